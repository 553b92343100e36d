"""Read a DICOM CT series into a HU volume with its patient-space geometry, or say why not.

Geometry comes from the headers that define it, never from file order or SliceThickness:
slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient direction cosines), the slice spacing is the distance between those
positions, and RescaleSlope/Intercept turn stored values into HU. A series the model would
misread (gantry tilt, uneven or missing slices, two slices at one position, not CT, several CT
series where one was asked for) is refused with an InvalidInputError that states the problem.

Array layout matches NIfTI: ``volume[i, j, k]`` is column i, row j of the k-th slice along the
normal; ``affine`` maps (i, j, k) to RAS millimetres, as MONAI's readers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..errors import InvalidInputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
NOT_IMAGE_SERIES = {
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines may differ by rounding only
TILT_TOLERANCE_DEG = 0.1
SPACING_TOLERANCE_MM = 0.01  # plus a relative 1% of the slice spacing


@dataclass
class SeriesHeaders:
    """The headers of one series' image files, in file order (pixel data not read)."""

    series_uid: str
    paths: list[str]
    headers: list[Dataset]

    @property
    def modality(self) -> str:
        return str(self.headers[0].get("Modality", ""))

    @property
    def description(self) -> str:
        return str(self.headers[0].get("SeriesDescription", ""))


@dataclass
class CTGeometry:
    """Where each voxel of a sorted series lies; ``order`` sorts the series' files along the normal."""

    order: list[int]
    affine: np.ndarray  # (i, j, k) -> RAS mm
    shape: tuple[int, int, int]
    normal: np.ndarray  # LPS
    positions_mm: np.ndarray  # each sorted slice's position along the normal

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass
class CTSeries:
    """A sorted CT series: HU volume, geometry, and the sorted headers (for RTSTRUCT/SEG references)."""

    volume: np.ndarray
    geometry: CTGeometry
    headers: list[Dataset]
    paths: list[str] = field(default_factory=list)

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


def read_header(path: str) -> Dataset | None:
    """The header of a DICOM file, or None for anything that is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError):
        return None


def dicom_files(folder: str) -> list[tuple[str, Dataset]]:
    """Every DICOM file under ``folder`` (recursively, hidden entries skipped) with its header."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith((".nii", ".nii.gz", ".nrrd", ".json", ".txt")):
                continue
            path = os.path.join(root, name)
            header = read_header(path)
            if header is not None and "SeriesInstanceUID" in header:
                found.append((path, header))
    return found


def group_series(files: list[tuple[str, Dataset]]) -> dict[str, SeriesHeaders]:
    """Image series by SeriesInstanceUID; structure sets and segmentations are not image series."""
    groups: dict[str, SeriesHeaders] = {}
    for path, header in files:
        if "Rows" not in header or str(header.get("SOPClassUID", "")) in NOT_IMAGE_SERIES:
            continue  # (stop_before_pixels hides PixelData; Rows marks an image)
        uid = str(header.SeriesInstanceUID)
        group = groups.setdefault(uid, SeriesHeaders(uid, [], []))
        group.paths.append(path)
        group.headers.append(header)
    return groups


def select_ct_series(groups: dict[str, SeriesHeaders], where: str) -> SeriesHeaders:
    """The one CT series in ``groups``; a 422 naming what was found otherwise."""
    if not groups:
        raise InvalidInputError(f"{where} holds no DICOM image files")
    ct = [g for g in groups.values() if g.modality == "CT"]
    if not ct:
        found = ", ".join(sorted({g.modality or "no Modality" for g in groups.values()}))
        raise InvalidInputError(f"{where} holds no CT series (modality {found}); the CTV model needs CT")
    if len(ct) > 1:
        listed = "; ".join(f"{g.series_uid} ({len(g.paths)} slices, '{g.description}')" for g in ct)
        raise InvalidInputError(
            f"{where} holds {len(ct)} CT series, so which one to contour is ambiguous: {listed}. "
            "Put each series in its own folder."
        )
    return ct[0]


