"""The learning loop through the real server and MONAI Label's client: train from random weights,
serve the new model without a restart, resume a killed training, save corrected labels, pick the
next image by uncertainty.

A small, coarse configuration keeps this within CI time: 6 mm voxels, 32^3 patches, filters
8-64. The served default is the same code at 4 mm (docs/model.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ctv_app.lib.checkpoint import load_checkpoint
from ctv_app.lib.provenance import file_sha256
from ctv_app.lib.metrics import dice
from ctv_datastore.build import HELD_OUT_SEED_START, build
from ctv_datastore.phantom import make_water_phantom, save_nifti

from .support import APP_DIR, REAL_CT, ServerProcess

TRAIN_SEEDS = list(range(3000, 3016))
HELD_OUT = [HELD_OUT_SEED_START, HELD_OUT_SEED_START + 1]
CONF = {
    "ctv_structures": '["CTV"]',  # trained from random weights in minutes: the CTV alone
    "ctv_target_spacing": "[6,6,6]",
    "ctv_patch_size": "[32,32,32]",
    "ctv_filters": "[8,16,32,64]",
    "epistemic_samples": "6",
}
TRAIN_PARAMS = {"max_epochs": 40, "learning_rate": 0.003, "val_split": 0.2, "patches_per_volume": 4}
MIN_DICE = 0.8
TRAIN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Path]:
    """16 labelled training phantoms; unlabelled: 2 held-out phantoms, a water QA phantom, the real CT."""
    root = tmp_path_factory.mktemp("learning")
    studies = root / "studies"
    build(str(studies), TRAIN_SEEDS + HELD_OUT, labelled=set(TRAIN_SEEDS))
    save_nifti(make_water_phantom(), str(studies / "water_qa_phantom.nii.gz"))
    if REAL_CT.exists():
        os.symlink(REAL_CT, studies / REAL_CT.name)
    truth = root / "truth"
    build(str(truth), HELD_OUT, labelled=set(HELD_OUT))
    return {"root": root, "studies": studies, "truth": truth / "labels" / "final", "model": root / "model" / "ctv.pt"}


@pytest.fixture(scope="module")
def server(store):
    conf = {**CONF, "ctv_model": str(store["model"])}
    with ServerProcess(store["studies"], store["root"] / "server", conf=conf) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server, store):
    return MONAILabelClient(server.url, tmpdir=str(store["root"] / "client"))


def wait_for_training(client: MONAILabelClient, timeout_s: float = TRAIN_TIMEOUT_S, until=None) -> dict:
    """Poll /train/ until the task ends (or ``until(status)`` holds); bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.train_status()
        if until is not None and until(status):
            return status
        if until is None and status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(2)
    raise AssertionError(f"training did not finish in {timeout_s}s: {status}")


def test_infer_before_any_training_is_503_not_500(client):
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("ctv", f"phantom_{HELD_OUT[0]:05d}", {})
    assert "Status: 503" in e.value.msg
    assert "train a model first" in e.value.msg


def test_training_from_random_weights_publishes_and_serves_without_restart(client, server, store):
    started = client.train_start("ctv", {**TRAIN_PARAMS, "pretrained": False, "resume": False})
    assert started["status"] in ("SUBMITTED", "RUNNING"), started

    # The first epoch publishes a model; inference works while training goes on.
    wait_for_training(
        client, timeout_s=300, until=lambda s: store["model"].exists() or s["status"] not in ("SUBMITTED", "RUNNING")
    )
    assert store["model"].exists(), server.log_tail()
    image = f"phantom_{HELD_OUT[0]:05d}"
    _, during = client.infer("ctv", image, {})
    assert client.train_status()["status"] == "RUNNING", "training ended before inference could overlap it"
    first_version = during["provenance"]["model"]["sha256"]

    status = wait_for_training(client)
    assert status["status"] == "DONE", server.log_tail()
    assert any("ctv epoch 40/40 val_dice" in line for line in status["details"]), status  # /train/ shows progress
    ckpt = load_checkpoint(str(store["model"]))
    meta = ckpt["meta"]
    assert meta["val_dice"] >= MIN_DICE, meta
    assert 1 <= meta["epoch"] <= TRAIN_PARAMS["max_epochs"]
    assert len(meta["train_labels"]) + len(meta["val_labels"]) == len(TRAIN_SEEDS)
    assert not set(meta["train_labels"]) & set(meta["val_labels"])
    assert len(meta["train_labels_sha256"]) == 64 and meta["time"] and meta["train_config"]["max_epochs"] == 40
    assert meta["started_from"] is None  # random initialisation
    assert ckpt["params"]["target_spacing"] == [6.0, 6.0, 6.0]
    resume_files = list((store["model"].parent / "train").rglob("resume.pt"))
    assert resume_files == [], "a finished run leaves nothing to resume"

    # Same server process, new weights: the response names the file now on disk.
    for seed in HELD_OUT:
        result_file, result = client.infer("ctv", f"phantom_{seed:05d}", {})
        truth = nib.load(store["truth"] / f"phantom_{seed:05d}.nii.gz").get_fdata()
        score = dice(nib.load(result_file).get_fdata(), truth == 1)  # the phantom's CTV (value 1)
        print(f"held-out phantom {seed}: Dice {score:.3f} (model {meta['epoch']} epochs, val {meta['val_dice']:.3f})")
        assert score >= MIN_DICE
        served = result["provenance"]["model"]
        assert served["sha256"] == file_sha256(store["model"]) != first_version
        assert served["epoch"] == meta["epoch"] and served["val_dice"] == pytest.approx(meta["val_dice"])


