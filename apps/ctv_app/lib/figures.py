"""Figures for the reports in docs/: a CT slice with truth and predicted contours, and learning curves.

Colours are each structure's own (``structures.Structure.colour``), so a figure matches the page,
the RTSTRUCT and the DICOM SEG. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .structures import Structures  # noqa: E402


def busiest_slice(truth: Mapping[str, np.ndarray]) -> int:
    """The axial slice (last array axis) where the truth draws the most structures, then the most voxels."""
    masks = [np.asarray(m) > 0 for m in truth.values()]
    present = sum(m.any(axis=(0, 1)).astype(int) for m in masks)
    area = sum(m.sum(axis=(0, 1)) for m in masks)
    return int(np.lexsort((area, present))[-1])


def contour_slice(
    path: str,
    image: np.ndarray,
    truth: Mapping[str, np.ndarray],
    pred: Mapping[str, np.ndarray],
    structures: Structures,
    title: str,
    window: tuple[float, float] = (-160.0, 240.0),
    z: int | None = None,
) -> int:
    """Write a PNG of axial slice ``z`` (default :func:`busiest_slice`) of a RAS-ordered CT (HU; array
    axes towards the patient's right, anterior, superior): truth contours solid, predictions dashed, per
    structure in its colour, cropped to the structures with a margin. Shown as a radiologist reads a CT:
    the patient's right on the image's left, anterior up. Returns the slice drawn."""
    z = busiest_slice(truth) if z is None else z

    def shown(volume: np.ndarray) -> np.ndarray:  # [x, y] -> image rows y (anterior up), columns -x
        return np.asarray(volume)[::-1, :, z].T

    union = np.any([shown(m) > 0 for m in truth.values()], axis=0)
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    margin = 25
    box = (
        slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
        slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
    )
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.imshow(shown(image)[box], cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
    handles = []
    for s in structures:
        colour = tuple(c / 255 for c in s.colour)
        drawn = False
        for masks, style in ((truth, "solid"), (pred, "dashed")):
            m = masks.get(s.name)
            if m is not None and shown(m)[box].any():
                ax.contour(shown(m)[box] > 0, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
                drawn = True
        if drawn:
            handles.append(Line2D([], [], color=colour, label=s.name))
    handles += [
        Line2D([], [], color="white", linestyle="solid", label="clinical"),
        Line2D([], [], color="white", linestyle="dashed", label="model"),
    ]
    ax.legend(handles=handles, loc="lower left", fontsize=6, facecolor="black", labelcolor="white", framealpha=0.6)
    ax.set_title(f"{title} (slice {z}; patient's right on the left)", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return z


def learning_curves(
    path: str, curves: Mapping[str, Mapping[int, Sequence[float]]], ylabel: str, title: str
) -> None:
    """Write a PNG of ``{strategy: {labelled cases: [score per seed]}}``: mean with min-max bars."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, points in curves.items():
        xs = sorted(points)
        means = [float(np.mean(points[x])) for x in xs]
        low = [m - min(points[x]) for m, x in zip(means, xs)]
        high = [max(points[x]) - m for m, x in zip(means, xs)]
        ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
