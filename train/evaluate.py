"""Dice of a checkpoint on held-out synthetic phantoms, through the served infer pipeline.

    python -m ctv_train.evaluate --model apps/ctv_app/model/ctv.pt --seeds 9000-9019

Runs the app's CTVInfer task in-process (same pre-processing, sliding window, restore to the
input grid and post-processing as /infer/ctv) and compares with the phantom ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import nibabel as nib
import numpy as np

from ctv_app.lib.configs.ctv import CTVConfig
from ctv_app.lib.infers.ctv import CTVInfer
from ctv_datastore.build import build, parse_seeds

from .data import find_pairs
from .metrics import dice


def summarise(scores: dict) -> dict:
    values = np.array(list(scores.values()))
    return {
        "n": len(values),
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "per_case": scores,
    }


def served_infer_task(model: str, conf: dict[str, str] | None = None) -> CTVInfer:
    """The app's infer task for a checkpoint, built as the server builds it (``--conf`` overrides)."""
    config = CTVConfig()
    config.init("ctv", os.path.dirname(model), {"ctv_model": model, **(conf or {})}, None)
    return config.infer()


def evaluate_pairs(model: str, pairs: list[dict[str, str]], conf: dict[str, str] | None = None) -> dict:
    """Dice per ``{"id", "image", "label"}`` pair, predicted by the served infer task in-process."""
    task = served_infer_task(model, conf)
    scores = {}
    for pair in pairs:
        result_path, _ = task({"image": pair["image"], "device": "cpu"})
        pred = np.asarray(nib.load(result_path).dataobj)
        os.unlink(result_path)
        scores[pair["id"]] = dice(pred, np.asarray(nib.load(pair["label"]).dataobj))
    return summarise(scores)


def evaluate(model: str, seeds: list[int], conf: dict[str, str] | None = None) -> dict:
    """Dice on freshly generated held-out phantoms."""
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, seeds, labelled=set(seeds))
        return evaluate_pairs(model, find_pairs(tmp), conf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", default="9000-9019", help="held-out phantom seeds (>= 9000)")
    ap.add_argument("--conf", default="{}", help='JSON of --conf overrides, e.g. {"ctv_flip_tta": "true"}')
    args = ap.parse_args()
    result = evaluate(args.model, parse_seeds(args.seeds), json.loads(args.conf))
    print(
        f"Dice on {result['n']} held-out phantoms: {result['mean']:.3f} +- {result['sd']:.3f} (min {result['min']:.3f})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
