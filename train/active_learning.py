"""Active learning on labelled data: does choosing the most uncertain CT to label beat choosing at random?

    python -m ctv_train.active_learning --pool runs/openkbp --test runs/openkbp_test --out runs/al \\
        --name hn --sizes 5,10,20,40 --strategies random,epistemic,tta --seeds 0,1 --steps 300 \\
        --candidates 30 --params '{"structures": [...], "target_spacing": [6, 6, 6], "patch_size": [32, 32, 32]}' \\
        --doc docs/active_learning_real.md --plot docs/images/al_openkbp.png

A simulation of the annotation loop the server runs, with the pool's own labels as the annotator: per
seed, every strategy starts from the same random ``sizes[0]`` labelled cases; a model is trained on the
labelled cases (``train.train``, the same budget of about ``--steps`` optimiser steps at every size) and
scored on the test folder through the served pipeline (``evaluate.evaluate_pairs``: mean Dice over each
case's structures). With ``--fine-tune`` each round instead goes on from the previous round's model, as the
server retrains from the model it serves, and the first model gets ``--first-steps``; every strategy still
gets the same steps at every size. Then the strategy picks the cases that bring the labelled set to the next size:
``random``, or the highest scores of the product's own scoring methods (``activelearning.EpistemicScoring``,
``TTAScoring``) for the model just trained. Scoring the whole pool costs ~samples inferences per case, so
each round scores ``--candidates`` unlabelled cases drawn at random (the same draw for both uncertainty
methods). Each finished point is kept in ``<out>/<seed>/<strategy>/<size>.json``, so a stopped run goes on
where it stopped; ``--doc`` and ``--plot`` write the table and the learning curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time

import numpy as np

from ctv_app.lib.activelearning import EpistemicScoring, TTAScoring
from ctv_app.lib.configs import CONFIGS
from ctv_app.lib.params import CTVParams

from .data import find_pairs
from .evaluate import evaluate_pairs, served_infer_task
from .train import TrainConfig, train

STRATEGIES = ("random", "epistemic", "tta")


def epochs_for(n_labelled: int, steps: int, cfg: TrainConfig) -> int:
    """Epochs that give about ``steps`` optimiser steps on ``n_labelled`` cases (less the validation share)."""
    n_train = n_labelled - max(1, int(round(n_labelled * cfg.val_fraction)))
    return max(1, math.ceil(steps * cfg.volumes_per_batch / max(n_train, 1)))


def pick(
    strategy: str, model: str, name: str, unlabelled: list[dict], k: int, rng: random.Random, candidates: int
) -> tuple[list[dict], dict[str, float]]:
    """``k`` cases of ``unlabelled`` by ``strategy``; the scores of the candidates it looked at."""
    if strategy == "random":
        return rng.sample(unlabelled, k), {}
    looked = rng.sample(unlabelled, min(candidates, len(unlabelled)))
    task = served_infer_task(model, None, name)
    scorer = EpistemicScoring(task, samples=4) if strategy == "epistemic" else TTAScoring(task)
    scores = {p["id"]: scorer.score_file(p["image"])[0] for p in looked}
    ranked = sorted(looked, key=lambda p: scores[p["id"]], reverse=True)
    return ranked[:k], scores


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def train_and_test(
    labelled: list[dict], test: list[dict], model: str, params: CTVParams, args, seed: int, steps: int, init: str = ""
) -> dict:
    """One point of a curve: a model trained on ``labelled`` (about ``steps`` steps, from ``init``'s weights
    if given), scored on ``test``."""
    t0 = time.process_time()
    cfg = TrainConfig(lr=args.lr, seed=seed, val_every=args.val_every, init=init)
    cfg.epochs = epochs_for(len(labelled), steps, cfg)
    os.makedirs(os.path.dirname(model), exist_ok=True)
    train(labelled, model, params, cfg, log=lambda m: None)
    scores = evaluate_pairs(model, test, name=args.name)
    return {
        "size": len(labelled),
        "labelled": sorted(p["id"] for p in labelled),
        "mean_dice": scores["mean"],
        "structures": {n: s["mean"] for n, s in scores["structures"].items()},
        "epochs": cfg.epochs,
        "init": init,
        "model": model,
        "cpu_seconds": time.process_time() - t0,
    }


def run(args: argparse.Namespace, log=print) -> dict:
    """{seed: {strategy: {size: result}}}, each point trained, tested and kept (or read back if kept)."""
    pool, test = find_pairs(args.pool), find_pairs(args.test)
    params = CTVParams().updated(json.loads(args.params))
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = args.strategies.split(",")
    if unknown := set(strategies) - set(STRATEGIES):
        raise SystemExit(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    results: dict = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = random.Random(seed).sample(pool, sizes[0])
        first_path = os.path.join(args.out, str(seed), "start", f"{sizes[0]}.json")  # one model for all strategies
        for strategy in strategies:
            # the uncertainty methods draw the same candidates; random draws its own picks
            labelled, rng = list(start), random.Random(seed * 1000 + (2 if strategy == "random" else 1))
            for i, size in enumerate(sizes):
                point = os.path.join(args.out, str(seed), strategy, f"{size}.json")
                result = read_json(point)
                if result is None:
                    steps = args.first_steps if args.fine_tune and i == 0 else args.steps
                    init = previous["model"] if args.fine_tune and i > 0 else ""
                    result = (read_json(first_path) if i == 0 else None) or train_and_test(
                        labelled, test, point[: -len(".json")] + ".pt", params, args, seed, steps, init
                    )
                    if i == 0:
                        write_json(first_path, result)
                    if i + 1 < len(sizes):
                        t0 = time.process_time()
                        unlabelled = [p for p in pool if p["id"] not in set(result["labelled"])]
                        chosen, scores = pick(
                            strategy, result["model"], args.name, unlabelled, sizes[i + 1] - size, rng, args.candidates
                        )
                        result = {**result, "chose": [p["id"] for p in chosen], "scores": scores,
                                  "scoring_cpu_seconds": time.process_time() - t0}  # fmt: skip
                    write_json(point, result)
                log(f"seed {seed} {strategy} {size} cases: mean Dice {result['mean_dice']:.3f}")
                results.setdefault(seed, {}).setdefault(strategy, {})[size] = result
                previous = result
                if i + 1 < len(sizes):
                    labelled = [p for p in pool if p["id"] in set(result["labelled"]) | set(result["chose"])]
    return results


def markdown(results: dict, command: str) -> str:
    """Mean test Dice per strategy and number of labelled cases (mean over seeds, each seed's value)."""
    strategies = list(next(iter(results.values())))
    sizes = sorted(next(iter(next(iter(results.values())).values())))
    lines = ["| labelled cases | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for size in sizes:
        cells = []
        for s in strategies:
            values = [results[seed][s][size]["mean_dice"] for seed in results if size in results[seed].get(s, {})]
            cells.append(f"{np.mean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})" if values else "")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMade by:\n\n```\n{command}\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="labelled folder datastore the strategies pick from")
    ap.add_argument("--test", required=True, help="labelled folder datastore every model is scored on")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="ctv", choices=sorted(CONFIGS))
    ap.add_argument("--params", default="{}", help="JSON overrides of CTVParams")
    ap.add_argument("--sizes", default="5,10,20,40")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per model, at every size")
    ap.add_argument("--fine-tune", action="store_true", help="each round goes on from the previous round's model")
    ap.add_argument("--first-steps", type=int, default=900, help="with --fine-tune: the first model's steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=30, help="unlabelled cases scored per round")
    ap.add_argument("--doc", help="write the markdown table here")
    ap.add_argument("--plot", help="write the learning curves (PNG) here")
    args = ap.parse_args()
    results = run(args)
    command = "python -m ctv_train.active_learning " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.doc:
        with open(args.doc, "w") as f:
            f.write(markdown(results, command))
    if args.plot:
        from ctv_app.lib.figures import learning_curves

        curves: dict = {}
        for by_strategy in results.values():
            for strategy, points in by_strategy.items():
                for size, r in points.items():
                    curves.setdefault(strategy, {}).setdefault(size, []).append(r["mean_dice"])
        learning_curves(args.plot, curves, "mean test Dice", f"Active learning on {args.pool} (tested on {args.test})")
    print(json.dumps({s: {st: {k: v["mean_dice"] for k, v in p.items()} for st, p in r.items()} for s, r in results.items()}))


if __name__ == "__main__":
    main()
