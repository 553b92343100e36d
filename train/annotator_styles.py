"""QAM + OCM in 3D: training on labels drawn by annotators with different styles.

    python -m ctv_train.annotator_styles --out runs/styles --doc runs/styles/summary.json
    python -m ctv_train.annotator_styles --data runs/openkbp_ablation --test runs/openkbp_test --name hn \
        --params '{"structures": [...], "target_spacing": [6, 6, 6], "patch_size": [32, 32, 32]}' \
        --arms true_labels styled_plain styled_qam_ocm --out runs/styles_openkbp

Without ``--data``, synthetic phantoms (SYNTHETIC anatomy, datastore/phantom.py) get their true CTV and
are scored on held-out phantoms. With ``--data``, a labelled datastore of real clinical structure sets
(e.g. OpenKBP's, ``ctv_datastore.openkbp``) is the truth, every structure a label contains is restyled,
the styled copy is saved through ``CTVDatastore.save_label`` with the same recorded structures, and the
models are scored on the ``--test`` datastore. Either way a fraction of the cases (default 50%) is
re-contoured by one of the simulated annotator styles (``--styles``, taken in turn):

- ``wide``: every axial contour dilated by 2-4 voxels (in plane, slice by slice);
- ``tight``: eroded by 2-4 voxels in the same way;
- ``missing_slices``: the cranial or caudal 25-50% of the CTV's axial slices left empty;
- ``shift``: every contour moved by 2-4 voxels in one in-plane direction, the same vector for all the
  structures of a case (an annotator who draws consistently off, or on a misregistered image).

The arms (``ARMS``) train the same network, seed and budget with ``ctv_train.train``: the true
labels (reference), the styled labels with the plain loss, and the styled labels with quality
weighting (QAM+OCM, at two QAM learning rates, and with issue 22's fixes: centred scores, per-case
weights). Each is scored by the served pipeline on held-out cases with their true labels. Each arm's
model then scores every training label with the ``review`` strategy's scores (``lib/review.py``): its
agreement with the label, and for the quality-weighted arms their QAM's score; the ROC AUC says how
well a low score finds the styled ones. A finished arm is kept in ``<out>/<arm>/result.json``, so a
stopped run continues where it stopped (and gains any review score it lacks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from ctv_app.lib.metrics import dice, roc_auc, summarise
from ctv_app.lib.params import CTVParams
from ctv_app.lib.structures import Structures, voxels_of
from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY
from ctv_datastore.build import build, parse_seeds

from .data import find_pairs
from .evaluate import evaluate, evaluate_pairs, served_infer_task
from .train import TrainConfig, train

STYLES = ("wide", "tight", "missing_slices", "shift")
ARMS: dict[str, tuple[str, dict]] = {
    # name: (labels, the TrainConfig fields it sets)
    "true_labels": ("clean", {}),
    "styled_plain": ("styled", {}),
    "styled_qam_ocm": ("styled", {"quality_weighting": True}),
    "styled_qam_ocm_lr1e-3": ("styled", {"quality_weighting": True, "qam_lr": 1e-3}),
    # issue 22's two named causes fixed: scores centred over the batch, and one score and loss per case
    "styled_qam_ocm_centred_per_case": ("styled", {"quality_weighting": True, "quality_centre": True,
                                                   "quality_per_case": True}),  # fmt: skip
    # the 2-D lead (docs/noisy_labels.md, 1d): centred scores with a 10x faster QAM, by case or by patch
    "styled_qam_ocm_centred_lr1e-3": ("styled", {"quality_weighting": True, "quality_centre": True, "qam_lr": 1e-3}),
    "styled_qam_ocm_centred_lr1e-3_per_case": ("styled", {"quality_weighting": True, "quality_centre": True,
                                                          "qam_lr": 1e-3, "quality_per_case": True}),  # fmt: skip
}
# The CI-sized configuration (6 mm, filters 8-64; docs/ablation.md), to keep each arm in CPU minutes.
PARAMS = {"target_spacing": [6, 6, 6], "patch_size": [32, 32, 32], "filters": [8, 16, 32, 64]}


def restyle(
    label: np.ndarray, style: str, rng: np.random.Generator, margin: tuple[int, int] = (2, 4)
) -> tuple[np.ndarray, dict]:
    """One annotator's version of a true label (axes x, y, z; z axial). Returns it and what was done.
    ``margin``: the range of voxels (inclusive) a wide or tight contour is grown or shrunk by."""
    mask = label > 0
    if style in ("wide", "tight"):
        voxels = int(rng.integers(margin[0], margin[1] + 1))
        in_plane = (1.0, 1.0, 1e6)  # contours are drawn slice by slice: grow or shrink within each slice
        if style == "wide":
            out = ndimage.distance_transform_edt(~mask, sampling=in_plane) <= voxels
        else:
            out = ndimage.distance_transform_edt(mask, sampling=in_plane) > voxels
        return out.astype(np.uint8), {"style": style, "voxels": voxels}
    if style == "missing_slices":
        slices = np.flatnonzero(mask.any(axis=(0, 1)))
        n_missing = int(round(len(slices) * rng.uniform(0.25, 0.5)))
        end = "cranial" if rng.random() < 0.5 else "caudal"
        dropped = slices[-n_missing:] if end == "cranial" else slices[:n_missing]
        out = mask.copy()
        out[..., dropped] = False
        return out.astype(np.uint8), {"style": style, "end": end, "slices": int(n_missing)}
    if style == "shift":
        voxels = int(rng.integers(margin[0], margin[1] + 1))
        angle = rng.uniform(0.0, 2.0 * np.pi)
        vector = (int(round(voxels * np.cos(angle))), int(round(voxels * np.sin(angle))), 0)
        out = ndimage.shift(mask.astype(np.uint8), vector, order=0, mode="constant", cval=0)
        return out, {"style": style, "voxels": voxels, "vector": list(vector)}
    raise ValueError(f"unknown annotator style {style!r}; one of {STYLES}")


def make_styled_datastore(
    clean: str,
    out: str,
    fraction: float,
    seed: int,
    styles: tuple[str, ...] = STYLES,
    margin: tuple[int, int] = (2, 4),
) -> dict[str, dict]:
    """A copy of the ``clean`` folder datastore (images linked) where ``fraction`` of the labels are
    restyled, styles taken in turn. Returns ``{id: {"style", ..., "dice_to_truth"}}`` (style
    ``true`` for the untouched ones), also written to ``<out>/annotators.json``.

    A ``shift`` is one vector per case: every structure of the case moves by it.

    A datastore that records its labels' structures (real structure sets) has every structure of a
    restyled label restyled, and its copy is saved as a bitmask of the same structures through the
    app's datastore. Plain label files (phantoms: label maps in the model's values) have each value's
    structure restyled and are saved as label maps. ``dice_to_truth`` is the mean over the label's
    structures."""
    pairs = find_pairs(clean)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(pairs), size=int(round(fraction * len(pairs))), replace=False).tolist())
    recorded = all(STRUCTURES_KEY in p for p in pairs)
    os.makedirs(os.path.join(out, "labels", "final"), exist_ok=True)
    for pair in pairs:
        link = os.path.join(out, os.path.basename(pair["image"]))
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(pair["image"]), link)
    store = _structure_datastore(out, pairs) if recorded else None
    record = {}
    restyled = 0
    for i, pair in enumerate(pairs):
        name = os.path.basename(pair["image"])
        truth_img = nib.load(pair["label"])
        truth = np.asarray(truth_img.dataobj)
        style = styles[restyled % len(styles)] if i in chosen else "true"
        restyled += i in chosen
        # A shift is the annotator's, not the structure's: every structure of the case gets the same draws.
        case_seed = int(rng.integers(2**63)) if style == "shift" else None

        def style_rng() -> np.random.Generator:
            return rng if case_seed is None else np.random.default_rng(case_seed)

        if store is None:
            truth = truth.astype(np.uint8)
            styled, per_value, dices = np.zeros_like(truth), {}, []
            # each structure of the label map (its value) restyled alone; where grown ones meet, the lower
            # value keeps the voxel, as a label map holds one structure per voxel
            for value in np.unique(truth[truth > 0]).tolist():
                mask = truth == value
                styled_mask, info = restyle(mask, style, style_rng(), margin) if style != "true" else (mask, {})
                styled[(styled_mask > 0) & (styled == 0)] = value
                per_value[int(value)] = info
                dices.append(dice(styled == value, mask))
            nib.save(nib.Nifti1Image(styled, truth_img.affine), os.path.join(out, "labels", "final", name))
            record[pair["id"]] = {"style": style, "structures": per_value, "dice_to_truth": float(np.mean(dices))}
            continue
        encoding, structures = pair[ENCODING_KEY], pair[STRUCTURES_KEY]
        styled_masks, per_structure, dices = {}, {}, []
        for structure, value in structures.items():
            mask = voxels_of(truth, value, encoding)
            styled_mask, info = restyle(mask, style, style_rng(), margin) if style != "true" else (mask, {})
            styled_masks[structure], per_structure[structure] = styled_mask > 0, info
            dices.append(dice(styled_mask, mask))
        bitmask = store.structures.pack([styled_masks.get(n) for n in store.structures.names])
        tmp = os.path.join(out, f".{name}")
        nib.save(nib.Nifti1Image(bitmask, truth_img.affine), tmp)
        try:
            label_names = {n: store.structures.value(n) for n in structures}
            store.save_label(pair["id"], tmp, "final", {"encoding": "bitmask", "label_names": label_names,
                                                        "annotator": f"simulated {style}"})  # fmt: skip
        finally:
            os.unlink(tmp)
        scored = [d for d in dices if d is not None]
        record[pair["id"]] = {
            "style": style,
            "structures": per_structure,
            "dice_to_truth": float(np.mean(scored)) if scored else None,
        }
    with open(os.path.join(out, "annotators.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _structure_datastore(folder: str, pairs: list[dict]):
    """The app's datastore at ``folder``, knowing the structures the ``pairs`` record, in their values."""
    from ctv_app.lib.datastore import CTVDatastore  # the app's datastore: imports the server's stack

    values = {name: value for p in pairs for name, value in p[STRUCTURES_KEY].items()}
    names = sorted(values, key=values.get)
    if [values[n] for n in names] != list(range(1, len(names) + 1)):
        raise ValueError(f"the labels' structure values are not 1..{len(names)}: {values}")
    return CTVDatastore(folder, Structures(names), auto_reload=False)


