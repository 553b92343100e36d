"""Load on the real server: C clients send N /infer/ctv uploads in total, at once.

Each upload is a distinct small SYNTHETIC phantom; each result must name, in its embedded
provenance, the sha256 of exactly the bytes that client sent (so no result reaches the wrong
client). A 503 must carry Retry-After; the client then waits that long and tries again, at most
``max_tries`` times. The server's resident memory is sampled throughout.

    python bench/load.py [--clients 10] [--requests 50] [--max-waiting 3]

prints one JSON line: latency p50/p95 of the successful requests, 503 count, peak RSS, for the
server as scripts/run.sh starts it (MALLOC_ARENA_MAX=2) and for its peer with glibc's default
allocator arenas, and the ratios.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctv_datastore.phantom import make_phantom  # noqa: E402
from tests.support import ServerProcess, memory_mb  # noqa: E402

SHAPE = (56, 48, 12)  # the phantom's whole axial field of view at 7 x 7 mm, 12 slices of 10 mm
SPACING = (7.0, 7.0, 10.0)


def distinct_inputs(count: int, seed: int = 7000) -> list[bytes]:
    """``count`` uncompressed NIfTI files, each a different phantom (SYNTHETIC)."""
    files = []
    for i in range(count):
        phantom = make_phantom(seed + i, shape=SHAPE, spacing=SPACING)
        image = nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine)
        files.append(image.to_bytes())
    return files


def run_load(
    url: str,
    pid: int,
    clients: int = 10,
    total: int = 50,
    max_tries: int = 20,
    time_limit_s: float = 900,
    headers: dict[str, str] | None = None,
) -> dict:
    """Returns the figures and every outcome; raises nothing for a wrong result (``mismatched`` says)."""
    inputs = distinct_inputs(total)
    samples: list[float] = []
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.2):
            samples.append(memory_mb(pid))

    deadline = time.monotonic() + time_limit_s

    def one(i: int) -> dict:
        sent = inputs[i]
        outcome = {"request": i, "busy": 0, "busy_without_retry_after": 0, "tries": 0}
        while outcome["tries"] < max_tries and time.monotonic() < deadline:
            outcome["tries"] += 1
            start = time.monotonic()
            r = requests.post(
                f"{url}/infer/ctv", params={"output": "image"}, headers=headers,
                files={"file": (f"load_{i:03d}.nii", sent)}, timeout=max(1.0, deadline - start),
            )  # fmt: skip
            if r.status_code == 503:
                outcome["busy"] += 1
                retry_after = r.headers.get("Retry-After")
                if retry_after is None:
                    outcome["busy_without_retry_after"] += 1
                    retry_after = "1"
                time.sleep(min(float(retry_after), max(0.0, deadline - time.monotonic())))
                continue
            outcome["status"] = r.status_code
            outcome["latency_s"] = time.monotonic() - start
            if r.status_code == 200:
                body = gzip.decompress(r.content) if r.content[:2] == b"\x1f\x8b" else r.content
                result = nib.Nifti1Image.from_bytes(body)
                provenance = json.loads(result.header.extensions[0].get_content())
                outcome["input_sha256_ok"] = provenance["input"]["sha256"] == hashlib.sha256(sent).hexdigest()
                outcome["shape_ok"] = tuple(result.shape) == SHAPE
            else:
                outcome["detail"] = r.text[:300]
            return outcome
        outcome["status"] = "gave up"
        return outcome

    sampler = threading.Thread(target=sample_rss, daemon=True)
    rss_before = memory_mb(pid)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(total)))
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    latencies = sorted(o["latency_s"] for o in outcomes if o.get("status") == 200)
    return {
        "clients": clients,
        "requests": total,
        "succeeded": sum(o.get("status") == 200 for o in outcomes),
        "other_status": sorted({str(o.get("status")) for o in outcomes} - {"200"}),
        "busy_503": sum(o["busy"] for o in outcomes),
        "busy_without_retry_after": sum(o["busy_without_retry_after"] for o in outcomes),
        "mismatched": sum(not (o["input_sha256_ok"] and o["shape_ok"]) for o in outcomes if o.get("status") == 200),
        "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "wall_s": round(wall, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_sampled_mb": round(max(samples, default=rss_before), 1),
        "rss_after_mb": round(memory_mb(pid), 1),
        "vmhwm_mb": round(memory_mb(pid, "VmHWM"), 1),
        "outcomes": outcomes,
    }


def measure(clients: int, total: int, max_waiting: int, env: dict[str, str]) -> dict:
    """A fresh server; a warm-up round of 20 under the same concurrency; then the measured run."""
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        conf = {"infer_max_waiting": str(max_waiting)}
        with ServerProcess(studies, Path(tmp) / "server", conf=conf, env=env) as server:
            run_load(server.url, server.proc.pid, clients, 20)
            figures = run_load(server.url, server.proc.pid, clients, total)
    figures.pop("outcomes")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-waiting", type=int, default=3, help="the server's infer_max_waiting")
    args = parser.parse_args()
    ours = measure(args.clients, args.requests, args.max_waiting, {"MALLOC_ARENA_MAX": "2"})  # as scripts/run.sh
    peer = measure(args.clients, args.requests, args.max_waiting, {})  # glibc default (if the caller sets none)
    print(json.dumps({"malloc_arena_max_2": ours, "glibc_default": peer,
                      "peak_rss_ratio": round(ours["vmhwm_mb"] / peer["vmhwm_mb"], 3),
                      "p50_ratio": round(ours["p50_s"] / peer["p50_s"], 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
