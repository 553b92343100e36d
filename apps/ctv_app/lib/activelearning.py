"""Active learning: how unsure the served model is about each unlabelled CT, and which to contour next.

Scores (higher = less sure), stored in the image info under the method's name (a second served
model's methods are prefixed with its name: ``hn_epistemic``) with the model version that made them:

- ``epistemic``: MC dropout. N stochastic passes with dropout on; per structure, the mean binary
  entropy of the mean probability (normalised to [0, 1]) over its predicted region, i.e. every voxel
  that any pass puts in it. Models trained without dropout get ``dropout`` (default 0.1) inserted at
  scoring time, which probes the weights' sensitivity rather than a trained posterior.
- ``tta``: disagreement of test-time augmentations (flips on each axis, a small rotation): per
  structure, 1 - mean Dice of each augmented mask against their majority mask.

Structures are scored each on its own (their probabilities are never averaged together: a voxel sure to
be parotid and sure not to be larynx is a sure voxel), and a CT's score is the mean over the structures
that any pass predicts. A CT where nothing at all is predicted scores 1: every planning CT has some.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .errors import InvalidInputError
from .inferers import build_inferer
from .infers.ctv import CTVInfer, ServedModel
from .networks import network_for
from .transforms import pre_transforms

logger = logging.getLogger(__name__)


def _per_structure(probs: torch.Tensor, score: Callable[[torch.Tensor], float | None]) -> float:
    """probs: [N samples, C structures, ...] -> mean over structures of ``score([N, ...])`` (None: the
    structure is predicted nowhere, left out); 1.0 when no structure is predicted anywhere."""
    scores = [s for s in (score(probs[:, c]) for c in range(probs.shape[1])) if s is not None]
    return float(sum(scores) / len(scores)) if scores else 1.0


def _entropy(probs: torch.Tensor) -> float | None:
    """One structure's [N, ...] probabilities -> mean normalised entropy of their mean in its predicted region."""
    region = (probs > 0.5).any(dim=0)
    if not region.any():
        return None
    p = probs.mean(dim=0)[region].clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)).mean())


def _disagreement(probs: torch.Tensor) -> float | None:
    """One structure's [N, ...] probabilities -> 1 - mean Dice of each sample's mask against the majority mask."""
    masks = probs > 0.5
    if not masks.any():
        return None
    majority = masks.float().mean(dim=0) >= 0.5
    dices = []
    for m in masks:
        denom = m.sum() + majority.sum()
        dices.append(1.0 if denom == 0 else float(2 * (m & majority).sum() / denom))
    return 1.0 - sum(dices) / len(dices)


def _entropy_score(probs: torch.Tensor) -> float:
    return _per_structure(probs, _entropy)


def _disagreement_score(probs: torch.Tensor) -> float:
    return _per_structure(probs, _disagreement)


