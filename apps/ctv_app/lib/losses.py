"""Segmentation losses, summed over deep-supervision heads with halving weights."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

from .params import LOSS_NAMES


class DeepSupervisionLoss(nn.Module):
    """``"dice_bce"`` (served) or ``"bce"`` (the ablation's baseline) on DynUNet training output.

    Accepts ``[B, heads, C, ...]`` or plain logits ``[B, C, ...]``. Head k gets weight 2^-k
    (normalised), as in nnU-Net: the full-resolution head dominates while coarse heads still push
    gradients into the decoder. ``reduction="none"`` gives one loss per sample, which the
    quality-aware trainer weights.
    """

    def __init__(self, loss: str = "dice_bce", reduction: str = "mean"):
        super().__init__()
        if loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {loss!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.loss = loss
        self.reduction = reduction
        self.dice = DiceLoss(sigmoid=True, reduction="none")

    def _one(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_sample = bce.reshape(logits.shape[0], -1).mean(dim=1)
        if self.loss == "dice_bce":
            per_sample = per_sample + self.dice(logits, target).reshape(logits.shape[0], -1).mean(dim=1)
        return per_sample if self.reduction == "none" else per_sample.mean()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == target.dim():
            return self._one(outputs, target)
        heads = outputs.shape[1]
        weights = torch.tensor([0.5**k for k in range(heads)], device=outputs.device)
        weights = weights / weights.sum()
        return sum(w * self._one(outputs[:, k], target) for k, w in enumerate(weights))
