"""Label quality for reviewers: the QAM trained with the served model scores every labelled case.

A model trained with ``quality_weighting`` carries its QAM. ``label_quality`` runs it on each
case's image and final label (the training pre-processing, whole volume: the QAM is fully
convolutional with global pooling) and stores the raw score in the label's info, beside the
annotator: ``{"label_quality": {"score", "model", "annotator", "ts"}}``. A low score means the
label agrees less with what the model learned from the other labels. The ``review`` strategy
returns the labelled case with the lowest score, for a reviewer to check.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .errors import CTVError
from .infers.ctv import CTVInfer, ServedModel
from .quality import QualityAwarenessModule
from .transforms import val_transforms
from .transforms.labels import label_datalist_keys

logger = logging.getLogger(__name__)


class NoQualityModelError(CTVError):
    status_code = 409


class LabelQualityScoring(ScoringMethod):
    method = "label_quality"

    def __init__(self, infer: CTVInfer):
        super().__init__("QAM score of each final label (low: likely wrong); needs a quality-weighted model")
        self.infer = infer
        self._qam: tuple[str, QualityAwarenessModule] | None = None

    def qam(self) -> tuple[QualityAwarenessModule, str]:
        qam, served = self._served_qam()
        return qam, served.record["sha256"]

    def _served_qam(self) -> tuple[QualityAwarenessModule, ServedModel]:
        served = self.infer.served("cpu")
        if served.qam is None:
            raise NoQualityModelError(
                "the served model was not trained with quality_weighting: no QAM to score labels with"
            )
        version = served.record["sha256"]
        if self._qam is None or self._qam[0] != version:
            qam = QualityAwarenessModule(3, in_channels=1 + len(served.params.labels))
            qam.load_state_dict({k.removeprefix("qam."): v for k, v in served.qam.items()})
            self._qam = (version, qam.eval())
        return self._qam[1], served

    @torch.no_grad()
    def score(self, image_path: str, label_path: str, label_info: dict | None = None) -> float:
        """The served QAM's raw score of one image + label pair (higher: more consistent); ``label_info``:
        the label's recorded encoding and structures, as the datastore keeps them."""
        return self._score(image_path, label_path, label_info)[0]

    def _score(self, image_path: str, label_path: str, label_info: dict | None = None) -> tuple[float, str]:
        """The score and the version of the model that gave it, pre-processed as that model was trained."""
        qam, served = self._served_qam()
        entry = {"image": image_path, "label": label_path, **label_datalist_keys(label_info or {})}
        item = Compose(val_transforms(served.params))(entry)
        image, label = torch.as_tensor(item["image"])[None].float(), torch.as_tensor(item["label"])[None].float()
        return float(qam(image, label)), served.record["sha256"]

    @torch.no_grad()
    def score_label(self, image_id: str, datastore: Datastore) -> float:
        tag = DefaultLabelTag.FINAL
        info = datastore.get_label_info(image_id, tag)
        score, version = self._score(datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, tag), info)
        record = {
            "score": score,
            "model": version,
            "annotator": info.get("annotator", "unknown"),
            "ts": int(time.time()),
        }
        datastore.update_label_info(image_id, tag, {self.method: record})
        logger.info(f"label quality {score:.4f} for {image_id} (annotator {record['annotator']})")
        return score

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        images = datastore.get_labeled_images()
        return {"method": self.method, "scores": {i: self.score_label(i, datastore) for i in images}}


class Review(Strategy):
    """The labelled case whose label the QAM trusts least (scores of the served model; missing
    ones are computed, at most ``max_compute`` per request)."""

    def __init__(self, scoring: LabelQualityScoring, max_compute: int = 16):
        super().__init__("Labelled case most likely to be wrong, for review")
        self.scoring = scoring
        self.max_compute = max_compute

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_labeled_images()
        if not images:
            return None
        _, version = self.scoring.qam()
        scores = {}
        missing = []
        for image in images:
            stored = datastore.get_label_info(image, DefaultLabelTag.FINAL).get(self.scoring.method) or {}
            if stored.get("model") == version:
                scores[image] = stored["score"]
            else:
                missing.append(image)
        for image in missing[: self.max_compute]:
            scores[image] = self.scoring.score_label(image, datastore)
        chosen = min(scores, key=lambda i: scores[i])
        return {"id": chosen, "label_quality": scores[chosen], "model": version}
