"""RTSTRUCT: write structures (a mask each) as an RT Structure Set on their CT series, read one back,
and decide whether a structure set may become a training label (``training_label``).

Contour convention (written and read): every boundary of a label on a slice is its own
CLOSED_PLANAR contour, outer boundaries and hole boundaries alike, with no keyhole cuts. A point
belongs to the ROI when it lies inside an odd number of that slice's contours (even-odd rule),
so a hole is a contour inside a contour and an island in a hole is a third one. This is the rule
Eclipse, RayStation and plastimatch's ``--xor-contours`` apply. Contours pass half-way between
voxel centres (marching squares at 0.5), so filling them by voxel centre gives the mask back.

Reading has two rules for which voxels a contour covers. ``centre`` (default): voxels whose centre
is inside; unbiased in area, and exact for what this module writes. ``touch``: also every voxel a
contour line passes through, as tools built on OpenCV's fillPoly (rt-utils and others) rasterise;
it adds about half a voxel all round, which is 10-15% of the volume of a spinal cord.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from skimage.draw import polygon as fill_polygon
from skimage.measure import approximate_polygon, find_contours

from ..errors import InvalidInputError
from .seg import MANUFACTURER, MANUFACTURER_MODEL_NAME
from .series import LPS_TO_RAS, CTGeometry

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RASTER_RULES = ("centre", "touch")
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # what RT systems put in RTReferencedStudySequence
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)  # fmt: skip


@dataclass
class ROI:
    """One structure to write: its name, its voxels and how it is drawn.

    ``mask`` is boolean (i, j, k) on the CT series' grid; structures may overlap (a PTV holds its CTV)."""

    name: str
    mask: np.ndarray
    colour: tuple[int, int, int] = (255, 128, 0)
    interpreted_type: str = "CTV"


@dataclass
class StructureROI:
    """A structure read from an RTSTRUCT: its contours as (N, 3) LPS point arrays."""

    number: int
    name: str
    colour: tuple[int, int, int] | None
    interpreted_type: str
    contours: list[np.ndarray] = field(default_factory=list)
    generation_algorithm: str = ""  # ROIGenerationAlgorithm: AUTOMATIC, SEMIAUTOMATIC, MANUAL or ""


@dataclass
class StructureSet:
    label: str
    frame_of_reference_uid: str
    referenced_series_uid: str | None
    rois: list[StructureROI]
    manufacturer: str = ""
    approval_status: str = ""  # APPROVED, UNAPPROVED, REJECTED or "" (no RT Approval module)

    def roi(self, name: str) -> StructureROI:
        for r in self.rois:
            if r.name == name:
                return r
        raise KeyError(name)


def _lps_affine(geometry: CTGeometry) -> np.ndarray:
    return LPS_TO_RAS @ geometry.affine  # the flip is its own inverse


def slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of a 2-D (i, j) mask as (N, 2) voxel coordinates, first point not repeated."""
    padded = np.pad(mask2d.astype(np.uint8), 1)
    contours = []
    for c in find_contours(padded, 0.5):
        c = approximate_polygon(c - 1.0, tolerance=0.0)  # drops only collinear points
        if len(c) >= 4:
            contours.append(c[:-1])
    return contours


def write_rtstruct(
    rois: Sequence[ROI],
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    path: str,
    structure_set_label: str = "CTV_AUTO",
    description: str = "",
    software_versions: Sequence[str] = (),
    series_description: str = "",
) -> Dataset:
    """Write ``rois`` (each its own mask on ``geometry``) as an UNAPPROVED, AUTOMATIC RTSTRUCT."""
    for roi in rois:
        if tuple(roi.mask.shape) != tuple(geometry.shape):
            raise InvalidInputError(f"{roi.name}: mask shape {roi.mask.shape} is not the series shape {geometry.shape}")
    ct = headers[0]
    lps = _lps_affine(geometry)
    now = datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 901, 1
    ds.SeriesDescription = (series_description or f"AUTO-GENERATED {', '.join(r.name for r in rois)} UNAPPROVED")[:64]
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MANUFACTURER_MODEL_NAME
    ds.SoftwareVersions = list(software_versions) or ["unknown"]
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    # Frame of Reference module (the RT Structure Set IOD requires it): the CT's own frame.
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetName = "CTV auto-contour"
    ds.StructureSetDescription = description[:1024]
    ds.ApprovalStatus = "UNAPPROVED"

    contour_images = []
    for h in headers:
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        contour_images.append(item)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence(contour_images)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = ct.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = ct.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi_items, contour_items, observation_items = [], [], []
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = ct.FrameOfReferenceUID
        item.ROIName = roi.name
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(item)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = roi.interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(roi.colour)
        contours = []
        for k in range(roi.mask.shape[2]):
            for c in slice_contours(roi.mask[:, :, k]):
                voxels = np.column_stack([c[:, 0], c[:, 1], np.full(len(c), k), np.ones(len(c))])
                points = (lps @ voxels.T).T[:, :3]
                contour = Dataset()
                image_ref = Dataset()
                image_ref.ReferencedSOPClassUID = headers[k].SOPClassUID
                image_ref.ReferencedSOPInstanceUID = headers[k].SOPInstanceUID
                contour.ContourImageSequence = DicomSequence([image_ref])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = [f"{v:.3f}" for v in points.ravel()]
                contours.append(contour)
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.save_as(path, write_like_original=False)
    return ds


def read_rtstruct(source: str | Dataset) -> StructureSet:
    """ROI names, colours, interpreted types and contours (LPS mm) of an RTSTRUCT file."""
    ds = pydicom.dcmread(source) if isinstance(source, (str, os.PathLike)) else source
    name = os.path.basename(str(source)) if isinstance(source, (str, os.PathLike)) else "RTSTRUCT"
    if str(ds.get("Modality")) != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise InvalidInputError(f"{name} is not an RT Structure Set (Modality {ds.get('Modality')})")
    series_uid = None
    frame_uids = [str(ds.get("FrameOfReferenceUID", ""))]  # the Frame of Reference module, where present
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frame_uids.insert(0, str(frame.get("FrameOfReferenceUID", "")))
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                series_uid = series_uid or str(series.SeriesInstanceUID)
    frame_uids += [str(item.get("ReferencedFrameOfReferenceUID", "")) for item in ds.StructureSetROISequence]
    observations = ds.get("RTROIObservationsSequence", [])
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "")) for o in observations}
    contours_by_roi: dict[int, Dataset] = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", [])}
    rois = []
    for item in ds.StructureSetROISequence:
        number = int(item.ROINumber)
        roi_contour = contours_by_roi.get(number)
        colour = None
        if roi_contour and "ROIDisplayColor" in roi_contour:
            colour = tuple(int(v) for v in roi_contour.ROIDisplayColor)
        algorithm = str(item.get("ROIGenerationAlgorithm", "")).strip().upper()
        roi = StructureROI(number, str(item.ROIName), colour, types.get(number, ""), generation_algorithm=algorithm)
        for contour in (roi_contour.get("ContourSequence", []) if roi_contour else []):
            if str(contour.get("ContourGeometricType", "")) not in ("CLOSED_PLANAR", ""):
                continue  # points and open lines have no inside
            roi.contours.append(np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3))
        rois.append(roi)
    return StructureSet(
        str(ds.get("StructureSetLabel", "")),
        next((uid for uid in frame_uids if uid.strip()), ""),
        series_uid,
        rois,
        manufacturer=str(ds.get("Manufacturer", "")),
        approval_status=str(ds.get("ApprovalStatus", "")).strip().upper(),
    )


def _touched_voxels(ij: np.ndarray, cols: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) indices of the voxels a closed polygon's edges pass through (sampled every 0.05 voxel)."""
    closed = np.vstack([ij, ij[:1]])
    samples = []
    for a, b in zip(closed[:-1], closed[1:]):
        n = max(2, int(np.ceil(np.abs(b - a).max() / 0.05)) + 1)
        samples.append(a + np.linspace(0.0, 1.0, n)[:, None] * (b - a))
    idx = np.unique(np.floor(np.vstack(samples) + 0.5).astype(int), axis=0)
    idx = idx[(idx[:, 0] >= 0) & (idx[:, 0] < cols) & (idx[:, 1] >= 0) & (idx[:, 1] < rows)]
    return idx[:, 0], idx[:, 1]