def _rotation_theta(degrees: float, axis: int) -> torch.Tensor:
    """3x4 affine_grid matrix: rotation about one axis of the normalised grid."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rot = torch.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return torch.cat([rot, torch.zeros(3, 1)], dim=1)


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    grid = F.affine_grid(theta[None].to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


class UncertaintyScoring(ScoringMethod):
    """Scores unlabelled images (all images with ``"all": true``) with the served CTV model."""

    method = ""

    def __init__(self, infer: CTVInfer, description: str):
        super().__init__(description)
        self.infer = infer

    def model_version(self) -> str:
        return self.infer.model_record()["sha256"]

    def probabilities(self, image: torch.Tensor, served: ServedModel, request: dict[str, Any]) -> torch.Tensor:
        """[N samples, C structures, D, H, W] probabilities on the resampled grid."""
        raise NotImplementedError

    @torch.no_grad()
    def score_file(self, path: str, request: dict[str, Any] | None = None) -> tuple[float, str]:
        """(score, model sha256) of the CT at ``path``, storing nothing (offline experiments use it too)."""
        request = request or {}
        served = self.infer.served("cpu")  # one model, with its own pre-processing, for the whole score
        image = Compose(pre_transforms(served.params))({"image": path})["image"]
        torch.manual_seed(int(request.get("seed", 0)))
        probs = self.probabilities(torch.as_tensor(image)[None].float(), served, request)
        return self.summarise(probs), served.record["sha256"]

    def score_image(self, image_id: str, datastore: Datastore, request: dict[str, Any] | None = None) -> float:
        request = request or {}
        value, model = self.score_file(datastore.get_image_uri(image_id), request)
        seed = int(request.get("seed", 0))
        datastore.update_image_info(
            image_id, {self.method: {"score": value, "model": model, "ts": int(time.time()), "seed": seed}}
        )
        logger.info(f"{self.method} score {value:.4f} for {image_id}")
        return value

    def summarise(self, probs: torch.Tensor) -> float:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        images = datastore.list_images() if request.get("all") else datastore.get_unlabeled_images()
        return {"method": self.method, "scores": {i: self.score_image(i, datastore, request) for i in images}}


class EpistemicScoring(UncertaintyScoring):
    method = "epistemic"

    def __init__(self, infer: CTVInfer, samples: int = 8, dropout: float = 0.1):
        super().__init__(infer, f"MC-dropout entropy inside each predicted structure ({samples} samples)")
        self.samples = samples
        self.dropout = dropout

    def _mc_network(self, served: ServedModel, dropout: float) -> torch.nn.Module:
        params = served.params if served.params.dropout else served.params.updated({"dropout": dropout})
        net = network_for(params)
        net.load_state_dict(served.network.state_dict())
        net.eval()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.train()
        return net

    def probabilities(self, image: torch.Tensor, served: ServedModel, request: dict[str, Any]) -> torch.Tensor:
        samples = int(request.get("samples", self.samples))
        if not 2 <= samples <= 64:
            raise InvalidInputError(f"samples must be in [2, 64], got {samples}")
        net = self._mc_network(served, float(request.get("dropout", self.dropout)))
        inferer = build_inferer(served.params, device="cpu", flip_tta=False)
        return torch.stack([torch.sigmoid(inferer(image, net))[0] for _ in range(samples)])

    def summarise(self, probs: torch.Tensor) -> float:
        return _entropy_score(probs)


class TTAScoring(UncertaintyScoring):
    method = "tta"

    def __init__(self, infer: CTVInfer, rotate_deg: float = 8.0):
        super().__init__(infer, f"disagreement of flip and +-{rotate_deg:g} degree rotation test-time augmentations")
        self.rotate_deg = rotate_deg

    def _augmentations(self) -> list[tuple[Callable, Callable]]:
        """(forward, inverse) pairs on [B, C, D, H, W] tensors; the first is the identity."""
        augs: list[tuple[Callable, Callable]] = [(lambda x: x, lambda x: x)]
        for axis in (2, 3, 4):
            augs.append((lambda x, a=axis: x.flip(a), lambda x, a=axis: x.flip(a)))
        for sign in (1, -1):
            fwd, inv = _rotation_theta(sign * self.rotate_deg, 0), _rotation_theta(-sign * self.rotate_deg, 0)
            augs.append((lambda x, t=fwd: _warp(x, t), lambda x, t=inv: _warp(x, t)))
        return augs

    def probabilities(self, image: torch.Tensor, served: ServedModel, request: dict[str, Any]) -> torch.Tensor:
        inferer = build_inferer(served.params, device="cpu", flip_tta=False)
        out = []
        for forward, inverse in self._augmentations():
            out.append(inverse(torch.sigmoid(inferer(forward(image), served.network)))[0])
        return torch.stack(out)

    def summarise(self, probs: torch.Tensor) -> float:
        return _disagreement_score(probs)


class Uncertain(Strategy):
    """The unlabelled image with the highest stored score of the current model; images without one
    are scored now (at most ``max_compute`` per request, then older models' scores are used)."""

    def __init__(self, scorers: dict[str, UncertaintyScoring], method: str = "epistemic", max_compute: int = 4):
        super().__init__(f"Highest {method} uncertainty first")
        self.scorers = scorers
        self.method = method
        self.max_compute = max_compute

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        method = request.get("method", self.method)
        if method not in self.scorers:
            raise InvalidInputError(f"unknown scoring method {method!r}; available: {sorted(self.scorers)}")
        scorer = self.scorers[method]
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        version = scorer.model_version()
        stored = {i: datastore.get_image_info(i).get(scorer.method) or {} for i in images}  # its own key
        scores = {i: s["score"] for i, s in stored.items() if s.get("model") == version}
        missing = [i for i in images if i not in scores]
        for image in missing[: self.max_compute]:
            scores[image] = scorer.score_image(image, datastore, request)
        for image in missing[self.max_compute :]:
            if "score" in stored[image]:
                scores[image] = stored[image]["score"]  # an older model's score beats none
        chosen = max(scores, key=lambda i: scores[i])
        return {"id": chosen, "score": scores[chosen], "method": method, "model": version}
