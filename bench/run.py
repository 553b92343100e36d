"""Performance of CTV contouring on this machine, against MONAI's stock pipeline and the hardware.

    .venv/bin/python bench/run.py --quick      # a few minutes; last line: one JSON object
    .venv/bin/python bench/run.py              # full run; writes docs/performance.md

1. End to end: /infer/ctv over HTTP on a SYNTHETIC 512x512x120 phantom (0.98x0.98x3 mm) and on
   the real CT (../shared/data/ct/abdomen_pelvis_3mm.nii.gz): median after a warm-up, the
   server's per-stage breakdown, HTTP = client time - server total, peak RSS of the server.
   Structure sets: the served (multi-structure) model beside the single-structure CTV model shipped
   before structure sets (``--single``; by default its checkpoint from git, commit 206cd5c), each
   in its own server process (so each has its own peak RSS), requests alternated between the two
   so that load from elsewhere falls on both alike; time and peak RSS ratios, multi / single.
2. The peer: the same 512x512x120 volume through MONAI's stock pipeline as MONAI Label's
   radiology `segmentation` model sets it up (SegResNet 32 filters, blocks (1,2,2,4)/(1,1,1),
   26 outputs, random weights; 1.5 mm; ScaleIntensity to [-1, 1]; SlidingWindowInferer roi 96^3,
   sw_batch_size 2, overlap 0.4). --quick times a sample of its window batches and scales by
   the number of batches (said in the output); the full run times it whole.
   Engines: the served model run by the engine the server chose on this machine (lib/engines.py:
   OpenVINO at a measured precision) beside the same model forced to PyTorch fp32 (``--conf
   inference_engine torch``), each its own server, requests alternated; the ratio, the stages, the peak
   RSS, the masks' agreement per structure (Dice) and what choosing the engine cost at load.
3. The limit: FLOPs of the network over the whole volume (torch's FLOP counter on one window,
   times the windows), achieved GFLOP/s, and the fraction of this machine's peak at the precision
   served: the best 2048x2048 GEMM among the installed libraries (PyTorch, OpenVINO) on the same
   threads, fp32 and bf16, with the library named, and the CPU's nominal figure beside it.
4. Training: patches/s of a training step, plain and with quality weighting (QAM + OCM).
5. GPU: the same figures when torch sees one (none on the project's machines so far).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

from ctv_app.lib.checkpoint import read_params  # noqa: E402
from ctv_app.lib.engines import masks_agree  # noqa: E402
from ctv_app.lib.inferers import window_starts  # noqa: E402
from ctv_app.lib.losses import DeepSupervisionLoss  # noqa: E402
from ctv_app.lib.metrics import dice  # noqa: E402
from ctv_app.lib.networks import network_for  # noqa: E402
from ctv_app.lib.params import CTVParams  # noqa: E402
from ctv_app.lib.quality import QualityAwarenessModule, QualityWeightedLoss  # noqa: E402
from ctv_datastore.phantom import FULL_SHAPE, FULL_SPACING, make_phantom, save_nifti  # noqa: E402
from tests.support import APP_DIR, REAL_CT, SHARED_DATA, ServerProcess, memory_mb  # noqa: E402

STAGES = ("pre", "infer", "post", "write")
# The last commit whose shipped checkpoint contours the CTV alone (before structure sets, issue 17).
SINGLE_STRUCTURE_COMMIT = "206cd5c"
# Issue 17's targets for the multi-structure model against the single-structure one.
TARGET_TIME_RATIO, TARGET_RSS_RATIO = 1.3, 1.2
OPENKBP = SHARED_DATA / "openkbp"  # real head-and-neck CTs: the body fills less of their field of view
OPENKBP_CASES = 20
NOTES_MARKER = "<!-- Written by hand below; bench/run.py keeps it when it rewrites the table above. -->"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def server_pid(server: ServerProcess) -> int:
    """The python process serving (the monailabel wrapper execs it, or it is the wrapper's child)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    kids = [int(k) for k in children.read_text().split()] if children.exists() else []
    return kids[0] if kids else server.proc.pid


def timed_infer(client: MONAILabelClient, image_id: str) -> tuple[float, dict]:
    """One /infer/ctv request: the client's wall time and the server's own stage times."""
    t0 = time.perf_counter()
    _, result = client.infer("ctv", image_id, {})
    return time.perf_counter() - t0, result["latencies"]


def summarise(runs: list[tuple[float, dict]]) -> dict:
    """Median wall time and median per stage; HTTP = client time - server total."""
    median = statistics.median(wall for wall, _ in runs)
    stages = {k: statistics.median(float(lat[k]) for _, lat in runs) for k in STAGES}
    stages["http"] = median - statistics.median(float(lat["total"]) for _, lat in runs)
    return {"seconds": median, "stages": stages, "runs": len(runs)}


def single_structure_checkpoint(folder: Path) -> Path:
    """The CTV-only checkpoint shipped before structure sets, read from git (never the tracked file)."""
    spec = f"{SINGLE_STRUCTURE_COMMIT}:apps/ctv_app/model/ctv.pt"
    shown = subprocess.run(["git", "show", spec], cwd=REPO, capture_output=True)
    if shown.returncode:
        raise SystemExit(f"cannot read {spec} from git ({shown.stderr.decode().strip()}): pass --single <checkpoint>")
    blob = shown.stdout
    path = folder / f"ctv_{SINGLE_STRUCTURE_COMMIT}.pt"
    path.write_bytes(blob)
    return path


def structure_sets(
    servers: dict[str, ServerProcess], checkpoints: dict[str, Path], image_id: str, repeats: int
) -> dict:
    """``servers``: one per checkpoint (``--conf ctv_model``), each its own process. After a warm-up
    each, ``repeats`` rounds of one request to each server in turn, so load from elsewhere on the
    machine falls on all alike. Per model: its structures, median end to end and stages, RSS after
    start and peak RSS (VmHWM) of its server; then multi / single ratios, time and peak RSS."""
    clients = {name: MONAILabelClient(s.url, tmpdir=str(s.workdir / "client")) for name, s in servers.items()}
    rows = {}
    for name, client in clients.items():
        rows[name] = {
            "checkpoint": checkpoints[name].name,
            "structures": read_params(str(checkpoints[name])).structure_list.names,
            "rss_start_mb": memory_mb(server_pid(servers[name]), "VmRSS"),
        }
    for name, row in alternated(clients, image_id, repeats).items():
        rows[name] |= row | {"peak_rss_mb": memory_mb(server_pid(servers[name]), "VmHWM")}
    single, multi = rows["single"], rows["multi"]
    ratios = {k: multi[k] / single[k] for k in ("seconds", "peak_rss_mb")}
    ratios |= {k: multi["stages"][k] / single["stages"][k] if single["stages"][k] > 0 else float("nan") for k in STAGES}
    return {"models": rows, "ratios": ratios}


def structure_sets_summary(figures: dict) -> dict:
    """The comparison in the JSON line: per model seconds, stages and peak RSS; the ratios."""
    out = {
        name: {"structures": len(row["structures"]), "seconds": round(row["seconds"], 3),
               "stages_s": {k: round(v, 3) for k, v in row["stages"].items()},
               "rss_start_mb": round(row["rss_start_mb"], 1), "peak_rss_mb": round(row["peak_rss_mb"], 1)}
        for name, row in figures["models"].items()
    }  # fmt: skip
    return out | {"ratios": {k: round(v, 3) for k, v in figures["ratios"].items()}}


def print_structure_sets(figures: dict) -> None:
    rows, ratios = figures["models"], figures["ratios"]
    runs = rows["multi"]["runs"]
    print(f"\nstructure sets, SYNTHETIC phantom 512x512x120: median of {runs} requests per model, alternated")
    names = {"infer": "network"}
    head = f"{'model':26s} {'structures':>10s} {'end-to-end s':>12s} " + " ".join(
        f"{names.get(k, k):>7s}" for k in (*STAGES, "http")
    )
    print(head + f" {'RSS start MB':>12s} {'peak RSS MB':>11s}")
    for name, row in rows.items():
        stages = " ".join(f"{row['stages'][k]:7.2f}" for k in (*STAGES, "http"))
        print(f"{name + ' (' + row['checkpoint'] + ')':26s} {len(row['structures']):10d} {row['seconds']:12.2f} "
              f"{stages} {row['rss_start_mb']:12.0f} {row['peak_rss_mb']:11.0f}")  # fmt: skip
    stages = " ".join(f"{ratios[k]:7.2f}" for k in STAGES)
    print(f"{'multi / single':26s} {'':10s} {ratios['seconds']:12.2f} {stages} {'':7s} {'':12s} "
          f"{ratios['peak_rss_mb']:11.2f}")  # fmt: skip
    time_ok = "within" if ratios["seconds"] <= TARGET_TIME_RATIO else "OVER"
    rss_ok = "within" if ratios["peak_rss_mb"] <= TARGET_RSS_RATIO else "OVER"
    print(f"targets: time <= {TARGET_TIME_RATIO}x ({time_ok}), peak RSS <= {TARGET_RSS_RATIO}x ({rss_ok})\n")


def alternated(clients: dict[str, MONAILabelClient], image_id: str, repeats: int) -> dict[str, dict]:
    """After a warm-up each, ``repeats`` rounds of one request to each server in turn (so load from
    elsewhere on the machine falls on all alike); the median figures of each."""
    for client in clients.values():
        timed_infer(client, image_id)
    runs: dict[str, list] = {name: [] for name in clients}
    for _ in range(repeats):
        for name, client in clients.items():
            runs[name].append(timed_infer(client, image_id))
    return {name: summarise(r) for name, r in runs.items()}


def engines(servers: dict[str, ServerProcess], images: list[str], repeats: int) -> dict:
    """``servers``: ``engine`` (the server's own choice) and ``torch`` (PyTorch fp32), the same model. Per
    image: both rows, the ratios engine / torch, and the Dice per structure of their masks."""
    clients = {name: MONAILabelClient(s.url, tmpdir=str(s.workdir / "client")) for name, s in servers.items()}
    info = clients["engine"].info()["models"]["ctv"]
    out: dict = {"engine": info["engine"], "images": {}}
    for image in images:
        rows = alternated(clients, image, repeats)
        masks, structures = {}, []
        for name, client in clients.items():
            path, result = client.infer("ctv", image, {"label_encoding": "bitmask"})
            masks[name] = np.asarray(nib.load(path).dataobj)
            structures = [s["name"] for s in result["structures"]]
        agreement = {}
        for i, name in enumerate(structures):
            agrees, score, differing = masks_agree((masks["torch"] >> i) & 1 > 0, (masks["engine"] >> i) & 1 > 0)
            agreement[name] = {"agrees": agrees, "dice": score, "differing": differing}
        ratios = {"seconds": rows["engine"]["seconds"] / rows["torch"]["seconds"]}
        ratios |= {k: rows["engine"]["stages"][k] / rows["torch"]["stages"][k] for k in STAGES if rows["torch"]["stages"][k] > 0}
        out["images"][image] = {"rows": rows, "ratios": ratios, "agreement": agreement}
    out["peak_rss_mb"] = {name: memory_mb(server_pid(s), "VmHWM") for name, s in servers.items()}
    return out


def print_engines(figures: dict) -> None:
    e = figures["engine"]
    print(f"\nengine chosen on this machine: {e['engine']} {e['precision']} ({e['chosen_because']}); "
          f"measured at load: {json.dumps({k: v['ms_per_window'] for k, v in e['measured'].items()})} ms per window; "
          f"choosing took {e.get('choose_s', 0):.1f} s (conversion {e.get('convert_s', 0):.1f} s)")  # fmt: skip
    for image, row in figures["images"].items():
        for name in ("torch", "engine"):
            r = row["rows"][name]
            print(f"{image:28s} {name:7s} {r['seconds']:6.2f} s  " + " ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
        print(f"{image:28s} engine / torch {row['ratios']['seconds']:.2f}; agreement (Dice, voxels differing) "
              + ", ".join(f"{k} {v['dice']:.4f} ({v['differing']})" for k, v in row["agreement"].items()))  # fmt: skip
    print(f"peak RSS MB: {figures['peak_rss_mb']}")


def gemm_peaks(n: int = 2048, repeats: int = 5) -> dict[str, dict[str, float]]:
    """GFLOP/s of a n x n GEMM at fp32 and bf16 with each installed library on this process's threads."""
    peaks: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype)
        torch.mm(a, a)
        peaks[precision]["PyTorch"] = 2 * n**3 / min(_timed(lambda: torch.mm(a, a)) for _ in range(repeats)) / 1e9
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return peaks
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    left, right = ops.parameter([n, n], np.float32), ops.parameter([n, n], np.float32)
    model = ov.Model([ops.matmul(left, right, False, False)], [left, right])
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        try:
            request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                             "INFERENCE_NUM_THREADS": torch.get_num_threads()}).create_infer_request()  # fmt: skip
        except RuntimeError:  # a CPU without it
            continue
        request.infer([x, x])
        peaks[precision]["OpenVINO"] = 2 * n**3 / min(_timed(lambda: request.infer([x, x])) for _ in range(repeats)) / 1e9
    return peaks


