"""k-fold cross-validation of the CTV model on a folder of images + labels.

    python -m ctv_train.crossval --data runs/phantoms --folds 3 --epochs 20 --out runs/cv

Each fold trains on the other folds (train.py holds a validation split out of them for
checkpoint selection) and is scored on its own images through the served pipeline.
Prints per-fold Dice and mean +- sd over folds; the JSON also carries every metric per structure
(``ctv_app.lib.metrics``) pooled over the folds' test images, each image scored once.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np

from ctv_app.lib.metrics import summarise
from ctv_app.lib.params import CTVParams

from .evaluate import evaluate_pairs
from .train import TrainConfig, add_training_args, parse_training_args, train


def kfold(items: list, folds: int, seed: int) -> list[tuple[list, list]]:
    """(train, test) per fold; every item is tested exactly once."""
    if not 2 <= folds <= len(items):
        raise ValueError(f"need 2 <= folds <= {len(items)} items, got folds={folds}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    parts = [sorted(order[f::folds]) for f in range(folds)]
    return [([items[i] for i in sorted(set(order) - set(part))], [items[i] for i in part]) for part in parts]


def pooled_metrics(fold_results: list[dict]) -> dict:
    """Each structure's summary of every metric over the test images of all folds (``evaluate_pairs``'
    ``metrics``), without the per-case values (those stay in each fold's result)."""
    per_case: dict[str, dict[str, dict]] = {}
    for result in fold_results:
        for name, by_metric in result["metrics"].items():
            for metric, s in by_metric.items():
                per_case.setdefault(name, {}).setdefault(metric, {}).update(s["per_case"])
    return {
        name: {metric: {k: v for k, v in summarise(cases).items() if k != "per_case"} for metric, cases in m.items()}
        for name, m in per_case.items()
    }


def cross_validate(
    pairs: list[dict[str, str]], out_dir: str, params: CTVParams, cfg: TrainConfig, folds: int = 3, log=print
) -> dict:
    results = []
    for fold, (train_pairs, test_pairs) in enumerate(kfold(pairs, folds, cfg.seed)):
        model = os.path.join(out_dir, f"fold{fold}", "ctv.pt")
        kept = os.path.join(out_dir, f"fold{fold}", "scores.json")  # a stopped run keeps its finished folds
        if os.path.exists(kept):
            with open(kept) as f:
                scores = json.load(f)
        else:
            train(train_pairs, model, params, cfg, log=lambda msg, f=fold: log(f"fold {f}: {msg}"))
            scores = evaluate_pairs(model, test_pairs)
            with open(kept, "w") as f:
                json.dump(scores, f)
        results.append(scores)
        log(f"fold {fold}: Dice {scores['mean']:.3f} +- {scores['sd']:.3f} on {scores['n']} test images")
    means = np.array([r["mean"] for r in results])
    summary = {
        "folds": folds,
        "fold_dice": means.tolist(),
        "mean": float(means.mean()),
        "sd": float(means.std(ddof=1)),
        "metrics": pooled_metrics(results),
        "per_fold": results,
    }
    log(
        f"{folds}-fold Dice: {summary['mean']:.3f} +- {summary['sd']:.3f} "
        f"(folds: {', '.join(f'{m:.3f}' for m in means)})"
    )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--out", required=True, help="folder for the per-fold checkpoints")
    ap.add_argument("--folds", type=int, default=3)
    args = ap.parse_args()
    pairs, params, cfg = parse_training_args(args)
    summary = cross_validate(pairs, args.out, params, cfg, args.folds)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_fold"}))


if __name__ == "__main__":
    main()
