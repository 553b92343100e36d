"""Result formats of ``/infer/ctv``: NIfTI for research, DICOM SEG for viewers, RTSTRUCT for planning.

The DICOM formats reference the source series' SOP instances and frame of reference, so they
need a DICOM CT series as input; a NIfTI input gets NIfTI only (a 422 says why otherwise).
Both carry every structure of the result: one ROI (RTSTRUCT) or one segment (SEG) each, named,
typed and coloured as the model's ``Structures`` describe them (``lib/structures.py``, carried in
the checkpoint), each from its own mask, so overlapping structures are kept whole. The synonyms
under which clinical RTSTRUCTs name a structure come from there too. What stays the department's
choice is set with ``--conf``:

    --conf rt_structure_set_label AUTO_CONTOUR      StructureSetLabel of the RTSTRUCTs written
    --conf rt_raster_rule centre                    centre | touch: how clinical contours are read (rtstruct.py)
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..errors import InvalidInputError
from ..structures import Structures
from .rtstruct import RASTER_RULES, ROI, write_rtstruct
from .seg import write_seg
from .series import SeriesRead, find_ct_series

RESULT_FORMATS = ("nifti", "dicom_seg", "rtstruct")
# Settings of the single-structure server, now described by the model's structures.
_REMOVED_CONF = ("rt_roi_name", "rt_roi_colour", "rt_roi_labels")


@dataclass
class RTConfig:
    structure_set_label: str = "AUTO_CONTOUR"
    raster_rule: str = "centre"

    def __post_init__(self) -> None:
        if not 0 < len(self.structure_set_label) <= 16:  # SH
            raise ValueError(f"rt_structure_set_label must be 1-16 characters, got {self.structure_set_label!r}")
        if self.raster_rule not in RASTER_RULES:
            raise ValueError(f"rt_raster_rule must be one of {RASTER_RULES}, got {self.raster_rule!r}")

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> "RTConfig":
        if removed := [key for key in _REMOVED_CONF if key in conf]:
            raise ValueError(
                f"--conf {', '.join(removed)} no longer exist: ROI names, colours and the clinical names read as "
                "labels are the model's structures (lib/structures.py, docs/dicom.md)"
            )
        return cls(**{key: conf[f"rt_{key}"] for key in ("structure_set_label", "raster_rule") if f"rt_{key}" in conf})


def is_dicom_source(image_path: Any) -> bool:
    return isinstance(image_path, str) and os.path.isdir(image_path)


def check_result_format(result_format: Any, image_path: Any) -> str:
    """The requested format, or a 422 that says what is wrong with it for this input."""
    fmt = str(result_format or "nifti").lower()
    if fmt not in RESULT_FORMATS:
        raise InvalidInputError(f"result_format {result_format!r} is not one of {RESULT_FORMATS}")
    if fmt != "nifti" and not is_dicom_source(image_path):
        raise InvalidInputError(
            f"result_format '{fmt}' needs a DICOM CT series as input: a {'DICOM SEG' if fmt == 'dicom_seg' else 'RTSTRUCT'}"
            " references the CT's SOP instances and frame of reference, which a NIfTI input does not have. "
            "Use result_format 'nifti', or contour the study from a DICOM datastore"
        )
    if fmt != "nifti":  # from the headers alone, before any model time is spent
        series = find_ct_series(image_path)
        check_referenceable(series.headers, f"series {series.series_uid}")
    return fmt


def check_referenceable(headers: list[Dataset], where: str) -> None:
    """A DICOM result references every slice by its SOPInstanceUID, in the series' frame of reference:
    a 422 naming what is missing when the slices do not allow that."""
    uids = [str(h.get("SOPInstanceUID", "") or "").strip() for h in headers]
    problems = []
    if blank := uids.count(""):
        problems.append(f"{blank} slice{'s have' if blank > 1 else ' has'} no SOPInstanceUID")
    shared = [(uid, n) for uid, n in Counter(u for u in uids if u).most_common() if n > 1]
    problems += [f"{n} slices share the SOPInstanceUID {uid}" for uid, n in shared[:3]]
    if no_frame := sum(not str(h.get("FrameOfReferenceUID", "") or "").strip() for h in headers):
        problems.append("it has no FrameOfReferenceUID" if no_frame == len(headers) else
                        f"{no_frame} of its slices have no FrameOfReferenceUID")  # fmt: skip
    if problems:
        raise InvalidInputError(
            f"{where} cannot be referenced by a DICOM result (RTSTRUCT, SEG): {'; '.join(problems)}. "
            "Use result_format 'nifti' for this series, or correct it at its source"
        )


def write_dicom_result(
    fmt: str,
    bitmask: np.ndarray,
    structures: Structures,
    series: SeriesRead,
    config: RTConfig,
    provenance: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """Write a result as DICOM SEG or RTSTRUCT referencing ``series``, the headers read with the input the
    result was computed from (never read again here); returns the path and what was written.

    ``bitmask`` (on the series' grid) holds ``structures`` by bit (``Structures.pack``); each of them
    becomes one ROI / one segment, in that order, empty ones included (rtstruct.py and seg.py say how)."""
    geometry, headers = series.geometry, series.headers
    check_referenceable(headers, f"series {series.series_uid}")  # these headers, as read
    if tuple(bitmask.shape) != tuple(geometry.shape):
        raise InvalidInputError(f"result shape {bitmask.shape} is not the CT series shape {geometry.shape}")
    masks = [(s, structures.mask(bitmask, s.name)) for s in structures]
    model = provenance.get("model") or {}
    model_version = str(model.get("sha256", "unknown"))
    software = provenance.get("software", {}).get("ctv-label", "unknown")
    what = structures[0].name if len(structures) == 1 else f"{len(structures)} structures"
    description = (
        f"Auto-generated by ctv-label {software}; model sha256 {model_version}; "
        f"input sha256 {provenance.get('input', {}).get('sha256')}; "
        f"structures {', '.join(structures.names)}. Not approved for treatment planning."
    )
    fd, path = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    if fmt == "rtstruct":
        ds = write_rtstruct(
            [ROI.of(s, mask) for s, mask in masks],
            geometry,
            headers,
            path,
            structure_set_label=config.structure_set_label,
            description=description,
            software_versions=[f"ctv-label {software}", f"model {model_version[:12]}"],
            series_description=f"AUTO {what} model {model_version[:12]} UNAPPROVED",
        )
    else:
        ds = write_seg(
            masks, geometry, headers, path, model_version, software,
            series_description=f"AUTO {what} model {model_version[:12]}", comments=description,
        )  # fmt: skip
    info = {
        "format": fmt,
        "SOPClassUID": str(ds.SOPClassUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "referenced_series": str(headers[0].SeriesInstanceUID),
        "structures": structures.names,
        "empty": [s.name for s, mask in masks if not mask.any()],
    }
    return path, info
