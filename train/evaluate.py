"""Contour metrics per structure of a checkpoint on held-out synthetic phantoms, through the served
infer pipeline.

    python -m ctv_train.evaluate --model apps/ctv_app/model/ctv.pt --seeds 9000-9019
    python -m ctv_train.evaluate --name hn --model apps/ctv_app/model/hn.pt --data runs/openkbp_test \
        --out runs/hn_test.json --pictures docs/images/hn    # a labelled folder datastore (real CT)

Runs the app's CTVInfer task in-process (same pre-processing, sliding window, restore to the
input grid, post-processing and writer as /infer/ctv), asks for the lossless ``bitmask``
result and compares each structure the model contours with the ground truth on the input's grid
and voxel spacing (``ctv_app.lib.metrics``: Dice, HD95, mean surface distance, surface Dice at 2 and
3 mm and one voxel, volume difference; conventions in docs/metrics.md). Prints a table per structure
(mean +- sd and median of Dice, HD95, MSD and surface Dice), then the whole result as JSON on the last
line (``--out`` also writes it, per case). ``--pictures`` draws the best, median and worst case (by the
case's mean Dice over its structures): one axial slice, clinical contours against the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Mapping

import nibabel as nib
import numpy as np

from ctv_app.lib.configs import CONFIGS
from ctv_app.lib.infers.ctv import CTVInfer
from ctv_app.lib.evaluation import contour_and_compare
from ctv_app.lib.metrics import METRICS, summarise
from ctv_app.lib.structures import decode_label
from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY
from ctv_datastore.build import build, parse_seeds
from ctv_datastore.phantom import STRUCTURES as PHANTOM_STRUCTURES

from .data import find_pairs


def served_infer_task(model: str, conf: dict[str, str] | None = None, name: str = "ctv") -> CTVInfer:
    """The app's infer task ``name`` (``ctv`` or ``hn``) for a checkpoint, built as the server builds it
    (``--conf`` overrides, ``<name>_<param>``)."""
    config = CONFIGS[name]()
    config.init(name, os.path.dirname(model), {f"{name}_model": model, **(conf or {})}, None)
    return config.infer()


def evaluate_pairs(
    model: str,
    pairs: list[dict[str, str]],
    conf: dict[str, str] | None = None,
    label_structures: Mapping[str, int] | None = None,
    name: str = "ctv",
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
    task = served_infer_task(model, conf, name)
    structures = task.served("cpu").params.structure_list
    per_structure: dict[str, dict[str, dict]] = {name: {} for name in structures.names}
    per_case = {}
    for pair in pairs:
        case = contour_and_compare(
            task, pair["image"], pair["label"], pair.get(ENCODING_KEY) or "labelmap",
            pair.get(STRUCTURES_KEY, label_structures),
        )  # fmt: skip
        for name, result in case.figures.items():
            per_structure[name][pair["id"]] = result
        scored = [r["dice"] for r in case.figures.values() if r["dice"] is not None]  # None: in neither mask
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


REPORTED = (
    ("dice", "Dice", 3),
    ("hd95_mm", "HD95 mm", 1),
    ("msd_mm", "MSD mm", 2),
    ("surface_dice_3mm", "surface Dice 3 mm", 2),
    ("surface_dice_voxel", "surface Dice 1 voxel", 2),
    ("volume_diff_pct", "volume diff %", 0),
)


def metrics_table(per_structure: dict) -> str:
    """Markdown: per structure, each reported metric as mean +- sd / median; n the cases scored, and where a
    distance is undefined for some (the model drew nothing), how many it is defined for."""
    header = "| structure | n | " + " | ".join(label for _, label, _ in REPORTED) + " |"
    lines = [header, "|---" * (len(REPORTED) + 2) + "|"]
    for name, summaries in per_structure.items():
        cells = []
        for key, _, digits in REPORTED:
            s = summaries[key]
            cell = "n/a" if s["mean"] is None else f"{s['mean']:.{digits}f} +- {s['sd']:.{digits}f} / {s['median']:.{digits}f}"
            cells.append(cell + (f" (n={s['n']})" if s["n_undefined"] else ""))
        n = summaries["dice"]["n"] + summaries["dice"]["n_undefined"]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_cases(
    model: str, pairs: list[dict[str, str]], result: dict, out_dir: str, conf: dict | None = None, name: str = "ctv"
) -> dict[str, str]:
    """Pictures of the best, median and worst case by mean Dice (``figures.contour_slice``); returns
    {rank: PNG path}."""
    from ctv_app.lib.figures import contour_slice

    ranked = sorted((d, i) for i, d in result["per_case"].items() if d is not None)
    chosen = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    task = served_infer_task(model, conf, name)
    structures = task.served("cpu").params.structure_list
    by_id = {p["id"]: p for p in pairs}
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for rank, (score, case) in chosen.items():
        pair = by_id[case]
        result_path, _ = task({"image": pair["image"], "device": "cpu", "label_encoding": "bitmask"})
        bitmask = np.asarray(nib.as_closest_canonical(nib.load(result_path)).dataobj)
        os.unlink(result_path)
        label = nib.as_closest_canonical(nib.load(pair["label"]))
        truth, contained = decode_label(
            np.asarray(label.dataobj), structures, pair.get(ENCODING_KEY) or "labelmap", pair.get(STRUCTURES_KEY)
        )
        names = [n for c, n in enumerate(structures.names) if contained[c]]
        image = np.asarray(nib.as_closest_canonical(nib.load(pair["image"])).dataobj)
        path = os.path.join(out_dir, f"{rank}.png")
        contour_slice(
            path,
            image,
            {n: truth[structures.names.index(n)] for n in names},
            {n: structures.mask(bitmask, n) for n in names},
            structures,
            f"{rank}: {case}, mean Dice {score:.3f}",
        )
        written[rank] = path
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", default="9000-9019", help="held-out phantom seeds (>= 9000)")
    ap.add_argument("--data", default="", help="score a labelled folder datastore instead (data.find_pairs)")
    ap.add_argument("--conf", default="{}", help='JSON of --conf overrides, e.g. {"ctv_flip_tta": "true"}')
    ap.add_argument("--name", default="ctv", choices=sorted(CONFIGS), help="the model's infer task (ctv or hn)")
    ap.add_argument("--out", help="write the whole result (every metric of every case) as JSON here")
    ap.add_argument("--pictures", help="folder for best/median/worst case PNGs (with --data)")
    args = ap.parse_args()
    conf = json.loads(args.conf)
    if args.data:
        pairs = find_pairs(args.data)
        result = evaluate_pairs(args.model, pairs, conf, name=args.name)
        print(f"Contour metrics on {result['n']} labelled images of {args.data}, through the served pipeline:")
        if args.pictures:
            for rank, path in draw_cases(args.model, pairs, result, args.pictures, conf, args.name).items():
                print(f"{rank}: {path}")
    else:
        result = evaluate(args.model, parse_seeds(args.seeds), conf)
        print(f"Contour metrics on {result['n']} held-out phantoms (SYNTHETIC), through the served pipeline:")
    print("mean +- sd / median\n")
    print(metrics_table(result["metrics"]))
    print(f"\ncase mean Dice over its structures: {result['mean']:.3f} +- {result['sd']:.3f} / {result['median']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
