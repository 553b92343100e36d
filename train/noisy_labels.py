"""The noisy-label experiment of the QAM/OCM method, in 2D on real chest X-rays (JSRT + SCR masks).

    python -m ctv_train.noisy_labels train --data ../shared/data/jsrt/jsrt_scr_256.npz \
        --noisy 0.5 --level 5-13 --method qam_ocm --epochs 60 --out runs/jsrt/n50_5-13_qam_ocm.pt
    python -m ctv_train.noisy_labels evaluate --model runs/jsrt/n50_5-13_qam_ocm.pt \
        --data ../shared/data/jsrt/jsrt_scr_256.npz [--split test|all]

Protocol: 165 images train, 42 test, split by a fixed seed; the test labels stay clean. A noisy
training sample gets each structure's mask dilated or eroded (at random) by n pixels, n uniform
in the level's range; a fraction ``--noisy`` of the training samples is noisy. Methods:
``baseline`` (mean Dice+BCE), ``qam`` (QAM weights), ``qam_ocm`` (QAM weights bounded by OCM).
Batch 32. Each run saves its checkpoint; ``evaluate`` prints one final JSON line of Dice per
structure and their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from scipy import ndimage

from ctv_app.lib.checkpoint import load_checkpoint
from ctv_app.lib.losses import DeepSupervisionLoss
from ctv_app.lib.metrics import dice, roc_auc
from ctv_app.lib.quality import QualityAwarenessModule, QualityWeightedLoss, small_loss_weights

N_TRAIN = 165
# The published table (Dice lungs / heart / clavicles / mean), keyed by (noisy fraction, level, method).
PUBLISHED: dict[tuple[float, str, str], tuple[float, float, float, float]] = {
    (0.0, "-", "baseline"): (0.943, 0.941, 0.862, 0.915),
    (0.0, "-", "qam"): (0.939, 0.923, 0.831, 0.898),
    (0.0, "-", "qam_ocm"): (0.941, 0.940, 0.852, 0.911),
    (0.25, "1-8", "baseline"): (0.868, 0.888, 0.538, 0.765),
    (0.25, "1-8", "qam"): (0.925, 0.926, 0.748, 0.866),
    (0.25, "1-8", "qam_ocm"): (0.936, 0.925, 0.823, 0.895),
    (0.5, "1-8", "baseline"): (0.873, 0.884, 0.539, 0.765),
    (0.5, "1-8", "qam"): (0.922, 0.925, 0.726, 0.857),
    (0.5, "1-8", "qam_ocm"): (0.936, 0.929, 0.828, 0.895),
    (0.75, "1-8", "baseline"): (0.820, 0.828, 0.512, 0.720),
    (0.75, "1-8", "qam"): (0.898, 0.825, 0.536, 0.753),
    (0.75, "1-8", "qam_ocm"): (0.937, 0.939, 0.809, 0.895),
    (0.25, "5-13", "baseline"): (0.865, 0.857, 0.422, 0.715),
    (0.25, "5-13", "qam"): (0.893, 0.835, 0.615, 0.781),
    (0.25, "5-13", "qam_ocm"): (0.935, 0.935, 0.801, 0.890),
    (0.5, "5-13", "baseline"): (0.755, 0.807, 0.393, 0.652),
    (0.5, "5-13", "qam"): (0.828, 0.853, 0.491, 0.714),
    (0.5, "5-13", "qam_ocm"): (0.942, 0.942, 0.853, 0.912),
    (0.75, "5-13", "baseline"): (0.745, 0.738, 0.381, 0.621),
    (0.75, "5-13", "qam"): (0.770, 0.772, 0.366, 0.636),
    (0.75, "5-13", "qam_ocm"): (0.938, 0.937, 0.801, 0.892),
}


@dataclass(frozen=True)
class Method:
    """How a run weighs its samples: not at all (baseline), by the QAM's softmax, bounded by the OCM or not;
    ``centre`` centres the scores over the batch before the OCM; ``qam_lr`` replaces ``--qam-lr``;
    ``sees_prediction`` gives the QAM the network's (detached) probabilities beside the image and label,
    which the published QAM does not see; ``small_loss`` weighs by the batch's losses, bounded as by the
    OCM, with no QAM (``quality.small_loss_weights``)."""

    quality: bool = True
    ocm: bool = True
    centre: bool = False
    qam_lr: float | None = None
    sees_prediction: bool = False
    small_loss: bool = False


# The published methods, then the variants tried against them (issue 22, docs/noisy_labels.md).
PUBLISHED_METHODS = ("baseline", "qam", "qam_ocm")
METHODS: dict[str, Method] = {
    "baseline": Method(quality=False),
    "qam": Method(ocm=False),
    "qam_ocm": Method(),
    "qam_ocm_centred": Method(centre=True),
    "qam_ocm_centred_lr1e-3": Method(centre=True, qam_lr=1e-3),
    "qam_ocm_centred_sees_prediction": Method(centre=True, sees_prediction=True),
    "small_loss_ocm": Method(quality=False, small_loss=True),
}
LEVELS = {"-": (0, 0), "1-8": (1, 8), "5-13": (5, 13)}


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = np.load(path, allow_pickle=False)
    missing = {"images", "masks", "structures"} - set(data.files)
    if missing:
        raise SystemExit(f"{path} lacks arrays {sorted(missing)}")
    images, masks = data["images"], data["masks"]
    consistent = images.ndim == 3 and masks.ndim == 4 and masks.shape[0] == images.shape[0]
    if not consistent or masks.shape[2:] != images.shape[1:]:
        raise SystemExit(f"{path}: expected images [N,H,W] and masks [N,C,H,W], got {images.shape}, {masks.shape}")
    return images, masks, [str(s) for s in data["structures"]]


def split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/test split: a seeded permutation, the first 165 for training."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:N_TRAIN]), np.sort(order[N_TRAIN:])


def perturb(mask: np.ndarray, pixels: int, dilate: bool) -> np.ndarray:
    """Grow or shrink a binary mask by ``pixels`` (Euclidean distance)."""
    mask = mask > 0
    if dilate:
        return (ndimage.distance_transform_edt(~mask) <= pixels).astype(np.uint8)
    return (ndimage.distance_transform_edt(mask) > pixels).astype(np.uint8)


def add_label_noise(masks: np.ndarray, fraction: float, level: tuple[int, int], seed: int) -> tuple[np.ndarray, list]:
    """Corrupt ``fraction`` of the samples; returns the noisy masks and which samples were corrupted."""
    rng = np.random.default_rng(seed)
    noisy = masks.copy()
    chosen = sorted(rng.choice(len(masks), size=int(round(fraction * len(masks))), replace=False).tolist())
    for i in chosen:
        for c in range(masks.shape[1]):
            noisy[i, c] = perturb(masks[i, c], int(rng.integers(level[0], level[1] + 1)), bool(rng.random() < 0.5))
    return noisy, chosen


def build_net(features: tuple[int, ...], n_classes: int) -> torch.nn.Module:
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=n_classes, features=features)


def _prepare(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 255.0
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def _prepare_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    y = torch.as_tensor(masks, dtype=torch.float32)
    return y if y.shape[-1] == size else (F.interpolate(y, size=(size, size), mode="area") >= 0.5).float()


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, size: int, batch: int = 16) -> np.ndarray:
    """Binary masks [N, C, H, W] at the images' own resolution."""
    net.eval()
    out = []
    for start in range(0, len(images), batch):
        logits = net(_prepare(images[start : start + batch], size))
        if logits.shape[-1] != images.shape[-1]:
            logits = F.interpolate(logits, size=images.shape[1:], mode="bilinear", align_corners=False)
        out.append((torch.sigmoid(logits) > 0.5).numpy().astype(np.uint8))
    return np.concatenate(out)


