"""Faults: kill -9 during a label save and during training, bad model files, a full disk."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from ctv_app.lib.checkpoint import load_checkpoint
from ctv_app.lib.provenance import file_sha256
from ctv_app.lib.datastore import CTVDatastore
from ctv_datastore.build import HELD_OUT_SEED_START, build
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom, save_nifti

from ..support import APP_DIR, ServerProcess
from ..test_server_training import CONF, TRAIN_PARAMS, TRAIN_SEEDS, wait_for_training

IMAGE = "big_phantom"

# Saves labels in a loop, as fast as it can, until it is killed.
SAVER = r"""
import itertools, sys
from ctv_app.lib.datastore import CTVDatastore
store = CTVDatastore(sys.argv[1], structures=["CTV"], auto_reload=False)
for n in itertools.count():
    store.save_label(sys.argv[2], sys.argv[3 + n % (len(sys.argv) - 3)], "final", {"annotator": f"loop{n}"})
    print(n, flush=True)
"""


def consistent(studies: Path) -> dict:
    """Open the datastore as a restarted server does and check every promise about its labels."""
    json.loads((studies / "datastore_v2.json").read_text())  # the index is whole
    store = CTVDatastore(str(studies), structures=["CTV"], recover=True, auto_reload=False)
    info = store.get_label_info(IMAGE, "final")
    label = studies / "labels" / "final" / f"{IMAGE}.nii"
    assert file_sha256(label) == info["sha256"]
    assert np.asarray(nib.load(label).dataobj).shape == (256, 256, 96)  # whole, readable
    history = studies / ".label_history" / "final" / IMAGE
    records = sorted(history.glob("*.json"))
    assert [json.loads(r.read_text())["version"] for r in records] == list(range(1, info["version"] + 1))
    for record in records:  # every version ever saved is intact, the current one included
        assert file_sha256(record.with_suffix(".nii")) == json.loads(record.read_text())["sha256"]
    assert len(list(history.glob("*.nii"))) == len(records)
    assert not [p for p in studies.rglob(".tmp-*")]
    return info


def interrupted(studies: Path) -> bool:
    """Whether the datastore on disk shows a save caught in the middle (before recovery)."""
    index = json.loads((studies / "datastore_v2.json").read_text())
    info = index["objects"][IMAGE]["labels"].get("final", {}).get("info", {})
    label = studies / "labels" / "final" / f"{IMAGE}.nii"
    records = list((studies / ".label_history" / "final" / IMAGE).glob("*"))
    return (
        bool(list(studies.rglob(".tmp-*")))
        or (label.exists() and file_sha256(label) != info.get("sha256"))
        or len(records) != 2 * info.get("version", 0)
    )


def kill_when_writing(saver: subprocess.Popen, folder: Path, timeout_s: float = 20) -> None:
    """SIGKILL the saver the moment a temp file of a save appears in ``folder``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if folder.exists() and any(e.name.startswith(".tmp-") for e in os.scandir(folder)):
            break
    saver.send_signal(signal.SIGKILL)


def test_kill_9_during_label_saves_leaves_the_datastore_consistent(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    phantom = make_phantom(HELD_OUT_SEED_START, shape=(256, 256, 96))
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), studies / f"{IMAGE}.nii.gz")
    labels = []
    for k in range(3):  # uncompressed and large: each write takes a while
        mask = np.zeros(phantom.image.shape, np.uint8)
        mask[40 + 10 * k : 200, 50:210, 10 : 80 - 5 * k] = 1
        labels.append(str(tmp_path / f"label{k}.nii"))
        nib.save(nib.Nifti1Image(mask, phantom.affine), labels[-1])
    env = {**os.environ, "PYTHONPATH": str(APP_DIR.parents[1])}
    # Kill while the history copy, the label file or the index is being written; and at random.
    targets = [studies / ".label_history" / "final" / IMAGE, studies / "labels" / "final", studies, None] * 2
    rng = np.random.default_rng(0)
    versions, caught = [], 0
    for target in targets:
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(studies), IMAGE, *labels],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)  # fmt: skip
        try:
            assert saver.stdout.readline().strip().isdigit(), "the saver did not save"
            if target is None:
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                kill_when_writing(saver, target)
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait()
        caught += interrupted(studies)
        versions.append(consistent(studies)["version"])
    print(f"label version after each kill: {versions}; kills that caught a save midway: {caught}/{len(targets)}")
    assert versions == sorted(versions) and versions[-1] >= len(targets)
    assert caught >= len(targets) // 2  # the kills did land inside saves, and were recovered from


