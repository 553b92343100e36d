"""The CTV model's tunable parameters: one place for defaults, their reasons, and (de)serialisation.

Every checkpoint stores the parameters it was trained with, so serving a checkpoint
always pre-processes exactly as its training did. ``--conf`` overrides apply on top.
See docs/model.md for the measurements behind the defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


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
    filters: tuple[int, ...] = (16, 32, 64, 128)
    deep_supr_num: int = 1
    refinement_passes: int = 0
    dropout: float | None = None
    # Inference
    sw_overlap: float = 0.5
    flip_tta: bool = False
    threshold: float = 0.5
    labels: dict[str, int] = field(default_factory=lambda: {"CTV": 1})

    def __post_init__(self) -> None:
        self.target_spacing = tuple(float(s) for s in self.target_spacing)
        self.window = tuple(float(w) for w in self.window)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.filters = tuple(int(f) for f in self.filters)
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CTVParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown CTV parameters: {sorted(unknown)}")
        return cls(**values)

    def updated(self, overrides: dict[str, Any]) -> "CTVParams":
        return CTVParams.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def from_conf(cls, conf: dict[str, str], base: "CTVParams | None" = None) -> "CTVParams":
        """Read ``--conf ctv_<name> <json value>`` overrides, e.g. ``--conf ctv_flip_tta true``."""
        base = base or cls()
        overrides = {}
        for key, raw in conf.items():
            if key.startswith("ctv_") and key != "ctv_model":
                try:
                    overrides[key[4:]] = json.loads(raw)
                except json.JSONDecodeError:
                    overrides[key[4:]] = raw
        return base.updated(overrides)
