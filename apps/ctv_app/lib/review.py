"""Label review: score every labelled case's final label, and offer the least trusted to a reviewer.

Two scores, each stored in the label's info beside the annotator,
``{<method>: {"score", "model", "annotator", "ts", ...}}``, and recomputed when the served model changes:

- ``label_agreement`` (the default ``review`` ranking): the served model contours the case's CT and its
  contour is compared with the label, per structure the label contains (``evaluation.contour_and_compare``).
  The score is the mean surface Dice at a tolerance of one voxel of the label's grid: the fraction of both
  surfaces within a voxel of the other. It needs no special training, and it sees every way a label can
  be off: too wide, too tight, slices missing, shifted (docs/noisy_labels.md, section 3c). The record keeps
  each structure's Dice and both volumes, so the reviewer sees which structure and which way. A model that
  memorised its training labels would agree with their errors: the score is only as independent as the
  model is from the label it checks.
- ``label_quality``: the QAM of a model trained with ``quality_weighting`` scores the image + label pair
  (the training pre-processing, whole volume: the QAM is fully convolutional with global pooling). It
  follows the label's volume, so it finds under-contouring and misses over-contouring and shifts.

The ``review`` strategy returns the labelled case with the lowest score of its method.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .errors import CTVError
from .evaluation import contour_and_compare
from .infers.ctv import CTVInfer, ServedModel
from .quality import QualityAwarenessModule
from .transforms import val_transforms
from .transforms.labels import ENCODING_KEY, STRUCTURES_KEY, label_datalist_keys

logger = logging.getLogger(__name__)


class NoQualityModelError(CTVError):
    status_code = 409


class UnscorableLabelError(CTVError):
    status_code = 422


class LabelReviewScoring(ScoringMethod):
    """A score of each final label under the served model (low: likely wrong), stored in the label's info;
    subclasses compute one label's score (``_score``)."""

    method = "label_review"

    def __init__(self, infer: CTVInfer, description: str):
        super().__init__(description)
        self.infer = infer

    def version(self) -> str:
        """The served model's version (its sha256): stored scores of another version are stale."""
        return self.infer.served("cpu").record["sha256"]

    def _score(self, image_path: str, label_path: str, label_info: dict) -> tuple[float, str, dict]:
        """One label's score, the version of the model that gave it, and details kept beside it."""
        raise NotImplementedError

    def score(self, image_path: str, label_path: str, label_info: dict | None = None) -> float:
        """One image + label pair's score (higher: more consistent); ``label_info``: the label's recorded
        encoding and structures, as the datastore keeps them."""
        return self._score(image_path, label_path, label_info or {})[0]

    def score_label(self, image_id: str, datastore: Datastore) -> float:
        tag = DefaultLabelTag.FINAL
        info = datastore.get_label_info(image_id, tag)
        score, version, details = self._score(
            datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, tag), info
        )
        record = {
            "score": score,
            "model": version,
            "annotator": info.get("annotator", "unknown"),
            "ts": int(time.time()),
            **details,
        }
        datastore.update_label_info(image_id, tag, {self.method: record})
        logger.info(f"{self.method} {score:.4f} for {image_id} (annotator {record['annotator']})")
        return score

    def score_labels(self, images: list[str], datastore: Datastore) -> dict[str, float]:
        """``score_label`` for each image whose label this model can score; a label that holds none of the
        model's structures (another model's, on a server of several) is left out."""
        scores = {}
        for image in images:
            try:
                scores[image] = self.score_label(image, datastore)
            except UnscorableLabelError as e:
                logger.info(f"{self.method}: {image} left out: {e}")
        return scores

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        return {"method": self.method, "scores": self.score_labels(datastore.get_labeled_images(), datastore)}


class LabelAgreementScoring(LabelReviewScoring):
    method = "label_agreement"

    def __init__(self, infer: CTVInfer):
        super().__init__(infer, "Agreement of each final label with the served model's contour (low: likely wrong)")

    def _score(self, image_path: str, label_path: str, label_info: dict) -> tuple[float, str, dict]:
        version = self.version()
        keys = label_datalist_keys(label_info)
        case = contour_and_compare(
            self.infer, image_path, label_path, keys.get(ENCODING_KEY) or "labelmap", keys.get(STRUCTURES_KEY)
        )  # fmt: skip
        structures = {
            name: {"surface_dice_voxel": f["surface_dice_voxel"], "dice": f["dice"],
                   "label_ml": f["volume_truth_ml"], "model_ml": f["volume_pred_ml"]}
            for name, f in case.figures.items()
        }  # fmt: skip
        # None: a structure the label holds empty and the model does not draw either; nothing to compare
        scored = [f["surface_dice_voxel"] for f in structures.values() if f["surface_dice_voxel"] is not None]
        if not scored:
            raise UnscorableLabelError(f"the label {label_path} contains none of the model's structures")
        return float(np.mean(scored)), version, {"structures": structures}


class LabelQualityScoring(LabelReviewScoring):
    method = "label_quality"

    def __init__(self, infer: CTVInfer):
        super().__init__(infer, "QAM score of each final label (low: likely wrong); needs a quality-weighted model")
        self._qam: tuple[str, QualityAwarenessModule] | None = None

    def version(self) -> str:
        return self._served_qam()[1].record["sha256"]

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
    def _score(self, image_path: str, label_path: str, label_info: dict) -> tuple[float, str, dict]:
        """The QAM's raw score, pre-processed as the served model was trained."""
        qam, served = self._served_qam()
        entry = {"image": image_path, "label": label_path, **label_datalist_keys(label_info)}
        item = Compose(val_transforms(served.params))(entry)
        image, label = torch.as_tensor(item["image"])[None].float(), torch.as_tensor(item["label"])[None].float()
        return float(qam(image, label)), served.record["sha256"], {}


class Review(Strategy):
    """The labelled case whose label ``scoring`` trusts least (scores of the served model; missing
    ones are computed, at most ``max_compute`` per request)."""

    def __init__(self, scoring: LabelReviewScoring, max_compute: int = 16):
        super().__init__("Labelled case most likely to be wrong, for review")
        self.scoring = scoring
        self.max_compute = max_compute

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_labeled_images()
        if not images:
            return None
        version = self.scoring.version()
        scores = {}
        missing = []
        for image in images:
            stored = datastore.get_label_info(image, DefaultLabelTag.FINAL).get(self.scoring.method) or {}
            if stored.get("model") == version:
                scores[image] = stored["score"]
            else:
                missing.append(image)
        scores.update(self.scoring.score_labels(missing[: self.max_compute], datastore))
        if not scores:
            return None
        chosen = min(scores, key=lambda i: scores[i])
        # the median beside it: a model that agrees with no label (early in the learning loop) says so
        return {"id": chosen, "method": self.scoring.method, "score": scores[chosen], "model": version,
                "median_score": float(np.median(list(scores.values()))), "scored": len(scores)}  # fmt: skip