@pytest.mark.parametrize(
    "corrupted", [{"sha256": "0" * 64}, {"version": 0}, {"version": 1, "sha256": "0" * 64}, {"version": "v3"}]
)
def test_recovery_never_deletes_history_because_of_an_index_value(tmp_path, corrupted):
    """Issue 16 item 11: whatever the index says about a label (forged through the API, or corrupted),
    restarting the server deletes no saved version."""
    studies = tmp_path / "studies"
    studies.mkdir()
    phantom = make_phantom(HELD_OUT_SEED_START, shape=(32, 32, 16))
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), studies / "small.nii.gz")
    store = CTVDatastore(str(studies), structures=["CTV"], auto_reload=False)
    for k in range(3):
        mask = np.zeros(phantom.image.shape, np.uint8)
        mask[8 : 20 + k, 8:24, 4:12] = 1
        nib.save(nib.Nifti1Image(mask, phantom.affine), tmp_path / f"label{k}.nii.gz")
        store.save_label("small", str(tmp_path / f"label{k}.nii.gz"), "final", {"annotator": "dr_a"})
    history = studies / ".label_history" / "final" / "small"
    kept = {p.name: p.read_bytes() for p in history.iterdir()}
    assert len(kept) == 6
    index_path = studies / "datastore_v2.json"
    index = json.loads(index_path.read_text())
    index["objects"]["small"]["labels"]["final"]["info"].update(corrupted)
    index_path.write_text(json.dumps(index))
    CTVDatastore(str(studies), structures=["CTV"], recover=True, auto_reload=False)
    assert {p.name: p.read_bytes() for p in history.iterdir()} == kept