def dice_per_structure(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[C] mean over images of each structure's Dice (``ctv_app.lib.metrics.dice``); an image where both
    masks are empty has no Dice and is left out (every JSRT image contains every structure)."""
    per_structure = []
    for c in range(pred.shape[1]):
        values = [d for d in map(dice, pred[:, c], truth[:, c]) if d is not None]
        per_structure.append(np.mean(values) if values else np.nan)
    return np.array(per_structure)


def scores(pred: np.ndarray, truth: np.ndarray, structures: list[str]) -> dict[str, float]:
    d = dice_per_structure(pred.astype(bool), truth.astype(bool))
    return {**{s: float(v) for s, v in zip(structures, d)}, "mean": float(d.mean())}


def qam_image(x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """What the QAM sees beside the label: the image, and the network's probabilities when the method says."""
    return x if logits is None else torch.cat([x, torch.sigmoid(logits.detach())], dim=1)


@torch.no_grad()
def quality_scores(weighting: QualityWeightedLoss, x: torch.Tensor, y: torch.Tensor, batch: int = 32,
                   net: torch.nn.Module | None = None) -> np.ndarray:  # fmt: skip
    """The QAM's raw score of every (image, label) pair, as the review would rank them; ``net``: the network
    whose probabilities a ``sees_prediction`` QAM sees."""
    if net is not None:
        net.eval()
    parts = [(x[s : s + batch], y[s : s + batch]) for s in range(0, len(x), batch)]
    scores = [weighting.qam(qam_image(xb, net(xb) if net is not None else None), yb) for xb, yb in parts]
    return torch.cat(scores).numpy()


@torch.no_grad()
def sample_losses(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> np.ndarray:
    """The network's loss on every training sample, as the weighting sees it."""
    net.eval()
    loss = DeepSupervisionLoss(reduction="none")
    return torch.cat([loss(net(x[s : s + batch]), y[s : s + batch]) for s in range(0, len(x), batch)]).numpy()


def progress(net, weighting, x, y, corrupted: list[int], test: tuple[np.ndarray, np.ndarray], size: int,
             sees_prediction: bool = False) -> dict:  # fmt: skip
    """A point of the training curve: the test split's mean Dice (never used to pick a model: the
    last epoch is the result); with corrupted labels, ``loss_auc``, how often a clean training sample has
    a lower loss than a corrupted one (the signal any weighting learns from); with a QAM, its raw scores'
    spread and ``review_auc``, how often a clean label scores above a corrupted one (what it learnt)."""
    pred = predict(net, test[0], size).astype(bool)
    point = {"test_mean": float(dice_per_structure(pred, test[1].astype(bool)).mean())}
    clean = np.setdiff1d(np.arange(len(x)), corrupted)
    separable = len(corrupted) > 0 and len(clean) > 0
    if separable:
        losses = sample_losses(net, x, y)
        point["loss_auc"] = roc_auc(-losses[clean], -losses[corrupted])
    if weighting is not None:
        raw = quality_scores(weighting, x, y, net=net if sees_prediction else None)
        point.update(score_mean=float(raw.mean()), score_sd=float(raw.std()))
        if separable:
            point["review_auc"] = roc_auc(raw[clean], raw[corrupted])
    return point


def train(args: argparse.Namespace, log=print) -> dict:
    torch.manual_seed(args.seed)
    images, masks, structures = load_npz(args.data)
    train_idx, test_idx = split(len(images), args.split_seed)
    level = LEVELS[args.level]
    train_masks, corrupted = masks[train_idx], []
    if args.noisy:
        train_masks, corrupted = add_label_noise(train_masks, args.noisy, level, args.seed)
    x, y = _prepare(images[train_idx], args.size), _prepare_masks(train_masks, args.size)
    net = build_net(tuple(args.features), len(structures))
    per_sample_loss = DeepSupervisionLoss(reduction="none")
    params = [{"params": net.parameters(), "lr": args.lr}]
    weighting = None
    method = METHODS[args.method]
    if method.quality:
        qam = QualityAwarenessModule(2, in_channels=1 + len(structures) * (2 if method.sees_prediction else 1))
        weighting = QualityWeightedLoss(qam, args.ocm_lambda if method.ocm else None, centre=method.centre)
        params.append({"params": qam.parameters(), "lr": method.qam_lr or args.qam_lr})
    opt = torch.optim.Adam(params)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    curve, test = [], (images[test_idx], masks[test_idx])
    for epoch in range(args.epochs):
        net.train()
        order = rng.permutation(len(x))
        losses = []
        for start in range(0, len(order), args.batch):
            idx = torch.as_tensor(order[start : start + args.batch])
            xb, yb = x[idx], y[idx]
            logits = net(xb)
            per_sample = per_sample_loss(logits, yb)
            if weighting is not None:
                loss = weighting(per_sample, qam_image(xb, logits if method.sees_prediction else None), yb)
            elif method.small_loss:
                loss = (small_loss_weights(per_sample, args.ocm_lambda) * per_sample).sum()
            else:
                loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if (epoch + 1) % args.log_every == 0 or epoch + 1 == args.epochs:
            t_point = time.time()
            point = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                     **progress(net, weighting, x, y, corrupted, test, args.size, method.sees_prediction)}  # fmt: skip
            curve.append(point)
            t_start += time.time() - t_point  # the curve is a diagnostic: its time is not training time
            log(f"epoch {epoch + 1}/{args.epochs} ({time.time() - t_start:.0f}s) "
                + " ".join(f"{k} {v:.4g}" for k, v in point.items() if k != "epoch"))  # fmt: skip
    train_seconds = time.time() - t_start
    result = scores(predict(net, images[test_idx], args.size), masks[test_idx], structures)
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}
    with np.load(args.data) as data:
        names = data["names"] if "names" in data.files else None
    meta = {
        "test_names": [str(n) for n in names[test_idx]] if names is not None else [],
        "corrupted_train_indices": corrupted,
        "test_dice": result,
        "curve": curve,
        "train_seconds": train_seconds,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoint = {"model": net.state_dict(), "config": config, "structures": structures, "meta": meta}
    if weighting is not None:
        checkpoint["qam"] = weighting.qam.state_dict()
    torch.save(checkpoint, args.out)
    log(f"saved {args.out}; test Dice {json.dumps(result)} after {train_seconds:.0f}s")
    return {**result, "train_seconds": train_seconds}


def run_table(args: argparse.Namespace, log=print) -> list[dict]:
    """Train every (row, method) not trained yet; return the machine-readable rows."""
    rows = []
    for spec in args.rows:
        noisy_text, level = spec.split(":")
        noisy = float(noisy_text)
        for method in args.methods:
            out = os.path.join(args.out, f"{noisy:g}_{level}_{method}.pt")
            if not os.path.exists(out):
                run = argparse.Namespace(**{**vars(args), "out": out, "method": method, "noisy": noisy, "level": level})
                log(f"training {os.path.basename(out)}")
                train(run, log=lambda m, n=os.path.basename(out): log(f"{n}: {m}"))
            meta = load_checkpoint(out)["meta"]
            rows.append(
                {
                    "noisy": noisy,
                    "level": level,
                    "method": method,
                    **meta["test_dice"],
                    "train_seconds": meta["train_seconds"],
                }
            )
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Merge ``rows`` into the JSON list at ``path``: a row of the same (noisy, level, method) is replaced,
    the others kept in their order, new ones appended; so a variant's rows join the table they compare with."""
    key = lambda r: (r["noisy"], r["level"], r["method"])  # noqa: E731
    kept = json.load(open(path)) if os.path.exists(path) else []
    new = {key(r): {k: v for k, v in r.items() if k != "train_seconds"} for r in rows}
    merged = [new.pop(key(r), r) for r in kept] + list(new.values())
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)