def test_killed_training_resumes_at_its_checkpoint_epoch(client, server, store):
    params = {**TRAIN_PARAMS, "max_epochs": 5, "name": "resume_check", "pretrained": False}
    resume = store["model"].parent / "train" / "resume_check" / "resume.pt"
    served_before = file_sha256(store["model"])
    client.train_start("ctv", params)
    wait_for_training(
        client,
        timeout_s=300,
        until=lambda s: (
            (resume.exists() and load_checkpoint(str(resume))["meta"]["epoch"] >= 2)
            or s["status"] not in ("SUBMITTED", "RUNNING")
        ),
    )
    stopped = requests.delete(f"{server.url}/train/", timeout=30)  # SIGKILL to the training process
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED", stopped.text
    epoch = load_checkpoint(str(resume))["meta"]["epoch"]
    assert 2 <= epoch < 5

    client.train_start("ctv", params)
    assert wait_for_training(client)["status"] == "DONE", server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert f"resumed at epoch {epoch} from {resume}" in log
    after = log[log.index(f"resumed at epoch {epoch}") :]
    assert f"ctv epoch {epoch + 1}/5" in after and f"ctv epoch {epoch}/5" not in after
    assert not resume.exists()
    # Started from random weights, it did not beat the served model on validation: nothing replaced it.
    assert file_sha256(store["model"]) == served_before


@pytest.mark.parametrize("method", ["epistemic", "tta"])
def test_uncertain_strategy_ranks_out_of_distribution_ct_first(client, server, method):
    sample = requests.post(f"{server.url}/activelearning/uncertain", json={"method": method}, timeout=600)
    assert sample.status_code == 200, sample.text
    chosen = sample.json()
    ood = {"water_qa_phantom"} | ({REAL_CT.name.removesuffix(".nii.gz")} if REAL_CT.exists() else set())
    assert chosen["id"] in ood, chosen

    scores = {}
    for image in client.datastore()["objects"]:
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=30).json()
        if method in info:
            scores[image] = info[method]["score"]
    print(f"{method} scores: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    in_dist = [scores[f"phantom_{s:05d}"] for s in HELD_OUT]
    assert all(scores[i] > max(in_dist) for i in ood), scores
    assert set(scores) == ood | {f"phantom_{s:05d}" for s in HELD_OUT}  # labelled images are not scored


def test_saved_label_is_versioned_with_its_annotator_and_leaves_the_worklist(client, server, store, tmp_path):
    image = "water_qa_phantom"
    empty = tmp_path / "water_qa_phantom.nii.gz"
    source = nib.load(store["studies"] / "water_qa_phantom.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), source.affine), empty)

    # A label on another grid is refused and nothing is stored.
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), source.affine), wrong)
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label(image, str(wrong), tag="final", params={"annotator": "dr_a"})
    assert "Status: 422" in e.value.msg and "does not match" in e.value.msg
    assert not (store["studies"] / "labels" / "final" / "water_qa_phantom.nii.gz").exists()

    client.save_label(image, str(empty), tag="final", params={"annotator": "dr_a"})
    client.save_label(image, str(empty), tag="final", params={"annotator": "dr_b"})
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=30)
    info = info.json()
    assert info["annotator"] == "dr_b" and info["version"] == 2 and info["previous_sha256"] == file_sha256(empty)
    history = store["studies"] / ".label_history" / "final" / image
    kept = sorted(p.name for p in history.iterdir() if p.name.endswith(".json"))
    assert len(kept) == 2
    assert json.loads((history / kept[0]).read_text())["annotator"] == "dr_a"
    index = json.loads((store["studies"] / "datastore_v2.json").read_text())  # valid JSON after the saves
    assert index["objects"][image]["labels"]["final"]["info"]["version"] == 2

    for strategy in ("first", "random", "uncertain"):
        for _ in range(3):
            sample = requests.post(f"{server.url}/activelearning/{strategy}", json={}, timeout=600).json()
            assert sample.get("id") != image, (strategy, sample)
    unknown = requests.post(f"{server.url}/activelearning/nonsense", json={}, timeout=30)
    assert unknown.status_code == 404 and "uncertain" in unknown.text


