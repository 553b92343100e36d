"""Training throughput of the CTV network on this machine: patches/s and seconds per epoch.

    python bench/train_throughput.py [--steps 10] [--volumes 14] [--params '{"patch_size": [64, 64, 48]}']

Times the training step (forward, Dice+BCE over deep-supervision heads, backward, Adam) on
batches of the served default configuration, and, as the peer in the same run, the same step
for the ablation's plain UNet. Augmentation is timed separately on cached volumes. Seconds per
epoch are derived for ``--volumes`` training volumes at 2 volumes x 2 patches per step.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from monai.transforms import Compose

from ctv_app.lib.losses import DeepSupervisionLoss
from ctv_app.lib.networks import network_for
from ctv_app.lib.params import CTVParams
from ctv_app.lib.transforms import train_transforms
from ctv_app.lib.transforms.labels import CONTAINED_KEY


def time_steps(params: CTVParams, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    net = network_for(params).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(params.loss)
    x = torch.rand(batch, 1, *params.patch_size)
    y = (torch.rand(batch, len(params.structures), *params.patch_size) > 0.7).float()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_augmentation(params: CTVParams, samples: int, repeats: int) -> float:
    """Seconds to crop and augment ``samples`` patches from one cached (pre-processed) volume."""
    rng = np.random.default_rng(0)
    # a small phantom at 4 mm, grown to hold the patch; one label channel per structure
    grid = tuple(max(g, p + 16) for g, p in zip((96, 84, 80), params.patch_size))
    image = torch.as_tensor(rng.random((1, *grid), dtype=np.float32))
    label = torch.zeros((len(params.structures), *grid))
    label[:, 30:60, 30:55, 25:55] = 1
    chain = Compose(train_transforms(params, samples))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain({"image": image.clone(), "label": label.clone(), CONTAINED_KEY: np.ones(len(label), bool)})
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))  # mean, not median: the elastic deformation runs on 20 % of calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--volumes", type=int, default=14, help="training volumes per epoch for the s/epoch figure")
    ap.add_argument("--params", default="{}", help="JSON overrides of CTVParams (e.g. the hn model's candidates)")
    args = ap.parse_args()
    batch = 4  # 2 volumes x 2 patches, the offline trainer's default
    served = CTVParams().updated(json.loads(args.params))
    plain = served.updated({"architecture": "unet", "loss": "bce"})
    step = time_steps(served, batch, args.steps)
    step_plain = time_steps(plain, batch, args.steps)
    aug = time_augmentation(served, 2, 5 * args.steps)
    steps_per_epoch = args.volumes / 2
    epoch_s = steps_per_epoch * (step + 2 * aug)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"patch {served.patch_size} at {served.target_spacing} mm, filters {served.filters}, "
        f"{len(served.structures)} structures, batch {batch}"
    )
    print(f"training step (served SE-res DynUNet, Dice+BCE): {step:.3f} s = {batch / step:.1f} patches/s")
    print(f"training step (plain UNet, BCE; peer): {step_plain:.3f} s; ratio served/plain {step / step_plain:.2f}")
    print(f"augmentation: {aug:.3f} s per volume (2 patches, elastic/affine at their default probabilities)")
    print(f"=> {epoch_s:.1f} s per epoch of {args.volumes} volumes (excluding validation)")
    print(
        json.dumps(
            {
                "step_s": step,
                "patches_per_s": batch / step,
                "plain_step_s": step_plain,
                "ratio_vs_plain": step / step_plain,
                "augment_s_per_volume": aug,
                "epoch_s": epoch_s,
            }
        )
    )


if __name__ == "__main__":
    main()