def nominal_peak() -> str:
    """The CPU's own fp32 figure: cores x clock x FMA width, with what it assumes."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = next((float(line.split(":")[1]) for line in flags.splitlines() if line.startswith("cpu MHz")), 0.0)
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    fma_units = 2  # assumed: two FMA ports per core (this figure is the CPU's nominal, not a measurement)
    gflops = torch.get_num_threads() * mhz / 1000 * lanes * 2 * fma_units
    return (f"{gflops:.0f} GFLOP/s fp32 = {torch.get_num_threads()} threads x {mhz / 1000:.2f} GHz x {lanes} lanes x "
            f"2 (FMA) x {fma_units} FMA units (assumed; vCPUs may share a core)")  # fmt: skip


def body_crop_saving(cases: list[tuple[str, str, CTVParams]]) -> list[dict]:
    """Per (name, CT path, model parameters): the windows the full volume's sliding window places, the windows
    the body crop runs and those it answers as air (``inferers.BodyCropInferer``), counted with a stand-in
    network (the decisions depend on the CT alone)."""
    from monai.transforms import Compose

    from ctv_app.lib.inferers import build_inferer
    from ctv_app.lib.transforms import pre_transforms

    out = []
    for name, path, params in cases:
        x = Compose(pre_transforms(params))({"image": path})["image"].as_tensor()[None]
        inferer = build_inferer(params, flip_tta=False)
        channels = len(params.structures)
        inferer(x, lambda w: torch.zeros(w.shape[0], channels, *w.shape[2:]))
        runs, air = inferer.last_windows
        full = window_count(tuple(x.shape[2:]), params.patch_size, params.sw_overlap)
        out.append({"case": name, "windows": full, "run": runs, "air": air, "saved": 1 - runs / full})
    return out


def window_count(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI places over ``shape`` (``inferers.window_starts`` along each axis)."""
    return int(np.prod([len(window_starts(size, r, overlap)) for size, r in zip(shape, roi)]))


