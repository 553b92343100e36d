"""Contour metrics per structure of a checkpoint on held-out synthetic phantoms, through the served
infer pipeline.

    python -m ctv_train.evaluate --model apps/ctv_app/model/ctv.pt --seeds 9000-9019
    python -m ctv_train.evaluate --model runs/hn.pt --data runs/openkbp_test    # a labelled folder datastore

Runs the app's CTVInfer task in-process (same pre-processing, sliding window, restore to the
input grid, post-processing and writer as /infer/ctv), asks for the lossless ``bitmask``
result and compares each structure the model contours with the ground truth on the input's grid
and voxel spacing (``ctv_app.lib.metrics``: Dice, HD95, mean surface distance, surface Dice at 2 and
3 mm, volume difference; conventions in docs/metrics.md). Prints a Dice table (mean +- sd and min
per structure) and a table of the other metrics, then the whole result as JSON on the last line.
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
from ctv_app.lib.metrics import METRICS, compare, summarise, voxel_spacing
from ctv_app.lib.structures import decode_label
from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY
from ctv_datastore.build import build, parse_seeds
from ctv_datastore.phantom import STRUCTURES as PHANTOM_STRUCTURES

from .data import find_pairs


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
    """Contour metrics per ``{"id", "image", "label"}`` pair and structure, predicted by the served infer task
    in-process, on the label's grid and voxel spacing.

    ``label_structures``: the structures the truth label maps hold, name -> value (None: the model's own
    values; ``structures.decode_label``). A pair from a datastore's datalist (``data.find_pairs``) says
    itself how its label is encoded and what it contains (``label_encoding``, ``label_structures``), which
    wins. A structure a case's truth does not contain is not scored for it.
    ``structures`` holds each structure's Dice summary (``metrics.summarise``); ``metrics`` each structure's
    summary of every metric (``metrics.METRICS``); the top-level summary is of each case's mean Dice over
    the structures scored for it (for a single-structure model, that structure's Dice)."""
    task = served_infer_task(model, conf)
    structures = task.served("cpu").params.structure_list
    per_structure: dict[str, dict[str, dict]] = {name: {} for name in structures.names}
    per_case = {}
    for pair in pairs:
        result_path, _ = task({"image": pair["image"], "device": "cpu", "label_encoding": "bitmask"})
        bitmask = np.asarray(nib.load(result_path).dataobj)
        os.unlink(result_path)
        label = nib.load(pair["label"])
        truth, contained = decode_label(
            np.asarray(label.dataobj),
            structures,
            pair.get(ENCODING_KEY) or "labelmap",
            pair.get(STRUCTURES_KEY, label_structures),
        )
        spacing = voxel_spacing(label.affine)
        case = {}
        for c, name in enumerate(structures.names):
            if contained[c]:
                result = compare(structures.mask(bitmask, name), truth[c], spacing).as_dict()
                per_structure[name][pair["id"]] = result
                case[name] = result["dice"]
        scored = [d for d in case.values() if d is not None]  # None: the structure is in neither mask
        per_case[pair["id"]] = float(np.mean(scored)) if scored else None
    scored_structures = {name: cases for name, cases in per_structure.items() if cases}
    return {
        **summarise(per_case),
        "structures": {
            name: summarise({i: r["dice"] for i, r in cases.items()}) for name, cases in scored_structures.items()
        },
        "metrics": {
            name: {m: summarise({i: r[m] for i, r in cases.items()}) for m in METRICS}
            for name, cases in scored_structures.items()
        },
    }


def evaluate(model: str, seeds: list[int], conf: dict[str, str] | None = None) -> dict:
    """Contour metrics per structure on freshly generated held-out phantoms (SYNTHETIC)."""
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, seeds, labelled=set(seeds))
        return evaluate_pairs(model, find_pairs(tmp), conf, PHANTOM_STRUCTURES.labels)


def metrics_table(per_structure: dict) -> str:
    """Markdown: each structure's mean +- sd of the surface and volume metrics (n: cases where defined)."""
    columns = [
        ("hd95_mm", "HD95 mm"),
        ("msd_mm", "MSD mm"),
        ("surface_dice_2mm", "surface Dice 2 mm"),
        ("surface_dice_3mm", "surface Dice 3 mm"),
        ("volume_diff_pct", "volume diff %"),
    ]
    lines = ["| structure | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, summaries in per_structure.items():
        cells = []
        for key, _ in columns:
            s = summaries[key]
            cell = "n/a" if s["mean"] is None else f"{s['mean']:.2f} +- {s['sd']:.2f}"
            cells.append(cell + (f" (n={s['n']})" if s["n_undefined"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", default="9000-9019", help="held-out phantom seeds (>= 9000)")
    ap.add_argument("--data", default="", help="score a labelled folder datastore instead (data.find_pairs)")
    ap.add_argument("--conf", default="{}", help='JSON of --conf overrides, e.g. {"ctv_flip_tta": "true"}')
    args = ap.parse_args()
    conf = json.loads(args.conf)
    if args.data:
        result = evaluate_pairs(args.model, find_pairs(args.data), conf)
        print(f"Dice on {result['n']} labelled images of {args.data}, through the served pipeline:")
    else:
        result = evaluate(args.model, parse_seeds(args.seeds), conf)
        print(f"Dice on {result['n']} held-out phantoms (SYNTHETIC), through the served pipeline:")
    print("| structure | mean +- sd | min |\n|---|---|---|")
    for name, s in result["structures"].items():
        print(f"| {name} | {s['mean']:.3f} +- {s['sd']:.3f} | {s['min']:.3f} |")
    print(f"| mean over structures | {result['mean']:.3f} +- {result['sd']:.3f} | {result['min']:.3f} |")
    print()
    print(metrics_table(result["metrics"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
