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
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import nibabel as nib
import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from .files import atomic_copy, atomic_write_text
from .provenance import file_sha256
from .dicom.results import RTConfig
from .dicom.rtstruct import check_clinical, read_rtstruct, training_label
from .dicom.scan import VIEW_FOLDER, DicomScanner, FoundStructureSet, link_view
from .dicom.series import read_ct_geometry
from .errors import ImageNotFoundError, InvalidInputError, StorageFullError
from .security import annotator_of
from .structures import ENCODINGS, MAX_STRUCTURES, Structures, normalise_name, voxels_of
from .transforms.labels import label_datalist_keys
from .transforms.validation import load_ct

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NIFTI = (".nii.gz", ".nii")
_SERIES_VIEW_EXT = ".dicom_series"  # marks an image that is a link folder under .dicom_series/
# A change on disk rescans the datastore this long after it: a series copied in is one rescan, not one a file.
RESCAN_DELAY_S = 1.0
# What the server records with each saved label; a client may not set these (PUT /datastore/label/info).
# ``encoding`` and ``structures`` say how the trainer reads the label: computed from the file at each save.
SERVER_LABEL_FIELDS = frozenset({"annotator", "version", "sha256", "previous_sha256", "ts", "name", "encoding",
                                 "structures"})  # fmt: skip
_VERSION_FILE = re.compile(r"v(\d+)_")  # .label_history/<tag>/<image>/v0001_<time>.json and its label copy


def _version(info: dict[str, Any]) -> int:
    """The version an index entry or history record names (0 when it names none it can)."""
    try:
        return int(info.get("version") or 0)
    except (TypeError, ValueError):
        return 0


def _newest_version(folder: str) -> int:
    """The newest version a label's history folder holds a file of (0 if none)."""
    if not os.path.isdir(folder):
        return 0
    return max((int(m.group(1)) for m in map(_VERSION_FILE.match, os.listdir(folder)) if m), default=0)


def _write_version(folder: str, info: dict[str, Any], source: str, ext: str) -> list[str]:
    """A history entry: a copy of ``source`` and its record ``info``, each atomic; none of it left if
    either fails. Returns both paths."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(info["ts"]))
    kept = os.path.join(folder, f"v{info['version']:04d}_{stamp}{ext}")
    paths = [kept, kept[: -len(ext)] + ".json"]
    try:
        atomic_copy(source, kept)
        atomic_write_text(json.dumps(info, indent=2), paths[1])
    except BaseException:
        _remove(paths)
        raise
    return paths


def _remove(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def _check_free_space(folder: str, needed: int) -> None:
    stats = os.statvfs(folder)
    if stats.f_bavail * stats.f_frsize < needed:
        raise OSError(errno.ENOSPC, f"{needed:,} bytes needed in {folder}")


def read_label_on_grid(label_filename: str, image_id: str, image_path: str, name: str | None = None) -> np.ndarray:
    """The label's data if it is a NIfTI of integer values on its image's grid; a 422 otherwise.

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
    return data


def check_label(
    label_filename: str, image_id: str, image_path: str, label_values: set[int], name: str | None = None
) -> np.ndarray:
    """``read_label_on_grid``, and a 422 naming any value not in ``label_values`` (a label map)."""
    data = read_label_on_grid(label_filename, image_id, image_path, name)
    unknown = {int(v) for v in np.unique(data)} - set(label_values)
    if unknown:
        raise InvalidInputError(f"label for '{image_id}' holds values {sorted(unknown)}; known: {sorted(label_values)}")
    return data