def network_flops(net: torch.nn.Module, roi: tuple[int, ...], channels: int = 1) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(torch.zeros(1, channels, *roi))
    return float(counter.get_total_flops())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stock_pipeline(path: str, quick: bool) -> dict:
    """MONAI Label radiology `segmentation` as configured there, random weights, on this volume."""
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityd, Spacingd

    t0 = time.perf_counter()
    data = {"image": path}
    for t in (
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0),
    ):
        data = t(data)
    pre_s = time.perf_counter() - t0
    x = data["image"][None].as_tensor()
    net = SegResNet(
        spatial_dims=3, in_channels=1, out_channels=26, init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
    ).eval()
    roi, overlap, batch = (96, 96, 96), 0.4, 2
    windows = window_count(tuple(x.shape[2:]), roi, overlap)
    batches = int(np.ceil(windows / batch))
    flops = network_flops(net, roi) * windows
    with torch.inference_mode():
        if quick:  # time sample batches of two windows, scale by the number of batches
            sample = torch.zeros(batch, 1, *roi)
            net(sample)
            per_batch = _timed(lambda: net(sample))
            infer_s = per_batch * batches
            how = f"sampled: one batch of {batch} windows timed ({per_batch:.2f} s) after a warm-up, x {batches} batches"
        else:
            inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=overlap, mode="gaussian")
            infer_s = _timed(lambda: inferer(x, net))
            how = "timed whole"
    return {"seconds": pre_s + infer_s, "pre_s": pre_s, "infer_s": infer_s, "windows": windows,
            "shape": list(x.shape[2:]), "flops": flops, "how": how}  # fmt: skip


