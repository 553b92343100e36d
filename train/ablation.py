"""Ablation of the CTV design, in the published design's order, by k-fold cross-validation.

    python -m ctv_train.ablation --data runs/ablation/data --out runs/ablation --folds 3 --epochs 30 \
        --doc docs/ablation.md

Two tables. The published order adds one component per row (UNet -> + residual blocks -> +
SE -> + iterative refinement -> + Dice loss); the first four rows use BCE alone, as there. The
second trains the same architectures with Dice + BCE throughout, which separates the
architecture from the loss. Every row is trained and tested on the same folds. A finished
row's result is kept in ``<out>/<step>/result.json``, so a stopped run continues where it
stopped. ``--doc`` writes the markdown tables with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

from .crossval import cross_validate
from .train import add_training_args, parse_training_args

PUBLISHED = "In the published design's order (each row adds one component to the row above)"
DICE_THROUGHOUT = "The same architectures, all trained with Dice + BCE"

# (name, row label, CTVParams overrides, table).
STEPS: list[tuple[str, str, dict, str]] = [
    ("unet", "UNet (plain conv blocks, BCE loss)", {"architecture": "unet", "loss": "bce"}, PUBLISHED),
    ("res", "+ residual blocks", {"architecture": "resunet", "loss": "bce"}, PUBLISHED),
    ("se", "+ squeeze-and-excitation", {"architecture": "se_resunet", "loss": "bce"}, PUBLISHED),
    (
        "refine",
        "+ iterative refinement (2 passes)",
        {"architecture": "se_resunet", "loss": "bce", "refinement_passes": 2},
        PUBLISHED,
    ),
    (
        "dice",
        "+ Dice loss (Dice + BCE)",
        {"architecture": "se_resunet", "loss": "dice_bce", "refinement_passes": 2},
        PUBLISHED,
    ),
    ("unet_dice", "UNet", {"architecture": "unet", "loss": "dice_bce"}, DICE_THROUGHOUT),
    ("res_dice", "residual UNet", {"architecture": "resunet", "loss": "dice_bce"}, DICE_THROUGHOUT),
    (
        "se_dice",
        "SE-residual UNet (served design)",
        {"architecture": "se_resunet", "loss": "dice_bce"},
        DICE_THROUGHOUT,
    ),
    (
        "dice",
        "SE-residual UNet + iterative refinement (2 passes)",
        {"architecture": "se_resunet", "loss": "dice_bce", "refinement_passes": 2},
        DICE_THROUGHOUT,
    ),
    (
        "segresnet",
        "MONAI SegResNet (the design's named alternative)",
        {"architecture": "segresnet", "loss": "dice_bce"},
        DICE_THROUGHOUT,
    ),
]


def run_ablation(args: argparse.Namespace, log=print) -> list[dict]:
    pairs, base_params, cfg = parse_training_args(args)
    rows = []
    for name, label, overrides, table in STEPS:
        overrides = {"refinement_passes": 0, **overrides}
        if args.steps and name not in args.steps:
            continue
        step_dir = os.path.join(args.out, name)
        result_path = os.path.join(step_dir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                rows.append({**json.load(f), "label": label, "table": table})
            log(f"{name}: done before, {rows[-1]['mean']:.3f} +- {rows[-1]['sd']:.3f}")
            continue
        t0 = time.process_time()  # CPU time: unaffected by other jobs or by pausing the run
        summary = cross_validate(
            pairs, step_dir, base_params.updated(overrides), cfg, args.folds, log=lambda m, n=name: log(f"{n}: {m}")
        )
        row = {
            "step": name,
            "label": label,
            "table": table,
            "params": overrides,
            "mean": summary["mean"],
            "sd": summary["sd"],
            "fold_dice": summary["fold_dice"],
            "metrics": summary["metrics"],  # every metric per structure, pooled over the folds' test images
            "cpu_seconds": time.process_time() - t0,
        }
        os.makedirs(step_dir, exist_ok=True)
        with open(result_path, "w") as f:
            json.dump(row, f, indent=2)
        rows.append(row)
    return rows


SYNTHETIC = "SYNTHETIC phantoms (`ctv_datastore.phantom`)"


def markdown(rows: list[dict], command: str, n_images: int, folds: int, about: str = SYNTHETIC) -> str:
    lines = [
        "# Ablation: what each component of the contouring network adds",
        "",
        f"{folds}-fold cross-validation on {n_images} {about}; each fold's",
        "test images are never trained on, and Dice is measured through the served pipeline on the",
        "input grid. All rows share the folds, the seed, the epochs and the optimiser settings below.",
        "",
    ]
    for table in (t for t in (PUBLISHED, DICE_THROUGHOUT) if any(r["table"] == t for r in rows)):
        lines += [
            f"## {table}",
            "",
            "| step | Dice mean +- sd over folds | per-fold Dice | CPU minutes (all folds) |",
            "|---|---|---|---|",
        ]
        for r in (r for r in rows if r["table"] == table):
            folds_txt = " / ".join(f"{d:.3f}" for d in r["fold_dice"])
            lines.append(
                f"| {r['label']} | {r['mean']:.3f} +- {r['sd']:.3f} | {folds_txt} | {r['cpu_seconds'] / 60:.1f} |"
            )
        lines.append("")
    lines += structure_table(rows)
    lines += [
        "",
        f"Made on {time.strftime('%Y-%m-%d')}, {platform.machine()} with {torch.get_num_threads()} torch threads"
        f" (torch {torch.__version__}), by:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def structure_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each row's Dice per structure (mean over the folds' test images that contain it),
    for models of several structures, where one mean hides which structures a component helps."""
    names = list(rows[0].get("metrics", {})) if rows else []
    if len(names) < 2:
        return []
    lines = [
        "## Dice per structure (mean over the test images that contain it, all folds)",
        "",
        "| step | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    seen = set()
    for r in rows:
        if r.get("step", r["label"]) in seen:
            continue  # a step in both tables (the Dice-loss row) is listed once
        seen.add(r.get("step", r["label"]))
        cells = [r["metrics"].get(n, {}).get("dice", {}).get("mean") for n in names]
        lines.append(f"| {r['label']} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--out", required=True, help="folder for per-step, per-fold checkpoints and results")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--steps", nargs="*", choices=sorted({s[0] for s in STEPS}), help="run only these steps")
    ap.add_argument("--doc", help="write the markdown table here")
    ap.add_argument("--about", default=SYNTHETIC, help="what the images are, for the table's heading")
    args = ap.parse_args()
    rows = run_ablation(args)
    if args.doc:
        command = "python -m ctv_train.ablation " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        n_images = len(parse_training_args(args)[0])
        with open(args.doc, "w") as f:
            f.write(markdown(rows, command, n_images, args.folds, args.about))
    print(json.dumps([{k: r[k] for k in ("step", "mean", "sd")} for r in rows]))


if __name__ == "__main__":
    main()