def test_auto_training_starts_after_n_saved_labels(tmp_path):
    """``--conf auto_train_after 2``: the second saved label starts a training run (off by default)."""
    studies = tmp_path / "studies"
    build(str(studies), [3100, 3101, 3102, 3103], labelled={3100, 3101})
    conf = {**CONF, "ctv_model": str(tmp_path / "model" / "ctv.pt"), "auto_train_after": "2"}
    del conf["ctv_structures"]  # the phantoms' labels hold every cervix structure: the default model's
    with ServerProcess(studies, tmp_path / "server", conf=conf) as proc:
        client = MONAILabelClient(proc.url, tmpdir=str(tmp_path / "client"))
        with pytest.raises(MONAILabelClientException, match="No Train Tasks Found"):
            client.train_status()
        truth = tmp_path / "truth"
        build(str(truth), [3102, 3103], labelled={3102, 3103})
        client.save_label("phantom_03102", str(truth / "labels/final/phantom_03102.nii.gz"), tag="final")
        with pytest.raises(MONAILabelClientException, match="No Train Tasks Found"):
            client.train_status()  # one label is not enough
        client.save_label("phantom_03103", str(truth / "labels/final/phantom_03103.nii.gz"), tag="final")
        status = wait_for_training(client, timeout_s=60, until=lambda s: s["status"] != "SUBMITTED")
        assert status["status"] == "RUNNING" and status["request"]["model"] == "ctv", status
        stopped = requests.delete(f"{proc.url}/train/", timeout=30)
        assert stopped.json()["status"] == "STOPPED"


def test_review_offers_the_label_the_served_model_disagrees_with(tmp_path):
    """``/activelearning/review`` through the real server, ranked by ``label_agreement`` (the default): of
    three labelled phantoms, the one an annotator drew 4 voxels off is offered, its score and per-structure
    figures are stored with the label, and a label with none of the model's structures is left out."""
    from ctv_train.annotator_styles import restyle

    studies = tmp_path / "studies"
    build(str(studies), [3200, 3201, 3202], labelled={3200, 3201, 3202})
    save_nifti(make_water_phantom(), str(studies / "water_qa_phantom.nii.gz"))
    shifted = studies / "labels" / "final" / "phantom_03201.nii.gz"
    label = nib.load(shifted)
    truth = np.asarray(label.dataobj)
    moved = np.zeros_like(truth)
    for value in np.unique(truth[truth > 0]).tolist():  # every structure by the same vector: one annotator
        mask, _ = restyle(truth == value, "shift", np.random.default_rng(7), margin=(4, 4))
        moved[(mask > 0) & (moved == 0)] = value
    assert not np.array_equal(moved, truth)
    nib.save(nib.Nifti1Image(moved, label.affine), shifted)
    model = tmp_path / "model" / "ctv.pt"  # the shipped weights, as a copy
    model.parent.mkdir()
    model.write_bytes((APP_DIR / "model" / "ctv.pt").read_bytes())
    with ServerProcess(studies, tmp_path / "server", conf={"ctv_model": str(model)}) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        empty = tmp_path / "empty.nii.gz"
        source = nib.load(studies / "water_qa_phantom.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), source.affine), empty)
        client.save_label("water_qa_phantom", str(empty), tag="final", params={"annotator": "dr_q"})

        chosen = requests.post(f"{server.url}/activelearning/review", json={}, timeout=600)
        assert chosen.status_code == 200, chosen.text
        chosen = chosen.json()
        assert chosen["id"] == "phantom_03201" and chosen["method"] == "label_agreement"
        assert chosen["scored"] == 3 and chosen["score"] < 0.5 < chosen["median_score"], chosen
        info = requests.get(f"{server.url}/datastore/label/info", params={"label": "phantom_03201", "tag": "final"},
                            timeout=30).json()  # fmt: skip
        record = info["label_agreement"]
        assert record["score"] == chosen["score"] and record["model"] == chosen["model"]
        assert record["structures"]["CTV"]["surface_dice_voxel"] < 0.5 and record["structures"]["CTV"]["label_ml"] > 0
        assert "label_agreement" not in requests.get(
            f"{server.url}/datastore/label/info", params={"label": "water_qa_phantom", "tag": "final"}, timeout=30
        ).json()
