"""TaskConfig ``ctv``: the cervix model (CTV and organs at risk on pelvic planning CT).

Everything but its name and description is ``ContouringConfig``'s: ``--conf ctv_model <path>`` (else
``<app>/model/ctv.pt``), ``--conf ctv_<param>`` overrides, ``CTVParams``' defaults (structures
``structures.CERVIX``)."""

from __future__ import annotations

from .contouring import ContouringConfig


class CTVConfig(ContouringConfig):
    """Weights: ``--conf ctv_model <path>``, else ``<app>/model/ctv.pt``.

    Parameters come from the checkpoint (what it was trained with), then ``--conf ctv_<name>``
    overrides, e.g. ``--conf ctv_flip_tta true``.
    """

    defaults: dict = {}  # CTVParams' own defaults are the cervix model's (docs/model.md)
    description = "Cervical-cancer CTV and organs at risk on planning CT (residual SE-DynUNet)"
