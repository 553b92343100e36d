"""Contour one case with an infer task and compare it with the case's reference label, per structure.

The one path from a CT and its reference to per-structure figures: the offline evaluation and
cross-validation (``train/evaluate.py``) and the server's commissioning reports (``lib/commissioning.py``)
both call :func:`contour_and_compare`, so a report's numbers are the evaluation's for the same masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from .metrics import added_path_length, compare, voxel_spacing
from .structures import Structures, decode_label
from .transforms.validation import load_ct


@dataclass
class CaseComparison:
    """A case's masks on the reference's grid, and each contained structure's figures (``metrics.compare``
    plus ``apl_mm``, the added path length)."""

    image: str  # the CT's path: read only for pictures
    predicted: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    spacing: tuple[float, ...]
    figures: dict[str, dict[str, Any]]
    affine: np.ndarray  # the reference's: its array axes in the patient's space

    def ras_arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The CT (HU, read now), the reference and the predicted masks, turned to RAS axes (patient's
        right, anterior, superior) as the pictures (``figures.contour_slice``) expect."""
        ornt = nib.orientations.io_orientation(self.affine)
        turn = lambda a: nib.orientations.apply_orientation(a, ornt)  # noqa: E731
        ct = np.asarray(load_ct(self.image))[0]  # on the reference's grid: the label was checked against it
        return turn(ct), {k: turn(v) for k, v in self.reference.items()}, {k: turn(v) for k, v in self.predicted.items()}


def contour_and_compare(
    task: Any,
    image: str,
    label: str,
    encoding: str = "labelmap",
    label_structures: Mapping[str, int] | None = None,
    device: str = "cpu",
) -> CaseComparison:
    """Contour ``image`` with ``task`` (a ``CTVInfer``: the served pipeline, asked for the lossless bitmask)
    and compare each of its structures that the reference ``label`` contains (``decode_label``: a structure
    the label does not contain is not scored)."""
    result_path, _ = task({"image": image, "device": device, "label_encoding": "bitmask"})
    try:
        bitmask = np.asarray(nib.load(result_path).dataobj)
    finally:
        os.unlink(result_path)
    structures: Structures = task.served(device).params.structure_list
    reference = nib.load(label)
    truth, contained = decode_label(np.asarray(reference.dataobj), structures, encoding, label_structures)
    spacing = voxel_spacing(reference.affine)
    predicted, truths, figures = {}, {}, {}
    for c, name in enumerate(structures.names):
        if not contained[c]:
            continue
        predicted[name], truths[name] = structures.mask(bitmask, name), truth[c] > 0
        figures[name] = {
            **compare(predicted[name], truths[name], spacing).as_dict(),
            "apl_mm": added_path_length(predicted[name], truths[name], spacing),
        }
    return CaseComparison(image, predicted, truths, spacing, figures, reference.affine)