def table_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "| noisy | level | method | ours: lungs / heart / clavicles / mean | published | train min |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        pub = PUBLISHED.get((r["noisy"], r["level"], r["method"]))
        pub_txt = " / ".join(f"{v:.3f}" for v in pub) if pub else "-"
        ours = " / ".join(f"{r[k]:.3f}" for k in ("lungs", "heart", "clavicles", "mean"))
        lines.append(
            f"| {r['noisy']:.0%} | {r['level']} | {r['method']} | {ours} | {pub_txt} | {r['train_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines + ["", "```", command, "```", ""])


def curves_markdown(models: list[str], every: int = 1) -> str:
    """One row per logged epoch; per checkpoint its test mean Dice, then, where logged, the loss AUC and the
    QAM's review AUC (``progress``)."""
    curves = {os.path.basename(m).removesuffix(".pt"): load_checkpoint(m)["meta"]["curve"] for m in models}
    keys = ("test_mean", "loss_auc", "review_auc")
    columns = [(name, k) for name, curve in curves.items() for k in keys if any(k in p for p in curve)]
    epochs = sorted({p["epoch"] for curve in curves.values() for p in curve})
    epochs = [e for i, e in enumerate(epochs) if (i + 1) % every == 0 or e == epochs[-1]]
    points = {(name, p["epoch"]): p for name, curve in curves.items() for p in curve}
    lines = ["| epoch | " + " | ".join(f"{name}: {k}" for name, k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for e in epochs:
        cells = [points.get((name, e), {}).get(k) for name, k in columns]
        lines.append(f"| {e} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    ckpt = load_checkpoint(args.model)
    config = ckpt["config"]
    images, masks, structures = load_npz(args.data)
    if structures != ckpt["structures"]:
        raise SystemExit(f"{args.data} has structures {structures}, the model was trained on {ckpt['structures']}")
    if args.split == "test":
        _, idx = split(len(images), config["split_seed"])
        images, masks = images[idx], masks[idx]
    net = build_net(tuple(config["features"]), len(structures))
    net.load_state_dict(ckpt["model"])
    return scores(predict(net, images, config["size"]), masks, structures)


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """Settings shared by one run (``train``) and a table of runs (``table``)."""
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--qam-lr", type=float, default=1e-4)
    ap.add_argument("--ocm-lambda", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=256, help="network input size (masks are scored at 256)")
    ap.add_argument("--features", type=int, nargs=6, default=[16, 32, 64, 128, 256, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one method on one noise setting, test on the clean test split")
    add_run_arguments(t)
    t.add_argument("--out", required=True)
    t.add_argument("--method", choices=list(METHODS), default="qam_ocm")
    t.add_argument("--noisy", type=float, default=0.0, help="fraction of noisy training samples")
    t.add_argument("--level", choices=sorted(LEVELS), default="-")
    tb = sub.add_parser("table", help="train the missing runs of a table, then print it")
    add_run_arguments(tb)
    tb.add_argument("--out", required=True, help="folder of the runs' checkpoints")
    tb.add_argument("--rows", nargs="+", default=["0:-", "0.5:1-8", "0.75:1-8", "0.5:5-13", "0.75:5-13"])
    tb.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(PUBLISHED_METHODS))
    tb.add_argument("--json", help="write the rows here (docs/noisy_labels.json)")
    e = sub.add_parser("evaluate", help="Dice of a checkpoint on an npz of the same format")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["test", "all"], default="all", help="test: the checkpoint's test split")
    c = sub.add_parser("curve", help="the training curves of checkpoints, side by side, as a markdown table")
    c.add_argument("--models", nargs="+", required=True)
    c.add_argument("--every", type=int, default=1, help="keep every n-th point (and the last)")
    args = ap.parse_args()
    if args.command == "curve":
        print(curves_markdown(args.models, args.every))
    elif args.command == "table":
        rows = run_table(args)
        if args.json:
            write_rows(args.json, rows)
        print(table_markdown(rows, "python -m ctv_train.noisy_labels " + " ".join(sys.argv[1:])))
    elif args.command == "train":
        if (args.noisy > 0) != (args.level != "-"):
            raise SystemExit("--noisy > 0 needs a --level (1-8 or 5-13), and --level needs --noisy > 0")
        print(json.dumps(train(args)))
    else:
        print(json.dumps(evaluate(args)))


if __name__ == "__main__":
    main()