def rasterise(
    structure_set: StructureSet,
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    roi_labels: Mapping[str, int],
    rule: str = "centre",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Label mask (i, j, k) on the CT grid from the ROIs named in ``roi_labels`` (case-insensitive).

    Returns the mask and what was used: ``{"rois": {name: value}, "ignored": [names], "voxels": {name:
    voxels it covers}, "off_series": {name: contours on no slice of the series}}``. ROIs later in
    ``roi_labels`` win where structures overlap. ``rule`` is ``centre`` or ``touch`` (module doc).
    """
    if rule not in RASTER_RULES:
        raise InvalidInputError(f"unknown rasterisation rule {rule!r}; use one of {RASTER_RULES}")
    ct_frame = str(headers[0].get("FrameOfReferenceUID", ""))
    if structure_set.frame_of_reference_uid and structure_set.frame_of_reference_uid != ct_frame:
        raise InvalidInputError(
            f"the RTSTRUCT is drawn in frame of reference {structure_set.frame_of_reference_uid}, "
            f"the CT series is in {ct_frame}"
        )
    wanted = {k.lower(): (rank, int(v)) for rank, (k, v) in enumerate(roi_labels.items())}
    matched = sorted(
        ((wanted[r.name.lower()], r) for r in structure_set.rois if r.name.lower() in wanted), key=lambda x: x[0][0]
    )
    mask = np.zeros(geometry.shape, dtype=np.uint8)
    to_voxel = np.linalg.inv(_lps_affine(geometry))
    half_gap = 0.5 * float(np.median(np.diff(geometry.positions_mm))) if len(geometry.positions_mm) > 1 else 1.0
    cols, rows = geometry.shape[0], geometry.shape[1]
    voxels_of, off_series = {}, {}
    for (_, value), roi in matched:
        inside = np.zeros(geometry.shape, dtype=bool)
        touched = np.zeros(geometry.shape, dtype=bool)
        for points in roi.contours:
            distance = float(np.mean(points @ geometry.normal))
            k = int(np.argmin(np.abs(geometry.positions_mm - distance)))
            if abs(geometry.positions_mm[k] - distance) > half_gap:
                off_series[roi.name] = off_series.get(roi.name, 0) + 1  # drawn on no slice of this series
                continue
            voxels = (to_voxel @ np.column_stack([points, np.ones(len(points))]).T).T
            rr, cc = fill_polygon(voxels[:, 1], voxels[:, 0], shape=(rows, cols))
            inside[cc, rr, k] ^= True  # even-odd: a contour inside a contour is a hole
            if rule == "touch":
                touched[_touched_voxels(voxels[:, :2], cols, rows) + (k,)] = True
        mask[inside | touched] = value
        voxels_of[roi.name] = int((inside | touched).sum())
    used = {roi.name: value for (_, value), roi in matched}
    ignored = [r.name for r in structure_set.rois if r.name not in used]
    return mask, {"rois": used, "ignored": ignored, "voxels": voxels_of, "off_series": off_series}


def check_clinical(structure_set: StructureSet, roi_labels: Mapping[str, int]) -> None:
    """InvalidInputError saying why, unless ``structure_set`` holds a clinician's contours of ROIs in ``roi_labels``.

    A training label must be a clinician's contour: not this server's own output, not AUTOMATIC
    unless a clinician APPROVED the set, not REJECTED. Every ROI it uses must have contours in a
    stated frame of reference: an empty ROI would teach the model that the structure is absent.
    """
    if structure_set.manufacturer == MANUFACTURER:
        raise InvalidInputError(f"written by this server ({MANUFACTURER}): an auto-contour, not a clinician's")
    if structure_set.approval_status == "REJECTED":
        raise InvalidInputError("its ApprovalStatus is REJECTED")
    wanted = {name.lower() for name in roi_labels}
    used = [r for r in structure_set.rois if r.name.lower() in wanted]
    if not used:
        names = [r.name for r in structure_set.rois]
        raise InvalidInputError(f"no ROI named in rt_roi_labels {sorted(roi_labels)} (it has {names})")
    automatic = [r.name for r in used if r.generation_algorithm == "AUTOMATIC"]
    if automatic and structure_set.approval_status != "APPROVED":
        raise InvalidInputError(
            f"ROI {', '.join(automatic)} was generated AUTOMATIC and the set is "
            f"{structure_set.approval_status or 'not approved'}: not a clinician's contour"
        )
    if not structure_set.frame_of_reference_uid:
        raise InvalidInputError("it has no frame of reference (FrameOfReferenceUID): its contours cannot be placed")
    for roi in used:
        if not roi.contours:
            raise InvalidInputError(f"ROI '{roi.name}' has no contours: it would be an all-zero label")


def training_label(
    structure_set: StructureSet,
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    roi_labels: Mapping[str, int],
    rule: str = "centre",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``rasterise``, for a structure set that may train the model (``check_clinical``, and every contour
    on a slice of this series, every ROI covering voxels); else InvalidInputError saying why not."""
    check_clinical(structure_set, roi_labels)
    mask, found = rasterise(structure_set, geometry, headers, roi_labels, rule)
    series = headers[0].get("SeriesInstanceUID", "")
    if found["off_series"]:
        off = ", ".join(f"{count} of ROI '{name}'" for name, count in found["off_series"].items())
        raise InvalidInputError(f"contours ({off}) lie on no slice of series {series}")
    if empty := [name for name, voxels in found["voxels"].items() if not voxels]:
        raise InvalidInputError(f"ROI {', '.join(empty)} covers no voxel of series {series}")
    return mask, found
