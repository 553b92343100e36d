"""The folder datastore, made safe for corrected contours.

MONAI Label's LocalDatastore copies a saved label over the previous one and rewrites its JSON
index in place: a crash mid-save can leave a half-written label or index, and the previous
correction is gone. Here a label is checked against its image first (readable, same grid, known
label values), every saved version is kept under ``.label_history/``, and the label file and
the index are replaced by atomic rename after fsync.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterable

import nibabel as nib
import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from .checkpoint import file_sha256
from .dicom.results import RTConfig
from .dicom.rtstruct import check_clinical, read_rtstruct, training_label
from .dicom.scan import VIEW_FOLDER, DicomScanner, FoundStructureSet, link_view
from .dicom.series import read_ct_geometry
from .errors import ImageNotFoundError, InvalidInputError, StorageFullError
from .security import annotator_of
from .transforms.validation import load_ct

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NIFTI = (".nii.gz", ".nii")
_SERIES_VIEW_EXT = ".dicom_series"  # marks an image that is a link folder under .dicom_series/


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_copy(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` so that ``dest`` is either the old file or the whole new one."""
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, dest: str) -> None:
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_free_space(folder: str, needed: int) -> None:
    stats = os.statvfs(folder)
    if stats.f_bavail * stats.f_frsize < needed:
        raise OSError(errno.ENOSPC, f"{needed:,} bytes needed in {folder}")


def check_label(
    label_filename: str, image_id: str, image_path: str, label_values: set[int], name: str | None = None
) -> np.ndarray:
    """The label's data if it is a NIfTI of known integer values on its image's grid; a 422 otherwise.

    ``image_path`` is a NIfTI file or a DICOM series folder (skipped if it does not exist); ``name``:
    what the client called the file, shown in messages instead of the server's (temporary) path."""
    try:
        label = nib.load(label_filename)
        data = np.asanyarray(label.dataobj)
    except Exception as e:
        why = str(e).replace(label_filename, name or "the upload")
        named = f" {name!r}" if name else ""
        raise InvalidInputError(f"label{named} for '{image_id}' is not a readable NIfTI file: {why}") from e
    if os.path.isdir(image_path):
        geometry = read_ct_geometry(image_path)[0]
        shape, affine = geometry.shape, geometry.affine
    elif os.path.isfile(image_path):
        image = nib.load(image_path)
        shape, affine = image.shape[:3], image.affine
    else:
        shape = affine = None
    if shape is not None:
        if tuple(label.shape) != tuple(shape):
            raise InvalidInputError(
                f"label shape {tuple(label.shape)} does not match image '{image_id}' shape {tuple(shape)}"
            )
        if not np.allclose(label.affine, affine, atol=1e-3):
            raise InvalidInputError(f"label for '{image_id}' is not on its image's grid (the affines differ)")
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
        raise InvalidInputError(f"label for '{image_id}' must hold integer label values")
    unknown = {int(v) for v in np.unique(data)} - set(label_values)
    if unknown:
        raise InvalidInputError(
            f"label for '{image_id}' holds values {sorted(unknown)}; known: {sorted(label_values)}"
        )
    return data


