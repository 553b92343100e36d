"""One contouring model as a MONAI Label TaskConfig, parameterised by its name.

As in MONAI Label's radiology sample app, each served model is one TaskConfig that builds its infer task,
trainer, scoring methods and strategies from one description: here a ``CTVParams`` (structures among
them). A model differs from another by its name and its default parameters only, so a variant is a small
named subclass (``configs/ctv.py``, ``configs/hn.py``) and ``configs.CONFIGS`` lists them for
``--conf models ctv,hn``.

For the model named ``<name>``:

- weights: served from the model's versions (``lib/versions.py``) under the data folder (``--conf
  data_dir``): research mode serves ``--conf <name>_model <path>`` if given (training publishes there),
  else ``<data_dir>/models/<name>/served.pt``, first a copy of the shipped ``<app>/model/<name>.pt``,
  which is never written; clinical mode (``--conf clinical_mode true``) serves only the version a
  physicist approved, and training makes candidates. Without ``data_dir`` (offline tools, tests of one
  task) there are no versions: the given or shipped file is served as it is;
- parameters: the checkpoint's own (what it was trained with), else the model's ``defaults``; then the
  ``--conf <name>_<param>`` overrides, e.g. ``--conf ctv_flip_tta true``, ``--conf hn_threshold 0.4``
  (``params.conf_overrides``); the overrides never re-label a checkpoint's structures;
- the task names: infer and train task ``<name>``; scoring methods and strategies keep their plain names
  (``uncertain``, ``review``, ``epistemic``, ``tta``, ``label_agreement``, ``label_quality``) for the first
  model served and are ``<name>_uncertain``... for the others (``init(..., primary=False)``), so two models
  never replace each other's, and each stores its scores in the image and label info under its own
  method name.
"""

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
from ..engines import EngineSettings
from ..infers.ctv import CTVInfer
from ..networks import network_for
from ..params import CTVParams, as_bool, conf_overrides
from ..provenance import file_sha256
from ..review import LabelAgreementScoring, LabelQualityScoring, LabelReviewScoring, Review
from ..trainers.ctv import CTVTrain
from ..versions import ModelVersions

logger = logging.getLogger(__name__)


