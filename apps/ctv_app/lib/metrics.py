"""Contour metrics per structure: Dice, HD95, mean surface distance, surface Dice, volume difference;
and the ROC AUC that judges a label-quality score (the review).

The one implementation the evaluation, cross-validation, ablation, tests and the server's commissioning
use. Published metric code differs between institutions by up to 50% on the same contours, so the
conventions are fixed here and written down in ``docs/metrics.md``:

- Inputs: two masks on the same voxel grid (non-zero = inside) and the voxel spacing in mm along the
  array axes (anisotropic allowed, e.g. ``(3.906, 3.906, 2.5)``). ``pred`` is the contour judged,
  ``truth`` the reference.
- Surface: the mask's *boundary voxels*, those with at least one of their 6 face neighbours outside the
  mask; beyond the array counts as outside, so a mask cut by the grid has a surface on the cut. Each
  boundary voxel is one surface point at its centre, all weighted equally (no surface-element areas).
- Directed distances: from every boundary voxel of one mask, the Euclidean distance in mm to the
  centre of the nearest boundary voxel of the other (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``), so 0 where the surfaces share a voxel.
- HD95: the larger of the two directed 95th percentiles (numpy's linear interpolation between order
  statistics). HD: the largest distance either way. MSD: the mean of the pooled distances of both
  surfaces (each boundary voxel counts once, so the larger surface weighs more than in the average of
  the two directed means). Surface Dice at tolerance t (Nikolov et al. 2018): the fraction of the
  boundary voxels of both masks within t mm (``<=``) of the other surface; at 2 mm, 3 mm and one voxel
  (the largest spacing): on a grid coarser than the tolerance, a surface one voxel off counts as
  missed at 2 and 3 mm (surface points are voxel centres), so the one-voxel figure says how much of
  the surface is off by at most the grid's own resolution.
- Volume: voxel count x voxel volume, in ml; difference signed, prediction minus truth, and relative
  to the truth's volume in %.
- Empty masks: both empty -> every overlap and distance metric is None (nothing to score; summaries
  count it in ``n_undefined``), volume difference 0 ml. One empty -> Dice 0, surface Dice 0, distances
  None (undefined: there is no surface to measure to), relative volume difference None when the truth
  is empty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

TOLERANCES_MM = (2.0, 3.0)
ROUNDING_MM = 1e-6  # a distance within this of the tolerance counts as within it (float rounding)


def _mask(array) -> np.ndarray:
    return np.asarray(array) > 0


def dice(pred, truth) -> float | None:
    """Dice of the non-zero voxels; None when both masks are empty."""
    a, b = _mask(pred), _mask(truth)
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def structure_dice(pred, truth) -> list[float | None]:
    """Dice per structure channel of ``[C, ...]`` masks; None for a channel the truth does not contain
    (filled with ``losses.UNCONTOURED``, negative) and for a channel empty in both."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    return [None if (t < 0).all() else dice(p, t) for p, t in zip(pred, truth)]


