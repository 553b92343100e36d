"""Dice per structure of a checkpoint on held-out synthetic phantoms, through the served infer pipeline.

    python -m ctv_train.evaluate --model apps/ctv_app/model/ctv.pt --seeds 9000-9019

Runs the app's CTVInfer task in-process (same pre-processing, sliding window, restore to the
input grid, post-processing and writer as /infer/ctv), asks for the lossless ``bitmask``
result and compares each structure the model contours with the ground truth. Prints a table
(mean +- sd and min per structure), then the whole result as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Mapping

import nibabel as nib
import numpy as np

from ctv_app.lib.configs.ctv import CTVConfig
from ctv_app.lib.infers.ctv import CTVInfer
from ctv_app.lib.structures import decode_label
from ctv_datastore.build import build, parse_seeds
from ctv_datastore.phantom import STRUCTURES as PHANTOM_STRUCTURES

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


def evaluate_pairs(
    model: str,
    pairs: list[dict[str, str]],
    conf: dict[str, str] | None = None,
    label_structures: Mapping[str, int] | None = None,
) -> dict:
    """Dice per ``{"id", "image", "label"}`` pair and structure, predicted by the served infer task in-process.

    ``label_structures``: the structures the truth label maps hold, name -> value (None: the model's own
    values; ``structures.decode_label``). A structure a case's truth does not contain is not scored for it.
    ``structures`` holds each structure's summary; the top-level summary is of each case's mean Dice over
    the structures scored for it (for a single-structure model, that structure's Dice)."""
    task = served_infer_task(model, conf)
    structures = task.served("cpu").params.structure_list
    per_structure: dict[str, dict[str, float]] = {name: {} for name in structures.names}
    per_case = {}
    for pair in pairs:
        result_path, _ = task({"image": pair["image"], "device": "cpu", "label_encoding": "bitmask"})
        bitmask = np.asarray(nib.load(result_path).dataobj)
        os.unlink(result_path)
        stored = np.asarray(nib.load(pair["label"]).dataobj)
        truth, contained = decode_label(stored, structures, "labelmap", label_structures)
        case = {}
        for c, name in enumerate(structures.names):
            if contained[c]:
                case[name] = per_structure[name][pair["id"]] = dice(structures.mask(bitmask, name), truth[c])
        per_case[pair["id"]] = float(np.mean(list(case.values())))
    return {
        **summarise(per_case),
        "structures": {name: summarise(scores) for name, scores in per_structure.items() if scores},
    }


def evaluate(model: str, seeds: list[int], conf: dict[str, str] | None = None) -> dict:
    """Dice per structure on freshly generated held-out phantoms (SYNTHETIC)."""
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, seeds, labelled=set(seeds))
        return evaluate_pairs(model, find_pairs(tmp), conf, PHANTOM_STRUCTURES.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", default="9000-9019", help="held-out phantom seeds (>= 9000)")
    ap.add_argument("--conf", default="{}", help='JSON of --conf overrides, e.g. {"ctv_flip_tta": "true"}')
    args = ap.parse_args()
    result = evaluate(args.model, parse_seeds(args.seeds), json.loads(args.conf))
    print(f"Dice on {result['n']} held-out phantoms (SYNTHETIC), through the served pipeline:")
    print("| structure | mean +- sd | min |\n|---|---|---|")
    for name, s in result["structures"].items():
        print(f"| {name} | {s['mean']:.3f} +- {s['sd']:.3f} | {s['min']:.3f} |")
    print(f"| mean over structures | {result['mean']:.3f} +- {result['sd']:.3f} | {result['min']:.3f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
