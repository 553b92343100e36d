"""A contouring model's tunable parameters (the ``ctv`` and ``hn`` models alike): one place for defaults,
their reasons, and (de)serialisation.

Every checkpoint stores the parameters it was trained with, so serving a checkpoint
always pre-processes exactly as its training did. ``--conf`` overrides apply on top.
See docs/model.md for the measurements behind the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError
from .structures import CERVIX, Structures


def as_bool(value: Any) -> bool:
    """Request params arrive as JSON booleans from clients, as strings from forms and --conf."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidInputError(f"expected true or false, got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


REQUEST_FLAGS = ("flip_tta", "store_result", "result_compress")


def check_infer_request(request: dict[str, Any]) -> None:
    """Refuse inference params of the wrong type or range with a 422 naming the param, before any
    model time is spent; the valid ones are normalised in place (a form's "0.4" becomes 0.4)."""
    if "threshold" in request:
        value = request["threshold"]
        try:
            threshold = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            threshold = math.nan
        if not 0.0 < threshold < 1.0:  # NaN fails too
            raise InvalidInputError(f"threshold must be a number between 0 and 1 (exclusive), got {value!r}")
        request["threshold"] = threshold
    for key in REQUEST_FLAGS:
        if key in request:
            value = request[key]
            if not isinstance(value, (bool, int, str)):
                raise InvalidInputError(f"{key} must be true or false, got {value!r}")
            try:
                request[key] = as_bool(value)
            except InvalidInputError as e:
                raise InvalidInputError(f"{key}: {e}") from e


@dataclass
class AugmentParams:
    """Training augmentation: probabilities and ranges (the patch grid is ``target_spacing``)."""

    flip_prob: float = 0.5  # per axis, all three axes; left-right also swaps _L/_R structures (transforms/mirror.py)
    affine_prob: float = 0.3
    rotate_deg: float = 10.0
    translate_voxels: float = 8.0
    scale: float = 0.1
    elastic_prob: float = 0.2
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    intensity_prob: float = 0.3  # scale +-10 % and shift +-0.05 of the normalised intensity
    noise_prob: float = 0.3
    noise_std: float = 0.0316  # variance 0.001 on the [0, 1] window scale

    def __post_init__(self) -> None:
        self.elastic_sigma = tuple(float(v) for v in self.elastic_sigma)
        self.elastic_magnitude = tuple(float(v) for v in self.elastic_magnitude)
        probs = {
            k: getattr(self, k) for k in ("flip_prob", "affine_prob", "elastic_prob", "intensity_prob", "noise_prob")
        }
        bad = {k: v for k, v in probs.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"augmentation probabilities must be in [0, 1], got {bad}")
        if not 0 <= self.rotate_deg <= 180 or self.translate_voxels < 0 or not 0 <= self.scale < 1:
            raise ValueError("rotate_deg must be in [0, 180], translate_voxels >= 0, scale in [0, 1)")
        for name in ("elastic_sigma", "elastic_magnitude"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


ARCHITECTURE_NAMES = ("unet", "resunet", "se_resunet", "segresnet")
LOSS_NAMES = ("dice_bce", "bce")


@dataclass
class CTVParams:
    # 4 mm isotropic: measured label round-trip Dice 0.970 (3 mm: 0.976, 2 mm: 0.993) for
    # 2.4x fewer voxels than 3 mm; CPU latency is the binding constraint (docs/model.md).
    target_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    # Soft-tissue window W400/L40, mapped to [0, 1] ("scale"); "zscore" normalises within the window.
    window: tuple[float, float] = (-160.0, 240.0)
    normalisation: str = "scale"
    # 48x48x40 at 4 mm = 192x192x160 mm: the whole true pelvis around the CTV in one patch.
    patch_size: tuple[int, int, int] = (48, 48, 40)
    architecture: str = "se_resunet"
    loss: str = "dice_bce"
    filters: tuple[int, ...] = (16, 32, 64, 128)
    deep_supr_num: int = 1
    refinement_passes: int = 0
    dropout: float | None = None
    # Inference
    sw_overlap: float = 0.5
    flip_tta: bool = False
    threshold: float = 0.5
    # What the model contours, in output-channel order: TG-263 names (looked up in structures.CATALOGUE)
    # or full descriptions; stored as full descriptions, so a checkpoint describes its own outputs.
    structures: list = field(default_factory=lambda: list(CERVIX))
    augment: AugmentParams = field(default_factory=AugmentParams)

    def __post_init__(self) -> None:
        self.target_spacing = tuple(float(s) for s in self.target_spacing)
        self.window = tuple(float(w) for w in self.window)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.filters = tuple(int(f) for f in self.filters)
        if isinstance(self.augment, dict):
            self.augment = AugmentParams(**self.augment)
        self.structures = Structures(self.structures).to_list()
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"architecture must be one of {ARCHITECTURE_NAMES}, got {self.architecture!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be 3 positive numbers, got {self.target_spacing}")
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        if self.normalisation not in ("scale", "zscore"):
            raise ValueError(f"normalisation must be 'scale' or 'zscore', got {self.normalisation!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 8:
            raise ValueError(f"patch_size must be 3 sizes >= 8, got {self.patch_size}")
        divisor = 2 ** (len(self.filters) - 1)
        if any(p % divisor for p in self.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} must be divisible by {divisor} for {len(self.filters)} levels"
            )
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    @property
    def structure_list(self) -> Structures:
        return Structures(self.structures)

    @property
    def labels(self) -> dict[str, int]:
        """MONAI Label's labels: structure name -> value."""
        return self.structure_list.labels

    def network_key(self) -> dict[str, Any]:
        """What fixes the weights' shapes and meaning: checkpoints only load into a network with the same key."""
        return {
            "architecture": self.architecture,
            "filters": list(self.filters),
            "deep_supr_num": self.deep_supr_num,
            "refinement_passes": self.refinement_passes,
            "structures": self.structure_list.names,
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CTVParams":
        values = dict(values)
        if "labels" in values and "structures" not in values:  # a single-structure checkpoint (before structures)
            labels = values.pop("labels")
            values["structures"] = sorted(labels, key=labels.get)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown CTV parameters: {sorted(unknown)}")
        return cls(**values)

    def updated(self, overrides: dict[str, Any]) -> "CTVParams":
        values = {**self.to_dict(), **overrides}
        if isinstance(overrides.get("augment"), dict):  # override single augmentation settings
            values["augment"] = {**self.to_dict()["augment"], **overrides["augment"]}
        return CTVParams.from_dict(values)

    @classmethod
    def from_conf(cls, conf: dict[str, str], base: "CTVParams | None" = None, model: str = "ctv") -> "CTVParams":
        """``base`` (a checkpoint's parameters; defaults if None) with model ``model``'s ``--conf``
        overrides applied."""
        return (base or cls()).updated(conf_overrides(conf, model))


def conf_overrides(conf: dict[str, str], model: str = "ctv") -> dict[str, Any]:
    """``--conf <model>_<name> <json value>`` overrides of the model named ``model``, e.g. ``--conf
    ctv_flip_tta true`` or ``--conf hn_threshold 0.4`` (``<model>_model`` names its weights, not a
    parameter); they apply on top of every checkpoint that model serves, the one at start and any
    swapped in later. Model names must not be the prefix of other ``--conf`` keys (``rt_`` is RTConfig's)."""
    prefix = f"{model}_"
    overrides = {}
    for key, raw in conf.items():
        if key.startswith(prefix) and key != f"{model}_model":
            try:
                overrides[key[len(prefix) :]] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[key[len(prefix) :]] = raw
    return overrides
