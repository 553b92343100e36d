"""The contouring models this app can serve, by name (``--conf models ctv,hn``; default ``ctv``)."""

from __future__ import annotations

from .contouring import ContouringConfig
from .ctv import CTVConfig
from .hn import HNConfig

CONFIGS: dict[str, type[ContouringConfig]] = {"ctv": CTVConfig, "hn": HNConfig}
