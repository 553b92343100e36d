"""The CTV transform chains. Infer and train share ``pre_transforms`` so they can never drift apart."""

from __future__ import annotations

import math

from monai.transforms import (
    Activationsd,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    Rand3DElasticd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ..params import CTVParams
from .labels import MarkUncontouredd, StructureChannelsd
from .mirror import RandFlipLeftRightd
from .postprocessing import ContourStructuresd
from .validation import LoadCTImaged, ValidateCTd

# The CT as read (HU, on the input's grid), which ``post_transforms`` confines the result to the body by.
INPUT_HU_KEY = "image_hu"


def pre_transforms(params: CTVParams, with_label: bool = False, keep_input: bool = False, size_limit: bool = True) -> list:
    """Load, validate, orient to RAS, resample to the target spacing, window and normalise; a label is
    resampled as stored (nearest neighbour keeps a label map or bitmask exact), then decoded into one
    channel per structure (finish it with ``MarkUncontouredd``: ``train_transforms`` and ``val_transforms``).

    ``keep_input``: also keep the CT as read under ``INPUT_HU_KEY`` (inference: ``post_transforms`` needs it),
    and what was read under ``image_read`` (an ``InputRead``: the writer names and references it).
    ``size_limit``: refuse inputs over ``CTV_MAX_VOXELS`` (off only for the server's own files)."""
    keys = ["image", "label"] if with_label else ["image"]
    lo, hi = params.window
    chain = [
        LoadCTImaged(keys=keys, keep_read=keep_input, size_limit=size_limit, dtype=None),  # as stored (int16): float32 later
        EnsureChannelFirstd(keys=keys),
        ValidateCTd(keys="image"),
    ]
    if keep_input:
        chain.append(CopyItemsd(keys="image", names=INPUT_HU_KEY))
    chain += [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=params.target_spacing, mode=["bilinear", "nearest"][: len(keys)]),
    ]
    if with_label:
        chain.append(StructureChannelsd(keys="label", structures=params.structure_list))
    if params.normalisation == "scale":
        chain.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    else:
        chain += [
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            NormalizeIntensityd(keys="image"),
        ]
    chain.append(EnsureTyped(keys=keys, dtype="float32"))
    return chain


def train_transforms(params: CTVParams, samples_per_volume: int = 4) -> list:
    """Patches around foreground (2:1) and background, then geometric and intensity augmentation.

    Several patches per volume, so a batch mixes cases; probabilities and ranges are ``params.augment``.
    The label is one channel per structure here (``pre_transforms(with_label=True)``), its uncontoured
    structures marked last (``MarkUncontouredd``), after any left-right flip has swapped them.
    """
    keys = ["image", "label"]
    aug = params.augment
    rotate = math.radians(aug.rotate_deg)
    return [
        SpatialPadd(keys=keys, spatial_size=params.patch_size),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=params.patch_size,
            pos=2,
            neg=1,
            num_samples=samples_per_volume,
            image_key="image",
            image_threshold=-1e9,
        ),
        Rand3DElasticd(
            keys=keys,
            prob=aug.elastic_prob,
            sigma_range=aug.elastic_sigma,
            magnitude_range=aug.elastic_magnitude,
            mode=["bilinear", "nearest"],
            padding_mode="border",
        ),
        RandAffined(
            keys=keys,
            prob=aug.affine_prob,
            rotate_range=[rotate] * 3,
            translate_range=[aug.translate_voxels] * 3,
            scale_range=[aug.scale] * 3,
            mode=["bilinear", "nearest"],
            padding_mode="border",
        ),
        # Left-right swaps the paired structures' channels too; the other two flips keep laterality.
        RandFlipLeftRightd(keys=keys, structures=params.structure_list, label_key="label", prob=aug.flip_prob),
        RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=0.1, prob=aug.intensity_prob),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=aug.intensity_prob),
        RandGaussianNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std),
        EnsureTyped(keys=keys, dtype="float32", track_meta=False),
        MarkUncontouredd(keys="label"),
    ]


def val_transforms(params: CTVParams) -> list:
    """Whole labelled volumes for validation: ``pre_transforms`` with the uncontoured structures marked."""
    return pre_transforms(params, with_label=True) + [MarkUncontouredd(keys="label")]


def post_transforms(params: CTVParams) -> list:
    """Logits -> probabilities -> each structure on the input grid, inside the body, cleaned by its rule
    -> one bitmask volume (``structures.Structures``: bit value - 1 per structure; overlaps kept).

    Needs the input CT under ``INPUT_HU_KEY`` (``pre_transforms(..., keep_input=True)``)."""
    return [
        Activationsd(keys="pred", sigmoid=True),
        ContourStructuresd(
            keys="pred", structures=params.structure_list, threshold=params.threshold, hu_key=INPUT_HU_KEY
        ),
    ]
