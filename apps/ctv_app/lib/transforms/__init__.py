from .geometry import RestoreGeometry, RestoreGeometryd
from .mirror import FlipLeftRight, RandFlipLeftRightd
from .pipeline import post_transforms, pre_transforms, train_transforms, val_transforms
from .postprocessing import ContourStructures, ContourStructuresd, clean_mask
from .validation import ValidateCT, ValidateCTd

__all__ = [
    "ContourStructures",
    "ContourStructuresd",
    "FlipLeftRight",
    "RandFlipLeftRightd",
    "RestoreGeometry",
    "RestoreGeometryd",
    "ValidateCT",
    "ValidateCTd",
    "clean_mask",
    "pre_transforms",
    "post_transforms",
    "train_transforms",
    "val_transforms",
]