def _label_info(pair: dict) -> dict | None:
    """The label info a datastore pair carries (its encoding and structures), as the scorer reads it."""
    if STRUCTURES_KEY not in pair:
        return None
    return {"encoding": pair[ENCODING_KEY], "structures": pair[STRUCTURES_KEY]}


def review_auc(scoring, pairs: list[dict], record: dict[str, dict]) -> dict:
    """Score every label with a review score (``lib/review.py``); the ROC AUC of 'true labels score above
    styled ones', over all styles and per style."""
    scores = {p["id"]: scoring.score(p["image"], p["label"], _label_info(p)) for p in pairs}
    true = [s for i, s in scores.items() if record[i]["style"] == "true"]
    styled = [s for i, s in scores.items() if record[i]["style"] != "true"]
    by_style = {
        style: roc_auc(true, [s for i, s in scores.items() if record[i]["style"] == style])
        for style in dict.fromkeys(r["style"] for r in record.values() if r["style"] != "true")
    }
    return {"auc": roc_auc(true, styled), "auc_by_style": by_style, "scores": scores}


def review_aucs(model: str, pairs: list[dict], record: dict[str, dict], name: str, quality: bool) -> dict:
    """``review_auc`` of the model's label agreement, and of its QAM when it has one (``quality``)."""
    from ctv_app.lib.review import LabelAgreementScoring, LabelQualityScoring

    task = served_infer_task(model, None, name)
    out = {"label_agreement": review_auc(LabelAgreementScoring(task), pairs, record)}
    if quality:
        out["label_quality"] = review_auc(LabelQualityScoring(task), pairs, record)
    return out


