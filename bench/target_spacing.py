"""Why 4 mm: what each target spacing costs in accuracy ceiling and in CPU time.

    .venv/bin/python bench/target_spacing.py

For full-size phantoms (512x512x120 at 0.98x0.98x3 mm) and each candidate spacing:
- ceiling: Dice of the true CTV after resampling to that spacing and back (bilinear,
  threshold 0.5), i.e. the best any model working on that grid could score;
- cost: voxels on that grid and the sliding-window forward time of the default network
  (untrained weights: time does not depend on them), relative to the 4 mm peer.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from ctv_app.lib.inferers import build_inferer
from ctv_app.lib.metrics import dice
from ctv_app.lib.networks import build_network
from ctv_app.lib.params import CTVParams
from ctv_app.lib.transforms import RestoreGeometry
from ctv_datastore.phantom import FULL_SHAPE, FULL_SPACING, make_phantom

SPACINGS = (2.0, 3.0, 4.0, 5.0)
SEEDS = (9600, 9601, 9602)


def main() -> None:
    params = CTVParams()
    net = build_network(params.filters, deep_supr_num=params.deep_supr_num).eval()
    inferer = build_inferer(params, flip_tta=False)
    phantoms = [make_phantom(s, FULL_SHAPE, FULL_SPACING) for s in SEEDS]
    rows = []
    for s in SPACINGS:
        dices, voxels, seconds = [], [], []
        for p in phantoms:
            aff = torch.as_tensor(p.affine)
            truth = p.mask("CTV")
            lab = MetaTensor(torch.from_numpy(truth[None].astype(np.float32)), affine=aff)
            coarse = Spacing(pixdim=(s, s, s), mode="bilinear")(lab)
            back = RestoreGeometry()(coarse, coarse.affine, p.affine, p.label.shape)[0].numpy() > 0.5
            dices.append(dice(back, truth))
            voxels.append(int(np.prod(coarse.shape[1:])))
        x = torch.rand(
            1,
            1,
            *Spacing(pixdim=(s, s, s))(
                MetaTensor(torch.zeros(1, *FULL_SHAPE), affine=torch.as_tensor(phantoms[0].affine))
            ).shape[1:],
        )
        with torch.no_grad():
            inferer(x, net)  # warm-up
            t0 = time.perf_counter()
            inferer(x, net)
            seconds.append(time.perf_counter() - t0)
        rows.append((s, float(np.mean(dices)), float(np.min(dices)), int(np.mean(voxels)), float(np.mean(seconds))))
    ref = next(r for r in rows if r[0] == 4.0)
    print(
        f"{'spacing':>8s} {'ceiling Dice':>13s} {'(min)':>7s} {'voxels':>10s} {'vs 4mm':>7s}"
        f" {'forward s':>10s} {'vs 4mm':>7s}"
    )
    for s, d, dmin, v, sec in rows:
        print(f"{s:6.1f}mm {d:13.3f} {dmin:7.3f} {v:10d} {v / ref[3]:7.2f} {sec:10.2f} {sec / ref[4]:7.2f}")


if __name__ == "__main__":
    main()
