"""Sliding-window inference with Gaussian blending, only where the patient is, optionally averaged over flips."""

from __future__ import annotations

import math
from typing import Callable

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from .params import CTVParams
from .structures import Structures
from .transforms.mirror import LEFT_RIGHT_AXIS


class FlipTTAInferer(Inferer):
    """Average the logits of ``base`` over the identity and flips of each spatial axis.

    A left-right flip mirrors the anatomy: its prediction, flipped back, holds the right femur head in
    the Femur_Head_L channel, so its structure channels are swapped back first
    (``Structures.mirror_channels``). A lateral structure whose partner the model lacks has no
    prediction from that pass and is averaged over the others."""

    def __init__(self, base: Inferer, structures: Structures, spatial_dims: int = 3):
        self.base = base
        self.flips = [()] + [(2 + d,) for d in range(spatial_dims)]
        self.left_right = (2 + LEFT_RIGHT_AXIS,)
        mirror = structures.mirror_channels()
        self.sources = [i if m is None else m for i, m in enumerate(mirror)]
        self.unknown = [i for i, m in enumerate(mirror) if m is None]
        self.passes = torch.tensor([len(self.flips) - (m is None) for m in mirror], dtype=torch.float32)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        total = None
        for dims in self.flips:
            x = torch.flip(inputs, dims) if dims else inputs
            y = self.base(x, network, *args, **kwargs)
            y = torch.flip(y, dims) if dims else y
            if dims == self.left_right:
                y = torch.index_select(y, 1, torch.as_tensor(self.sources, device=y.device))
                y[:, self.unknown] = 0.0  # left out of the average (``passes``)
            total = y if total is None else total + y
        return total / self.passes.to(device=total.device, dtype=total.dtype).view(1, -1, *[1] * (total.ndim - 2))


# What the network is taken to say where no window was run: far outside the patient (sigmoid ~2e-9).
BACKGROUND_LOGIT = -20.0
# Voxels of the model's grid kept around the tissue: the input-grid body (above -400 HU) reaches past the
# tissue seen here (above the window's floor) only by the skin's partial volume, and the restore to the
# input grid interpolates from the neighbouring voxel.
BODY_MARGIN = 2


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where MONAI's sliding window starts its windows along one axis (``dense_patch_slices``' rule)."""
    if size <= roi:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    count = next(i for i in range(math.ceil(size / step)) if i * step + roi >= size) + 1
    return [min(i * step, size - roi) for i in range(count)]


class BodyCropInferer(Inferer):
    """``base`` (a ``SlidingWindowInferer``) run only on the windows that reach the patient's tissue, and
    only the network on windows that hold some.

    The tissue is every voxel above the volume's minimum (the window's floor: air, after clipping), grown
    by ``BODY_MARGIN``. Along each axis the crop is the span of the windows the full volume's sliding window
    places over that tissue, so the crop's sliding window places exactly those windows: every voxel of the
    tissue gets the same windows, the same Gaussian weights and so the same logits as without the crop
    (to float rounding). Outside the crop the logits are ``BACKGROUND_LOGIT``; the post-processing confines
    every structure to the body there anyway. A window that holds only air (a constant input) gets the
    network's answer for such a window, computed once: the same as running it."""

    def __init__(self, base: SlidingWindowInferer, overlap: float):
        self.base = base
        self.roi = tuple(int(r) for r in base.roi_size)
        self.overlap = overlap
        self.last_windows = (0, 0)  # (network runs, air windows answered from the cache) of the last call

    def crop(self, tissue: torch.Tensor) -> tuple[slice, ...] | None:
        """The crop of the spatial grid for a boolean ``tissue`` volume; None without tissue."""
        if not bool(tissue.any()):
            return None
        box = []
        for axis, roi in enumerate(self.roi):
            others = tuple(d for d in range(tissue.ndim) if d != axis)
            present = torch.nonzero(tissue.any(dim=others) if others else tissue).flatten()
            lo = max(int(present[0]) - BODY_MARGIN, 0)
            hi = min(int(present[-1]) + 1 + BODY_MARGIN, tissue.shape[axis])
            starts = [s for s in window_starts(tissue.shape[axis], roi, self.overlap) if s < hi and s + roi > lo]
            box.append(slice(starts[0], min(starts[-1] + roi, tissue.shape[axis])))
        return tuple(box)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        floor = float(inputs.amin())
        box = self.crop((inputs[0, 0] > floor))
        if box is None:  # nothing but air: the network's answer for an air window, everywhere
            box = tuple(slice(0, min(r, s)) for r, s in zip(self.roi, inputs.shape[2:]))
        cropped = inputs[(slice(None), slice(None), *box)]
        air_answer: list[torch.Tensor] = []
        runs = skipped = 0

        def skipping(windows: torch.Tensor) -> torch.Tensor:
            nonlocal runs, skipped
            air = (windows == floor).flatten(1).all(dim=1)
            if not bool(air.any()):
                runs += windows.shape[0]
                return network(windows, *args, **kwargs)
            if not air_answer:
                air_answer.append(network(windows[air][:1], *args, **kwargs))
                runs += 1
            out = air_answer[0].expand(windows.shape[0], *air_answer[0].shape[1:]).clone()
            if not bool(air.all()):
                out[~air] = network(windows[~air], *args, **kwargs)
                runs += int((~air).sum())
            skipped += int(air.sum())
            return out

        logits = self.base(cropped, skipping)
        self.last_windows = (runs, skipped)
        out = logits.new_full((logits.shape[0], logits.shape[1], *inputs.shape[2:]), BACKGROUND_LOGIT)
        out[(slice(None), slice(None), *box)] = logits
        return out


def build_inferer(params: CTVParams, device: str | torch.device | None = None, flip_tta: bool | None = None,
                  body_crop: bool = True) -> Inferer:  # fmt: skip
    """The served inferer: the sliding window (within the body: ``BodyCropInferer``), flips averaged if
    ``flip_tta`` (default: the model's own ``params.flip_tta``)."""
    inferer: Inferer = SlidingWindowInferer(
        roi_size=params.patch_size,
        overlap=params.sw_overlap,
        mode="gaussian",
        sw_batch_size=2,
        sw_device=device,
        device=device,
    )
    if body_crop:
        inferer = BodyCropInferer(inferer, params.sw_overlap)
    if params.flip_tta if flip_tta is None else flip_tta:
        inferer = FlipTTAInferer(inferer, params.structure_list)
    return inferer