def voxel_spacing(affine) -> tuple[float, ...]:
    """Voxel size in mm along each array axis of a (NIfTI) affine: the lengths of its columns."""
    a = np.asarray(affine, dtype=float)
    return tuple(float(s) for s in np.linalg.norm(a[:3, :3], axis=0))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face (6-connected in 3-D) neighbour outside it; outside the array is outside."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``a | b`` (None when both are empty), from its projection on each axis."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(np.any(union, axis=tuple(i for i in range(union.ndim) if i != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
        union = union[(slice(None),) * axis + (box[-1],)]  # later projections read the cropped array
    return tuple(box)


def _cropped(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both masks (bool) in the union's bounding box with one outside voxel all round: everything
    either surface or volume needs (an empty box when both are empty)."""
    a, b = _mask(pred), _mask(truth)
    if a.shape != b.shape:
        raise ValueError(f"masks on different grids: {a.shape} vs {b.shape}")
    box = _union_box(a, b)
    if box is None:
        return np.zeros((0,) * a.ndim, bool), np.zeros((0,) * a.ndim, bool)
    return np.pad(a[box], 1), np.pad(b[box], 1)


def surface_distances(pred, truth, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (from each boundary voxel of ``pred`` to the surface of ``truth``,
    from each boundary voxel of ``truth`` to the surface of ``pred``), each in C order of its voxels.

    An empty mask has no boundary voxels (an empty array); the other mask's distances are then ``inf``.
    Computed in the union's bounding box padded by one outside voxel: every surface lies in it, so the
    distances are those of the whole grid."""
    if len(spacing) != np.ndim(pred):
        raise ValueError(f"spacing {tuple(spacing)} does not match {np.ndim(pred)}-D masks")
    return _surface_distances(*_cropped(pred, truth), tuple(float(s) for s in spacing))


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    surface_a, surface_b = _boundary(a), _boundary(b)

    def to_surface(points: np.ndarray, surface: np.ndarray) -> np.ndarray:
        if not surface.any():
            return np.full(int(points.sum()), np.inf)
        return ndimage.distance_transform_edt(~surface, sampling=spacing)[points]

    return to_surface(surface_a, surface_b), to_surface(surface_b, surface_a)


@dataclass(frozen=True)
class StructureMetrics:
    """One structure's comparison (``None``: undefined for these masks; see the module's conventions)."""

    dice: float | None
    hd95_mm: float | None
    hd_mm: float | None
    msd_mm: float | None
    surface_dice_2mm: float | None
    surface_dice_3mm: float | None
    surface_dice_voxel: float | None  # tolerance: the largest voxel spacing
    volume_pred_ml: float
    volume_truth_ml: float
    volume_diff_ml: float
    volume_diff_pct: float | None

    def as_dict(self) -> dict:
        return asdict(self)


METRICS = tuple(StructureMetrics.__dataclass_fields__)


def surface_dice(d_pred: np.ndarray, d_truth: np.ndarray, tolerance_mm: float) -> float | None:
    """Fraction of both surfaces' points within ``tolerance_mm`` of the other surface, from
    :func:`surface_distances`; None when both are empty."""
    n = d_pred.size + d_truth.size
    if n == 0:
        return None
    limit = tolerance_mm + ROUNDING_MM
    return float((np.count_nonzero(d_pred <= limit) + np.count_nonzero(d_truth <= limit)) / n)


def compare(pred, truth, spacing: Sequence[float]) -> StructureMetrics:
    """Every metric of ``pred`` against ``truth`` (same grid, ``spacing`` in mm per array axis)."""
    if len(spacing) != np.ndim(pred):
        raise ValueError(f"spacing {tuple(spacing)} does not match {np.ndim(pred)}-D masks")
    spacing = tuple(float(s) for s in spacing)
    a, b = _cropped(pred, truth)  # nothing outside the union's box changes any metric
    d_pred, d_truth = _surface_distances(a, b, spacing)
    ml = math.prod(spacing) / 1000.0
    v_pred, v_truth = int(a.sum()) * ml, int(b.sum()) * ml
    distances = d_pred.size > 0 and d_truth.size > 0
    return StructureMetrics(
        dice=dice(a, b),
        hd95_mm=float(max(np.percentile(d_pred, 95), np.percentile(d_truth, 95))) if distances else None,
        hd_mm=float(max(d_pred.max(), d_truth.max())) if distances else None,
        msd_mm=float((d_pred.sum() + d_truth.sum()) / (d_pred.size + d_truth.size)) if distances else None,
        surface_dice_2mm=surface_dice(d_pred, d_truth, TOLERANCES_MM[0]),
        surface_dice_3mm=surface_dice(d_pred, d_truth, TOLERANCES_MM[1]),
        surface_dice_voxel=surface_dice(d_pred, d_truth, max(spacing)),
        volume_pred_ml=v_pred,
        volume_truth_ml=v_truth,
        volume_diff_ml=v_pred - v_truth,
        volume_diff_pct=100.0 * (v_pred - v_truth) / v_truth if v_truth > 0 else None,
    )


def compare_structures(
    pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], spacing: Sequence[float]
) -> dict[str, StructureMetrics]:
    """:func:`compare` for every structure of ``truth`` (name -> mask); a structure ``pred`` lacks is empty."""
    out = {}
    for name, t in truth.items():
        p = pred.get(name)
        out[name] = compare(np.zeros(np.shape(t), bool) if p is None else p, t, spacing)
    return out


def contour_pixels(mask) -> np.ndarray:
    """Each axial slice's (last axis) contour: the mask's pixels with a 4-connected in-plane neighbour outside
    it (outside the array is outside). Slices are drawn one by one, so no neighbour across slices counts."""
    mask = _mask(mask)
    in_plane = np.zeros((3,) * mask.ndim, bool)
    in_plane[(slice(None), slice(None)) + (1,) * (mask.ndim - 2)] = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=in_plane, border_value=0)


def added_path_length(pred, truth, spacing: Sequence[float], tolerance_mm: float = 0.0) -> float:
    """Added path length in mm (Vaassen et al., Phys Imaging Radiat Oncol 2020): how much of ``truth``'s
    contour a clinician draws to turn ``pred`` into it. Per axial slice (the last axis), the contour pixels
    of ``truth`` (:func:`contour_pixels`) farther than ``tolerance_mm`` from every contour pixel of ``pred``
    on the same slice, each one pixel long (the mean in-plane spacing); a slice ``pred`` leaves empty adds
    its whole contour. What ``pred`` has and ``truth`` lacks is deleted, not drawn, and adds nothing."""
    if len(spacing) != np.ndim(truth) or np.ndim(truth) < 3:
        raise ValueError(f"spacing {tuple(spacing)} does not match {np.ndim(truth)}-D masks (x, y, axial)")
    drawn, kept = contour_pixels(truth), contour_pixels(pred)
    pixel_mm = (float(spacing[0]) + float(spacing[1])) / 2.0
    if not kept.any():
        return float(drawn.sum()) * pixel_mm
    # distances within each slice: across slices the grid is made too far apart for any to be the nearest
    far = 1e3 * (max(np.shape(truth)[:2]) * max(float(spacing[0]), float(spacing[1])) + tolerance_mm + 1.0)
    sampling = (float(spacing[0]), float(spacing[1])) + (far,) * (np.ndim(truth) - 2)
    distance = ndimage.distance_transform_edt(~kept, sampling=sampling)
    return float(np.count_nonzero(distance[drawn] > tolerance_mm + ROUNDING_MM)) * pixel_mm


def summarise(per_case: Mapping[str, float | None]) -> dict:
    """n, mean, sd (n-1), median, min, max over the defined values of ``{case id: value}``;
    ``n_undefined`` counts the cases whose value is None (e.g. HD95 of a structure the prediction missed),
    so an aggregate never hides them. ``per_case`` is kept."""
    values = np.array([v for v in per_case.values() if v is not None], dtype=float)
    stats = (
        {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "median": float(np.median(values)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
        if values.size
        else dict.fromkeys(("mean", "sd", "median", "min", "max"))
    )
    return {"n": int(values.size), "n_undefined": len(per_case) - int(values.size), **stats, "per_case": dict(per_case)}


def roc_auc(positive_scores, negative_scores) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    pos, neg = np.asarray(positive_scores, dtype=float), np.asarray(negative_scores, dtype=float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