def train_throughput(params: CTVParams, steps: int, batch: int = 4) -> dict:
    """Patches/s of a training step (forward, loss, backward, Adam), plain and with QAM + OCM; one label
    channel per structure of ``params``."""
    out = {}
    channels = len(params.structures)
    for name in ("plain", "qam_ocm"):
        torch.manual_seed(0)
        net = network_for(params).train()
        loss_fn = DeepSupervisionLoss(params.loss, reduction="none")
        qam = QualityAwarenessModule(3, in_channels=1 + channels)
        weighting = QualityWeightedLoss(qam, 2.0) if name == "qam_ocm" else None
        parameters = list(net.parameters()) + (list(weighting.parameters()) if weighting else [])
        opt = torch.optim.Adam(parameters, lr=1e-4)
        x = torch.rand(batch, 1, *params.patch_size)
        y = (torch.rand(batch, channels, *params.patch_size) > 0.7).float()
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            per_sample = loss_fn(net(x), y)
            loss = weighting(per_sample, x, y) if weighting else per_sample.mean()
            loss.backward()
            opt.step()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        out[name] = batch / statistics.median(times)
    out["qam_ocm_overhead"] = out["plain"] / out["qam_ocm"]
    return out


def accuracy_vs_reference(seeds: list[int], folder: Path) -> list[float]:
    """Dice of the served (fast) path against the reference path on SYNTHETIC phantoms.

    Reference: the CT loaded as float32 and the mask restored by MONAI's grid resampling, i.e.
    the pipeline before this benchmark's speed-ups."""
    from ctv_app.lib.configs.ctv import CTVConfig
    from ctv_app.lib.transforms import geometry
    from ctv_app.lib.transforms import pipeline as chains

    config = CTVConfig()
    config.init("ctv", str(APP_DIR / "model"), {}, None)
    task = config.infer()
    scores = []
    for seed in seeds:
        path = folder / f"phantom_{seed}.nii.gz"
        save_nifti(make_phantom(seed, FULL_SHAPE, FULL_SPACING), str(path))
        fast = nib.load(task({"image": str(path), "device": "cpu"})[0]).get_fdata() > 0
        aligned, load_dtype = geometry._axis_aligned, chains.LoadCTImaged
        geometry._axis_aligned = lambda index_map: False
        chains.LoadCTImaged = lambda **kw: load_dtype(**{**kw, "dtype": np.float32})
        try:
            reference = nib.load(task({"image": str(path), "device": "cpu"})[0]).get_fdata() > 0
        finally:
            geometry._axis_aligned, chains.LoadCTImaged = aligned, load_dtype
        scores.append(dice(fast, reference))
    return scores


