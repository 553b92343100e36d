"""Overlap metrics for binary masks (numpy arrays or CPU tensors)."""

from __future__ import annotations

import numpy as np


def dice(pred, truth) -> float:
    """Dice of the non-zero voxels; 1.0 when both masks are empty."""
    a, b = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def structure_dice(pred, truth) -> list[float | None]:
    """Dice per structure channel of ``[C, ...]`` masks; None for a channel the truth does not contain
    (filled with ``losses.UNCONTOURED``)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    return [None if (t < 0).all() else dice(p, t) for p, t in zip(pred, truth)]


def roc_auc(positive_scores, negative_scores) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    pos, neg = np.asarray(positive_scores, dtype=float), np.asarray(negative_scores, dtype=float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
