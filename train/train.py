"""Offline CTV training on a folder of images + labels.

    python -m ctv_train.train --data runs/phantoms --out apps/ctv_app/model/ctv.pt --epochs 40
    torchrun --nproc_per_node 2 -m ctv_train.train --data runs/phantoms --out runs/ctv.pt

Uses the app's own pre-processing, network and loss (ctv_app.lib), validates on a
held-out split every epoch, and keeps the best checkpoint (atomic write, with metadata).
Under torchrun it trains data-parallel (DDP): gloo on CPU, nccl on GPU; each rank sees its
own share of the training volumes, rank 0 validates and writes the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.transforms import Compose
from torch.utils.data import DistributedSampler

from ctv_app.lib.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from ctv_app.lib.inferers import build_inferer
from ctv_app.lib.losses import DeepSupervisionLoss
from ctv_app.lib.metrics import structure_dice
from ctv_app.lib.networks import network_for
from ctv_app.lib.params import CTVParams
from ctv_app.lib.provenance import labels_record
from ctv_app.lib.quality import QualityAwarenessModule, QualityWeightedLoss
from ctv_app.lib.transforms import pre_transforms, train_transforms, val_transforms

from .data import find_pairs


@dataclass
class TrainConfig:
    epochs: int = 40
    lr: float = 1e-4
    volumes_per_batch: int = 2
    patches_per_volume: int = 2
    val_fraction: float = 0.15
    # Validate (and so pick the best checkpoint) every n-th epoch and at the last: sliding-window
    # validation of a real CT costs seconds per case, as much as an epoch of training on 2 cores.
    val_every: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch default
    # QAM + OCM (lib/quality.py): needs a batch of >= 4 patches from >= 2 volumes
    quality_weighting: bool = False
    ocm_lambda: float = 2.0
    qam_lr: float = 1e-4
    quality_centre: bool = False  # centre the QAM's scores over the batch before the OCM
    quality_per_case: bool = False  # weigh cases, not patches: one score and one loss per case
    # A checkpoint to start from (e.g. a model of fewer structures): its weights where shapes match, and
    # each output channel of a structure it also contours; the rest starts from random initialisation.
    init: str = ""

    def __post_init__(self) -> None:
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        if self.quality_weighting and (
            self.volumes_per_batch < 2 or self.volumes_per_batch * self.patches_per_volume < 4
        ):
            raise ValueError(
                "quality weighting compares samples within a batch: it needs volumes_per_batch >= 2 and "
                f">= 4 patches per batch, got {self.volumes_per_batch} x {self.patches_per_volume}"
            )


def split(pairs: list[dict[str, str]], val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(pairs) * val_fraction)))
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    return train, val


@torch.no_grad()
def validate(net: torch.nn.Module, val_ds, params: CTVParams, device: str) -> float:
    """Mean Dice over the structures each case contains, on the resampled grid (cheap; the served
    pipeline is evaluated by evaluate.py)."""
    net.eval()
    inferer = build_inferer(params, device=device, flip_tta=False)
    scores = []
    for item in val_ds:
        logits = inferer(item["image"][None].to(device), net)
        pred = (torch.sigmoid(logits) > params.threshold).float().cpu()
        scores += [d for d in structure_dice(pred[0], item["label"].cpu()) if d is not None]
    net.train()
    return float(np.mean(scores))


def warm_start(net: torch.nn.Module, params: CTVParams, checkpoint: dict) -> str:
    """Load ``checkpoint``'s weights into ``net`` where they fit: layers of the same shape whole; output
    layers (one channel per structure) channel by channel for the structures both contour. Returns what
    was taken."""
    old = CTVParams.from_dict(checkpoint["params"]).structure_list.names if "params" in checkpoint else ["CTV"]
    new = params.structure_list.names
    shared = [(new.index(n), old.index(n)) for n in new if n in old]
    state, taken, by_channel = net.state_dict(), 0, 0
    for key, value in checkpoint["model"].items():
        if key not in state:
            continue
        if state[key].shape == value.shape:
            state[key], taken = value.clone(), taken + 1
        elif value.dim() >= 1 and value.shape[1:] == state[key].shape[1:] and value.shape[0] == len(old):
            for c_new, c_old in shared:  # an output layer: dimension 0 is the structure
                state[key][c_new] = value[c_old]
            by_channel += 1
    net.load_state_dict(state)
    return f"{taken} layers whole, {by_channel} output layers for {[new[c] for c, _ in shared]}"


def _init_distributed(cfg: "TrainConfig") -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def train(pairs: list[dict[str, str]], out: str, params: CTVParams, cfg: TrainConfig, log=print) -> dict:
    rank, world = _init_distributed(cfg)
    if cfg.device.startswith("cuda") and world > 1:
        cfg.device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)  # same initial weights everywhere, different augmentation per rank
    random.seed(cfg.seed + rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_pairs, val_pairs = split(pairs, cfg.val_fraction, cfg.seed)
    pre = pre_transforms(params, with_label=True)
    train_ds = CacheDataset(
        train_pairs, transform=Compose(pre + train_transforms(params, cfg.patches_per_volume)), progress=False
    )
    val_ds = CacheDataset(val_pairs, transform=Compose(val_transforms(params)), progress=False) if rank == 0 else None
    sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader = DataLoader(
        train_ds,
        batch_size=cfg.volumes_per_batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=0,
        collate_fn=list_data_collate,
    )
    net = network_for(params)
    if cfg.init:
        log(f"starting from {cfg.init}: {warm_start(net, params, load_checkpoint(cfg.init))}")
    net = net.to(cfg.device)
    groups = [{"params": net.parameters(), "lr": cfg.lr}]
    patches_per_case = cfg.patches_per_volume if cfg.quality_weighting and cfg.quality_per_case else 1
    loss_fn = DeepSupervisionLoss(params.loss, reduction="none", patches_per_case=patches_per_case)
    weighting = None
    if cfg.quality_weighting:
        qam = QualityAwarenessModule(3, in_channels=1 + len(params.structures))
        weighting = QualityWeightedLoss(qam, cfg.ocm_lambda, cfg.quality_centre, patches_per_case).to(cfg.device)
        groups.append({"params": weighting.parameters(), "lr": cfg.qam_lr})
    opt = torch.optim.Adam(groups)

    start_epoch, best, history = 0, -1.0, []
    resume_path = out + ".last"
    if os.path.exists(resume_path):
        ckpt = load_checkpoint(resume_path, cfg.device)
        net.load_state_dict(ckpt["model"])
        if weighting is not None:
            weighting.load_state_dict(ckpt["meta"]["qam"])
        opt.load_state_dict(ckpt["meta"]["optimizer"])
        start_epoch, best, history = ckpt["meta"]["epoch"] + 1, ckpt["meta"]["best_val_dice"], ckpt["meta"]["history"]
        log(f"resumed from {resume_path} at epoch {start_epoch}")
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    weigh = weighting
    if weighting is not None and world > 1:
        weigh = torch.nn.parallel.DistributedDataParallel(weighting)  # keeps the QAM identical across ranks

    labels = labels_record([p["label"] for p in train_pairs])
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0, losses = time.time(), []
        for batch in loader:
            image, label = batch["image"].to(cfg.device), batch["label"].to(cfg.device)
            opt.zero_grad(set_to_none=True)
            per_sample = loss_fn(model(image), label)
            loss = weigh(per_sample, image, label) if weigh is not None else per_sample.mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
        validating = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        if rank == 0:
            val_dice = validate(net, val_ds, params, cfg.device) if validating else None
            history.append(
                {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice, "seconds": time.time() - t0}
            )
            meta = {
                "epoch": epoch,
                "val_dice": val_dice,
                **labels,
                "val_labels": [os.path.basename(p["label"]) for p in val_pairs],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "train_config": {**cfg.__dict__, "world_size": world},
            }
            if weighting is not None:
                meta["qam"] = weighting.state_dict()  # scores labelled cases for review
            if val_dice is not None and val_dice > best:
                best = val_dice
                save_checkpoint(out, net.state_dict(), params, {**meta, "best_val_dice": best})
            save_checkpoint(
                resume_path,
                net.state_dict(),
                params,
                {**meta, "best_val_dice": best, "history": history, "optimizer": opt.state_dict()},
            )
            log(
                f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f}"
                + (f" val_dice {val_dice:.4f}" if val_dice is not None else "")
                + f" best {best:.4f}"
                f" ({time.time() - t0:.0f}s)"
            )
        if world > 1:
            dist.barrier()  # the others wait while rank 0 validates and saves
    result = {"best_val_dice": best, "history": history, "train": len(train_pairs), "val": len(val_pairs)}
    if world > 1:
        result["weights_sha256"] = weights_digest(net)
        log(f"rank {rank}/{world} weights sha256 {result['weights_sha256']}")
        dist.barrier()
    if rank == 0 and os.path.exists(resume_path):
        os.unlink(resume_path)  # finished: nothing to resume
    return result


def add_training_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared by the training CLIs: data folder, CTVParams overrides, TrainConfig fields."""
    ap.add_argument("--data", required=True, help="folder datastore with labels/final (pairs: data.find_pairs)")
    ap.add_argument("--params", default="{}", help='JSON overrides of CTVParams, e.g. \'{"normalisation": "zscore"}\'')
    for name, default in TrainConfig().__dict__.items():
        kind = (lambda v: v.strip().lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)


def parse_training_args(args: argparse.Namespace) -> tuple[list[dict[str, str]], CTVParams, TrainConfig]:
    pairs = find_pairs(args.data)
    if len(pairs) < 2:
        raise SystemExit(f"need at least 2 labelled images in {args.data}, found {len(pairs)}")
    params = CTVParams().updated(json.loads(args.params))
    return pairs, params, TrainConfig(**{k: getattr(args, k) for k in TrainConfig().__dict__})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--out", required=True, help="checkpoint to write (best validation Dice)")
    args = ap.parse_args()
    pairs, params, cfg = parse_training_args(args)
    result = train(pairs, args.out, params, cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
