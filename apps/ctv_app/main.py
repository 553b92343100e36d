"""MONAI Label app: cervical-cancer CTV contouring on planning CT.

monailabel start_server --app apps/ctv_app --studies datastore/demo
"""

from __future__ import annotations

import logging
import os
from typing import Any

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ctv_app.lib.configs.ctv import CTVConfig
from ctv_app.lib.errors import ImageNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

CONFIGS: dict[str, type[TaskConfig]] = {"ctv": CTVConfig}


class CTVApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        names = [n.strip() for n in conf.get("models", "ctv").split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown models {unknown}; available: {sorted(CONFIGS)}")
        self.models: dict[str, TaskConfig] = {}
        for name in names:
            config = CONFIGS[name]()
            config.init(name, os.path.join(app_dir, "model"), conf, None)
            self.models[name] = config
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CTV contouring",
            description="Cervical-cancer clinical target volume on planning CT; learns from corrected contours",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {name: config.infer() for name, config in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = {}
        for name, config in self.models.items():
            trainer = config.trainer()
            if trainer is not None:
                trainers[name] = trainer
        return trainers

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's infer, with the caller's mistakes answered as 4xx instead of 500."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"model '{model}' is not served here; available: {sorted(self._infers)}"
            )
        try:
            image = request.get("image")
            if isinstance(image, str) and not os.path.exists(image):
                store = datastore or self.datastore()
                if not store.get_image_uri(image):
                    raise ImageNotFoundError(f"image '{image}' is not in the datastore")
            return super().infer(request, datastore)
        except InvalidInputError as e:
            logger.warning(f"infer rejected: {e}")
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e
