"""Write synthetic phantom cases as a MONAI Label folder datastore.

    python -m ctv_datastore.build --out datastore/demo --seeds 9000-9005 --labelled 9000-9002

Images go to ``<out>/phantom_<seed>.nii.gz``, the label maps of the ``--labelled`` seeds (the cervix
model's structures, values as in ``phantom.STRUCTURES``) to ``<out>/labels/final/``. Seeds below 9000 are for training; 9000 and up are held out.
Everything written is SYNTHETIC (see phantom.py).
"""

from __future__ import annotations

import argparse
import os

from .phantom import FULL_SHAPE, FULL_SPACING, SMALL_SHAPE, SMALL_SPACING, make_phantom, save_nifti

HELD_OUT_SEED_START = 9000


def parse_seeds(text: str) -> list[int]:
    """'9000-9003,9010' -> [9000, 9001, 9002, 9003, 9010]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def build(out: str, seeds: list[int], labelled: set[int], full: bool = False) -> list[str]:
    os.makedirs(os.path.join(out, "labels", "final"), exist_ok=True)
    shape, spacing = (FULL_SHAPE, FULL_SPACING) if full else (SMALL_SHAPE, SMALL_SPACING)
    written = []
    for seed in seeds:
        name = f"phantom_{seed:05d}.nii.gz"
        image_path = os.path.join(out, name)
        label_path = os.path.join(out, "labels", "final", name) if seed in labelled else None
        if os.path.exists(image_path) and (label_path is None or os.path.exists(label_path)):
            written.append(image_path)
            continue
        save_nifti(make_phantom(seed, shape, spacing), image_path, label_path)
        written.append(image_path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", required=True, help="e.g. 9000-9005")
    ap.add_argument("--labelled", default="", help="seeds that get a label in labels/final (default none)")
    ap.add_argument("--full", action="store_true", help="512x512x120 at 0.98x0.98x3 mm instead of the small grid")
    args = ap.parse_args()
    paths = build(args.out, parse_seeds(args.seeds), set(parse_seeds(args.labelled)), args.full)
    print(f"{len(paths)} synthetic phantom images in {args.out}")


if __name__ == "__main__":
    main()
