"""Does training slow inference down? /infer/ctv latency with the server idle and while a
training run (POST /train/ctv) works in its subprocess, on the same machine.

    python bench/infer_during_training.py [--runs 3] [--threads 1]

Uses a small synthetic phantom datastore and the shipped demo weights (copied to a temp dir,
so training does not touch them). ``--threads`` is the training request's ``threads``
(torch threads of the training process; 0 = the trainer's default). Prints figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctv_datastore.build import build  # noqa: E402
from tests.support import APP_DIR, ServerProcess  # noqa: E402


def infer_latency(url: str, image: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/infer/ctv", params={"image": image, "output": "json"}, timeout=600)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="training process threads (0: trainer default)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctv-bench-"))
    try:
        studies = work / "studies"
        build(str(studies), list(range(9200, 9208)), labelled=set(range(9200, 9206)))
        model = work / "model" / "ctv.pt"
        model.parent.mkdir()
        shutil.copy(APP_DIR / "model" / "ctv.pt", model)
        with ServerProcess(studies, work / "server", conf={"ctv_model": str(model)}) as server:
            image = "phantom_09207"
            infer_latency(server.url, image, 1)  # warm-up
            idle = infer_latency(server.url, image, args.runs)
            params = {"max_epochs": 1000, "name": "bench", "resume": False}
            if args.threads:
                params["threads"] = args.threads
            requests.post(f"{server.url}/train/ctv", json=params, timeout=30).raise_for_status()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # wait until training iterates
                if "Epoch: 1/" in server.log_path.read_text(errors="replace"):
                    break
                time.sleep(1)
            busy = infer_latency(server.url, image, args.runs)
            requests.delete(f"{server.url}/train/", timeout=30)
        idle_s, busy_s = statistics.median(idle), statistics.median(busy)
        print(f"machine: {os.cpu_count()} CPUs; training threads: {args.threads or 'trainer default'}")
        print(f"/infer/ctv idle: median {idle_s:.2f} s ({', '.join(f'{t:.2f}' for t in idle)})")
        print(f"/infer/ctv during training: median {busy_s:.2f} s ({', '.join(f'{t:.2f}' for t in busy)})")
        print(f"ratio during/idle: {busy_s / idle_s:.2f}")
        print(json.dumps({"idle_s": idle_s, "during_training_s": busy_s, "ratio": busy_s / idle_s}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
