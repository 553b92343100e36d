"""RTSTRUCT: write structures (a mask each) as an RT Structure Set on their CT series, read one back,
and decide whether a structure set may become a training label (``training_label``).

Written: one ROI per structure (``ROI.of``: its TG-263 name, RT ROI interpreted type and colour, from
``lib/structures.py``), each from its own mask, so structures that overlap are each kept whole. A
structure with no voxels keeps its ROI with no contours (ROIContourSequence item without a
ContourSequence, as planning systems export an ROI that was named but not drawn): the planner sees
that the model looked for it and found nothing. Read for training: every ROI whose name means one of
the model's structures (``Structures.find``: TG-263 name or synonym, any case) becomes that
structure's mask; ROIs that mean none are ignored, and a structure no ROI draws is not contained.

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
from ..structures import Structure, Structures
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

    @classmethod
    def of(cls, structure: Structure, mask: np.ndarray) -> "ROI":
        """A structure's ROI: name, RTROIInterpretedType and ROIDisplayColor as ``structure`` describes it."""
        return cls(structure.name, mask, structure.colour, structure.roi_type)


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
    structure_set_label: str = "AUTO_CONTOUR",
    description: str = "",
    software_versions: Sequence[str] = (),
    series_description: str = "",
) -> Dataset:
    """Write ``rois`` (each its own mask on ``geometry``, so they may overlap) as an UNAPPROVED, AUTOMATIC
    RTSTRUCT; an ROI with an empty mask is written without contours (module doc)."""
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
    ds.StructureSetName = "Auto-contour"
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


def _check_rule(rule: str) -> None:
    if rule not in RASTER_RULES:
        raise InvalidInputError(f"unknown rasterisation rule {rule!r}; use one of {RASTER_RULES}")


def _check_frame(structure_set: StructureSet, headers: Sequence[Dataset]) -> None:
    ct_frame = str(headers[0].get("FrameOfReferenceUID", ""))
    if structure_set.frame_of_reference_uid and structure_set.frame_of_reference_uid != ct_frame:
        raise InvalidInputError(
            f"the RTSTRUCT is drawn in frame of reference {structure_set.frame_of_reference_uid}, "
            f"the CT series is in {ct_frame}"
        )


def roi_mask(roi: StructureROI, geometry: CTGeometry, rule: str = "centre") -> tuple[np.ndarray, int]:
    """The voxels (i, j, k) one ROI covers by ``rule`` (module doc), and how many of its contours lie on
    no slice of ``geometry``."""
    _check_rule(rule)
    to_voxel = np.linalg.inv(_lps_affine(geometry))
    half_gap = 0.5 * float(np.median(np.diff(geometry.positions_mm))) if len(geometry.positions_mm) > 1 else 1.0
    cols, rows = geometry.shape[0], geometry.shape[1]
    inside = np.zeros(geometry.shape, dtype=bool)
    touched = np.zeros(geometry.shape, dtype=bool)
    off_series = 0
    for points in roi.contours:
        distance = float(np.mean(points @ geometry.normal))
        k = int(np.argmin(np.abs(geometry.positions_mm - distance)))
        if abs(geometry.positions_mm[k] - distance) > half_gap:
            off_series += 1  # drawn on no slice of this series
            continue
        voxels = (to_voxel @ np.column_stack([points, np.ones(len(points))]).T).T
        rr, cc = fill_polygon(voxels[:, 1], voxels[:, 0], shape=(rows, cols))
        inside[cc, rr, k] ^= True  # even-odd: a contour inside a contour is a hole
        if rule == "touch":
            touched[_touched_voxels(voxels[:, :2], cols, rows) + (k,)] = True
    return inside | touched, off_series


