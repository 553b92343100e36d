"""TaskConfig ``ctv``: builds the CTV infer task (and, later, its trainer) from one set of parameters."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..checkpoint import read_params
from ..infers.ctv import CTVInfer
from ..networks import build_network
from ..params import CTVParams

logger = logging.getLogger(__name__)


class CTVConfig(TaskConfig):
    """Weights: ``--conf ctv_model <path>``, else ``<app>/model/ctv.pt``.

    Parameters come from the checkpoint (what it was trained with), then ``--conf ctv_<name>``
    overrides, e.g. ``--conf ctv_flip_tta true``.
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.path = conf.get("ctv_model") or os.path.join(model_dir, f"{name}.pt")
        self.params = CTVParams.from_conf(conf, base=read_params(self.path))
        self.labels = self.params.labels
        self.network = build_network(
            self.params.filters, self.params.refinement_passes, self.params.deep_supr_num, self.params.dropout
        )
        logger.info(f"CTV model {self.path} (exists: {os.path.exists(self.path)}) params {self.params.to_dict()}")

    def infer(self) -> InferTask:
        # Load the weights at start-up: the first request is not slowed, and a bad file fails loudly now.
        preload = os.path.exists(self.path)
        if not preload:
            logger.warning(f"CTV weights not found at {self.path}: /infer/ctv will fail until they exist")
        return CTVInfer(path=self.path, network=self.network, params=self.params, name=self.name, preload=preload)

    def trainer(self) -> Optional[TrainTask]:
        return None
