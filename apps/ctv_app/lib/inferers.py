"""Sliding-window inference with Gaussian blending, optionally averaged over flips."""

from __future__ import annotations

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from .params import CTVParams


class FlipTTAInferer(Inferer):
    """Average the logits of ``base`` over the identity and flips of each spatial axis."""

    def __init__(self, base: Inferer, spatial_dims: int = 3):
        self.base = base
        self.flips = [()] + [(2 + d,) for d in range(spatial_dims)]

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        total = None
        for dims in self.flips:
            x = torch.flip(inputs, dims) if dims else inputs
            y = self.base(x, network, *args, **kwargs)
            y = torch.flip(y, dims) if dims else y
            total = y if total is None else total + y
        return total / len(self.flips)


def build_inferer(params: CTVParams, device: str | torch.device | None = None, flip_tta: bool | None = None) -> Inferer:
    inferer: Inferer = SlidingWindowInferer(
        roi_size=params.patch_size,
        overlap=params.sw_overlap,
        mode="gaussian",
        sw_batch_size=2,
        sw_device=device,
        device=device,
    )
    if params.flip_tta if flip_tta is None else flip_tta:
        inferer = FlipTTAInferer(inferer)
    return inferer