class CTVDatastore(LocalDatastore):
    """LocalDatastore with validated, versioned, atomic label saves and an atomic JSON index.

    Images are NIfTI/NRRD files or DICOM CT series (``dicom/scan.py`` says how series are found).
    An RTSTRUCT that references a series and names an ROI in ``rt_config.roi_labels`` becomes
    that series' ``final`` label unless it already has one, so clinical contours train the model;
    only a clinician's (``rtstruct.training_label``): the others are listed with why in ``json()``.

    Label info records ``annotator`` (the ``annotator`` save param, else ``user``, else
    ``"unknown"``), ``version`` (1, 2, ... per image and tag), ``sha256`` and ``previous_sha256``
    (``SERVER_LABEL_FIELDS``). A label file whose bytes no version holds (put in labels/ by hand, or
    imported) becomes a version of its own before a save replaces it.
    """

    def __init__(
        self,
        datastore_path: str,
        label_values: Iterable[int],
        rt_config: RTConfig | None = None,
        recover: bool = False,
        **kwargs,
    ):
        """``recover``: finish or undo saves a crash interrupted (the serving process only, at start)."""
        self.label_values = {0, *(int(v) for v in label_values)}
        self.rt_config = rt_config or RTConfig()
        self._scanner = DicomScanner(datastore_path)
        self._structure_sets: list = []
        self._skipped_structure_sets: dict[str, dict[str, Any]] = {}  # path -> why it is not a label
        self.history_path = os.path.join(datastore_path, ".label_history")
        super().__init__(datastore_path, **kwargs)
        if getattr(self, "_handler", None) is not None:
            self._handler.on_moved = self._on_moved_event  # the index is replaced by rename
        if recover and not kwargs.get("read_only"):
            self._recover_interrupted_saves()

    def _on_moved_event(self, event) -> None:
        if getattr(event, "dest_path", None) == self._datastore_config_path and not self._ignore_event_config:
            self._init_from_datastore_file()
        self._ignore_event_config = False

    # --- DICOM series and clinical structure sets -----------------------------------------------
    def _filename(self, id: str, ext: str) -> str:
        return os.path.join(VIEW_FOLDER, id) if ext == _SERIES_VIEW_EXT else id + ext

    def _add_non_existing_images(self) -> int:
        invalidate = super()._add_non_existing_images()
        found, self._structure_sets = self._scanner.scan(skip={"labels"})
        for series in found:
            if not series.in_own_folder:
                link_view(series)
            if series.image_id in self._datastore.objects:
                continue
            ext = "" if series.in_own_folder else _SERIES_VIEW_EXT
            info = {
                "ts": int(time.time()),
                "name": self._filename(series.image_id, ext),
                "format": "dicom",
                "SeriesInstanceUID": series.series_uid,
                "slices": len(series.files),
            }
            logger.info(f"Adding DICOM series {series.image_id} ({len(series.files)} files)")
            self._datastore.objects[series.image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            invalidate += 1
        return invalidate

    def _reconcile_datastore(self) -> None:
        super()._reconcile_datastore()
        self._import_structure_sets()

    def _import_structure_sets(self) -> None:
        """Clinical RTSTRUCTs become ``final`` labels of the series they reference (never overwriting one).

        Why each other one did not is logged (once) and listed by ``json()``."""
        by_series = {
            obj.image.info.get("SeriesInstanceUID"): image_id for image_id, obj in self._datastore.objects.items()
        }
        skipped: dict[str, dict[str, Any]] = {}
        for found in self._structure_sets:
            image_id = by_series.get(found.referenced_series_uid)
            final = self._datastore.objects[image_id].labels.get("final") if image_id else None
            if final and final.info.get("source_rtstruct") == found.sop_instance_uid:
                continue  # imported before
            try:  # one bad clinical file must not stop the server
                if image_id is None:
                    raise InvalidInputError(f"its series {found.referenced_series_uid} is not in this datastore")
                structure_set = read_rtstruct(found.path)
                check_clinical(structure_set, self.rt_config.roi_labels)
                if final:
                    raise InvalidInputError(f"'{image_id}' already has a final label, which is kept")
                geometry, headers = read_ct_geometry(self.get_image_uri(image_id))
                mask, used = training_label(
                    structure_set, geometry, headers, self.rt_config.roi_labels, self.rt_config.raster_rule
                )
            except Exception as e:
                skipped[found.path] = self._skip_structure_set(found, e)
                continue
            fd, tmp = tempfile.mkstemp(suffix=".nii.gz")
            os.close(fd)
            try:
                nib.save(nib.Nifti1Image(mask, geometry.affine), tmp)
                self.save_label(
                    image_id,
                    tmp,
                    "final",
                    {
                        "annotator": f"rtstruct:{found.label or found.sop_instance_uid}",
                        "source_rtstruct": found.sop_instance_uid,
                        "rois": used["rois"],
                        "raster_rule": self.rt_config.raster_rule,
                    },
                )
                logger.info(f"RTSTRUCT {found.path} imported as the final label of {image_id}: {used['rois']}")
            except Exception as e:
                skipped[found.path] = self._skip_structure_set(found, e)
            finally:
                os.unlink(tmp)
        self._skipped_structure_sets = skipped

    def _skip_structure_set(self, found: FoundStructureSet, reason: Exception) -> dict[str, Any]:
        """The listing entry of a structure set that is not a label; logged when its reason is new."""
        entry = {
            "file": os.path.relpath(found.path, self._datastore_path),
            "sop_instance_uid": found.sop_instance_uid,
            "referenced_series": found.referenced_series_uid,
            "reason": str(reason),
        }
        if self._skipped_structure_sets.get(found.path) != entry:
            logger.warning(f"RTSTRUCT {found.path} is not a training label: {reason}")
        return entry

    def json(self) -> dict[str, Any]:
        """The listing (``/datastore/?output=all``), with the structure sets that are not labels and why."""
        listing = super().json()
        listing["skipped_structure_sets"] = list(self._skipped_structure_sets.values())
        return listing

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if not _SAFE_NAME.match(image_id or ""):
            raise InvalidInputError(f"image id {image_id!r} is not a plain name (letters, digits, _ . -)")
        load_ct(image_filename)  # a 422 naming the problem, before anything is stored
        return super().add_image(image_id, image_filename, image_info)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        if not self.datalist():
            raise ImageNotFoundError("no labelled images to export: the dataset archive holds image-label pairs")
        return super().get_dataset_archive(limit_cases)

    # --- labels --------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not _SAFE_NAME.match(label_tag or ""):
            raise InvalidInputError(f"label tag {label_tag!r} is not a plain name (letters, digits, _ . -)")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundError(f"image '{image_id}' is not in the datastore")
        ext = next((e for e in _NIFTI if label_filename.endswith(e)), None)
        if ext is None:
            raise InvalidInputError(f"label for '{image_id}' must be a NIfTI file (.nii or .nii.gz)")
        self._check_label(image_id, label_filename)

        info = dict(label_info or {})
        info["annotator"] = annotator_of(info)
        info["sha256"] = file_sha256(label_filename)

        self._init_from_datastore_file()  # pick up other processes' changes (it takes the lock itself)
        try:
            self._write_label(image_id, label_filename, label_tag, info, ext)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StorageFullError(
                f"label for '{image_id}' not saved: the datastore's disk is full; the previous version is unchanged"
            ) from e
        logger.info(f"label {label_tag}/{image_id} v{info['version']} saved by {info['annotator']}")
        return image_id

    def _write_label(self, image_id: str, label_filename: str, label_tag: str, info: dict[str, Any], ext: str) -> None:
        """History record, then the label file, then the index: each replaced atomically, in this
        order, so that ``_recover_interrupted_saves`` can finish or undo a save a crash stopped."""
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_dir, name)
        with FileLock(self._lock_file):
            obj = self._datastore.objects[image_id]
            previous = obj.labels.get(label_tag)
            info["version"] = int(previous.info.get("version", 1)) + 1 if previous else 1
            info["previous_sha256"] = previous.info.get("sha256") if previous else None
            info["ts"] = int(time.time())
            info["name"] = name

            os.makedirs(label_dir, exist_ok=True)
            history = os.path.join(self.history_path, label_tag, image_id)
            os.makedirs(history, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(info["ts"]))
            kept = os.path.join(history, f"v{info['version']:04d}_{stamp}{ext}")
            record = kept[: -len(ext)] + ".json"
            _check_free_space(label_dir, 2 * os.path.getsize(label_filename) + (1 << 20))
            try:
                atomic_copy(label_filename, kept)
                atomic_write_text(json.dumps(info, indent=2), record)
                atomic_copy(label_filename, dest)
            except BaseException:  # the label file is unchanged: no trace of this save may remain
                for path in (kept, record):
                    if os.path.exists(path):
                        os.unlink(path)
                raise
            if previous and previous.ext != ext:  # the same image's label under the other extension
                old = os.path.join(label_dir, self._filename(image_id, previous.ext))
                if os.path.exists(old):
                    os.unlink(old)

            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)

    def label_history(self, image_id: str, label_tag: str) -> list[dict[str, Any]]:
        """Every saved version of a label, oldest first (the info recorded with each)."""
        folder = os.path.join(self.history_path, label_tag, image_id)
        if not os.path.isdir(folder):
            return []
        versions = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    versions.append(json.load(f))
        return versions

    def _recover_interrupted_saves(self) -> None:
        """Finish or undo saves that a crash (kill -9, power cut) stopped midway.

        A save writes its history record, then replaces the label file, then the index. A label
        file whose sha256 is not the index's but is in its history was fully replaced: the index
        rolls forward to that record. History records newer than the index's version belong to
        saves that never replaced the label: they and any temp files are removed."""
        with FileLock(self._lock_file):  # another process of this server may be mid-save
            for folder in (self._datastore_path, self._datastore.label_path(None), self.history_path):
                for root, _, files in os.walk(folder):
                    for name in files:
                        if name.startswith(".tmp-"):
                            logger.warning(f"removing {os.path.join(root, name)}, left by an interrupted save")
                            os.unlink(os.path.join(root, name))
                    if root == self._datastore_path:
                        break  # the images themselves are not walked
            changed = False
            for image_id, obj in self._datastore.objects.items():
                for tag, label in obj.labels.items():
                    path = os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext))
                    if not os.path.exists(path) or not label.info.get("sha256"):
                        continue
                    sha = file_sha256(path)
                    if sha != label.info["sha256"]:
                        newer = [
                            r for r in self.label_history(image_id, tag)
                            if r.get("sha256") == sha and r.get("version", 0) > label.info.get("version", 0)
                        ]  # fmt: skip
                        record = max(newer, key=lambda r: r["version"], default=None)
                        if record is not None:
                            version = record["version"]
                            logger.warning(f"label {tag}/{image_id}: completing interrupted save of v{version}")
                            obj.labels[tag] = label = DataModel(info=record, ext=label.ext)
                            changed = True
                    self._remove_unfinished_history(image_id, tag, int(label.info.get("version", 0)))
            if changed:
                self._update_datastore_file(lock=False)

    def _remove_unfinished_history(self, image_id: str, tag: str, version: int) -> None:
        folder = os.path.join(self.history_path, tag, image_id)
        if not os.path.isdir(folder):
            return
        recorded = {n[:5] for n in os.listdir(folder) if n.endswith(".json") and int(n[1:5]) <= version}
        for name in os.listdir(folder):
            if name[:5] not in recorded:
                logger.warning(f"removing {os.path.join(folder, name)}: its save never completed")
                os.unlink(os.path.join(folder, name))

    def _check_label(self, image_id: str, label_filename: str) -> None:
        check_label(label_filename, image_id, self.get_image_uri(image_id), self.label_values)

    # --- the JSON index --------------------------------------------------------------------------
    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(text, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
