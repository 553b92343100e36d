"""Segmentation losses, summed over deep-supervision heads with halving weights.

Multi-label: each structure is its own sigmoid channel, so overlapping structures are each learned
whole. A structure a training case does not contain (not contoured: a partial structure set) has its
label channel filled with ``UNCONTOURED`` and is left out of that case's loss; it is not taught as
background.
"""

from __future__ import annotations

import torch
from torch import nn

from .params import LOSS_NAMES

UNCONTOURED = -1.0  # label value of a whole channel whose structure the case does not contain


class DeepSupervisionLoss(nn.Module):
    """``"dice_bce"`` (served) or ``"bce"`` (the ablation's baseline) on DynUNet training output.

    Accepts ``[B, heads, C, ...]`` or plain logits ``[B, C, ...]``, and a target ``[B, C, ...]`` of 0/1,
    or ``UNCONTOURED`` on the channels a case does not contain. Per case and structure: BCE over the
    voxels plus soft Dice (smoothed by 1e-5, as MONAI's DiceLoss); a case's loss is the mean over the
    structures it contains (0 if none). Head k gets weight 2^-k (normalised), as in nnU-Net: the
    full-resolution head dominates while coarse heads still push gradients into the decoder.
    ``reduction="none"`` gives one loss per case, which the quality-aware trainer weights.

    ``patches_per_case``: the batch holds that many consecutive patches of each case (MONAI's list collate
    of a multi-sample crop); a case's loss is then taken over all its patches' voxels together, so that a
    patch that happens to hold little foreground does not decide its case's Dice.
    """

    def __init__(self, loss: str = "dice_bce", reduction: str = "mean", smooth: float = 1e-5,
                 patches_per_case: int = 1):  # fmt: skip
        super().__init__()
        if loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {loss!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if patches_per_case < 1:
            raise ValueError(f"patches_per_case must be >= 1, got {patches_per_case}")
        self.loss = loss
        self.reduction = reduction
        self.smooth = smooth
        self.patches_per_case = patches_per_case

    def _one(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        b, c = logits.shape[:2]
        logits, target = logits.reshape(b, c, -1), target.reshape(b, c, -1).to(logits.dtype)
        if self.patches_per_case > 1:
            if b % self.patches_per_case:
                raise ValueError(f"a batch of {b} patches is not whole cases of {self.patches_per_case} patches")
            b, p = b // self.patches_per_case, self.patches_per_case
            logits, target = (t.reshape(b, p, c, -1).transpose(1, 2).reshape(b, c, -1) for t in (logits, target))
        contained = (target[..., 0] != UNCONTOURED).to(logits.dtype)  # [B, C]: a channel is all or none
        target = target.clamp(min=0)
        per_structure = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        if self.loss == "dice_bce":
            prob = torch.sigmoid(logits)
            overlap = (prob * target).sum(-1)
            total = prob.sum(-1) + target.sum(-1)
            per_structure = per_structure + 1.0 - (2.0 * overlap + self.smooth) / (total + self.smooth)
        per_case = (per_structure * contained).sum(1) / contained.sum(1).clamp(min=1)
        return per_case if self.reduction == "none" else per_case.mean()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == target.dim():
            return self._one(outputs, target)
        heads = outputs.shape[1]
        weights = torch.tensor([0.5**k for k in range(heads)], device=outputs.device)
        weights = weights / weights.sum()
        return sum(w * self._one(outputs[:, k], target) for k, w in enumerate(weights))
