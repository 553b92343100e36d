"""Overlap metrics for binary masks (numpy arrays or CPU tensors)."""

from __future__ import annotations

import numpy as np


def dice(pred, truth) -> float:
    """Dice of the non-zero voxels; 1.0 when both masks are empty."""
    a, b = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
