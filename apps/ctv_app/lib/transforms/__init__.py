from .geometry import RestoreGeometry, RestoreGeometryd
from .pipeline import post_transforms, pre_transforms, train_transforms, val_transforms
from .postprocessing import CleanMask, CleanMaskd, ConfineToBody, ConfineToBodyd
from .validation import ValidateCT, ValidateCTd

__all__ = [
    "CleanMask",
    "CleanMaskd",
    "ConfineToBody",
    "ConfineToBodyd",
    "RestoreGeometry",
    "RestoreGeometryd",
    "ValidateCT",
    "ValidateCTd",
    "pre_transforms",
    "post_transforms",
    "train_transforms",
    "val_transforms",
]
