"""TaskConfig ``ctv``: builds the CTV infer task, trainer, scoring and strategies from one set of parameters."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from ..activelearning import EpistemicScoring, TTAScoring, Uncertain, UncertaintyScoring
from ..checkpoint import read_params
from ..dicom.results import RTConfig
from ..infers.ctv import CTVInfer
from ..networks import network_for
from ..params import CTVParams, conf_overrides
from ..review import LabelQualityScoring, Review
from ..trainers.ctv import CTVTrain

logger = logging.getLogger(__name__)


class CTVConfig(TaskConfig):
    """Weights: ``--conf ctv_model <path>``, else ``<app>/model/ctv.pt``.

    Parameters come from the checkpoint (what it was trained with), then ``--conf ctv_<name>``
    overrides, e.g. ``--conf ctv_flip_tta true``.
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self._infer: CTVInfer | None = None
        self._scorers: dict[str, ScoringMethod] = {}
        self.path = conf.get("ctv_model") or os.path.join(model_dir, f"{name}.pt")
        trained = read_params(self.path)
        self.params = CTVParams.from_conf(conf, base=trained)
        if trained is not None and trained.structure_list.names != self.params.structure_list.names:
            raise ValueError(
                f"{self.path} contours {trained.structure_list.names}; --conf ctv_structures asks for "
                f"{self.params.structure_list.names}: a model serves the structures it was trained for"
            )
        self.labels = self.params.labels
        self.network = network_for(self.params)
        self.rt_config = RTConfig.from_conf(conf)
        logger.info(f"CTV model {self.path} (exists: {os.path.exists(self.path)}) params {self.params.to_dict()}")

    def infer(self) -> InferTask:
        if self._infer is None:
            # Load the weights at start-up: the first request is not slowed, and a bad file fails loudly now.
            preload = os.path.exists(self.path)
            if not preload:
                logger.warning(f"CTV weights not found at {self.path}: /infer/ctv answers 503 until trained")
            self._infer = CTVInfer(
                path=self.path,
                network=self.network,
                params=self.params,
                name=self.name,
                rt_config=self.rt_config,
                overrides=conf_overrides(self.conf),
                preload=preload,
            )
        return self._infer

    def scoring_method(self) -> dict[str, ScoringMethod]:
        """``--conf epistemic_samples 8``, ``--conf epistemic_dropout 0.1``."""
        if not self._scorers:
            self._scorers = {
                "epistemic": EpistemicScoring(
                    self.infer(),
                    samples=int(self.conf.get("epistemic_samples", 8)),
                    dropout=float(self.conf.get("epistemic_dropout", 0.1)),
                ),
                "tta": TTAScoring(self.infer()),
                "label_quality": LabelQualityScoring(self.infer()),
            }
        return self._scorers

    def strategy(self) -> dict[str, Strategy]:
        """``uncertain``: by ``--conf uncertain_method epistemic|tta`` (or the request's ``method``);
        ``--conf uncertain_max_compute N`` bounds the studies scored inside one request."""
        method = self.conf.get("uncertain_method", "epistemic")
        uncertainty = {k: v for k, v in self.scoring_method().items() if isinstance(v, UncertaintyScoring)}
        if method not in uncertainty:
            raise ValueError(f"uncertain_method must be one of {sorted(uncertainty)}, got {method!r}")
        max_compute = int(self.conf.get("uncertain_max_compute", 4))
        return {
            "uncertain": Uncertain(uncertainty, method=method, max_compute=max_compute),
            "review": Review(self.scoring_method()["label_quality"]),
        }

    def trainer(self) -> Optional[TrainTask]:
        return CTVTrain(served_path=self.path, params=self.params, name=self.name)