def rasterise(
    structure_set: StructureSet,
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    roi_labels: Mapping[str, int],
    rule: str = "centre",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Label map (i, j, k) on the CT grid of the ROIs named in ``roi_labels`` (exact names, any case): a
    reader of RTSTRUCTs by ROI name (``training_label`` reads them by structure).

    Returns the map and what was used: ``{"rois": {name: value}, "ignored": [names], "voxels": {name:
    voxels it covers}, "off_series": {name: contours on no slice of the series}}``. ROIs later in
    ``roi_labels`` win where structures overlap (``roi_mask`` gives each ROI whole).
    """
    _check_rule(rule)
    _check_frame(structure_set, headers)
    wanted = {k.lower(): (rank, int(v)) for rank, (k, v) in enumerate(roi_labels.items())}
    matched = sorted(
        ((wanted[r.name.lower()], r) for r in structure_set.rois if r.name.lower() in wanted), key=lambda x: x[0][0]
    )
    mask = np.zeros(geometry.shape, dtype=np.uint8)
    voxels_of, off_series = {}, {}
    for (_, value), roi in matched:
        covered, off = roi_mask(roi, geometry, rule)
        if off:
            off_series[roi.name] = off
        mask[covered] = value
        voxels_of[roi.name] = int(covered.sum())
    used = {roi.name: value for (_, value), roi in matched}
    ignored = [r.name for r in structure_set.rois if r.name not in used]
    return mask, {"rois": used, "ignored": ignored, "voxels": voxels_of, "off_series": off_series}


def _meant(structure_set: StructureSet, structures: Structures) -> list[tuple[StructureROI, Structure]]:
    """The ROIs whose names mean one of ``structures`` (TG-263 name or synonym, any case), each with it."""
    return [(roi, s) for roi in structure_set.rois if (s := structures.find(roi.name)) is not None]


def check_clinical(structure_set: StructureSet, structures: Structures) -> None:
    """InvalidInputError saying why, unless ``structure_set`` holds a clinician's contours of ``structures``.

    A training label must be a clinician's contour: not this server's own output, not AUTOMATIC
    unless a clinician APPROVED the set, not REJECTED. At least one ROI meaning one of the structures
    must have contours, in a stated frame of reference. An ROI that means a structure but has no
    contours (named, never drawn, as planning templates leave them) is left out: that structure was
    not contoured, which does not mean it is absent, so the label does not contain it.
    """
    if structure_set.manufacturer == MANUFACTURER:
        raise InvalidInputError(f"written by this server ({MANUFACTURER}): an auto-contour, not a clinician's")
    if structure_set.approval_status == "REJECTED":
        raise InvalidInputError("its ApprovalStatus is REJECTED")
    meant = _meant(structure_set, structures)
    if not meant:
        names = [r.name for r in structure_set.rois]
        raise InvalidInputError(f"no ROI means one of the structures {structures.names} (its ROIs: {names})")
    automatic = [roi.name for roi, _ in meant if roi.generation_algorithm == "AUTOMATIC"]
    if automatic and structure_set.approval_status != "APPROVED":
        raise InvalidInputError(
            f"ROI {', '.join(automatic)} was generated AUTOMATIC and the set is "
            f"{structure_set.approval_status or 'not approved'}: not a clinician's contour"
        )
    if not structure_set.frame_of_reference_uid:
        raise InvalidInputError("it has no frame of reference (FrameOfReferenceUID): its contours cannot be placed")
    if not any(roi.contours for roi, _ in meant):
        empty = ", ".join(f"'{roi.name}'" for roi, _ in meant)
        raise InvalidInputError(
            f"ROI {empty} {'has' if len(meant) == 1 else 'have'} no contours: it would be a label of no structure"
        )


def training_label(
    structure_set: StructureSet,
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    structures: Structures,
    rule: str = "centre",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The structures a clinician's structure set draws, as boolean (i, j, k) masks on the CT grid, by name
    in ``structures``' order; InvalidInputError saying why when it may not train the model.

    Every ROI whose name means one of ``structures`` becomes that structure's mask (several ROIs
    meaning one structure, e.g. ``CTV_45Gy`` and ``CTV_High``: their union); each ROI is rasterised
    alone, so structures that overlap are each whole. Refused: what ``check_clinical`` refuses, contours
    on no slice of this series, an ROI that covers no voxel. ``used``: ``{"rois": {ROI name: structure},
    "ignored": [ROI names meaning none of them], "not_contoured": [ROI names meaning one, without
    contours], "voxels": {structure: voxels}}``.
    """
    check_clinical(structure_set, structures)
    _check_rule(rule)
    _check_frame(structure_set, headers)
    meant = _meant(structure_set, structures)
    drawn = [(roi, s) for roi, s in meant if roi.contours]
    masks: dict[str, np.ndarray] = {}
    off_series, empty = {}, []
    for roi, structure in drawn:
        mask, off = roi_mask(roi, geometry, rule)
        if off:
            off_series[roi.name] = off
        if not mask.any():
            empty.append(roi.name)
        masks[structure.name] = masks[structure.name] | mask if structure.name in masks else mask
    series = headers[0].get("SeriesInstanceUID", "")
    if off_series:
        off = ", ".join(f"{count} of ROI '{name}'" for name, count in off_series.items())
        raise InvalidInputError(f"contours ({off}) lie on no slice of series {series}")
    if empty:
        raise InvalidInputError(f"ROI {', '.join(empty)} covers no voxel of series {series}")
    masks = {name: masks[name] for name in structures.names if name in masks}
    meant_rois = {roi.name for roi, _ in meant}
    used = {
        "rois": {roi.name: structure.name for roi, structure in drawn},
        "ignored": [r.name for r in structure_set.rois if r.name not in meant_rois],
        "not_contoured": [roi.name for roi, _ in meant if not roi.contours],
        "voxels": {name: int(mask.sum()) for name, mask in masks.items()},
    }
    return masks, used