def structure_sets_rows(figures: dict) -> list[str]:
    """Rows of the report's table: each model's end to end and peak RSS, and multi / single."""
    lines = []
    for name, row in figures["models"].items():
        st = row["stages"]
        lines.append(
            f"| structure sets: {name}-structure model ({len(row['structures'])}, {row['checkpoint']}), "
            f"512x512x120, median of {row['runs']} alternated | {row['seconds']:.2f} s (pre {st['pre']:.2f}, "
            f"network {st['infer']:.2f}, post {st['post']:.2f}, write {st['write']:.2f}); "
            f"peak RSS {row['peak_rss_mb']:.0f} MB |"
        )
    r = figures["ratios"]
    lines.append(
        f"| structure sets: multi / single (targets {TARGET_TIME_RATIO} / {TARGET_RSS_RATIO}) | "
        f"time {r['seconds']:.2f}, peak RSS {r['peak_rss_mb']:.2f} (pre {r['pre']:.2f}, network {r['infer']:.2f}, "
        f"post {r['post']:.2f}, write {r['write']:.2f}) |"
    )
    return lines


def engine_rows(figures: dict) -> list[str]:
    e = figures["engine"]
    lines = [f"| engine chosen at load | {e['engine']} {e['precision']}: {e['chosen_because']}; ms per window "
             + ", ".join(f"{k} {v['ms_per_window']}" for k, v in e["measured"].items())
             + f"; choosing took {e.get('choose_s', 0):.1f} s (conversion {e.get('convert_s', 0):.1f} s) |"]  # fmt: skip
    for image, row in figures["images"].items():
        t, g = row["rows"]["torch"], row["rows"]["engine"]
        lines.append(f"| {image}: PyTorch fp32 -> engine (median of {g['runs']} alternated) | {t['seconds']:.2f} s -> "
                     f"{g['seconds']:.2f} s = x{row['ratios']['seconds']:.2f} (network {t['stages']['infer']:.2f} -> "
                     f"{g['stages']['infer']:.2f} s); masks: " + ", ".join(f"{k} {v['dice']:.4f} ({v['differing']} voxels)"
                                                          for k, v in row["agreement"].items()) + " |")  # fmt: skip
    lines.append(f"| peak RSS, PyTorch fp32 / engine server | {figures['peak_rss_mb']['torch']:.0f} / "
                 f"{figures['peak_rss_mb']['engine']:.0f} MB |")  # fmt: skip
    return lines


