"""Reject input that is not a readable 3-D CT before any model time is spent on it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Hashable, Mapping

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImaged, MapTransform, Transform
from monai.utils import ImageMetaKey

from ..dicom.reader import DicomSeriesReader
from ..dicom.series import find_ct_series
from ..errors import InvalidInputError
from ..provenance import InputRead

MIN_VOXELS_PER_AXIS = 4
# Largest image accepted, checked from the header before any voxel is read (CTV_MAX_VOXELS to change):
# 512x512x2000 slices, about 2 GB as float32.
MAX_VOXELS = int(os.environ.get("CTV_MAX_VOXELS", 512 * 512 * 2000))
SPACING_RANGE_MM = (0.05, 20.0)
# A CT in HU holds air or fat (< -200 HU) in at least 1% of voxels and tops out far below 5000 HU;
# MR, PET, 8-bit images and label maps fail one of these.
CT_LOW_HU, CT_LOW_FRACTION, CT_MAX_P99 = -200.0, 0.01, 5000.0


class LoadCTImaged(LoadImaged):
    """LoadImaged that also reads a DICOM CT series folder, and reports an unreadable file as the
    caller's error, naming the file. Always ``image_only``: the metadata travels in the MetaTensor.

    ``keep_read`` (inference): each input is read once and ``<key>_read`` holds its ``InputRead``: the
    sha256 of the bytes loaded and, for a DICOM series, the headers read with them. A file is loaded from
    a private copy written as it is hashed, so a file replaced meanwhile changes neither. (Off in
    training: a DataLoader cannot batch an ``InputRead``.)"""

    def __init__(self, keys: KeysCollection, keep_read: bool = False, size_limit: bool = True, **kwargs):
        """``size_limit``: refuse files over ``MAX_VOXELS`` from their header (off only for the server's own
        files, e.g. the engine's calibration phantom, which a site's small limit must not refuse)."""
        super().__init__(keys, **{**kwargs, "image_only": True})
        self.keep_read = keep_read
        self.size_limit = size_limit

    def __call__(self, data, reader=None):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], read = self._load(d[key], reader)
            if self.keep_read:
                d[f"{key}_read"] = read
        return d

    def _load(self, path, reader) -> tuple[MetaTensor, InputRead | None]:
        with tempfile.TemporaryDirectory(prefix="ctv-input-") as private:
            source, read = path, None
            if self.keep_read and isinstance(path, str) and os.path.isfile(path):
                source = os.path.join(private, os.path.basename(path))  # same name: same reader, same messages
                read = InputRead(_copy_hashing(path, source))
            if isinstance(source, str) and self.size_limit:
                check_size(source)
            if reader is None and isinstance(path, str) and os.path.isdir(path):
                reader = DicomSeriesReader()  # named explicitly: its errors reach the caller unchanged
            try:
                image = self._loader(source, reader)
            except InvalidInputError:
                raise
            except Exception as e:  # readers raise many types; all mean the same thing to the caller
                name = os.path.basename(str(path))
                why = str(e).replace(str(source), name).replace(str(path), name)  # server folders are private
                raise InvalidInputError(f"image '{name}' is not a readable 3D image: {type(e).__name__}: {why}") from e
        if isinstance(reader, DicomSeriesReader):
            read = InputRead(reader.series.sha256, reader.series.without_volume())
        if source is not path:
            image.meta[ImageMetaKey.FILENAME_OR_OBJ] = path  # the input's name, not the private copy's
        return image, read


def _copy_hashing(path: str, copy: str) -> str:
    """Copy ``path`` to ``copy``; the sha256 of the bytes copied."""
    h = hashlib.sha256()
    with open(path, "rb") as src, open(copy, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def check_size(path: str, limit: int | None = None) -> None:
    """Refuse an image over ``limit`` voxels from its header alone, before any voxel is read: NIfTI,
    NRRD, MetaImage or a DICOM series folder; any other format, and a header whose voxels are in
    another file (which could be any file on the server), are refused."""
    limit = MAX_VOXELS if limit is None else limit
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InvalidInputError(f"image '{name}' is an empty file (0 bytes)")
    if os.path.isdir(path):
        series = find_ct_series(path)
        shape = (int(series.headers[0].Rows), int(series.headers[0].Columns), len(series.paths))
    elif path.endswith((".nii", ".nii.gz")):
        try:
            header = nib.load(path).header  # the header only
        except Exception:
            return  # unreadable: the loader says so, with its reason
        shape = tuple(int(s) for s in header.get_data_shape())
        _check_nifti_geometry(header, name)
    elif path.endswith(_TEXT_HEADER_FORMATS):
        shape = _text_header_shape(path, name)
    else:
        raise InvalidInputError(
            f"image '{name}' is not in a format this server reads: send NIfTI (.nii, .nii.gz), NRRD (.nrrd), "
            "MetaImage (.mha) or a DICOM series"
        )
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > limit:
        raise InvalidInputError(
            f"image '{name}' has {voxels:,} voxels {shape}; the limit is {limit:,} (CTV_MAX_VOXELS)"
        )


# Formats with a text header: (field that gives the size, fields that name a data file, its in-file value);
# field names compared in lower case with single spaces, whatever a reader would tolerate.
_TEXT_HEADER_FORMATS = (".nrrd", ".nhdr", ".mha", ".mhd")
_NRRD_FIELDS = ("sizes", ("data file", "datafile"), None)
_METAIMAGE_FIELDS = ("dimsize", ("elementdatafile",), "LOCAL")
_MAX_HEADER_BYTES = 1 << 16


def _text_header_shape(path: str, name: str) -> tuple[int, ...]:
    """The shape an NRRD or MetaImage header states; refused if its data lies in another file."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER_BYTES)
    nrrd = head.startswith(b"NRRD")
    size_field, file_fields, attached = _NRRD_FIELDS if nrrd else _METAIMAGE_FIELDS
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if nrrd and not line:
            break  # the blank line that ends an NRRD header
        key, sep, value = line.partition(":" if nrrd else "=")
        key = " ".join(key.lower().split())
        if sep and not line.startswith("#") and not value.startswith("="):  # NRRD "key:=value" pairs are free text
            fields[key] = value.strip()
        if not nrrd and key == "elementdatafile":
            break  # the last MetaImage field: the voxels follow
    if any(k in fields and fields[k] != attached for k in file_fields):
        kind = "NRRD" if nrrd else "MetaImage"
        raise InvalidInputError(
            f"image '{name}': detached {kind} data files are not accepted; send a "
            f"{'.nrrd' if nrrd else '.mha'} with attached data"
        )
    try:
        return tuple(int(s) for s in fields[size_field].split())
    except (KeyError, ValueError) as e:
        why = f"no valid '{size_field}' header field"
        raise InvalidInputError(f"image '{name}' is not a readable 3D image: {why}") from e


