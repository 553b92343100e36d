"""Learning from inconsistent annotators: quality-awareness module (QAM) + overfitting control (OCM).

- QAM: a small VGG-style CNN on the image concatenated with its training label; global average
  pooling replaces VGG's classifier, giving one raw quality score per sample.
- OCM: ``lambda * tanh(score)`` bounds the score to (-lambda, lambda), so within a batch the
  largest weight is at most e^(2 lambda) times the smallest.
- A softmax over the batch turns the (bounded) scores into weights that sum to 1; the loss is
  sum_i w_i * loss_i. The same loss trains the segmentation net and the QAM; at inference only
  the segmentation net runs. The QAM learns to give weight to the samples whose labels the
  segmentation net can fit, i.e. the consistent ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv, Pool
from torch import nn


class QualityAwarenessModule(nn.Module):
    """VGG-style: per level two 3x3 conv + ReLU, then 2x max-pool; a 1x1 conv to one channel and
    global average pooling give the raw score ``[B]``."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 2:
            raise ValueError(f"in_channels is image + label channels, so >= 2; got {in_channels}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive, got {list(channels)}")
        conv, pool = Conv[Conv.CONV, spatial_dims], Pool[Pool.MAX, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [conv(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            layers += [conv(c, c, 3, padding=1), nn.ReLU(inplace=True), pool(2)]
            c_in = c
        layers.append(conv(c_in, 1, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, label.to(image.dtype).clamp(min=0)], dim=1)  # uncontoured (-1) reads as empty
        return self.features(x).mean(dim=tuple(range(2, x.dim())))[:, 0]


def overfitting_control(scores: torch.Tensor, ocm_lambda: float) -> torch.Tensor:
    """OCM: ``lambda * tanh(score)``, in (-lambda, lambda)."""
    return ocm_lambda * torch.tanh(scores)


class QualityWeightedLoss(nn.Module):
    """sum_i w_i * loss_i with w = softmax over the batch of the QAM scores (OCM-bounded unless
    ``ocm_lambda`` is None, which is the QAM-only method).

    ``centre``: subtract the batch's mean score before the OCM. The softmax ignores a shift common to the
    batch, so the raw scores have no anchor and can drift together until tanh saturates, where every
    sample's bounded score is about lambda and the weights are uniform again (the plain loss); centred,
    the scores the OCM bounds are their differences within the batch.

    ``patches_per_case``: the batch holds that many consecutive patches of each case, and a label's quality
    is its case's: the case's score is the mean of its patches' scores, the softmax is over the cases, and
    the loss weighted is one per case (``DeepSupervisionLoss(patches_per_case=...)``)."""

    def __init__(self, qam: QualityAwarenessModule, ocm_lambda: float | None = 2.0, centre: bool = False,
                 patches_per_case: int = 1):  # fmt: skip
        super().__init__()
        if ocm_lambda is not None and ocm_lambda <= 0:
            raise ValueError(f"ocm_lambda must be > 0 (or None for QAM alone), got {ocm_lambda}")
        if patches_per_case < 1:
            raise ValueError(f"patches_per_case must be >= 1, got {patches_per_case}")
        self.qam = qam
        self.ocm_lambda = ocm_lambda
        self.centre = centre
        self.patches_per_case = patches_per_case

    def weights(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        scores = self.qam(image, label)
        if self.patches_per_case > 1:
            scores = scores.reshape(-1, self.patches_per_case).mean(1)
        if self.centre:
            scores = scores - scores.mean()
        if self.ocm_lambda is not None:
            scores = overfitting_control(scores, self.ocm_lambda)
        return torch.softmax(scores, dim=0)

    def forward(self, per_sample_loss: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n = image.shape[0] // self.patches_per_case
        if per_sample_loss.dim() != 1 or per_sample_loss.shape[0] != n:
            raise ValueError(f"need one loss per case ([{n}]), got shape {tuple(per_sample_loss.shape)}")
        return (self.weights(image, label) * per_sample_loss).sum()


def small_loss_weights(per_sample_loss: torch.Tensor, ocm_lambda: float = 2.0) -> torch.Tensor:
    """Weights from the losses themselves, no QAM: each sample's loss standardised over the batch, bounded
    by the OCM's ``lambda * tanh`` (a low loss weighs up to e^(2 lambda) times a high one), softmax over the
    batch. Detached: the weights steer the network, they are not trained. A corrupted label has the higher
    loss under a network that has learnt the consistent labels (the "small-loss" criterion of
    co-teaching, Han et al. 2018)."""
    if ocm_lambda <= 0:
        raise ValueError(f"ocm_lambda must be > 0, got {ocm_lambda}")
    loss = per_sample_loss.detach()
    z = (loss - loss.mean()) / loss.std().clamp(min=1e-8) if loss.numel() > 1 else torch.zeros_like(loss)
    return torch.softmax(overfitting_control(-z, ocm_lambda), dim=0)