def test_kill_9_of_the_server_during_training_resumes_after_restart(tmp_path):
    studies = tmp_path / "studies"
    build(str(studies), TRAIN_SEEDS[:8], labelled=set(TRAIN_SEEDS[:8]))
    model = tmp_path / "model" / "ctv.pt"
    conf = {**CONF, "ctv_model": str(model)}
    params = {**TRAIN_PARAMS, "max_epochs": 4, "name": "killed", "pretrained": False}
    resume = model.parent / "train" / "killed" / "resume.pt"
    with ServerProcess(studies, tmp_path / "server", conf=conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        client.train_start("ctv", params)
        wait_for_training(
            client, timeout_s=600,
            until=lambda s: (resume.exists() and load_checkpoint(str(resume))["meta"]["epoch"] >= 2)
            or s["status"] not in ("SUBMITTED", "RUNNING"),
        )  # fmt: skip
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its training process, mid-epoch
        server.proc.wait()
    epoch = load_checkpoint(str(resume))["meta"]["epoch"]
    assert 2 <= epoch < 4

    with ServerProcess(studies, tmp_path / "server2", conf=conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client2"))
        client.train_start("ctv", params)
        assert wait_for_training(client, timeout_s=600)["status"] == "DONE", server.log_tail()
        log = server.log_path.read_text(errors="replace")
    assert f"resumed at epoch {epoch} from {resume}" in log
    after = log[log.index(f"resumed at epoch {epoch}") :]
    assert f"ctv epoch {epoch + 1}/4" in after and f"ctv epoch {epoch}/4" not in after
    assert load_checkpoint(str(model))["meta"]["epoch"] >= 1


MIXED_STUDY = "mixed_study"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"


def write_mixed_study(folder: Path, staging: Path) -> None:
    """A CT series (CT_*.dcm), an MR series of the same study beside it (MR_*.dcm) and an RT plan."""
    phantom = make_phantom(HELD_OUT_SEED_START + 7, shape=(40, 36, 12), spacing=(8.0, 8.0, 10.0))
    study = pydicom.uid.generate_uid()
    write_ct_series(phantom.image, phantom.affine, str(folder), study_uid=study)
    for path in write_ct_series(phantom.image, phantom.affine, str(staging), study_uid=study, modality="MR"):
        os.replace(path, folder / Path(path).name.replace("CT_", "MR_"))
    plan = pydicom.dcmread(next(folder.glob("CT_*.dcm")), stop_before_pixels=True)
    plan.SOPClassUID = plan.file_meta.MediaStorageSOPClassUID = RT_PLAN_STORAGE
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    plan.SeriesInstanceUID, plan.Modality, plan.RTPlanLabel = pydicom.uid.generate_uid(), "RTPLAN", "cervix"
    plan.save_as(folder / "RP_plan.dcm", write_like_original=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on its own copy of the demo weights (uploads must not touch the repository's), and a
    study folder holding a CT series beside another series and an RT plan."""
    root = tmp_path_factory.mktemp("served")
    build(str(root / "studies"), [HELD_OUT_SEED_START], labelled=set())
    write_mixed_study(root / "studies" / MIXED_STUDY, root / "staging")
    model = root / "model" / "ctv.pt"
    model.parent.mkdir()
    shutil.copy(APP_DIR / "model" / "ctv.pt", model)
    with ServerProcess(root / "studies", root / "server", conf={"ctv_model": str(model)}) as server:
        server.model = model
        yield server


def served_model_sha(server) -> str:
    r = requests.post(
        f"{server.url}/infer/ctv", params={"image": f"phantom_{HELD_OUT_SEED_START:05d}", "output": "json"}, timeout=300
    )
    assert r.status_code == 200, r.text
    return r.json()["provenance"]["model"]["sha256"]


def checkpoint_bytes(edit) -> bytes:
    checkpoint = load_checkpoint(str(APP_DIR / "model" / "ctv.pt"))
    edit(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def test_bad_model_uploads_are_refused_and_the_previous_model_keeps_serving(served):
    original = file_sha256(served.model)
    assert served_model_sha(served) == original

    def drop_a_layer(c):
        c["model"].pop(next(iter(c["model"])))

    def other_architecture(c):
        c["params"]["filters"] = [8, 16, 32, 64]

    def other_structures(c):  # a model of other structures than the one served: never swapped in
        c["params"].pop("labels", None)
        c["params"]["structures"] = ["CTV", "Bladder"] if len(c["params"].get("structures", [])) != 2 else ["CTV"]

    bad = {
        "garbage": (b"\x80\x02 definitely not torch", "refused"),
        "truncated": (checkpoint_bytes(lambda c: None)[:5000], "refused"),
        "missing layer": (checkpoint_bytes(drop_a_layer), "Missing key"),
        "other architecture": (checkpoint_bytes(other_architecture), "trained as"),
        "other structures": (checkpoint_bytes(other_structures), "this server serves"),
    }
    for name, (data, words) in bad.items():
        r = requests.put(f"{served.url}/model/ctv", files={"file": ("ctv.pt", data)}, timeout=120)
        assert r.status_code == 422 and words in r.json()["detail"], (name, r.status_code, r.text)
        assert file_sha256(served.model) == original, name
    assert served_model_sha(served) == original

    # A good upload replaces the served model; the previous one is kept as a version.
    good = checkpoint_bytes(lambda c: c["meta"].update({"note": "re-uploaded"}))
    r = requests.put(f"{served.url}/model/ctv", files={"file": ("ctv.pt", good)}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == file_sha256(served.model) != original
    assert served_model_sha(served) == r.json()["sha256"]
    listing = requests.get(f"{served.url}/models/ctv", timeout=30).json()
    assert listing["served"] == r.json()["sha256"]
    assert {original, r.json()["sha256"]} <= {v["sha256"] for v in listing["versions"]}

    # A broken file put straight on disk (a half copy) is not served: the model in memory stays.
    current = file_sha256(served.model)
    served.model.write_bytes(good[:3000])
    assert served_model_sha(served) == current
    assert "refusing new ctv weights" in served.log_tail(200_000)  # names the model


class RunsCommand:
    """Unpickling this runs a shell command: what a crafted checkpoint does to ``torch.load(weights_only=False)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def put_model(server, data: bytes) -> requests.Response:
    return requests.put(f"{server.url}/model/ctv", files={"file": ("ctv.pt", data)}, timeout=120)


def test_a_crafted_pickle_is_refused_without_running_it(served, tmp_path):
    """Issue 16 item 8: uploaded or on-disk checkpoints are never unpickled as code."""
    r = put_model(served, checkpoint_bytes(lambda c: None))  # a good model to start from, whatever ran before
    assert r.status_code == 200, r.text
    current = r.json()["sha256"]
    assert served_model_sha(served) == current

    uploaded = tmp_path / "upload-ran"
    crafted = checkpoint_bytes(lambda c: c["meta"].update({"note": RunsCommand(f"touch {uploaded}")}))
    r = put_model(served, crafted)
    assert r.status_code == 422 and "posix.system" in r.json()["detail"], r.text
    assert not uploaded.exists()
    assert file_sha256(served.model) == current

    # The same kind of file put on disk as the served model is refused when the server reloads it.
    on_disk = tmp_path / "on-disk-ran"
    tmp = served.model.with_name(".crafted.tmp")
    tmp.write_bytes(checkpoint_bytes(lambda c: c["meta"].update({"note": RunsCommand(f"touch {on_disk}")})))
    os.replace(tmp, served.model)
    assert served_model_sha(served) == current
    assert not on_disk.exists()
    assert "posix.system" in served.log_tail(200_000)


def test_a_swapped_model_is_served_with_its_own_parameters(served, tmp_path):
    """Issue 16 item 3: after PUT /model/ctv with other pre/post-processing parameters, results are computed
    with the new parameters (as the in-process pipeline on the new checkpoint computes them) and name them."""
    from ctv_train.evaluate import served_infer_task

    image = f"phantom_{HELD_OUT_SEED_START:05d}"
    image_path = str(served.studies / f"{image}.nii.gz")
    changed = {"target_spacing": [5.0, 5.0, 5.0], "window": [-120.0, 260.0], "threshold": 0.4}
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    old.write_bytes(checkpoint_bytes(lambda c: None))
    new.write_bytes(checkpoint_bytes(lambda c: c["params"].update(changed)))

    def in_process(model: Path) -> np.ndarray:
        result, _ = served_infer_task(str(model))({"image": image_path, "device": "cpu"})
        mask = np.asarray(nib.load(result).dataobj)
        os.unlink(result)
        return mask

    assert put_model(served, old.read_bytes()).status_code == 200
    client = MONAILabelClient(served.url, tmpdir=str(tmp_path / "client"))
    before, _ = client.infer("ctv", image, {})
    r = put_model(served, new.read_bytes())
    assert r.status_code == 200, r.text
    after, result = client.infer("ctv", image, {})

    expected, previous = in_process(new), in_process(old)
    assert np.array_equal(np.asarray(nib.load(before).dataobj), previous)
    assert (expected != previous).sum() > 100  # the parameters matter for this image
    assert np.array_equal(np.asarray(nib.load(after).dataobj), expected)
    provenance = result["provenance"]
    assert provenance["model"]["sha256"] == r.json()["sha256"]
    assert provenance["model"] == r.json()["model"]  # the upload's answer describes the model now served
    assert {k: provenance["model"]["params"][k] for k in changed} == changed
    assert provenance["request"]["threshold"] == changed["threshold"]
    info = requests.get(f"{served.url}/info/", timeout=30).json()
    assert info["models"]["ctv"]["config"]["threshold"] == changed["threshold"]  # /info shows the served defaults


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: the datastore of the full-disk test. Needs root (CI runs as root)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_disk_during_label_save_is_a_clear_error_and_nothing_partial(small_disk, tmp_path):
    studies = small_disk / "studies"
    studies.mkdir()
    phantom = make_phantom(HELD_OUT_SEED_START, shape=(128, 128, 64))
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), studies / "disk_phantom.nii.gz")
    first, second = tmp_path / "v1.nii", tmp_path / "v2.nii"  # 1 MiB each, uncompressed
    nib.save(nib.Nifti1Image(np.zeros(phantom.image.shape, np.uint8), phantom.affine), first)
    nib.save(nib.Nifti1Image(phantom.mask("CTV").astype(np.uint8), phantom.affine), second)
    with ServerProcess(studies, tmp_path / "server") as server:

        def save(path: Path) -> requests.Response:
            return requests.put(f"{server.url}/datastore/label", params={"image": "disk_phantom", "tag": "final"},
                                files={"label": (path.name, path.read_bytes())}, timeout=120)  # fmt: skip

        assert save(first).status_code == 200
        index = (studies / "datastore_v2.json").read_bytes()
        filler = fill(small_disk, leave_bytes=300_000)
        r = save(second)
        assert r.status_code == 507 and "disk is full" in r.json()["detail"], r.text
        assert "previous version is unchanged" in r.json()["detail"]
        label = studies / "labels" / "final" / "disk_phantom.nii"
        assert file_sha256(label) == file_sha256(first)
        assert (studies / "datastore_v2.json").read_bytes() == index
        assert not list(small_disk.rglob(".tmp-*"))
        assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200

        filler.unlink()  # space again: the same save now works
        assert save(second).status_code == 200
        assert file_sha256(label) == file_sha256(second)


def test_disk_filling_up_mid_save_leaves_no_trace(small_disk, tmp_path, monkeypatch):
    """The space check passes, then the disk fills while the files are written (another writer)."""
    import ctv_app.lib.datastore as datastore

    studies = small_disk / "studies"
    studies.mkdir()
    phantom = make_phantom(HELD_OUT_SEED_START, shape=(128, 128, 64))
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), studies / "disk_phantom.nii.gz")
    label = tmp_path / "label.nii"
    nib.save(nib.Nifti1Image(phantom.mask("CTV").astype(np.uint8), phantom.affine), label)
    store = CTVDatastore(str(studies), structures=["CTV"], auto_reload=False)
    monkeypatch.setattr(datastore, "_check_free_space", lambda folder, needed: None)
    fill(small_disk, leave_bytes=1_500_000)  # room for the history copy, not for the label file too
    with pytest.raises(datastore.StorageFullError, match="disk is full"):
        store.save_label("disk_phantom", str(label), "final", {})
    assert not (studies / "labels" / "final" / "disk_phantom.nii").exists()
    assert not [p for p in (studies / ".label_history").rglob("*") if p.is_file()]
    assert not list(small_disk.rglob(".tmp-*"))
    assert store.get_label_info("disk_phantom", "final") in ({}, None)