@dataclass(frozen=True)
class LabelContents:
    """How a saved label is encoded and which structures it contains (TG-263 name -> its value in the
    file: a label-map value, or bit value - 1), in the datastore's order. Recorded with the label
    (``encoding``, ``structures``) and read back by the trainer (``transforms.labels.label_datalist_keys``)."""

    encoding: str
    structures: dict[str, int]

    def masks(self, data: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Each contained structure's voxels (one at a time: a CT's worth of booleans each)."""
        values = np.asarray(data).astype(np.int64, copy=False)
        for name, value in self.structures.items():
            yield name, voxels_of(values, value, self.encoding)


def _named_values(label_info: Mapping[str, Any], known: Structures, image_id: str) -> dict[str, int] | None:
    """The structures a save names, TG-263 name -> value, from MONAI Label's ``label_names`` ({name:
    value}) or 3D Slicer's ``label_info`` ([{"name", "idx"}]); None if it names none. A 422 names any
    name that means no known structure (synonyms count), and values that are not one per structure."""
    names = label_info.get("label_names")
    if names is None and label_info.get("label_info") is not None:  # Slicer's onSaveLabel
        items = label_info["label_info"]
        if not isinstance(items, list) or not all(isinstance(i, Mapping) and {"name", "idx"} <= set(i) for i in items):
            raise InvalidInputError('label_info must be a list of {"name": ..., "idx": ...} (3D Slicer\'s form)')
        names = {str(i["name"]): i["idx"] for i in items}
    if names is None:
        return None
    if not isinstance(names, Mapping):
        raise InvalidInputError(f"label_names must be a JSON object {{name: value}}, not {type(names).__name__}")
    named: dict[str, int] = {}
    given: dict[str, str] = {}  # TG-263 name -> the name the client used
    unknown = []
    for raw, value in names.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"label_names: the value of {raw!r} must be a whole number >= 0, got {value!r}")
        if value == 0:
            if normalise_name(raw) == "background":
                continue  # MONAI Label's apps list the background too
            raise InvalidInputError(f"label_names: {raw!r} has value 0, which is the background")
        structure = known.find(str(raw))
        if structure is None:
            unknown.append(str(raw))
        elif structure.name in named:
            raise InvalidInputError(
                f"label_names {given[structure.name]!r} and {raw!r} both mean structure {structure.name}"
            )
        else:
            named[structure.name], given[structure.name] = value, str(raw)
    if unknown:
        raise InvalidInputError(
            f"label for '{image_id}' names structure{'s' if len(unknown) > 1 else ''} {unknown}, which "
            f"{'mean' if len(unknown) > 1 else 'means'} none this server knows: {known.names} (TG-263 names, "
            "synonyms)"
        )
    if not named:
        raise InvalidInputError(f"label_names for '{image_id}' names no structure")
    by_value: dict[int, list[str]] = {}
    for name, value in named.items():
        by_value.setdefault(value, []).append(name)
    if shared := {v: n for v, n in by_value.items() if len(n) > 1}:
        raise InvalidInputError(f"label_names give several structures one value: {shared}")
    return {name: named[name] for name in known.names if name in named}


def label_contents(data: np.ndarray, label_info: Mapping[str, Any], known: Structures, image_id: str) -> LabelContents:
    """Which of the ``known`` structures a label contains, from its data and the names the save gives
    (``label_names`` / Slicer's ``label_info``); a 422 naming what does not fit.

    - ``encoding`` ``labelmap`` (default; what viewers send): each voxel one value. With names, it
      contains the named structures and every value in it must be one of theirs; without, the known
      structures' own values, and it contains those whose values occur.
    - ``encoding`` ``bitmask`` (lossless, overlaps kept): bit value - 1 set where the voxel is in that
      structure; ``label_names`` are required, and every bit set must be one of theirs."""
    encoding = label_info.get("encoding") or "labelmap"
    if encoding not in ENCODINGS:
        raise InvalidInputError(f"label encoding {encoding!r} is not one of {ENCODINGS}")
    named = _named_values(label_info, known, image_id)
    values = {int(v) for v in np.unique(data)}
    if encoding == "labelmap":
        allowed = known.labels if named is None else named
        if unknown := sorted(values - {0, *allowed.values()}):
            whose = "this server's structures" if named is None else "label_names"
            raise InvalidInputError(
                f"label for '{image_id}' holds values {unknown}, which no structure has (values of {whose}: {allowed})"
            )
        if named is None:
            named = {name: value for name, value in known.labels.items() if value in values}
        return LabelContents("labelmap", named)
    if named is None:
        raise InvalidInputError(
            f"a bitmask label for '{image_id}' needs label_names: {{structure: value}}, the bit of each (value - 1)"
        )
    if too_wide := {n: v for n, v in named.items() if v > MAX_STRUCTURES}:
        raise InvalidInputError(f"label_names {too_wide}: a bitmask has bit values 1 to {MAX_STRUCTURES}")
    if values and min(values) < 0:
        raise InvalidInputError(f"bitmask label for '{image_id}' holds negative values")
    bits = 0
    for v in values:
        bits |= v
    unnamed = bits & ~sum(1 << (v - 1) for v in named.values())
    if unnamed:
        extra = [b + 1 for b in range(unnamed.bit_length()) if unnamed >> b & 1]
        raise InvalidInputError(
            f"bitmask label for '{image_id}' sets bit value{'s' if len(extra) > 1 else ''} {extra} (bit value - 1), "
            f"which no structure in label_names has: {named}"
        )
    return LabelContents("bitmask", named)


def check_structure_label(
    label_filename: str, image_id: str, image_path: str, label_info: Mapping[str, Any], known: Structures
) -> tuple[np.ndarray, LabelContents]:
    """A label a datastore may save: on its image's grid (``read_label_on_grid``) and of known
    structures (``label_contents``); a 422 naming the problem otherwise."""
    if "structures" in label_info:
        raise InvalidInputError(
            "label info 'structures' is recorded by the server from the label and the names it gives: "
            "name the label's structures with label_names {name: value}"
        )
    data = read_label_on_grid(label_filename, image_id, image_path)
    return data, label_contents(data, label_info, known, image_id)


def recorded_info(label_info: Mapping[str, Any], contents: LabelContents) -> dict[str, Any]:
    """The info saved with a label: what the client sent, the names it gave replaced by the structures
    they mean (``encoding``, ``structures``: server fields, never set any other way)."""
    info = {k: v for k, v in label_info.items() if k not in ("label_names", "label_info")}
    info.update(encoding=contents.encoding, structures=dict(contents.structures))
    return info


def structure_datalist(store: LocalDatastore, full_path: bool = True) -> list[dict[str, Any]]:
    """MONAI Label's training pairs, each with its label's ``label_datalist_keys`` (how it is encoded,
    which structures it contains), so the trainer decodes every label by its own structures."""
    tag = DefaultLabelTag.FINAL
    image_dir, label_dir = store._datastore.image_path(), store._datastore.label_path(tag)
    entries = []
    for image_id, obj in store._datastore.filter_by_tag(tag).items():
        label = obj.labels[tag]
        entry = {
            "image": os.path.realpath(os.path.join(image_dir, store._filename(image_id, obj.image.ext))),
            "label": os.path.realpath(os.path.join(label_dir, store._filename(image_id, label.ext))),
        }
        if not full_path:
            root = os.path.realpath(store._datastore_path)
            entry = {k: os.path.relpath(v, root) for k, v in entry.items()}
        entries.append({**entry, **label_datalist_keys(label.info)})
    return entries


def dataset_archive(store: LocalDatastore, limit_cases: int | None) -> str:
    """MONAI Label's dataset archive (``image/`` and ``label/`` of each training pair, ``metadata.json``
    with each label's info: its ``encoding`` and ``structures``); MONAI Label's own would add every key
    of a datalist entry as a file."""
    pairs = store.datalist()
    if not pairs:
        raise ImageNotFoundError("no labelled images to export: the dataset archive holds image-label pairs")
    if limit_cases and 0 < limit_cases < len(pairs):
        pairs = pairs[:limit_cases]
    fd, path = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, mode="w") as archive:
        for pair in pairs:
            for key in ("image", "label"):
                archive.write(pair[key], arcname=os.path.join(key, os.path.basename(pair[key])))
        archive.writestr("metadata.json", store._datastore.model_dump_json(exclude={"base_path"}))
    return path


class CTVDatastore(LocalDatastore):
    """LocalDatastore with validated, versioned, atomic label saves and an atomic JSON index.

    ``structures``: the structures labels may contain (the served models' together; a label-map value
    without names means the structure at that position). A saved label is a label map or a bitmask of
    them (``label_contents``), stored as uploaded.

    Images are NIfTI/NRRD files or DICOM CT series (``dicom/scan.py`` says how series are found).
    An RTSTRUCT that references a series and has ROIs meaning some of ``structures`` (synonyms count)
    becomes that series' ``final`` label, a bitmask of all of them, unless the series has one, so
    clinical contours train the model; only a clinician's (``rtstruct.training_label``): the others
    are listed with why in ``json()``.

    Label info records ``annotator`` (the ``annotator`` save param, else ``user``, else
    ``"unknown"``), ``version`` (1, 2, ... per image and tag), ``sha256``, ``previous_sha256``,
    ``encoding`` and ``structures`` (``SERVER_LABEL_FIELDS``). A label file whose bytes no version
    holds (put in labels/ by hand, or imported) becomes a version of its own before a save replaces it.
    """

    def __init__(
        self,
        datastore_path: str,
        structures: Structures | Iterable[str],
        rt_config: RTConfig | None = None,
        recover: bool = False,
        **kwargs,
    ):
        """``recover``: finish or undo saves a crash interrupted (the serving process only, at start)."""
        self.structures = structures if isinstance(structures, Structures) else Structures(structures)
        self.rt_config = rt_config or RTConfig()
        self._scanner = DicomScanner(datastore_path)
        self._structure_sets: list = []
        self._skipped_structure_sets: dict[str, dict[str, Any]] = {}  # path -> why it is not a label
        self.history_path = os.path.join(datastore_path, ".label_history")
        self._reconcile_lock = threading.RLock()  # the watcher's rescans and requests' refreshes, one at a time
        self._rescan_lock = threading.Lock()
        self._rescan_pending: threading.Timer | None = None
        super().__init__(datastore_path, **kwargs)
        if getattr(self, "_handler", None) is not None:
            self._watch_every_file()
        if recover and not kwargs.get("read_only"):
            self._recover_interrupted_saves()

    # --- the watcher ---------------------------------------------------------------------------
    def _watch_every_file(self) -> None:
        """MONAI Label's watcher reacts to NIfTI names only (a DICOM slice has any name, or none) and
        rescans in its own thread, which one exception ends for good. Here any change outside hidden
        folders schedules a rescan, which runs in a timer thread and logs what it cannot do."""
        handler = FileSystemEventHandler()
        handler.on_any_event = self._on_file_event
        self._observer.unschedule_all()
        self._handler = handler
        self._observer.schedule(handler, path=self._datastore_path, recursive=True)

    def _on_file_event(self, event: FileSystemEvent) -> None:
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if self._datastore_config_path in paths:  # the index: replaced by rename, or edited in place
            if event.event_type in ("moved", "modified"):
                if self._ignore_event_config:
                    self._ignore_event_config = False  # this process wrote it
                else:
                    self._init_from_datastore_file()
            return
        if event.event_type in ("opened", "closed_no_write") or all(map(self._is_hidden, paths)):
            return  # reads, and the server's own bookkeeping (.label_history, .dicom_series, temp files)
        with self._rescan_lock:
            if self._rescan_pending is None:  # else the pending rescan will see this change too
                self._rescan_pending = threading.Timer(RESCAN_DELAY_S, self._rescan)
                self._rescan_pending.daemon = True
                self._rescan_pending.start()

    def _is_hidden(self, path: str) -> bool:
        relative = os.path.relpath(path, self._datastore_path)
        return any(part.startswith(".") for part in relative.split(os.sep))

    def _rescan(self) -> None:
        with self._rescan_lock:
            self._rescan_pending = None  # a change from now on schedules the next rescan
        try:
            self.refresh()
        except Exception:  # the next change rescans again; the watcher must outlive any one failure
            logger.exception("datastore rescan failed")

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
        with self._reconcile_lock:
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
                check_clinical(structure_set, self.structures)
                if final:
                    raise InvalidInputError(f"'{image_id}' already has a final label, which is kept")
                geometry, headers = read_ct_geometry(self.get_image_uri(image_id))
                masks, used = training_label(
                    structure_set, geometry, headers, self.structures, self.rt_config.raster_rule
                )
            except Exception as e:
                skipped[found.path] = self._skip_structure_set(found, e)
                continue
            fd, tmp = tempfile.mkstemp(suffix=".nii.gz")
            os.close(fd)
            try:  # a bitmask: the structures a clinical set draws overlap (a CTV and the bladder wall)
                bitmask = self.structures.pack([masks.get(name) for name in self.structures.names])
                nib.save(nib.Nifti1Image(bitmask, geometry.affine), tmp)
                self.save_label(
                    image_id,
                    tmp,
                    "final",
                    {
                        "annotator": f"rtstruct:{found.label or found.sop_instance_uid}",
                        "source_rtstruct": found.sop_instance_uid,
                        "rois": used["rois"],
                        "raster_rule": self.rt_config.raster_rule,
                        "encoding": "bitmask",
                        "label_names": {name: v for name, v in self.structures.labels.items() if name in masks},
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

    def remove_image(self, image_id: str) -> None:
        """A DICOM image is one series: its files go, and its link folder, never the rest of its folder
        (MONAI Label deletes the folder: another series, an RT plan)."""
        obj = self._datastore.objects.get(image_id)
        if obj is None or obj.image.info.get("format") != "dicom":
            return super().remove_image(image_id)
        logger.info(f"Removing DICOM series {image_id}")
        for tag in list(obj.labels):
            self.remove_label(image_id, tag)
        folder = self.get_image_uri(image_id)
        with self._reconcile_lock:  # no rescan may see the series half gone
            for path in self._scanner.series_files(folder, str(obj.image.info.get("SeriesInstanceUID"))):
                os.unlink(path)
            if obj.image.ext == _SERIES_VIEW_EXT:
                shutil.rmtree(folder)  # links only
            elif not os.listdir(folder):
                os.rmdir(folder)
            with FileLock(self._lock_file):
                self._datastore.objects.pop(image_id, None)
                self._update_datastore_file(lock=False)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        return structure_datalist(self, full_path)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        return dataset_archive(self, limit_cases)

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
        label_info = dict(label_info or {})
        _, contents = check_structure_label(
            label_filename, image_id, self.get_image_uri(image_id), label_info, self.structures
        )

        info = recorded_info(label_info, contents)
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
        logger.info(
            f"label {label_tag}/{image_id} v{info['version']} saved by {info['annotator']}: "
            f"{contents.encoding} of {list(contents.structures)}"
        )
        return image_id

    def _write_label(self, image_id: str, label_filename: str, label_tag: str, info: dict[str, Any], ext: str) -> None:
        """History record, then the label file, then the index: each replaced atomically, in this
        order, so that ``_recover_interrupted_saves`` can finish or undo a save a crash stopped."""
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_dir, name)
        history = os.path.join(self.history_path, label_tag, image_id)
        with FileLock(self._lock_file):
            obj = self._datastore.objects[image_id]
            previous = obj.labels.get(label_tag)
            os.makedirs(label_dir, exist_ok=True)
            os.makedirs(history, exist_ok=True)
            _check_free_space(label_dir, 2 * os.path.getsize(label_filename) + (1 << 20))
            replaced = os.path.join(label_dir, self._filename(image_id, previous.ext)) if previous else None
            info["previous_sha256"] = None
            if replaced is not None and os.path.exists(replaced):
                info["previous_sha256"] = self._keep_unversioned(image_id, label_tag, previous, replaced)
            info["version"] = _newest_version(history) + 1
            info["ts"] = int(time.time())
            info["name"] = name
            written = _write_version(history, info, label_filename, ext)
            try:
                atomic_copy(label_filename, dest)
            except BaseException:  # the label file is unchanged: no trace of this save may remain
                _remove(written)
                raise
            if previous and previous.ext != ext:  # the same image's label under the other extension
                old = os.path.join(label_dir, self._filename(image_id, previous.ext))
                if os.path.exists(old):
                    os.unlink(old)

            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)

    def _keep_unversioned(self, image_id: str, label_tag: str, previous: DataModel, path: str) -> str:
        """The sha256 of the label file a save replaces, kept first as a version of its own if no
        version holds its bytes (put in labels/ by hand, or imported): a save must not destroy it."""
        sha = file_sha256(path)
        if any(r.get("sha256") == sha for r in self.label_history(image_id, label_tag)):
            return sha
        history = os.path.join(self.history_path, label_tag, image_id)
        found = {k: v for k, v in previous.info.items() if k not in SERVER_LABEL_FIELDS}
        found.update(annotator=str(previous.info.get("annotator") or "unknown"), version=_newest_version(history) + 1,
                     sha256=sha, previous_sha256=None, ts=int(os.path.getmtime(path)),
                     name=self._filename(image_id, previous.ext), found_on_disk=True)  # fmt: skip
        _check_free_space(history, os.path.getsize(path) + (1 << 20))
        _write_version(history, found, path, previous.ext)
        logger.warning(f"label {label_tag}/{image_id}: kept the file found on disk as v{found['version']} first")
        return sha

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

        A save writes its history record, then replaces the label file, then the index; saves run
        one at a time. The label file's bytes say which version it is (the newest record holding
        them). If the index names an older version, or that version with another sha256, the save
        replaced the label: the index rolls forward to the record. The version after the label
        file's, when it is the newest in the history and the index agrees with the label file, is a
        save that never replaced the label: its files are removed, as are temp files. Nothing else
        is ever deleted: an index that disagrees (edited, corrupted) can stop a removal, never cause one."""
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
                    if not os.path.exists(path):
                        continue
                    sha = file_sha256(path)
                    held = [r for r in self.label_history(image_id, tag) if r.get("sha256") == sha]
                    current = max(held, key=_version, default=None)
                    if current is None:
                        continue  # bytes no save wrote: the next save keeps them as a version
                    indexed = (_version(label.info), label.info.get("sha256"))
                    if indexed != (_version(current), sha) and _version(current) >= indexed[0]:
                        logger.warning(f"label {tag}/{image_id}: index rolled forward to v{_version(current)}")
                        kept = {k: v for k, v in label.info.items() if k not in SERVER_LABEL_FIELDS}
                        obj.labels[tag] = label = DataModel(info={**kept, **current}, ext=label.ext)
                        changed = True
                    if (_version(label.info), label.info.get("sha256")) == (_version(current), sha):
                        self._remove_unfinished_save(image_id, tag, _version(current))
            if changed:
                self._update_datastore_file(lock=False)

    def _remove_unfinished_save(self, image_id: str, tag: str, current: int) -> None:
        """The files of version ``current + 1`` (the label file holds ``current``), if it is the newest."""
        folder = os.path.join(self.history_path, tag, image_id)
        if _newest_version(folder) != current + 1:
            return
        for name in os.listdir(folder):
            match = _VERSION_FILE.match(name)
            if match and int(match.group(1)) == current + 1:
                logger.warning(f"removing {os.path.join(folder, name)}: its save never replaced the label")
                os.unlink(os.path.join(folder, name))

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
