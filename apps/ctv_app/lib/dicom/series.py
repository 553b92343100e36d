"""Read a DICOM CT series into a HU volume with its patient-space geometry, or say why not.

Geometry comes from the headers that define it, never from file order or SliceThickness:
slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient direction cosines), the slice spacing is the distance between those
positions, and RescaleSlope/Intercept turn stored values (the low BitsStored bits, sign-extended
when signed) into HU. A series the model would misread (gantry tilt, uneven or missing slices, two
slices at one position, not CT, slices of two patients, studies or frames of reference, several CT
series where one was asked for) is refused with an InvalidInputError that states the problem.

Each file is read once: the volume, the headers a DICOM result references and the digest a result
names all come from those same bytes (``CTSeries.sha256``).

Array layout matches NIfTI: ``volume[i, j, k]`` is column i, row j of the k-th slice along the
normal; ``affine`` maps (i, j, k) to RAS millimetres, as MONAI's readers do.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields

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
# Every slice of one volume must agree on these: one patient, study, series and frame of reference.
ONE_VOLUME_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


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
class SeriesRead:
    """A CT series as read once: the sorted headers (pixel data dropped) and geometry parsed from the
    files' bytes, and ``sha256``, the digest of those bytes (``series_sha256``). A DICOM result
    references exactly these headers, and names this digest."""

    geometry: CTGeometry
    headers: list[Dataset]
    paths: list[str]
    sha256: str

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


@dataclass
class CTSeries(SeriesRead):
    """A sorted CT series read once: its HU volume besides what ``SeriesRead`` holds."""

    volume: np.ndarray

    def without_volume(self) -> SeriesRead:
        return SeriesRead(**{f.name: getattr(self, f.name) for f in fields(SeriesRead)})


def series_sha256(files: Iterable[tuple[str, str]]) -> str:
    """The digest of a series from (SOPInstanceUID, sha256 of the file) pairs: over the pairs in
    SOPInstanceUID order, so file names, file order and other objects in the folder do not count."""
    h = hashlib.sha256()
    for uid, digest in sorted(files):
        h.update(f"{uid}:{digest}\n".encode())
    return h.hexdigest()


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


def check_one_volume(series: SeriesHeaders, where: str) -> None:
    """Slices sharing a SeriesInstanceUID are one volume only when they agree on patient, study, series
    and frame of reference: a mis-merged export would put one patient's contours on another's slices."""
    for keyword in ONE_VOLUME_KEYWORDS:
        values = [str(h.get(keyword, "") or "").strip() for h in series.headers]
        counts = sorted({v: values.count(v) for v in values}.values(), reverse=True)
        if len(counts) > 1:  # the values themselves are patient data: counted, not shown
            raise InvalidInputError(
                f"{where}: its slices differ in {keyword} ({len(counts)} values, on "
                f"{' and '.join(str(n) for n in counts)} slices): one series must be one patient, study and "
                "frame of reference. Separate the series at its source"
            )


def ct_geometry(series: SeriesHeaders) -> CTGeometry:
    """Sort the slices along the normal and check they form one regular, untilted grid of one patient."""
    where = f"series {series.series_uid}"
    if series.modality != "CT":
        raise InvalidInputError(f"{where} is modality {series.modality or 'unknown'}; the CTV model needs CT")
    check_one_volume(series, where)
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


def stored_values(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """``values`` (pixels, or PixelPaddingValue) as the standard defines stored values: the low BitsStored
    bits only (the bits above may hold overlays or anything else), sign-extended from the highest stored
    bit when PixelRepresentation is 1."""
    values = np.asarray(values)
    bits = int(ds.get("BitsStored") or 0)
    if not 0 < bits < 8 * values.dtype.itemsize:
        return values
    stored = values.astype(np.int64) & ((1 << bits) - 1)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        stored = np.where(stored >= 1 << (bits - 1), stored - (1 << bits), stored)
    return stored


def hu_slice(ds: Dataset) -> np.ndarray:
    """One slice in HU, [rows, cols]; padding (PixelPaddingValue) becomes -1024 HU (air)."""
    stored = stored_values(ds, ds.pixel_array)
    hu = stored.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[stored == stored_values(ds, padding)] = -1024.0
    return hu


def _decode(ds: Dataset, path: str) -> np.ndarray:
    try:
        return hu_slice(ds)
    except Exception as e:  # a codec missing or corrupt pixel data: name the file and the syntax
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = os.path.basename(path)
        raise InvalidInputError(f"cannot decode pixel data of {name} (transfer syntax {syntax}): {e}") from e


def load_series(series: SeriesHeaders, pixels: bool = True) -> CTSeries | SeriesRead:
    """Read each file of ``series`` once, and take everything from those bytes: the headers, the geometry
    (checked again: a file may have changed since the header pass chose it), the digest and, with
    ``pixels``, the HU volume."""
    ct_geometry(series)  # refuse a series the model would misread before reading its pixels
    headers, digests, slices = [], [], []
    for path in series.paths:
        with open(path, "rb") as f:
            blob = f.read()
        try:
            ds = pydicom.dcmread(io.BytesIO(blob))
        except (pydicom.errors.InvalidDicomError, EOFError, ValueError, TypeError) as e:
            raise InvalidInputError(f"{os.path.basename(path)} is not a readable DICOM file: {e}") from e
        digests.append((str(ds.get("SOPInstanceUID", "")), hashlib.sha256(blob).hexdigest()))
        if pixels:
            slices.append(_decode(ds, path))
        if "PixelData" in ds:
            del ds.PixelData
        headers.append(ds)
    geometry = ct_geometry(SeriesHeaders(series.series_uid, series.paths, headers))
    read = {
        "geometry": geometry,
        "headers": [headers[i] for i in geometry.order],
        "paths": [series.paths[i] for i in geometry.order],
        "sha256": series_sha256(digests),
    }
    if not pixels:
        return SeriesRead(**read)
    volume = np.stack([slices[i].T for i in geometry.order], axis=-1)  # [cols, rows, slices] = (i, j, k)
    return CTSeries(**read, volume=volume)


def find_ct_series(folder: str) -> SeriesHeaders:
    """The one CT series in ``folder`` (other DICOM objects such as RTSTRUCT are ignored)."""
    return select_ct_series(group_series(dicom_files(folder)), f"folder '{os.path.basename(os.path.normpath(folder))}'")


def read_ct_series(folder: str) -> CTSeries:
    return load_series(find_ct_series(folder))


def read_series_headers(folder: str) -> SeriesRead:
    """The CT series in ``folder`` read once, without decoding pixels: headers, geometry and digest."""
    return load_series(find_ct_series(folder), pixels=False)


def read_ct_geometry(folder: str) -> tuple[CTGeometry, list[Dataset]]:
    """Geometry and sorted headers of the CT series in ``folder`` without decoding pixels."""
    series = find_ct_series(folder)
    geometry = ct_geometry(series)
    return geometry, [series.headers[i] for i in geometry.order]