def listed(server) -> set[str]:
    return set(requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"])


def wait_until_listed(server, image_id: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if image_id in listed(server):
            return True
        time.sleep(0.5)
    return False


def test_deleting_a_dicom_image_deletes_its_series_only(served):
    """Issue 16 item 15: DELETE /datastore/image on a DICOM series deleted its whole study folder,
    the other series and the RT plan with it."""
    folder = served.studies / MIXED_STUDY
    kept = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith("CT_")}
    assert len(kept) == 13 and MIXED_STUDY in listed(served)  # 12 MR slices and the plan
    r = requests.delete(f"{served.url}/datastore/image", params={"id": MIXED_STUDY}, timeout=60)
    assert r.status_code == 200, r.text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept  # the CT slices, and only they, are gone
    assert MIXED_STUDY not in listed(served)
    # Nor does a rescan bring it back: the folder holds no CT series now.
    save_nifti(make_phantom(HELD_OUT_SEED_START + 8, shape=(32, 32, 16)), str(served.studies / "after_delete.nii.gz"))
    assert wait_until_listed(served, "after_delete") and MIXED_STUDY not in listed(served)


def test_the_watcher_survives_a_vanished_file_and_sees_new_dicom_folders(served, tmp_path):
    """Issue 16 item 16: a file that vanished between the rescan's listing and its reading killed the
    datastore watcher for good; new DICOM folders were only noticed after a NIfTI change."""
    ghost = served.studies / "ghost.dcm"
    ghost.symlink_to(served.studies / "vanished.dcm")  # listed, then not found when read: a vanished file
    try:
        save_nifti(make_phantom(HELD_OUT_SEED_START + 9, shape=(32, 32, 16)), str(served.studies / "watched.nii.gz"))
        assert wait_until_listed(served, "watched")  # a rescan ran over the vanished file
        phantom = make_phantom(HELD_OUT_SEED_START + 10, shape=(40, 36, 12), spacing=(8.0, 8.0, 10.0))
        write_ct_series(phantom.image, phantom.affine, str(served.studies / "new_dicom_series"))
        assert wait_until_listed(served, "new_dicom_series"), served.log_tail()
        assert "ghost.dcm" in served.log_tail(200_000)  # skipped, and said so
    finally:
        ghost.unlink()
