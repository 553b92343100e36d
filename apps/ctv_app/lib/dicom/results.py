"""Result formats of ``/infer/ctv``: NIfTI for research, DICOM SEG for viewers, RTSTRUCT for planning.

The DICOM formats reference the source series' SOP instances and frame of reference, so they
need a DICOM CT series as input; a NIfTI input gets NIfTI only (a 422 says why otherwise).
How contours are named and drawn is the department's choice, set with ``--conf``:

    --conf rt_roi_name CTV                          TG-263 name of the written ROI
    --conf rt_roi_colour [255,128,0]                its display colour (RGB)
    --conf rt_structure_set_label CTV_AUTO
    --conf rt_roi_labels {"CTV":1,"CTV_High":1}     clinical ROI names read as training labels
    --conf rt_raster_rule centre                    centre | touch (rtstruct.py)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..errors import InvalidInputError
from .rtstruct import RASTER_RULES, ROI, write_rtstruct
from .seg import write_seg
from .series import SeriesRead, find_ct_series

RESULT_FORMATS = ("nifti", "dicom_seg", "rtstruct")
# TG-263: at most 16 characters, letters, digits and _ ^ - (no spaces).
_TG263_NAME = re.compile(r"^[A-Za-z0-9_^-]{1,16}$")
DEFAULT_ROI_LABELS = {"CTV": 1, "CTV_High": 1, "CTV_Low": 1, "CTVp": 1, "CTVp_High": 1, "CTV_Primary": 1}


@dataclass
class RTConfig:
    roi_name: str = "CTV"
    roi_colour: tuple[int, int, int] = (255, 128, 0)
    structure_set_label: str = "CTV_AUTO"
    roi_labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_ROI_LABELS))
    raster_rule: str = "centre"

    def __post_init__(self) -> None:
        if not _TG263_NAME.match(self.roi_name):
            raise ValueError(f"rt_roi_name {self.roi_name!r} is not a TG-263 name (<= 16 of A-Z a-z 0-9 _ ^ -)")
        self.roi_colour = tuple(int(c) for c in self.roi_colour)
        if len(self.roi_colour) != 3 or not all(0 <= c <= 255 for c in self.roi_colour):
            raise ValueError(f"rt_roi_colour must be three values 0-255, got {self.roi_colour}")
        if self.raster_rule not in RASTER_RULES:
            raise ValueError(f"rt_raster_rule must be one of {RASTER_RULES}, got {self.raster_rule!r}")
        self.roi_labels = {str(k): int(v) for k, v in self.roi_labels.items()}

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> "RTConfig":
        values: dict[str, Any] = {}
        for name in ("roi_name", "structure_set_label", "raster_rule"):
            if f"rt_{name}" in conf:
                values[name] = conf[f"rt_{name}"]
        for name in ("roi_colour", "roi_labels"):
            if f"rt_{name}" in conf:
                values[name] = json.loads(conf[f"rt_{name}"])
        return cls(**values)


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
    fmt: str, mask: np.ndarray, series: SeriesRead, config: RTConfig, provenance: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Write ``mask`` (on the series' grid) as DICOM SEG or RTSTRUCT referencing ``series``, the headers
    read with the input the mask was computed from (never read again here); returns path and UIDs."""
    geometry, headers = series.geometry, series.headers
    check_referenceable(headers, f"series {series.series_uid}")  # these headers, as read
    model = provenance.get("model") or {}
    model_version = str(model.get("sha256", "unknown"))
    software = provenance.get("software", {}).get("ctv-label", "unknown")
    fd, path = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    labels = {config.roi_name: 1}
    description = (
        f"Auto-generated by ctv-label {software}; model sha256 {model_version}; "
        f"input sha256 {provenance.get('input', {}).get('sha256')}. Not approved for treatment planning."
    )
    if fmt == "rtstruct":
        ds = write_rtstruct(
            [ROI(config.roi_name, mask == labels[config.roi_name], config.roi_colour, "CTV")],
            geometry,
            headers,
            path,
            structure_set_label=config.structure_set_label,
            description=description,
            software_versions=[f"ctv-label {software}", f"model {model_version[:12]}"],
            series_description=f"AUTO {config.roi_name} model {model_version[:12]} UNAPPROVED",
        )
    else:
        ds = write_seg(
            mask, geometry, headers, path, labels, model_version, software,
            series_description=f"AUTO {config.roi_name} model {model_version[:12]}"[:64], colour=config.roi_colour,
            comments=description,
        )  # fmt: skip
    info = {
        "format": fmt,
        "SOPClassUID": str(ds.SOPClassUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "referenced_series": str(headers[0].SeriesInstanceUID),
    }
    return path, info
