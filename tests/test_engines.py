"""The inference engine (lib/engines.py) and the body crop (lib/inferers.py): the masks the server may return
with any engine or precision it can choose are the fp32 PyTorch masks (Dice >= 0.999 per structure), on
SYNTHETIC held-out phantoms and a real CT; a converted model is never served for another version; without
OpenVINO, or when a model does not convert, PyTorch serves."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from monai.transforms import Compose
from monailabel.client import MONAILabelClient

from ctv_app.lib import engines
from ctv_app.lib.checkpoint import load_checkpoint, save_checkpoint
from ctv_app.lib.configs import CONFIGS
from ctv_app.lib.inferers import BACKGROUND_LOGIT, BODY_MARGIN, build_inferer
from ctv_app.lib.infers import ctv as served_task_module
from ctv_app.lib.networks import network_for
from ctv_app.lib.params import CTVParams
from ctv_app.lib.transforms import pre_transforms

from .conftest import HELD_OUT_SEEDS
from .support import APP_DIR, REAL_CT, REPO, ServerProcess

SHIPPED = APP_DIR / "model" / "ctv.pt"
openvino = pytest.importorskip("openvino", reason="openvino is a runtime dependency (requirements.txt)")


def task_for(conf: dict[str, str], model_path: str | None = None):
    config = CONFIGS["ctv"]()
    config.init("ctv", str(APP_DIR / "model"), {**conf, **({"ctv_model": model_path} if model_path else {})}, None)
    return config.infer()


def bitmask(task, image: str) -> tuple[np.ndarray, dict]:
    path, result = task({"image": image, "device": "cpu", "label_encoding": "bitmask"})
    return np.asarray(nib.load(path).dataobj), result


def agreement(a: np.ndarray, b: np.ndarray, names: list[str]) -> dict[str, tuple[bool, float, int]]:
    """Per structure (bit i) of two bitmask volumes: ``engines.masks_agree``."""
    return {name: engines.masks_agree((a >> i) & 1 > 0, (b >> i) & 1 > 0) for i, name in enumerate(names)}


def agree(scores: dict[str, tuple[bool, float, int]]) -> bool:
    return all(ok for ok, _, _ in scores.values())


def shipped_network() -> tuple[torch.nn.Module, CTVParams]:
    checkpoint = load_checkpoint(str(SHIPPED))
    params = CTVParams.from_dict(checkpoint["params"])
    network = network_for(params)
    network.load_state_dict(checkpoint["model"])
    return network.eval(), params


def test_body_crop_gives_the_full_sliding_windows_logits_wherever_there_is_tissue(studies):
    """A small body in a wide field of view: the crop runs fewer windows and answers the air-only ones from one
    run, and every voxel near tissue gets the logits of the uncropped sliding window."""
    network, params = shipped_network()
    phantom = str(studies / f"phantom_{HELD_OUT_SEEDS[0]:05d}.nii.gz")
    x = Compose(pre_transforms(params))({"image": phantom})["image"].as_tensor()[None]
    floor = float(x.amin())
    wide = F.pad(x, (10, 30, 40, 60, 50, 70), value=floor)  # air around it, more on some sides
    wide[:, :, -12:-4, -12:-4, -12:-4] = float(x.amax())  # and a block of something far off in a corner:
    # the crop spans both, so windows in the other corners hold only air
    with torch.inference_mode():
        full = build_inferer(params, body_crop=False)(wide, network)
        cropping = build_inferer(params)
        cropped = cropping(wide, network)
    tissue = wide[0, 0] > floor
    box = cropping.crop(tissue)
    in_crop = torch.zeros(tissue.shape, dtype=torch.bool)
    in_crop[box] = True
    assert 0 < int(in_crop.sum()) < in_crop.numel()  # it did crop
    runs, skipped = cropping.last_windows
    assert skipped > 0 and runs > 0
    # Wherever there is tissue (its box, grown by the margin the crop promises), the same logits.
    near = tuple(slice(max(int(i.min()) - BODY_MARGIN, 0), int(i.max()) + 1 + BODY_MARGIN) for i in torch.nonzero(tissue).T)
    assert float((full - cropped)[(slice(None), slice(None), *near)].abs().max()) < 1e-4
    assert bool((cropped[:, :, ~in_crop] == BACKGROUND_LOGIT).all())


def test_every_precision_the_server_may_choose_gives_the_fp32_masks(studies):
    """Auto: the engine chosen is the fastest whose calibration masks agree; then, for every candidate that
    could be chosen (it agreed in calibration), its served masks on a held-out SYNTHETIC phantom and on the
    real CT are the PyTorch fp32 masks (``engines.masks_agree`` for every structure: Dice >= 0.999, or one voxel where a
    structure is too small for that to allow one)."""
    auto = task_for({})
    record = auto.served("cpu").engine.record
    assert record["engine"] == "openvino"  # openvino is installed and this machine is a CPU
    measured = record["measured"]
    assert set(measured) >= {"torch f32", "openvino f32"}
    agreeing = {k: m for k, m in measured.items()
                if k == "torch f32" or min(s["dice"] for s in m["agreement"].values()) >= engines.CALIBRATION_AGREEMENT}  # fmt: skip
    chosen = f"{record['engine']} {record['precision']}"
    assert chosen == min(agreeing, key=lambda k: agreeing[k]["ms_per_window"])
    assert sum(s["voxels"] for s in measured["openvino f32"]["agreement"].values()) > 0  # calibration has structures

    reference_task = task_for({"inference_engine": "torch"})
    assert reference_task.served("cpu").engine.record["engine"] == "torch"
    names = reference_task.served("cpu").params.structure_list.names
    images = [str(studies / f"phantom_{HELD_OUT_SEEDS[1]:05d}.nii.gz")] + ([str(REAL_CT)] if REAL_CT.exists() else [])
    references = {image: bitmask(reference_task, image)[0] for image in images}
    for candidate in sorted(set(agreeing) - {"torch f32"}):
        precision = candidate.split()[1]
        task = task_for({"inference_engine": "openvino", "inference_precision": precision})
        assert task.served("cpu").engine.precision == precision
        for image in images:
            mask, result = bitmask(task, image)
            assert result["provenance"]["engine"]["precision"] == precision
            scores = agreement(references[image], mask, names)
            assert agree(scores), (candidate, os.path.basename(image), scores)
    if not REAL_CT.exists():
        pytest.skip(f"checked on the phantom only: {REAL_CT} is missing")


def test_a_reduced_precision_is_not_chosen_on_structures_calibration_never_showed():
    """The head-and-neck model calibrated on the pelvic SYNTHETIC phantom: its structures are (mostly) absent,
    so their masks agree trivially; only f32 (OpenVINO or PyTorch) may serve it."""
    config = CONFIGS["hn"]()
    config.init("hn", str(APP_DIR / "model"), {}, None)
    record = config.infer().served("cpu").engine.record
    unseen = {name for k, m in record["measured"].items() if k != "torch f32"
              for name, s in m["agreement"].items() if s["voxels"] == 0}  # fmt: skip
    assert unseen  # the Parotids are not in a pelvis
    assert record["precision"] == "f32"


def test_a_new_version_is_served_with_its_own_engine(studies, tmp_path):
    """Publish another version (an admin uploads weights whose Bladder output is shifted): the next result
    names it and its engine, and its masks are the new version's own fp32 masks, not the old version's."""
    checkpoint = load_checkpoint(str(SHIPPED))
    params = CTVParams.from_dict(checkpoint["params"])
    state = {k: v.clone() for k, v in checkpoint["model"].items()}
    heads = [k for k, v in state.items() if k.endswith("bias") and v.shape == (len(params.structures),)]
    bladder = params.structure_list.names.index("Bladder")
    for key in heads:  # every output head: the served (eval) one among them
        state[key][bladder] += 3.0
    shifted = tmp_path / "ctv_shifted.pt"
    new_sha = save_checkpoint(str(shifted), state, params, {**checkpoint["meta"], "note": "test: Bladder shifted"})
    image = f"phantom_{HELD_OUT_SEEDS[2]:05d}"
    with ServerProcess(studies, tmp_path / "server", conf={"data_dir": str(tmp_path / "data")}) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        info = client.info()["models"]["ctv"]["engine"]
        assert info["engine"] in ("openvino", "torch") and "chosen_because" in info
        old_file, old = client.infer("ctv", image, {"label_encoding": "bitmask"})
        old_mask = np.asarray(nib.load(old_file).dataobj)
        with open(shifted, "rb") as f:
            r = requests.put(f"{server.url}/model/ctv", files={"file": f}, timeout=300)
        assert r.status_code == 200, r.text
        new_file, new = client.infer("ctv", image, {"label_encoding": "bitmask"})
        new_mask = np.asarray(nib.load(new_file).dataobj)
    assert old["provenance"]["model"]["sha256"] != new_sha
    assert new["provenance"]["model"]["sha256"] == new_sha
    assert new["provenance"]["engine"]["engine"] == info["engine"]
    own_fp32, _ = bitmask(task_for({"inference_engine": "torch"}, str(shifted)), str(studies / f"{image}.nii.gz"))
    names = params.structure_list.names
    assert agree(agreement(own_fp32, new_mask, names))
    assert agreement(old_mask, new_mask, names)["Bladder"][1] < 0.99  # the old version's engine would show here


def test_without_openvino_pytorch_serves_and_says_why(studies):
    """A machine without OpenVINO (the package hidden from the import system): PyTorch serves, the log
    says why, and the result names the engine."""
    image = str(studies / f"phantom_{HELD_OUT_SEEDS[0]:05d}.nii.gz")
    code = (
        "import sys, logging; sys.modules['openvino'] = None; logging.basicConfig(level=logging.INFO)\n"
        "import nibabel as nib, numpy as np\n"
        "from ctv_app.lib.configs import CONFIGS\n"
        "config = CONFIGS['ctv'](); config.init('ctv', 'apps/ctv_app/model', {}, None)\n"
        f"path, result = config.infer()({{'image': {image!r}, 'device': 'cpu'}})\n"
        "print('ENGINE', result['provenance']['engine']['engine'], result['provenance']['engine']['chosen_because'])\n"
        "print('VOXELS', int((np.asarray(nib.load(path).dataobj) > 0).sum()))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ENGINE torch openvino is not installed" in run.stdout
    assert "openvino is not installed: PyTorch serves" in run.stderr  # the log line
    assert int(run.stdout.split("VOXELS")[1].split()[0]) > 0


def test_a_model_that_fails_to_convert_is_served_by_pytorch(studies, monkeypatch, caplog):
    """OpenVINO refusing the model (its conversion raising): a warning names the failure and PyTorch serves
    the same masks as the torch engine."""

    def refuse(network, window):
        raise RuntimeError("unsupported operation in this test")

    monkeypatch.setattr(engines, "convert", refuse)
    monkeypatch.setattr(served_task_module, "ENGINES_BY_VERSION", engines.EngineCache())  # not the cached engines
    image = str(studies / f"phantom_{HELD_OUT_SEEDS[0]:05d}.nii.gz")
    with caplog.at_level(logging.WARNING, logger="ctv_app.lib.engines"):
        mask, result = bitmask(task_for({}), image)
    assert result["provenance"]["engine"]["engine"] == "torch"
    assert "unsupported operation in this test" in result["provenance"]["engine"]["chosen_because"]
    assert any("OpenVINO could not take this model" in r.getMessage() for r in caplog.records)
    reference, _ = bitmask(task_for({"inference_engine": "torch"}), image)
    assert np.array_equal(mask, reference)


@pytest.mark.parametrize(
    "conf, words",
    [({"inference_engine": "tensorrt"}, "inference_engine must be one of"),
     ({"inference_precision": "int4"}, "inference_precision must be one of"),
     ({"inference_engine": "torch", "inference_precision": "bf16"}, "needs openvino"),
     ({"engine_calibration": "/nonexistent/ct.nii.gz"}, "no such file")],
)  # fmt: skip
def test_bad_engine_settings_are_refused_at_start(conf, words):
    with pytest.raises(ValueError, match=words):
        task_for(conf)
