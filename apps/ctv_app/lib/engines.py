"""How the network runs at inference: PyTorch, or OpenVINO at a precision measured on this machine.

When a model version is loaded, it is converted for OpenVINO (CPU) and every candidate precision is run
beside the PyTorch fp32 path on calibration volumes (a SYNTHETIC phantom by default, or the site's own
CTs: ``--conf engine_calibration a.nii.gz,b.nii.gz``), through the served sliding window. The fastest
candidate whose masks agree with fp32 (Dice >= ``CALIBRATION_AGREEMENT`` for every structure, so that
unseen CTs keep ``AGREEMENT``) serves that version;
the choice, the agreement and the speed of each candidate go into every result's provenance and
``/info/``. The machines this runs on differ (with or without bf16 units: bf16 is 4-6x faster than fp32
on one, 2x slower on another), so the choice is measured here, not written down.

``--conf inference_engine torch|openvino|auto`` and ``--conf inference_precision f32|bf16|f16|auto``
force either (``f32``: for a site that must compute in fp32). OpenVINO computes in bf16 by itself on a
CPU that has it, so every precision is pinned by ``INFERENCE_PRECISION_HINT``. Without OpenVINO, on a
GPU, or when a model fails to convert, PyTorch serves, with a log line saying why.

A converted model belongs to one model version: engines are cached by the version's sha256 (and the
settings), never by the network's name or file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .params import CTVParams

logger = logging.getLogger(__name__)

AGREEMENT = 0.999  # Dice per structure against the fp32 PyTorch masks: what a served precision keeps
# Two fp32 implementations summing in another order can put a voxel lying on the threshold on either side:
# OpenVINO f32 and PyTorch fp32 differ by one voxel of a 154-voxel structure on the real CT (Dice 0.9968). A
# structure too small for AGREEMENT to allow one voxel agrees when no more than this many differ.
TOLERATED_VOXELS = 1


def masks_agree(reference: np.ndarray, candidate: np.ndarray) -> tuple[bool, float, int]:
    """Whether a served mask keeps the fp32 mask (``AGREEMENT``, or ``TOLERATED_VOXELS``), its Dice (1.0 when both
    are empty) and the voxels that differ."""
    reference, candidate = np.asarray(reference, dtype=bool), np.asarray(candidate, dtype=bool)
    total = int(reference.sum()) + int(candidate.sum())
    differing = int(np.count_nonzero(reference != candidate))
    dice = 1.0 if total == 0 else 1.0 - differing / total
    return dice >= AGREEMENT or differing <= TOLERATED_VOXELS, dice, differing


# What a candidate must show on the calibration volumes to be served: stricter than AGREEMENT, because they are
# few. On one SYNTHETIC phantom OpenVINO f16 reached 0.9991 and then 0.9984 (Bladder) on the real CT; 0.9995
# lets no voxel of a structure under 1000 voxels change there. OpenVINO f32 scores 1.0.
CALIBRATION_AGREEMENT = 0.9995
ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "f32", "bf16", "f16")
# OpenVINO's name for each precision, and the CPU capability it needs (OPTIMIZATION_CAPABILITIES).
_OV_TYPES = {"f32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "f16": ("f16", "FP16")}
CALIBRATION_SEED = 9700  # the SYNTHETIC phantom the candidates are compared on, unless the site gives CTs


@dataclass(frozen=True)
class EngineSettings:
    """``--conf inference_engine``, ``inference_precision``, ``engine_calibration`` (comma-separated CT files)."""

    engine: str = "auto"
    precision: str = "auto"
    calibration: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"inference_engine must be one of {ENGINES}, got {self.engine!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"inference_precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.engine == "torch" and self.precision not in ("auto", "f32"):
            raise ValueError(f"the torch engine computes in f32; inference_precision {self.precision!r} needs openvino")
        missing = [p for p in self.calibration if not os.path.exists(p)]
        if missing:
            raise ValueError(f"engine_calibration: no such file {missing}")

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> "EngineSettings":
        calibration = tuple(p.strip() for p in conf.get("engine_calibration", "").split(",") if p.strip())
        return cls(conf.get("inference_engine", "auto").lower(), conf.get("inference_precision", "auto").lower(), calibration)


@dataclass(frozen=True)
class Engine:
    """What the sliding window calls (``network``) and how it was chosen (``record``: provenance)."""

    network: torch.nn.Module
    name: str
    precision: str
    record: dict[str, Any] = field(default_factory=dict)


class OpenVINONetwork(torch.nn.Module):
    """A compiled OpenVINO model called like the network: a batch of windows in, logits out.

    One infer request per thread (a request is not thread-safe; the server may run several inferences)."""

    def __init__(self, compiled: Any, window: tuple[int, ...]):
        super().__init__()
        self.compiled = compiled
        self.window = tuple(window)
        self._local = threading.local()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.window:
            raise ValueError(f"converted for windows of {self.window}, got {tuple(x.shape[2:])}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        out = request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True)).to(x.device)


def openvino_version() -> str | None:
    try:
        import openvino

        return openvino.get_version()
    except ImportError:
        return None


def _compile(ov_model: Any, precision: str) -> Any:
    import openvino as ov

    return ov.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": _OV_TYPES[precision][0],  # never the CPU's own pick (bf16 where it has it)
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    })  # fmt: skip


def _cpu_precisions() -> list[str]:
    import openvino as ov

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return [p for p, (_, cap) in _OV_TYPES.items() if cap in capabilities]


def convert(network: torch.nn.Module, window: tuple[int, ...]) -> Any:
    """The eval-mode network as an OpenVINO model taking a batch of 1-channel ``window``-sized patches."""
    import openvino as ov

    example = torch.zeros(1, 1, *window)
    with torch.inference_mode():
        return ov.convert_model(network.eval(), example_input=example, input=[(-1, 1, *window)])


def calibration_volumes(params: CTVParams, paths: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The pre-processed volumes (1, 1, ...) the candidates are compared on: ``paths`` (real CTs), else one
    SYNTHETIC phantom at its small size, through the model's own pre-processing."""
    from monai.transforms import Compose

    from .transforms import pre_transforms

    chain = Compose(pre_transforms(params, size_limit=False))  # the site's CTV_MAX_VOXELS is for requests
    if paths:
        return [chain({"image": p})["image"].as_tensor()[None] for p in paths]
    from ctv_datastore.phantom import make_phantom, save_nifti

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calibration_phantom.nii.gz")
        save_nifti(make_phantom(CALIBRATION_SEED), path)
        return [chain({"image": path})["image"].as_tensor()[None]]


