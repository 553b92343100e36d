"""MONAI ImageReader for a folder holding one DICOM CT series (see ``series.py`` for the rules)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from .series import CTSeries, read_ct_series


class DicomSeriesReader(ImageReader):
    """Reads a folder as a CT series: HU volume, RAS affine. Any other path is left to other readers.

    Use one instance per read: ``series`` keeps what it read (headers, digest) for the result writers."""

    def __init__(self) -> None:
        super().__init__()
        self.series: CTSeries | None = None

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        folders = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(folders) == 1 and os.path.isdir(folders[0])

    def read(self, data: Sequence[str] | str, **kwargs) -> CTSeries:
        folders = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(folders) != 1:
            raise ValueError("DicomSeriesReader reads one folder at a time")
        self.series = read_ct_series(str(folders[0]))
        return self.series

    def get_data(self, img: CTSeries) -> tuple[np.ndarray, dict]:
        first = img.headers[0]
        meta = {
            MetaKeys.AFFINE: img.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.volume.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "SeriesInstanceUID": str(first.SeriesInstanceUID),
            "StudyInstanceUID": str(first.get("StudyInstanceUID", "")),
            "FrameOfReferenceUID": str(first.get("FrameOfReferenceUID", "")),
        }
        return img.volume, meta
