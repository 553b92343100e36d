"""Sliding-window inference with Gaussian blending, optionally averaged over flips."""

from __future__ import annotations

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
        inferer = FlipTTAInferer(inferer, params.structure_list)
    return inferer