def mask_agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor], threshold: float,
                   names: list[str]) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per structure: Dice of the masks (logits above ``threshold``'s logit) over all volumes, the voxels that
    differ, and the reference's voxels (0: the structure is absent from the calibration set: not exercised)."""
    cut = float(np.log(threshold / (1.0 - threshold)))
    out = {}
    for c, name in enumerate(names):
        ref = (torch.cat([r[:, c].flatten() for r in reference]) > cut).numpy()
        _, dice, differing = masks_agree(ref, (torch.cat([x[:, c].flatten() for x in candidate]) > cut).numpy())
        out[name] = {"dice": round(dice, 6), "voxels": int(ref.sum()), "differing": differing}
    return out


def _timed_run(network: Callable, volumes: list[torch.Tensor], inferer: Callable,
               window: tuple[int, ...]) -> tuple[list[torch.Tensor], float, int]:  # fmt: skip
    """The logits of each volume through ``inferer``, the seconds it took and the windows the network saw."""
    windows = 0

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += x.shape[0]
        return network(x)

    with torch.inference_mode():
        network(torch.zeros(1, 1, *window))  # warm-up: a compiled model allocates on its first call
        t0 = time.perf_counter()
        outputs = [inferer(v, counted) for v in volumes]
        return outputs, time.perf_counter() - t0, windows


def choose_engine(network: torch.nn.Module, params: CTVParams, device: str, settings: EngineSettings,
                  inferer: Callable) -> Engine:  # fmt: skip
    """Measure the candidates on this machine and keep the fastest whose masks agree with PyTorch fp32."""
    torch_engine = Engine(network, "torch", "f32")
    why_torch = None
    if settings.engine == "torch":
        why_torch = "inference_engine torch"
    elif not str(device).startswith("cpu"):
        why_torch = f"device {device}: OpenVINO serves CPUs"
    elif openvino_version() is None:
        why_torch = "openvino is not installed"
    if why_torch:
        asked = "inference_engine openvino asked for, but " if settings.engine == "openvino" else ""
        log = logger.info if settings.engine == "torch" else logger.warning
        log(f"{asked}{why_torch}: PyTorch serves")
        return _with_record(torch_engine, why_torch, {})
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        ov_model = convert(network, params.patch_size)
        convert_s = time.perf_counter() - t0
        available = _cpu_precisions()
        wanted = [p for p in ("bf16", "f16", "f32") if p in available]
        if settings.precision != "auto":
            wanted = [settings.precision] if settings.precision in available else []
            if not wanted:
                raise RuntimeError(f"this CPU cannot compute in {settings.precision} (it offers {available})")
        first = OpenVINONetwork(_compile(ov_model, wanted[-1]), params.patch_size)  # fails here if OpenVINO cannot
    except Exception as e:  # a model OpenVINO cannot take: keep serving with PyTorch
        logger.warning(f"OpenVINO could not take this model ({type(e).__name__}: {e}); PyTorch serves")
        return _with_record(torch_engine, f"OpenVINO failed: {type(e).__name__}: {e}", {})
    try:
        volumes = calibration_volumes(params, settings.calibration)
        reference, seconds, windows = _timed_run(network, volumes, inferer, params.patch_size)
    except Exception as e:  # without a calibration nothing can be shown to agree: keep serving with PyTorch
        logger.warning(f"engine calibration failed ({type(e).__name__}: {e}); PyTorch serves")
        return _with_record(torch_engine, f"calibration failed: {type(e).__name__}: {e}", {})
    measured: dict[str, dict[str, Any]] = {"torch f32": {"ms_per_window": round(1000 * seconds / windows, 2)}}
    forced = settings.precision != "auto"
    # One compiled model at a time, only the best so far kept: each holds its own copy of the weights.
    best = torch_engine if settings.engine == "auto" else None
    for precision in reversed(wanted):  # f32 first: forced to OpenVINO, it is the fallback
        ov_network = first if precision == wanted[-1] else OpenVINONetwork(_compile(ov_model, precision), params.patch_size)
        outputs, seconds, _ = _timed_run(ov_network, volumes, inferer, params.patch_size)
        agreement = mask_agreement(reference, outputs, params.threshold, params.structure_list.names)
        key = f"openvino {precision}"
        measured[key] = {"ms_per_window": round(1000 * seconds / windows, 2), "agreement": agreement,
                         "agrees": _agrees({"agreement": agreement}, precision)}  # fmt: skip
        faster = best is None or measured[key]["ms_per_window"] < measured[f"{best.name} {best.precision}"]["ms_per_window"]
        if forced or (measured[key]["agrees"] and faster):
            best = Engine(ov_network, "openvino", precision)
    chosen = best
    if forced:
        reason = f"forced (inference_precision {settings.precision})"
        if not measured[f"openvino {settings.precision}"]["agrees"]:
            logger.warning(f"forced openvino {settings.precision} does not agree with PyTorch fp32 on calibration: {measured}")
    else:
        reason = f"fastest whose calibration masks agree with PyTorch fp32 (Dice >= {CALIBRATION_AGREEMENT} per structure)"
        if chosen is None:  # inference_engine openvino, and no precision agrees: f32, as close as OpenVINO gets
            chosen = Engine(first, "openvino", wanted[-1])
            reason = "inference_engine openvino: no precision agreed on calibration, f32 serves"
            logger.warning(f"{reason}: {measured}")
        elif settings.engine != "auto":
            reason += f"; inference_engine {settings.engine}"
    record = _with_record(chosen, reason, measured).record
    record |= {"convert_s": round(convert_s, 2), "choose_s": round(time.perf_counter() - started, 2), "calibration": list(settings.calibration) or [f"SYNTHETIC phantom {CALIBRATION_SEED}"],
               "calibration_windows": windows}  # fmt: skip
    logger.info(f"engine: {chosen.name} {chosen.precision} ({measured})")
    return Engine(chosen.network, chosen.name, chosen.precision, record)


def _agrees(measured: dict[str, Any], precision: str) -> bool:
    """A reduced precision must have been seen on every structure (a head-and-neck model on the pelvic phantom
    is not: its masks there are empty, and agree trivially); f32 differs from PyTorch only in summation order."""
    agreement = measured["agreement"].values()
    exercised = all(s["voxels"] > 0 for s in agreement)
    return min(s["dice"] for s in agreement) >= CALIBRATION_AGREEMENT and (exercised or precision == "f32")


def _with_record(engine: Engine, reason: str, measured: dict[str, Any]) -> Engine:
    record = {
        "engine": engine.name,
        "precision": engine.precision,
        "version": openvino_version() if engine.name == "openvino" else torch.__version__,
        "chosen_because": reason,
        "threads": torch.get_num_threads(),
        "measured": measured,
    }
    return Engine(engine.network, engine.name, engine.precision, record)


class EngineCache:
    """Engines by (model version sha256, device, settings): a version's converted model is never served for
    another. Bounded: the served version and a few being commissioned."""

    def __init__(self, size: int = 4):
        self.size = size
        self._engines: OrderedDict[tuple, Engine] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, device: str, settings: EngineSettings, make: Callable[[], Engine]) -> Engine:
        key = (sha256, str(device), settings)
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            engine = make()
            self._engines[key] = engine
            while len(self._engines) > self.size:
                self._engines.popitem(last=False)
            return engine


ENGINES_BY_VERSION = EngineCache()