def _check_nifti_geometry(header, name: str) -> None:
    """A geometry the header states must be usable: nibabel would otherwise fall back silently to
    another one (e.g. an sform with a zero spacing is replaced by pixdim)."""
    stated = [(k, a) for k, a, code in (("sform", header.get_sform(), header["sform_code"]),
                                        ("qform", header.get_qform(), header["qform_code"])) if code > 0]  # fmt: skip
    if not stated:
        stated = [("pixdim", np.diag([*header.get_zooms()[:3], 1.0]))]
    for kind, affine in stated:
        spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        lo, hi = SPACING_RANGE_MM
        if not np.all(np.isfinite(spacing)) or np.any(spacing < lo) or np.any(spacing > hi):
            raise InvalidInputError(
                f"image '{name}': its {kind} gives voxel spacing {np.round(spacing, 4).tolist()} mm, outside {lo}-{hi} mm"
            )


class ValidateCT(Transform):
    """Raise InvalidInputError unless ``img`` (channel-first) is a finite, 3-D, CT-like volume in HU."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        name = (
            os.path.basename(str(img.meta.get("filename_or_obj", "image"))) if isinstance(img, MetaTensor) else "image"
        )
        spatial = tuple(img.shape[1:])
        if img.shape[0] != 1 or len(spatial) != 3:
            raise InvalidInputError(f"'{name}' must be a single-channel 3D volume, got shape {tuple(img.shape)}")
        if min(spatial) < MIN_VOXELS_PER_AXIS:
            raise InvalidInputError(
                f"'{name}' is {spatial} voxels; need at least {MIN_VOXELS_PER_AXIS} along every axis"
            )
        if isinstance(img, MetaTensor):
            spacing = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
            if not (np.all(spacing >= SPACING_RANGE_MM[0]) and np.all(spacing <= SPACING_RANGE_MM[1])):
                raise InvalidInputError(
                    f"'{name}' has voxel spacing {np.round(spacing, 3).tolist()} mm, outside {SPACING_RANGE_MM} mm"
                )
        values = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)  # no metadata tracking
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise InvalidInputError(f"'{name}' contains NaN or infinite values")
        # A strided sample of ~250k voxels estimates these two figures to well under a percent.
        sample = values.flatten()[:: max(1, values.numel() // 250_000)].float()
        low_fraction = float((sample < CT_LOW_HU).float().mean())
        p99 = float(torch.kthvalue(sample, max(1, int(0.99 * sample.numel()))).values)
        if low_fraction < CT_LOW_FRACTION or p99 > CT_MAX_P99:
            raise InvalidInputError(
                f"'{name}' does not look like CT in Hounsfield units: {low_fraction:.1%} of voxels below "
                f"{CT_LOW_HU:.0f} HU (need >= {CT_LOW_FRACTION:.0%}) and 99th percentile {p99:.0f} "
                f"(need <= {CT_MAX_P99:.0f})"
            )
        return img


class ValidateCTd(MapTransform):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.validate = ValidateCT()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.validate(d[key])
        return d


def load_ct(path: str):
    """The CT as the model reads it (NIfTI file or DICOM series folder), checked; 422 otherwise."""
    data = {"image": path}
    for transform in (LoadCTImaged(keys="image"), EnsureChannelFirstd(keys="image"), ValidateCTd(keys="image")):
        data = transform(data)  # one by one: Compose would wrap the 422 in a RuntimeError
    return data["image"]