def run(args: argparse.Namespace, log=print) -> dict:
    styled = os.path.join(args.out, "styled")
    if args.data:
        clean, test_pairs = args.data, find_pairs(args.test)
    else:
        clean, test_pairs = os.path.join(args.out, "clean"), None
        build(clean, parse_seeds(args.train_seeds), labelled=set(parse_seeds(args.train_seeds)))
    margin = tuple(int(v) for v in args.margin.split("-"))
    record = make_styled_datastore(clean, styled, args.fraction, args.seed, tuple(args.styles), margin)
    folders = {"clean": clean, "styled": styled}
    styled_pairs = find_pairs(styled)
    params = CTVParams().updated(json.loads(args.params) if args.params else PARAMS)
    results = {}
    for arm in args.arms:
        labels, weighting = ARMS[arm]
        arm_dir = os.path.join(args.out, arm)
        result_path = os.path.join(arm_dir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                results[arm] = json.load(f)
            if "label_agreement" not in results[arm]:  # an arm finished before the agreement score existed
                results[arm].update(review_aucs(os.path.join(arm_dir, "ctv.pt"), styled_pairs, record, args.name,
                                                results[arm]["quality_weighting"]))  # fmt: skip
                with open(result_path, "w") as f:
                    json.dump(results[arm], f, indent=1)
            continue
        os.makedirs(arm_dir, exist_ok=True)
        cfg = TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            volumes_per_batch=args.volumes_per_batch,
            patches_per_volume=args.patches_per_volume,
            seed=args.seed,
            val_every=args.val_every,
            **weighting,
        )
        pairs = find_pairs(folders[labels])
        model = os.path.join(arm_dir, "ctv.pt")
        t0 = time.time()
        trained = train(pairs, model, params, cfg, log=lambda m, a=arm: log(f"{a}: {m}"))
        seconds = time.time() - t0
        if test_pairs is None:
            held_out = evaluate(model, parse_seeds(args.test_seeds))
        else:
            held_out = evaluate_pairs(model, test_pairs, name=args.name)
        result = {
            "labels": labels,
            "quality_weighting": cfg.quality_weighting,
            "qam_lr": cfg.qam_lr if cfg.quality_weighting else None,
            **{k: v for k, v in weighting.items() if k not in ("quality_weighting", "qam_lr")},
            "best_val_dice": trained["best_val_dice"],
            "train_seconds": seconds,
            "held_out_dice": {k: v for k, v in held_out.items() if k != "per_case"},
            "held_out_per_case": held_out["per_case"],
        }
        # the styled labels, whichever the arm trained on: a true-label model checks them as an independent one
        result.update(review_aucs(model, styled_pairs, record, args.name, cfg.quality_weighting))
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        results[arm] = result
        log(f"{arm}: held-out Dice {held_out['mean']:.3f} +- {held_out['sd']:.3f} after {seconds / 60:.1f} min")
    styles = {s: summarise({i: r["dice_to_truth"] for i, r in record.items() if r["style"] == s}) for s in args.styles}
    return {
        "command": "python -m ctv_train.annotator_styles " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "params": params.to_dict(),
        "config": {k: v for k, v in vars(args).items() if k != "doc"},
        "annotators": record,
        "style_dice_to_truth": {s: {k: v for k, v in d.items() if k != "per_case"} for s, d in styles.items()},
        "arms": results,
    }


