"""Monitoring from clinicians' edits: how much of the served model's contours do clinicians change?

When the server contours a datastore study, it keeps the prediction (the lossless bitmask, the model
version that made it). When a final label is later saved for that study, each structure both contain is
compared with the clinician's final contour (``record_edit``): surface Dice at 3 mm and Dice (``metrics``),
the added path length (the contour the clinician drew, per slice), and the volume the clinician added and
removed, in ml. The record keeps the model version and the annotator.

Per model and structure, the rolling median of surface Dice @3 mm over the last ``window`` edits is held
against the structure's acceptance criterion for surface Dice @3 mm (``commissioning.AcceptanceCriteria``,
the same rule commissioning used): below it, the structure is in alarm. An alarm shows on the quality page
and in ``/info/``, and its start is written to the audit log. ``MostEdited`` (strategy ``most_edited``)
offers the studies whose corrections were largest, for review and retraining.

Under ``<data_dir>/monitoring/``: ``predictions/<model>/<image>.npz`` and ``edits.jsonl`` (append-only).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from .commissioning import AcceptanceCriteria
from .metrics import added_path_length, compare, voxel_spacing
from .structures import Structures, decode_label

logger = logging.getLogger(__name__)

WINDOW = 10  # edits per structure in the rolling median


class EditMonitor:
    def __init__(self, data_dir: str, criteria: AcceptanceCriteria, window: int = WINDOW):
        self.root = os.path.join(data_dir, "monitoring")
        os.makedirs(os.path.join(self.root, "predictions"), exist_ok=True)
        self.edits_path = os.path.join(self.root, "edits.jsonl")
        self.criteria, self.window = criteria, window
        self.on_alarm: Callable[[dict[str, Any]], None] = lambda entry: None  # the server sets the audit log's
        self._lock = threading.Lock()

    def _prediction_path(self, model: str, image_id: str) -> str:
        return os.path.join(self.root, "predictions", model, f"{image_id}.npz")

    def remember(self, model: str, image_id: str, bitmask: np.ndarray, structures: Structures, affine: np.ndarray,
                 version: str | None) -> None:  # fmt: skip
        """Keep the served model's contours of a datastore study (the newest replaces the older)."""
        path = self._prediction_path(model, image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, bitmask=bitmask, affine=affine, structures=json.dumps(structures.names),
                                version=version or "", time=time.time())  # fmt: skip
        os.replace(tmp, path)

    def record_edit(self, image_id: str, label_path: str, label_info: dict[str, Any], models: dict[str, Structures]) -> list[dict]:
        """Compare each model's kept prediction of ``image_id`` with its final label just saved; returns the
        records written (none where the served model never contoured the study)."""
        import nibabel as nib

        written = []
        label = None
        for model, structures in models.items():
            path = self._prediction_path(model, image_id)
            if not os.path.exists(path):
                continue
            kept = np.load(path)  # an npz: each key read decompresses it again, so each is read once
            bitmask, version = kept["bitmask"], str(kept["version"]) or None
            if json.loads(str(kept["structures"])) != structures.names:  # a version with other structures made it
                logger.warning(f"monitoring: {model}'s kept contours of {image_id} are of other structures: not compared")
                continue
            if label is None:
                image = nib.load(label_path)
                label, spacing = np.asarray(image.dataobj), voxel_spacing(image.affine)
            if label.shape != bitmask.shape:
                logger.warning(f"monitoring: {image_id}'s label and {model}'s prediction differ in shape: not compared")
                continue
            truth, contained = decode_label(label, structures, label_info.get("encoding") or "labelmap",
                                            label_info.get("structures"))  # fmt: skip
            voxel_ml = math.prod(spacing) / 1000.0
            figures = {}
            for c, name in enumerate(structures.names):
                if not contained[c]:
                    continue
                pred, final = structures.mask(bitmask, name), truth[c] > 0
                m = compare(pred, final, spacing)
                figures[name] = {
                    "surface_dice_3mm": m.surface_dice_3mm, "dice": m.dice,
                    "apl_mm": added_path_length(pred, final, spacing),
                    "added_ml": float(np.count_nonzero(final & ~pred)) * voxel_ml,
                    "removed_ml": float(np.count_nonzero(pred & ~final)) * voxel_ml,
                }  # fmt: skip
            if not figures:
                continue
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model, "image": image_id,
                      "version": version, "annotator": label_info.get("annotator"),
                      "structures": figures}  # fmt: skip
            with self._lock:
                before = self.alarms(model)
                with open(self.edits_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                after = self.alarms(model)
            for name in sorted(set(after) - set(before)):
                self.on_alarm({"action": "monitoring.alarm", "model": model, "structure": name, **after[name]})
            written.append(record)
        return written

    def edits(self, model: str | None = None) -> list[dict[str, Any]]:
        if not os.path.exists(self.edits_path):
            return []
        with open(self.edits_path) as f:
            records = [json.loads(line) for line in f if line.endswith("\n")]
        return [r for r in records if model is None or r["model"] == model]

    def structure_status(self, model: str) -> dict[str, dict[str, Any]]:
        """Per structure: the rolling median of surface Dice @3 mm over the last ``window`` edits, its
        criterion, and whether it is in alarm."""
        series: dict[str, list[float]] = {}
        for record in self.edits(model):
            for name, figures in record["structures"].items():
                if figures["surface_dice_3mm"] is not None:
                    series.setdefault(name, []).append(figures["surface_dice_3mm"])
        out = {}
        for name, values in series.items():
            recent = values[-self.window :]
            median = float(np.median(recent))
            rule = self.criteria.for_structure(name).get("surface_dice_3mm")
            alarm = rule is not None and not AcceptanceCriteria.holds(rule, median)
            out[name] = {"rolling_median_surface_dice_3mm": median, "edits": len(recent), "criterion": rule, "alarm": alarm}
        return out

    def alarms(self, model: str) -> dict[str, dict[str, Any]]:
        return {n: s for n, s in self.structure_status(model).items() if s["alarm"]}

    def most_edited(self, model: str, limit: int = 10) -> list[dict[str, Any]]:
        """The studies whose newest correction redrew the most contour (total APL over structures)."""
        newest: dict[str, dict] = {}
        for record in self.edits(model):
            newest[record["image"]] = record
        ranked = sorted(newest.values(), key=lambda r: -sum(f["apl_mm"] for f in r["structures"].values()))
        return [{"image": r["image"], "time": r["time"], "version": r["version"], "annotator": r["annotator"],
                 "apl_mm": sum(f["apl_mm"] for f in r["structures"].values())} for r in ranked[:limit]]  # fmt: skip

    def summary(self, model: str) -> dict[str, Any]:
        """What the quality page shows."""
        return {"model": model, "window": self.window, "structures": self.structure_status(model),
                "most_edited": self.most_edited(model), "edits": self.edits(model)}  # fmt: skip


class MostEdited(Strategy):
    """The study whose newest correction of the served model's contours redrew the most (total added path
    length): for review and retraining."""

    def __init__(self, monitor: EditMonitor, model: str):
        super().__init__("Study whose correction of the model's contours was largest (added path length)")
        self.monitor, self.model = monitor, model

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        ranked = self.monitor.most_edited(self.model, limit=1)
        if not ranked:
            return {}
        return {"id": ranked[0]["image"], "apl_mm": ranked[0]["apl_mm"], "version": ranked[0]["version"]}