class ContouringConfig(TaskConfig):
    """A contouring model named at ``init``; subclasses set ``defaults`` and ``description``."""

    # This model's parameters where they differ from ``CTVParams``' defaults (a checkpoint's own win).
    defaults: dict[str, Any] = {}
    description = "Contours structures on planning CT (residual SE-DynUNet)"
    # What the weights shipped in <app>/model/<name>.pt are: their versions' model card says it.
    shipped_card: dict[str, str] = {"intended_use": "unknown", "limitations": "unknown", "data": "unknown"}

    @classmethod
    def default_params(cls) -> CTVParams:
        return CTVParams().updated(cls.defaults)

    def init(
        self, name: str, model_dir: str, conf: dict[str, str], planner: Any, primary: bool = True, **kwargs
    ) -> None:
        """``primary``: the first model served, whose scoring methods and strategies keep their plain names."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self._infer: CTVInfer | None = None
        self._scorers: dict[str, ScoringMethod] = {}
        self.task_prefix = "" if primary else f"{name}_"
        given = conf.get(f"{name}_model")
        self.versions: ModelVersions | None = None
        self.path = given or os.path.join(model_dir, f"{name}.pt")
        if conf.get("data_dir"):
            self.versions = ModelVersions(conf["data_dir"], name, as_bool(conf.get("clinical_mode", False)), given)
            shipped = os.path.join(model_dir, f"{name}.pt")
            is_shipped = os.path.exists(shipped) and (
                not given or (os.path.exists(given) and file_sha256(given) == file_sha256(shipped))
            )
            self.versions.start(self.path, "shipped" if is_shipped else "given")  # a copy of the shipped is those
            self.path = self.versions.served_path
        trained = read_params(self.path)
        defaults = self.default_params()
        self.overrides = conf_overrides(conf, name)
        self.params = (trained if trained is not None else defaults).updated(self.overrides)
        if trained is not None and trained.structure_list.names != self.params.structure_list.names:
            raise ValueError(
                f"{self.path} contours {trained.structure_list.names}; --conf {name}_structures asks for "
                f"{self.params.structure_list.names}: a model serves the structures it was trained for"
            )
        expected = defaults.updated(self.overrides).structure_list.names
        if trained is not None and trained.structure_list.names != expected:  # e.g. a single-CTV checkpoint
            logger.warning(
                f"model {name}: {self.path} contours {trained.structure_list.names}, not the {name} model's "
                f"{expected}; serving the checkpoint's structures"
            )
        self.labels = self.params.labels
        self.network = network_for(self.params)
        self.rt_config = RTConfig.from_conf(conf)
        self.engine_settings = EngineSettings.from_conf(conf)
        logger.info(f"model {name}: {self.path} (exists: {os.path.exists(self.path)}) params {self.params.to_dict()}")

    def infer(self) -> InferTask:
        if self._infer is None:
            # Load the weights at start-up: the first request is not slowed, and a bad file fails loudly now.
            preload = os.path.exists(self.path)
            missing = None
            if self.versions is not None and self.versions.mode == "clinical":
                missing = (f"no {self.name} version is approved for clinical use: commission one (POST /commission/"
                           f"{self.name}?version=...) and have a physicist approve it (POST /models/{self.name}/approve)")  # fmt: skip
            if not preload:
                logger.warning(f"{self.name} weights not found at {self.path}: /infer/{self.name} answers 503 until "
                               f"trained (POST /train/{self.name}) or given (--conf {self.name}_model)")  # fmt: skip
            self._infer = CTVInfer(
                path=self.path,
                network=self.network,
                params=self.params,
                name=self.name,
                rt_config=self.rt_config,
                overrides=self.overrides,
                defaults=self.default_params(),
                description=self.description,
                missing=missing,
                engine_settings=self.engine_settings,
                preload=preload,
            )
        return self._infer

    def task_for(self, path: str) -> CTVInfer:
        """An infer task for the checkpoint at ``path`` (a version being commissioned), built as the served one."""
        params = (read_params(path) or self.default_params()).updated(self.overrides)
        return CTVInfer(path=path, network=network_for(params), params=params, name=self.name, rt_config=self.rt_config,
                        overrides=self.overrides, defaults=self.default_params(), description=self.description,
                        engine_settings=self.engine_settings, preload=True)  # fmt: skip

    def scoring_method(self) -> dict[str, ScoringMethod]:
        """``--conf epistemic_samples 8``, ``--conf epistemic_dropout 0.1`` (every model's)."""
        if not self._scorers:
            scorers: list[ScoringMethod] = [
                EpistemicScoring(
                    self.infer(),
                    samples=int(self.conf.get("epistemic_samples", 8)),
                    dropout=float(self.conf.get("epistemic_dropout", 0.1)),
                ),
                TTAScoring(self.infer()),
                LabelAgreementScoring(self.infer()),
                LabelQualityScoring(self.infer()),
            ]
            for scorer in scorers:
                scorer.method = self.task_prefix + scorer.method  # its name here, and its key in the info
            self._scorers = {scorer.method: scorer for scorer in scorers}
        return self._scorers

    def strategy(self) -> dict[str, Strategy]:
        """``uncertain``: by ``--conf uncertain_method epistemic|tta`` (or the request's ``method``);
        ``--conf uncertain_max_compute N`` bounds the studies scored inside one request. ``review``: by
        ``--conf review_method label_agreement|label_quality`` (``lib/review.py``)."""
        method = self.conf.get("uncertain_method", "epistemic")
        uncertainty = self._scorers_of(UncertaintyScoring)
        if method not in uncertainty:
            raise ValueError(f"uncertain_method must be one of {sorted(uncertainty)}, got {method!r}")
        max_compute = int(self.conf.get("uncertain_max_compute", 4))
        review_method = self.conf.get("review_method", LabelAgreementScoring.method)
        review = self._scorers_of(LabelReviewScoring)
        if review_method not in review:
            raise ValueError(f"review_method must be one of {sorted(review)}, got {review_method!r}")
        return {
            f"{self.task_prefix}uncertain": Uncertain(uncertainty, method=method, max_compute=max_compute),
            f"{self.task_prefix}review": Review(review[review_method]),
        }

    def _scorers_of(self, kind: type) -> dict[str, ScoringMethod]:
        """This model's scoring methods of one kind, by their plain names (``epistemic``, ``label_agreement``)."""
        return {k.removeprefix(self.task_prefix): v for k, v in self.scoring_method().items() if isinstance(v, kind)}

    def trainer(self) -> Optional[TrainTask]:
        return CTVTrain(served_path=self.path, params=self.params, name=self.name, description=self.description,
                        versions=self.versions)  # fmt: skip