def markdown(summary: dict) -> str:
    lines = ["| arm | held-out Dice (mean +- sd, min) | best val Dice | train min |", "|---|---|---|---|"]
    for arm, r in summary["arms"].items():
        d = r["held_out_dice"]
        lines.append(
            f"| {arm} | {d['mean']:.3f} +- {d['sd']:.3f}, {d['min']:.3f} | {r['best_val_dice']:.3f} |"
            f" {r['train_seconds'] / 60:.1f} |"
        )
    for arm, r in summary["arms"].items():
        for score in ("label_agreement", "label_quality"):
            if score in r:
                q = r[score]
                by_style = ", ".join(f"{s} {v:.2f}" for s, v in q["auc_by_style"].items())
                lines += ["", f"{arm}: {score} ROC AUC (true labels above styled) {q['auc']:.2f} ({by_style})."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-seeds", default="4000-4023")
    ap.add_argument("--test-seeds", default="9000-9009")
    ap.add_argument("--data", help="labelled datastore of real structure sets (instead of phantoms)")
    ap.add_argument("--test", help="with --data: the labelled datastore every arm is scored on")
    ap.add_argument("--name", default="ctv", help="the model's infer task (hn for head-and-neck structures)")
    ap.add_argument("--params", help=f"JSON CTVParams overrides (default {json.dumps(PARAMS)})")
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of cases restyled")
    ap.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES), help="annotator styles, in turn")
    ap.add_argument("--margin", default="2-4", help="voxels a wide, tight or shifted annotator is off by (range)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--volumes-per-batch", type=int, default=4)
    ap.add_argument("--patches-per-volume", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=1, help="validate every n-th epoch and at the last")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--doc", help="write the summary JSON here (docs/annotator_styles.json)")
    args = ap.parse_args()
    if bool(args.data) != bool(args.test):
        ap.error("--data and --test go together")
    summary = run(args)
    if args.doc:
        with open(args.doc, "w") as f:
            json.dump(summary, f, indent=1)
    print(markdown(summary))


if __name__ == "__main__":
    main()
