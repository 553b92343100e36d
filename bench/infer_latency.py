"""/infer/ctv latency on this machine: the real CT and a 512x512x120 phantom, through the real server.

    .venv/bin/python bench/infer_latency.py [--repeats 3]

Peers in the same run: the same infer task called in-process (no HTTP, no server), and
flip test-time augmentation on vs off. Prints medians and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monailabel.client import MONAILabelClient  # noqa: E402

from ctv_app.lib.configs.ctv import CTVConfig  # noqa: E402
from ctv_datastore.phantom import FULL_SHAPE, FULL_SPACING, make_phantom, save_nifti  # noqa: E402
from tests.support import APP_DIR, REAL_CT, ServerProcess  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, dict]:
    fn()  # warm-up: model load, allocator, file cache
    times, last = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = fn() or {}
        times.append(time.perf_counter() - t0)
    return statistics.median(times), last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        cases = {}
        if REAL_CT.exists():
            os.symlink(REAL_CT, studies / REAL_CT.name)
            cases["real CT 122x101x112 @3mm"] = REAL_CT.name.removesuffix(".nii.gz")
        else:
            print("../shared/data absent: real CT skipped")
        save_nifti(make_phantom(9500, FULL_SHAPE, FULL_SPACING), str(studies / "phantom_full.nii.gz"))
        cases["phantom 512x512x120 @0.98x0.98x3mm"] = "phantom_full"

        config = CTVConfig()
        config.init("ctv", str(APP_DIR / "model"), {}, None)
        task = config.infer()

        rows = []
        with ServerProcess(studies, Path(tmp) / "server") as server:
            client = MONAILabelClient(server.url, tmpdir=str(Path(tmp) / "client"))
            for label, image_id in cases.items():
                path = str(studies / f"{image_id}.nii.gz")
                http_s, res = timed(lambda: client.infer("ctv", image_id, {})[1], args.repeats)
                local_s, _ = timed(lambda: task({"image": path, "device": "cpu"})[1], args.repeats)
                tta_s, _ = timed(lambda: client.infer("ctv", image_id, {"flip_tta": True})[1], args.repeats)
                rows.append((label, http_s, local_s, tta_s, res["latencies"]))

        print(f"\nmedian of {args.repeats} warm runs (seconds)")
        print(f"{'case':38s} {'/infer/ctv':>10s} {'in-process':>10s} {'ratio':>6s} {'+flipTTA':>9s} {'ratio':>6s}")
        for label, http_s, local_s, tta_s, lat in rows:
            print(
                f"{label:38s} {http_s:10.2f} {local_s:10.2f} {http_s / local_s:6.2f} {tta_s:9.2f} {tta_s / http_s:6.2f}"
            )
            print(
                f"{'':38s} server breakdown: "
                + ", ".join(f"{k} {lat[k]}" for k in ("pre", "infer", "post", "write", "total"))
            )


if __name__ == "__main__":
    main()
