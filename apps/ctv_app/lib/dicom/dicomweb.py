"""DICOMweb datastore (a PACS such as Orthanc): CT series in, SEG/RTSTRUCT results and labels out.

MONAI Label's DICOMWebDatastore, changed where a department needs it to be safe:
- a series is read as DICOM by this app's reader (geometry checks, HU), not converted by ITK;
- a series is downloaded to a partial folder and renamed when complete, so an interrupted
  download is never taken for the whole series;
- a saved label is checked against its series and the known structures (422 otherwise, as the
  folder datastore: ``datastore.check_structure_label``) before anything is sent, and the final
  label is stored in the PACS as a DICOM SEG written here (highdicom), marked MANUAL, one segment
  per structure the label contains (segments may overlap); training reads it back as a label of
  those structures;
- ``store_result`` sends an inference result (SEG or RTSTRUCT) back with STOW-RS.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from dicomweb_client import DICOMwebClient
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset
from watchdog.events import FileSystemEventHandler

from ..datastore import LabelContents, check_structure_label, dataset_archive, recorded_info, structure_datalist
from ..errors import CTVError, ImageNotFoundError, InvalidInputError
from ..security import annotator_of
from ..structures import Structures
from .seg import MANUFACTURER, read_seg, write_seg
from .series import read_ct_geometry

logger = logging.getLogger(__name__)


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreError(CTVError):
    """The PACS refused or could not be reached: the request cannot be completed now."""

    status_code = 502


class CTVDicomWebDatastore(DICOMWebDatastore):
    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        structures: Structures,
        cache_path: str | None = None,
        software_version: str = "unknown",
    ):
        """``structures``: those labels may contain (the served models' together), as ``CTVDatastore``."""
        self.structures = structures
        self.software_version = software_version
        super().__init__(client, search_filter, cache_path, fetch_by_frame=False, convert_to_nifti=False)
        if getattr(self, "_observer", None) is not None:
            # The cache holds only what this server fetched and wrote. MONAI Label's watcher rescans it
            # on every file written here, in its own thread, rebuilding label entries while a request
            # updates them (a SEG read back lost its structures' values that way). Only the index is
            # watched: another process of this server may rewrite it.
            handler = FileSystemEventHandler()
            handler.on_modified = self._on_modify_event
            self._observer.unschedule_all()
            self._observer.schedule(handler, path=self._datastore_path, recursive=False)

    # --- images --------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        """The series the search filter finds now, every page of them.

        monailabel caches this for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (2 h) in a cache shared by every
        instance and keyed by object identity: a CT sent to the PACS stayed unseen for hours, and a new
        datastore allocated where a freed one lived read the freed one's list."""
        found = self._client.search_for_series(search_filters=self._search_filter, get_remaining=True)
        return [str(Dataset.from_json(ds).SeriesInstanceUID) for ds in found]

    def _series_meta(self, series_uid: str) -> Dataset:
        found = [
            Dataset.from_json(s)
            for s in self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        ]
        found = [s for s in found if str(s.get("SeriesInstanceUID", "")) == series_uid]
        if not found:
            raise ImageNotFoundError(f"series '{series_uid}' is not in the DICOMweb store")
        return found[0]

    def get_image_uri(self, image_id: str) -> str:
        if not _UID.match(image_id or "") or len(image_id) > 64:
            raise ImageNotFoundError(f"'{image_id}' is not a SeriesInstanceUID")
        folder = os.path.join(self._datastore.image_path(), image_id)
        if not os.path.isdir(folder):
            self._download(image_id, folder)
        if image_id not in self._datastore.objects:  # the local index holds its labels
            with FileLock(self._lock_file):
                info = {"ts": int(time.time()), "name": image_id, "format": "dicom", "SeriesInstanceUID": image_id}
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=""))
                self._update_datastore_file(lock=False)
        return folder

    def _download(self, series_uid: str, folder: str) -> None:
        study_uid = str(self._series_meta(series_uid).StudyInstanceUID)
        partial = tempfile.mkdtemp(prefix=f".{series_uid[-16:]}.partial-", dir=os.path.dirname(folder))
        try:
            for instance in self._client.retrieve_series(study_uid, series_uid):
                instance.save_as(os.path.join(partial, f"{instance.SOPInstanceUID}.dcm"), write_like_original=False)
            os.replace(partial, folder)  # whole series or nothing
        except OSError:
            if os.path.isdir(folder):  # another request downloaded it first
                shutil.rmtree(partial, ignore_errors=True)
                return
            raise
        finally:
            if os.path.isdir(partial):
                shutil.rmtree(partial, ignore_errors=True)
        logger.info(f"downloaded series {series_uid} to {folder}")

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        meta = self._series_meta(image_id)
        info = {"SeriesInstanceUID": image_id, "format": "dicom"}
        for key in ("StudyInstanceUID", "PatientID", "Modality", "SeriesDescription", "StudyDate"):
            info[key] = str(meta.get(key, ""))
        return info

    def json(self) -> dict[str, Any]:
        """The series the PACS lists (QIDO), with what is known locally about their labels."""
        local = super().json()
        known = local.get("objects", {})
        objects = {
            uid: known.get(uid, {"image": {"info": {"SeriesInstanceUID": uid}, "ext": ""}, "labels": {}})
            for uid in self.list_images()
        }
        return {**local, "objects": objects}

    # --- labels and results --------------------------------------------------------------------
    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        folder = self.get_image_uri(image_id)
        converted = None
        if label_filename.endswith(".bin"):  # raw uint8 voxels from a viewer (OHIF's MONAI Label client)
            converted = label_filename = self._binary_to_nifti(label_filename, folder, image_id)
        try:
            label_info = dict(label_info or {})
            data, contents = check_structure_label(label_filename, image_id, folder, label_info, self.structures)
            info = recorded_info(label_info, contents)
            info["annotator"] = annotator_of(info)
            if label_tag == DefaultLabelTag.FINAL:
                if not contents.structures:
                    raise InvalidInputError(
                        f"label for '{image_id}' contains no structure: a SEG needs at least one (an empty "
                        "structure is saved by naming it in label_names)"
                    )
                geometry, headers = read_ct_geometry(folder)
                by_name = {s.name: s for s in self.structures}
                description = f"{', '.join(contents.structures)} by {info['annotator']}"
                if len(description) > 64:  # SeriesDescription (LO)
                    description = f"{len(contents.structures)} structures by {info['annotator']}"[:64]
                fd, seg_path = tempfile.mkstemp(suffix=".dcm")
                os.close(fd)
                try:
                    write_seg(
                        [(by_name[name], mask) for name, mask in contents.masks(data)], geometry, headers, seg_path,
                        None, self.software_version, series_description=description,
                    )  # fmt: skip
                    info.update(self.store_result(seg_path))
                finally:
                    os.unlink(seg_path)
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, info)
        finally:
            if converted:
                os.unlink(converted)

    @staticmethod
    def _binary_to_nifti(path: str, folder: str, image_id: str) -> str:
        """Raw uint8 voxels in the series' order (column fastest, then row, then slice along the normal)."""
        geometry = read_ct_geometry(folder)[0]
        data = np.fromfile(path, dtype=np.uint8)
        if data.size != int(np.prod(geometry.shape)):
            raise InvalidInputError(
                f"label for '{image_id}' has {data.size} voxels; its series has {int(np.prod(geometry.shape))} "
                f"{tuple(geometry.shape)}"
            )
        out = path[: -len(".bin")] + ".nii.gz"
        nib.save(nib.Nifti1Image(data.reshape(geometry.shape, order="F"), geometry.affine), out)
        return out

    def store_result(self, path: str) -> dict[str, Any]:
        """STOW-RS one DICOM file; returns what the PACS now holds."""
        ds = pydicom.dcmread(path)
        try:
            response = self._client.store_instances([ds])
        except Exception as e:
            raise StoreError(f"the DICOMweb store refused {ds.Modality} {ds.SOPInstanceUID}: {e}") from e
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise StoreError(f"the DICOMweb store refused {ds.Modality} {ds.SOPInstanceUID}: {failed}")
        logger.info(f"stored {ds.Modality} {ds.SOPInstanceUID} (series {ds.SeriesInstanceUID})")
        return {
            "stored": True,
            "Modality": str(ds.Modality),
            "StudyInstanceUID": str(ds.StudyInstanceUID),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SOPInstanceUID": str(ds.SOPInstanceUID),
        }

    def _label_segs(self) -> dict[str, str]:
        """image series -> its label: the newest clinician SEG (not AUTOMATIC) written by this server.

        Model output stored back with ``store_result`` is AUTOMATIC and never counts as a label.
        SEGs from other writers are not trusted as labels: the OHIF v3 build bundled with monailabel
        0.8.5 stores its segmentations with the frames in reverse slice order (seen in
        tests/test_ohif.py), which would train the model on mirrored contours. Labels from a viewer
        come in through ``PUT /datastore/label`` and are written here."""
        images = set(self.list_images())
        newest: dict[str, tuple[tuple[str, str], str]] = {}
        for found in self._client.search_for_series(search_filters={"Modality": "SEG"}, get_remaining=True):
            series = Dataset.from_json(found)
            meta = Dataset.from_json(
                self._client.retrieve_series_metadata(str(series.StudyInstanceUID), str(series.SeriesInstanceUID))[0]
            )
            types = {str(s.get("SegmentAlgorithmType", "")) for s in meta.get("SegmentSequence", [])}
            refs = meta.get("ReferencedSeriesSequence")
            if not types or "AUTOMATIC" in types or not refs:
                continue
            if str(meta.get("Manufacturer", "")) != MANUFACTURER:
                logger.info(f"SEG {series.SeriesInstanceUID} by '{meta.get('Manufacturer', '')}' not used as a label")
                continue
            image = str(refs[0].SeriesInstanceUID)
            stamp = (str(meta.get("ContentDate", meta.get("SeriesDate", ""))), str(meta.get("ContentTime", "")))
            if image in images and (image not in newest or stamp >= newest[image][0]):
                newest[image] = (stamp, str(series.SeriesInstanceUID))
        return {image: seg for image, (_, seg) in newest.items()}

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(self._label_segs())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labelled = self._label_segs()
        return [uid for uid in self.list_images() if uid not in labelled]

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Training pairs: each labelled series and its newest clinician SEG, as NIfTI of its structures."""
        for image, seg in self._label_segs().items():
            self.get_label_uri(seg, DefaultLabelTag.FINAL, image_id=image)
        return structure_datalist(self, full_path)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        return dataset_archive(self, limit_cases)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """With ``image_id``: the SEG series ``label_id`` from the PACS as NIfTI on the image's grid, a
        label of the structures its segments mean: a label map in the known structures' values, or a
        bitmask where segments overlap; the index records which (``encoding``, ``structures``).
        Without: the local label of image ``label_id`` (MONAI Label's usual meaning)."""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        label_dir = os.path.join(self._datastore.label_path(label_tag), label_id)
        if not os.path.isdir(label_dir) or not os.listdir(label_dir):
            self._download(label_id, label_dir)
        image_folder = self.get_image_uri(image_id)
        geometry, headers = read_ct_geometry(image_folder)
        seg_file = os.path.join(label_dir, sorted(os.listdir(label_dir))[0])
        data, contents = self._encode(read_seg(seg_file, headers, self.structures), geometry.shape)
        path = os.path.join(self._datastore.label_path(label_tag), f"{image_id}.nii.gz")
        nib.save(nib.Nifti1Image(data, geometry.affine), path + ".tmp.nii.gz")
        os.replace(path + ".tmp.nii.gz", path)
        with FileLock(self._lock_file):  # the index may be reloaded from another process's write until then
            obj = self._datastore.objects[image_id]  # get_image_uri indexed it
            label = obj.labels.get(label_tag)
            if label is None or label.info.get("SeriesInstanceUID") != label_id:
                # a SEG stored by someone else, or a newer one: index it
                info = {"ts": int(time.time()), "name": os.path.basename(path), "SeriesInstanceUID": label_id}
            else:  # the SEG a save here stored: keep what the save recorded
                info = dict(label.info)
            info.update(encoding=contents.encoding, structures=contents.structures)  # what the file now holds
            if label is None or info != label.info:
                obj.labels[label_tag] = DataModel(info=info, ext=".nii.gz")
                self._update_datastore_file(lock=False)
        return path

    def _encode(self, masks: dict[str, np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, LabelContents]:
        """Structure masks as one label file: a label map in the known structures' values, which viewers
        read, unless two overlap; then the lossless bitmask."""
        values = {name: self.structures.value(name) for name in masks}
        covered = np.zeros(shape, np.uint8)
        for mask in masks.values():
            covered += mask
        if covered.max(initial=0) > 1:
            return self.structures.pack([masks.get(n) for n in self.structures.names]), LabelContents("bitmask", values)
        labelmap = np.zeros(shape, np.uint8)
        for name, mask in masks.items():
            labelmap[mask] = values[name]
        return labelmap, LabelContents("labelmap", values)