def body_crop_rows(rows: list[dict]) -> list[str]:
    lines = [f"| body crop, {r['case']}: windows run / placed | {r['run']} / {r['windows']} ({r['air']} answered as air) |"
             for r in rows if not r["case"].startswith("openkbp")]  # fmt: skip
    real = [r for r in rows if r["case"].startswith("openkbp")]
    if real:
        lines.append(f"| body crop, {len(real)} real OpenKBP CTs (hn): windows run / placed, mean | "
                     f"{np.mean([r['run'] for r in real]):.1f} / {np.mean([r['windows'] for r in real]):.1f}: "
                     f"{np.mean([r['saved'] for r in real]):.1%} saved (range {min(r['saved'] for r in real):.1%}-"
                     f"{max(r['saved'] for r in real):.1%}) |")  # fmt: skip
    return lines


def write_report(figures: dict, command: str) -> None:
    s = figures["stock"]
    lines = [
        "# Performance",
        "",
        f"Command: `{command}` · machine: {figures['machine']} · date: {figures['date']}",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for name, row in figures["e2e"].items():
        st = row["stages"]
        lines.append(
            f"| /infer/ctv, {name} (median of {row['runs']} after a warm-up) | {row['seconds']:.2f} s "
            f"(pre {st['pre']:.2f}, network {st['infer']:.2f}, post {st['post']:.2f}, write {st['write']:.2f}, "
            f"HTTP {st['http']:.2f}) |"
        )
    lines += [
        f"| stock MONAI Label radiology pipeline, 512x512x120 ({s['how']}) | {s['seconds']:.1f} s "
        f"({s['windows']} windows of 96^3 on {s['shape']}) |",
        f"| ours / stock | {figures['ratio_vs_stock']:.3f} |",
        *structure_sets_rows(figures["structure_sets"]),
        *engine_rows(figures["engines"]),
        *body_crop_rows(figures["body_crop"]),
        f"| non-network share of end to end (512x512x120) | {figures['non_network_share']:.1%} |",
        f"| peak RSS of the server | {figures['peak_rss_mb']:.0f} MB |",
        f"| network FLOPs, 512x512x120 ({figures['windows']} windows) | {figures['flops'] / 1e9:.0f} GFLOP |",
        f"| achieved / peak at the served precision (best {figures['peak_precision']} GEMM: {figures['peak_library']}, "
        f"{figures['threads']} threads) | {figures['gflops']:.1f} / {figures['peak_gflops']:.1f} GFLOP/s = "
        f"{figures['frac_of_peak_flops']:.1%} |",
        "| GEMMs on this machine, GFLOP/s | " + "; ".join(f"{p} " + ", ".join(f"{lib} {v:.0f}" for lib, v in libs.items())
                                                  for p, libs in figures["gemm_peaks"].items()) + " |",
        f"| nominal fp32 peak | {figures['nominal_peak']} |",
        f"| training, patches/s plain / QAM+OCM | {figures['train']['plain']:.2f} / {figures['train']['qam_ocm']:.2f} "
        f"(overhead x{figures['train']['qam_ocm_overhead']:.2f}) |",
        f"| Dice, served path vs fp32 reference path, {len(figures['accuracy'])} SYNTHETIC 512x512x120 phantoms | "
        f"min {min(figures['accuracy']):.4f} |",
        f"| GPU | {figures['gpu']} |",
        "",
        "Stage times are the server's own (`latencies` in the result); HTTP is the client's time",
        "minus the server's total. The stock pipeline uses random weights: speed does not depend on them.",
    ]
    report = REPO / "docs" / "performance.md"
    notes = ""
    if report.exists() and NOTES_MARKER in report.read_text():  # the hand-written part is kept
        notes = report.read_text()[report.read_text().index(NOTES_MARKER) :]
    report.write_text("\n".join(lines) + "\n\n" + (notes or NOTES_MARKER + "\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer runs, stock pipeline sampled")
    ap.add_argument("--single", help=f"single-structure checkpoint (default: the one at {SINGLE_STRUCTURE_COMMIT})")
    ap.add_argument("--multi", help="multi-structure checkpoint (default: the served apps/ctv_app/model/ctv.pt)")
    args = ap.parse_args()
    repeats = 3 if args.quick else 5
    params = CTVParams()
    figures: dict = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        phantom = studies / "phantom_full.nii.gz"
        save_nifti(make_phantom(9500, FULL_SHAPE, FULL_SPACING), str(phantom))
        if REAL_CT.exists():
            os.symlink(REAL_CT, studies / REAL_CT.name)
        checkpoints = {
            "single": Path(args.single) if args.single else single_structure_checkpoint(Path(tmp)),
            "multi": Path(args.multi) if args.multi else APP_DIR / "model" / "ctv.pt",
        }
        conf = {"single": {"ctv_model": str(checkpoints["single"])}, "multi": {"ctv_model": str(checkpoints["multi"])},
                "multi_torch": {"ctv_model": str(checkpoints["multi"]), "inference_engine": "torch"}}  # fmt: skip
        with ExitStack() as stack:
            servers = {name: stack.enter_context(ServerProcess(studies, Path(tmp) / name, conf=c)) for name, c in conf.items()}
            figures["structure_sets"] = structure_sets({k: servers[k] for k in ("single", "multi")}, checkpoints,
                                                       "phantom_full", repeats)  # fmt: skip
            images = ["phantom_full"] + ([REAL_CT.name.removesuffix(".nii.gz")] if REAL_CT.exists() else [])
            figures["engines"] = engines({"engine": servers["multi"], "torch": servers["multi_torch"]}, images, repeats)
        # The served model's figures: the multi-structure server's (the engine it chose).
        figures["e2e"] = {("phantom 512x512x120" if image == "phantom_full" else f"real CT {image}"): row["rows"]["engine"]
                          for image, row in figures["engines"]["images"].items()}  # fmt: skip
        figures["peak_rss_mb"] = figures["engines"]["peak_rss_mb"]["engine"]
        print_structure_sets(figures["structure_sets"])
        print_engines(figures["engines"])
        for name, row in figures["e2e"].items():
            print(f"/infer/ctv {name}: {row['seconds']:.2f} s  " + ", ".join(f"{k} {v:.2f}" for k, v in row["stages"].items()))
        print(f"peak RSS of the server: {figures['peak_rss_mb']:.0f} MB")

        figures["stock"] = stock_pipeline(str(phantom), args.quick)
        print(f"stock pipeline: {figures['stock']['seconds']:.1f} s ({figures['stock']['how']})")

    e2e = figures["e2e"]["phantom 512x512x120"]
    net = network_for(params).eval()
    pre_shape = [int(round(s * sp / t)) for s, sp, t in zip(FULL_SHAPE, FULL_SPACING, params.target_spacing)]
    figures["windows"] = window_count(tuple(pre_shape), params.patch_size, params.sw_overlap)
    figures["flops"] = network_flops(net, params.patch_size) * figures["windows"]
    figures["gflops"] = figures["flops"] / e2e["stages"]["infer"] / 1e9
    figures["gemm_peaks"] = gemm_peaks()
    served = "bf16" if figures["engines"]["engine"]["precision"] == "bf16" else "fp32"
    figures["peak_library"], figures["peak_gflops"] = max(figures["gemm_peaks"][served].items(), key=lambda kv: kv[1])
    figures["peak_precision"] = served
    figures["nominal_peak"] = nominal_peak()
    figures["frac_of_peak_flops"] = figures["gflops"] / figures["peak_gflops"]
    figures["ratio_vs_stock"] = e2e["seconds"] / figures["stock"]["seconds"]
    figures["non_network_share"] = 1 - e2e["stages"]["infer"] / e2e["seconds"]
    print(f"network: {figures['flops'] / 1e9:.0f} GFLOP over {figures['windows']} windows, {figures['gflops']:.1f} GFLOP/s "
          f"= {figures['frac_of_peak_flops']:.1%} of the best {figures['peak_precision']} GEMM "
          f"({figures['peak_library']}, {figures['peak_gflops']:.1f} GFLOP/s); GEMMs: {figures['gemm_peaks']}; "
          f"nominal: {figures['nominal_peak']}")
    figures["train"] = train_throughput(params, steps=2 if args.quick else 6)
    print(f"training: {figures['train']['plain']:.2f} patches/s plain, {figures['train']['qam_ocm']:.2f} with QAM+OCM "
          f"(x{figures['train']['qam_ocm_overhead']:.2f})")
    with tempfile.TemporaryDirectory() as tmp:
        figures["accuracy"] = accuracy_vs_reference([9600] if args.quick else [9600, 9601, 9602], Path(tmp))
    print(f"Dice served vs reference path: {[round(d, 4) for d in figures['accuracy']]}")
    with tempfile.TemporaryDirectory() as tmp:
        phantom = Path(tmp) / "phantom_full.nii.gz"
        save_nifti(make_phantom(9500, FULL_SHAPE, FULL_SPACING), str(phantom))
        cases = [("SYNTHETIC phantom 512x512x120 (ctv)", str(phantom), read_params(str(APP_DIR / "model" / "ctv.pt")))]
        if REAL_CT.exists():
            cases.append((f"{REAL_CT.name} (ctv)", str(REAL_CT), cases[0][2]))
        hn = read_params(str(APP_DIR / "model" / "hn.pt"))
        cases += [(f"{p.name} (hn)", str(p), hn) for p in sorted(OPENKBP.glob("openkbp_train_*.nii.gz"))[:OPENKBP_CASES]]
        figures["body_crop"] = body_crop_saving(cases)
    for row in figures["body_crop"][:2]:
        print(f"body crop {row['case']}: {row['run']} of {row['windows']} windows run, {row['air']} answered as air")
    real = [r for r in figures["body_crop"] if r["case"].startswith("openkbp")]
    if real:
        print(f"body crop on {len(real)} real OpenKBP CTs (hn): windows run {np.mean([r['run'] for r in real]):.1f} of "
              f"{np.mean([r['windows'] for r in real]):.1f} on average, saved {np.mean([r['saved'] for r in real]):.1%} "
              f"(range {min(r['saved'] for r in real):.1%}-{max(r['saved'] for r in real):.1%})")  # fmt: skip
    figures["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none on this machine"
    if not args.quick:
        write_report(figures, "python bench/run.py")
        print("wrote docs/performance.md")
    print(json.dumps({
        "e2e_s": round(e2e["seconds"], 3),
        "e2e_real_ct_s": round(next((r["seconds"] for k, r in figures["e2e"].items() if k.startswith("real")), float("nan")), 3),
        "stock_s": round(figures["stock"]["seconds"], 2),
        "stock_timing": "sampled" if args.quick else "whole",
        "ratio_vs_stock": round(figures["ratio_vs_stock"], 4),
        "peak_rss_mb": round(figures["peak_rss_mb"], 1),
        "frac_of_peak_flops": round(figures["frac_of_peak_flops"], 4),
        "non_network_share": round(figures["non_network_share"], 3),
        "stages_s": {k: round(v, 3) for k, v in e2e["stages"].items()},
        "train_patches_per_s": {k: round(v, 3) for k, v in figures["train"].items()},
        "dice_vs_reference_min": round(min(figures["accuracy"]), 4),
        "structure_sets": structure_sets_summary(figures["structure_sets"]),
        "engine": {k: figures["engines"]["engine"].get(k) for k in ("engine", "precision", "choose_s", "convert_s")},
        "engine_vs_torch": {image: {"ratio": round(row["ratios"]["seconds"], 3),
                                    "torch_s": round(row["rows"]["torch"]["seconds"], 3),
                                    "engine_s": round(row["rows"]["engine"]["seconds"], 3),
                                    "agrees": all(v["agrees"] for v in row["agreement"].values()),
                                    "min_dice": round(min(v["dice"] for v in row["agreement"].values()), 5)}
                            for image, row in figures["engines"]["images"].items()},
        "peak_rss_mb_torch": round(figures["engines"]["peak_rss_mb"]["torch"], 1),
    }))


if __name__ == "__main__":
    main()
