"""TaskConfig ``hn``: the head-and-neck model (OpenKBP's structure sets, TG-263 names).

Weights ``--conf hn_model <path>`` (else ``<app>/model/hn.pt``), overrides ``--conf hn_<param>``. Its
defaults differ from the cervix model's in the structures only (``structures.HEAD_AND_NECK``: the three
PTVs, highest dose first, then the organs at risk). Spacing, patch and width stay ``CTVParams``'
defaults until they are chosen by measurement on head-and-neck CT (issue 18); a checkpoint carries the
parameters it was trained with, so trained weights serve with their own. The soft-tissue window
(W400/L40) suits the PTVs and the soft-tissue organs; the mandible's bone lies above it and reads
as 1.0, as bright as nothing else in the neck."""

from __future__ import annotations

from ..structures import HEAD_AND_NECK
from .contouring import ContouringConfig


class HNConfig(ContouringConfig):
    defaults = {"structures": list(HEAD_AND_NECK)}
    description = "Head-and-neck PTVs and organs at risk on planning CT (residual SE-DynUNet)"
    shipped_card = {
        "intended_use": "Research only. NOT for clinical use: not commissioned (model card: apps/ctv_app/model/hn.md).",
        "limitations": "4 mm voxels and 66 minutes of training on 2 CPU cores: far below clinical level for the PTVs and the "
        "esophagus (docs/real_data.md); head-and-neck CT as OpenKBP's plans show it only.",
        "data": "OpenKBP (Babier et al., Med Phys 2021; MIT licence; CT and contours from TCIA collections): 163 "
        "training-split plans (train/splits/openkbp.json).",
    }
