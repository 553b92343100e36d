from .geometry import RestoreGeometry, RestoreGeometryd
from .postprocessing import CleanMask, CleanMaskd
from .pipeline import post_transforms, pre_transforms, train_transforms
from .validation import ValidateCT, ValidateCTd

__all__ = [
    "CleanMask",
    "CleanMaskd",
    "RestoreGeometry",
    "RestoreGeometryd",
    "ValidateCT",
    "ValidateCTd",
    "pre_transforms",
    "post_transforms",
    "train_transforms",
]