def _floats(header: Dataset, keyword: str, n: int, where: str) -> np.ndarray:
    value = header.get(keyword)
    if value is None or len(value) != n:
        raise InvalidInputError(f"{where}: {keyword} is missing or malformed")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def ct_geometry(series: SeriesHeaders) -> CTGeometry:
    """Sort the slices along the normal and check they form one regular, untilted grid."""
    where = f"series {series.series_uid}"
    if series.modality != "CT":
        raise InvalidInputError(f"{where} is modality {series.modality or 'unknown'}; the CTV model needs CT")
    first = series.headers[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1 or str(first.get("SOPClassUID")) == ENHANCED_CT_IMAGE_STORAGE:
        raise InvalidInputError(f"{where} is a multi-frame (enhanced) CT object; export it as single-frame CT")
    iop = _floats(first, "ImageOrientationPatient", 6, where)
    rows, cols = int(first.Rows), int(first.Columns)
    pixel_spacing = _floats(first, "PixelSpacing", 2, where)  # [between rows, between columns]
    for h in series.headers[1:]:
        if not np.allclose(_floats(h, "ImageOrientationPatient", 6, where), iop, atol=ORIENTATION_TOLERANCE):
            raise InvalidInputError(f"{where}: slices have different ImageOrientationPatient")
        if (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise InvalidInputError(f"{where}: slices have different sizes ({rows}x{cols} and {h.Rows}x{h.Columns})")
        if not np.allclose(_floats(h, "PixelSpacing", 2, where), pixel_spacing, atol=1e-4):
            raise InvalidInputError(f"{where}: slices have different PixelSpacing")

    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column (row index grows)
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InvalidInputError(f"{where}: ImageOrientationPatient is not two orthogonal unit vectors")
    positions = np.stack([_floats(h, "ImagePositionPatient", 3, where) for h in series.headers])
    distance = positions @ normal
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    positions, distance = positions[order], distance[order]

    if len(order) < 2:
        raise InvalidInputError(f"{where} has a single slice; a 3D CT series is needed")
    gaps = np.diff(distance)
    if np.any(gaps < SPACING_TOLERANCE_MM):
        k = int(np.argmin(gaps))
        raise InvalidInputError(
            f"{where} has two slices at the same position ({distance[k]:.2f} mm along the normal): "
            "it mixes acquisitions, so which slice to use is ambiguous"
        )
    step = np.diff(positions, axis=0)
    cosine = np.abs(step @ normal) / np.linalg.norm(step, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(cosine.min(), -1.0, 1.0))))
    if tilt > TILT_TOLERANCE_DEG:
        raise InvalidInputError(
            f"{where} is gantry-tilted: slices are offset {tilt:.1f} degrees from the slice normal. "
            "Resample it to an untilted grid first"
        )
    spacing = float(np.median(gaps))
    tolerance = SPACING_TOLERANCE_MM + 0.01 * spacing
    uneven = np.abs(gaps - spacing) > tolerance
    if np.any(uneven):
        k = int(np.argmax(np.abs(gaps - spacing)))
        missing = gaps[k] / spacing
        if abs(missing - round(missing)) * spacing <= tolerance and round(missing) >= 2:
            raise InvalidInputError(
                f"{where} has missing slices: a gap of {gaps[k]:.2f} mm between slices at {distance[k]:.2f} and "
                f"{distance[k + 1]:.2f} mm where the spacing is {spacing:.2f} mm ({int(round(missing)) - 1} "
                "slice(s) missing)"
            )
        raise InvalidInputError(
            f"{where} is not uniformly spaced: a gap of {gaps[k]:.2f} mm between slices at {distance[k]:.2f} and "
            f"{distance[k + 1]:.2f} mm where the spacing is {spacing:.2f} mm"
        )
    slice_step = (positions[-1] - positions[0]) / (len(order) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return CTGeometry(order, LPS_TO_RAS @ lps, (cols, rows, len(order)), normal, distance)


def hu_slice(ds: Dataset) -> np.ndarray:
    """One slice in HU, [rows, cols]; padding (PixelPaddingValue) becomes -1024 HU (air)."""
    stored = ds.pixel_array
    hu = stored.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[stored == padding] = -1024.0
    return hu


def load_series(series: SeriesHeaders) -> CTSeries:
    geometry = ct_geometry(series)
    paths = [series.paths[i] for i in geometry.order]
    headers, slices = [], []
    for path in paths:
        ds = pydicom.dcmread(path)
        try:
            slices.append(hu_slice(ds))
        except Exception as e:  # a codec missing or corrupt pixel data: name the file and the syntax
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
            raise InvalidInputError(
                f"cannot decode pixel data of {os.path.basename(path)} (transfer syntax {syntax}): {e}"
            ) from e
        del ds.PixelData
        headers.append(ds)
    volume = np.stack([s.T for s in slices], axis=-1)  # [cols, rows, slices] = (i, j, k)
    return CTSeries(volume=volume, geometry=geometry, headers=headers, paths=paths)


def find_ct_series(folder: str) -> SeriesHeaders:
    """The one CT series in ``folder`` (other DICOM objects such as RTSTRUCT are ignored)."""
    return select_ct_series(group_series(dicom_files(folder)), f"folder '{os.path.basename(os.path.normpath(folder))}'")


def read_ct_series(folder: str) -> CTSeries:
    return load_series(find_ct_series(folder))


def read_ct_geometry(folder: str) -> tuple[CTGeometry, list[Dataset]]:
    """Geometry and sorted headers of the CT series in ``folder`` without decoding pixels."""
    series = find_ct_series(folder)
    geometry = ct_geometry(series)
    return geometry, [series.headers[i] for i in geometry.order]
