"""The offline trainer: checkpoints carry their metadata, and an interrupted run resumes; a folder datastore's
pairs carry the structures its labels record."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from ctv_app.lib.checkpoint import load_checkpoint
from ctv_app.lib.losses import UNCONTOURED
from ctv_app.lib.params import CTVParams
from ctv_app.lib.structures import CERVIX, Structures
from ctv_app.lib.transforms import pre_transforms, train_transforms, val_transforms
from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY
from ctv_datastore.build import build
from ctv_datastore.phantom import STRUCTURES as PHANTOM
from ctv_datastore.phantom import make_phantom
from ctv_train.data import file_pairs, find_pairs
from ctv_train.train import TrainConfig, train


class Interrupt(Exception):
    pass


def test_training_writes_metadata_and_resumes_after_interruption(tmp_path):
    data = tmp_path / "data"
    build(str(data), [1, 2, 3, 4], labelled={1, 2, 3, 4})
    pairs = find_pairs(str(data))
    assert [p["id"] for p in pairs] == [f"phantom_{s:05d}" for s in (1, 2, 3, 4)]
    params = CTVParams(filters=(8, 16, 32), patch_size=(32, 32, 32))
    out = str(tmp_path / "ctv.pt")
    cfg = TrainConfig(epochs=2, lr=1e-3, val_fraction=0.25, volumes_per_batch=2, patches_per_volume=1)

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("epoch 1/"):
            raise Interrupt(msg)

    with pytest.raises(Interrupt):
        train(pairs, out, params, cfg, log=stop_after_first_epoch)
    first = load_checkpoint(out)
    assert first["meta"]["epoch"] == 0
    assert len(first["meta"]["train_labels"]) == 3 and len(first["meta"]["val_labels"]) == 1
    assert len(first["meta"]["train_labels_sha256"]) == 64
    assert first["params"] == params.to_dict()

    messages = []
    result = train(pairs, out, params, cfg, log=messages.append)
    assert messages[0].startswith("resumed") and "epoch 1" in messages[0]
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert not (tmp_path / "ctv.pt.last").exists()
    assert 0.0 <= result["best_val_dice"] <= 1.0


def test_kfold_tests_every_case_once_and_never_trains_on_it():
    from ctv_train.crossval import kfold

    items = [f"case{i}" for i in range(10)]
    splits = kfold(items, 3, seed=1)
    tested = [x for _, test in splits for x in test]
    assert sorted(tested) == sorted(items)
    for train_items, test_items in splits:
        assert not set(train_items) & set(test_items)
        assert len(train_items) + len(test_items) == len(items)
    assert kfold(items, 3, seed=1) == splits
    with pytest.raises(ValueError, match="folds"):
        kfold(items, 11, seed=1)


def test_crossval_cli_prints_per_fold_dice(tmp_path):
    import json
    import subprocess
    import sys

    data = tmp_path / "data"
    build(str(data), list(range(20, 26)), labelled=set(range(20, 26)))
    params = json.dumps({"filters": [8, 16, 32], "patch_size": [32, 32, 32]})
    cmd = [
        sys.executable,
        "-m",
        "ctv_train.crossval",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "cv"),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--lr",
        "0.001",
        "--val-fraction",
        "0.34",
        "--params",
        params,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["folds"] == 2 and len(summary["fold_dice"]) == 2
    assert all(0.0 <= d <= 1.0 for d in summary["fold_dice"])
    assert "fold 0: Dice" in out and "fold 1: Dice" in out and "2-fold Dice:" in out
    assert (tmp_path / "cv" / "fold0" / "ctv.pt").exists() and (tmp_path / "cv" / "fold1" / "ctv.pt").exists()

    # A stopped run keeps its finished folds: run again, fold 1's scores gone, only fold 1 trains.
    (tmp_path / "cv" / "fold1" / "scores.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    assert "fold 0: epoch" not in again and "fold 1: epoch 1/1" in again
    assert json.loads(again.strip().splitlines()[-1])["fold_dice"][0] == summary["fold_dice"][0]


def test_validation_every_n_epochs_and_at_the_last(tmp_path):
    data = tmp_path / "data"
    build(str(data), [1, 2, 3], labelled={1, 2, 3})
    params = CTVParams(filters=(8, 16, 32), patch_size=(32, 32, 32))
    cfg = TrainConfig(epochs=3, lr=1e-3, val_fraction=0.34, val_every=2, patches_per_volume=1)
    result = train(find_pairs(str(data)), str(tmp_path / "ctv.pt"), params, cfg, log=lambda m: None)
    assert [h["val_dice"] is None for h in result["history"]] == [True, False, False]  # epochs 2 and 3 (last)
    assert load_checkpoint(str(tmp_path / "ctv.pt"))["meta"]["epoch"] in (1, 2)
    with pytest.raises(ValueError, match="val_every"):
        TrainConfig(val_every=0)


def test_torchrun_two_cpu_ranks_hold_identical_weights(tmp_path):
    """DDP under torchrun (gloo): after training steps both ranks hold bit-identical weights."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    build(str(data), [11, 12, 13, 14, 15], labelled={11, 12, 13, 14, 15})
    torchrun = Path(sys.executable).parent / "torchrun"
    params = '{"filters": [8, 16, 32], "patch_size": [32, 32, 32], "target_spacing": [6, 6, 6]}'
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ctv_train.train"]
    cmd += ["--data", str(data), "--out", str(tmp_path / "ctv.pt"), "--epochs", "2", "--lr", "0.003"]
    cmd += ["--val-fraction", "0.2", "--volumes-per-batch", "1", "--patches-per-volume", "2", "--params", params]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2 weights sha256 ([0-9a-f]{64})", run.stdout + run.stderr))
    assert set(digests) == {"0", "1"}, run.stdout[-2000:]
    assert digests["0"] == digests["1"]

    ckpt = load_checkpoint(str(tmp_path / "ctv.pt"))
    assert ckpt["meta"]["train_config"]["world_size"] == 2
    # Training steps happened: the weights left their seeded (identical) initialisation.
    import torch

    from ctv_app.lib.checkpoint import weights_digest
    from ctv_app.lib.networks import network_for

    torch.manual_seed(0)
    assert weights_digest(network_for(CTVParams.from_dict(ckpt["params"]))) != digests["0"]


@pytest.mark.parametrize("per_case", [False, True], ids=["per_patch", "centred_per_case"])
def test_quality_weighted_training_keeps_its_qam_and_needs_a_real_batch(tmp_path, per_case):
    with pytest.raises(ValueError, match="quality weighting"):
        TrainConfig(quality_weighting=True, volumes_per_batch=1, patches_per_volume=4)
    data = tmp_path / "data"
    build(str(data), [21, 22, 23, 24, 25], labelled={21, 22, 23, 24, 25})
    params = CTVParams(filters=(8, 16, 32), patch_size=(32, 32, 32), target_spacing=(6, 6, 6))
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.2, volumes_per_batch=2, patches_per_volume=2,
                      quality_weighting=True, quality_centre=per_case, quality_per_case=per_case)  # fmt: skip
    result = train(find_pairs(str(data)), str(tmp_path / "ctv.pt"), params, cfg, log=lambda m: None)
    ckpt = load_checkpoint(str(tmp_path / "ctv.pt"))
    assert ckpt["meta"]["train_config"]["quality_weighting"] is True
    assert ckpt["meta"]["train_config"]["quality_per_case"] is per_case
    assert any(k.startswith("qam.features") for k in ckpt["meta"]["qam"])
    assert 0.0 <= result["best_val_dice"] <= 1.0


def test_server_trainer_under_torchrun_two_cpu_ranks(tmp_path):
    """The server's `ctv` training task under torchrun (gloo): the ranks split the cases, end with
    bit-identical weights, and rank 0 alone publishes weights the server can serve."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from ctv_app.lib.configs.ctv import CTVConfig

    studies = tmp_path / "studies"
    build(str(studies), list(range(3000, 3006)), labelled=set(range(3000, 3006)))
    model = tmp_path / "model" / "ctv.pt"
    conf = {"ctv_target_spacing": "[6,6,6]", "ctv_patch_size": "[32,32,32]", "ctv_filters": "[8,16,32,64]"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "ctv_train.server_train", "--studies", str(studies), "--model", str(model)]  # fmt: skip
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    for param in ("max_epochs=2", "pretrained=false", "val_split=0.34", "patches_per_volume=2"):
        cmd += ["--param", param]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert sorted(re.findall(r"(\d) - Records for Training: (\d+)", log)) == [("0", "2"), ("1", "2")]  # 4 split
    digests = dict(re.findall(r"rank (\d)/2 weights sha256 ([0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    publishers = {line.split("]")[0] for line in log.splitlines() if "; published " in line}
    assert publishers == {"[rank 0"}
    ckpt = load_checkpoint(str(model))
    assert ckpt["meta"]["train_config"]["world_size"] == 2
    config = CTVConfig()
    config.init("ctv", str(model.parent), {"ctv_model": str(model), **conf}, None)
    assert config.infer().check_weights(str(model))["sha256"]  # what the server would serve


SHAPE = (96, 80, 24)  # small, with enough air around the body to pass as CT


def test_offline_pairs_carry_recorded_structures_and_missing_ones_are_uncontoured(tmp_path, caplog):
    """A folder datastore holding one partial bitmask label (CTV and Bladder, overlapping; the other five
    cervix structures not contoured) and one full label map: ``find_pairs`` gives the datastore's datalist,
    and the training transforms make the five missing structures' channels ``UNCONTOURED``. Read as plain
    files (what the trainer did before), the bitmask's overlap value 3 would be taught as Rectum."""
    from ctv_app.lib.datastore import CTVDatastore

    data = tmp_path / "data"
    data.mkdir()
    phantoms = {name: make_phantom(seed, shape=SHAPE) for name, seed in (("partial", 430), ("full", 431))}
    for name, phantom in phantoms.items():
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), data / f"{name}.nii.gz")
    store = CTVDatastore(str(data), CERVIX, auto_reload=False)
    partial = phantoms["partial"]
    bladder = partial.label == PHANTOM.labels["Bladder"]
    ctv = (partial.label == PHANTOM.labels["CTV"]) | np.roll(bladder, 2, axis=0)  # reaches into the bladder
    bitmask = Structures(["CTV", "Bladder"]).pack([ctv, bladder])
    assert (bitmask == 3).any()
    nib.save(nib.Nifti1Image(bitmask, partial.affine), tmp_path / "partial.nii.gz")
    store.save_label("partial", str(tmp_path / "partial.nii.gz"), "final",
                     {"encoding": "bitmask", "label_names": {"CTV": 1, "Bladder": 2}})  # fmt: skip
    full = phantoms["full"]
    nib.save(nib.Nifti1Image(full.label, full.affine), tmp_path / "full.nii.gz")
    store.save_label("full", str(tmp_path / "full.nii.gz"), "final", {})  # a label map in the model's values
    # an image and label file dropped in by hand after the index was written: not recorded, so left out
    nib.save(nib.Nifti1Image(full.image, full.affine), data / "stray.nii.gz")
    nib.save(nib.Nifti1Image(full.label, full.affine), data / "labels" / "final" / "stray.nii.gz")
    index = (data / "datastore_v2.json").read_bytes()

    with caplog.at_level(logging.WARNING, logger="ctv_train.data"):
        pairs = find_pairs(str(data))
    assert (data / "datastore_v2.json").read_bytes() == index  # read-only
    assert "stray" in caplog.text
    assert [p["id"] for p in pairs] == ["full", "partial"]
    assert pairs[1][ENCODING_KEY] == "bitmask" and pairs[1][STRUCTURES_KEY] == {"CTV": 1, "Bladder": 2}
    in_full = {name: v for name, v in PHANTOM.labels.items() if (full.label == v).any()}
    assert pairs[0][ENCODING_KEY] == "labelmap" and pairs[0][STRUCTURES_KEY] == in_full

    params = CTVParams(patch_size=(16, 16, 16))
    names = params.structure_list.names
    missing = [c for c, name in enumerate(names) if name not in ("CTV", "Bladder")]
    whole = Compose(val_transforms(params))(pairs[1])["label"]
    assert all((whole[c] == UNCONTOURED).all() for c in missing)
    for name in ("CTV", "Bladder"):
        assert set(np.unique(whole[names.index(name)]).tolist()) == {0.0, 1.0}, name
    assert ((whole[names.index("CTV")] == 1) & (whole[names.index("Bladder")] == 1)).any()  # the overlap, kept
    for patch in Compose(pre_transforms(params, with_label=True) + train_transforms(params, 2))(pairs[1]):
        label = patch["label"]
        assert all((label[c] == UNCONTOURED).all() for c in missing)
        assert all((label[names.index(n)] >= 0).all() for n in ("CTV", "Bladder"))
    full_label = Compose(val_transforms(params))(pairs[0])["label"]
    assert all((full_label[c] >= 0).all() == (name in in_full) for c, name in enumerate(names))

    # Without the recorded structures the same file is a label map: overlap voxels (3) read as Rectum.
    plain = next(p for p in file_pairs(str(data)) if p["id"] == "partial")
    misread = Compose(val_transforms(params))(plain)["label"]
    assert (misread[names.index("Rectum")] == 1).any()


def test_plain_folders_and_unrecorded_datastores_are_read_as_files(tmp_path):
    """Phantom folders (no index), and a datastore whose labels record no structures (saved before they
    were recorded), still give every image with a label file, label maps in the model's values."""
    import json

    build(str(tmp_path), [1, 2], labelled={1, 2}, full=False)
    expected = file_pairs(str(tmp_path))
    assert find_pairs(str(tmp_path)) == expected and len(expected) == 2
    unrecorded = {"image": {"ext": ".nii.gz", "info": {}}, "labels": {"final": {"ext": ".nii.gz", "info": {}}}}
    index = {"name": "x", "description": "", "images_dir": ".", "labels_dir": "labels",
             "objects": {"phantom_00001": unrecorded}}  # fmt: skip
    (tmp_path / "datastore_v2.json").write_text(json.dumps(index))
    assert find_pairs(str(tmp_path)) == expected


def test_ablation_table_gives_each_structure_dice_for_models_of_several():
    """One mean over ten structures hides which structures a component helps: the ablation's markdown adds a
    table of each row's Dice per structure (empty where no test image contains it), only for several."""
    from ctv_train.ablation import markdown

    def row(label, dices):
        metrics = {n: {"dice": {"mean": d}} for n, d in dices.items()}
        return {"label": label, "table": "t", "mean": 0.5, "sd": 0.0, "fold_dice": [0.5], "cpu_seconds": 60,
                "metrics": metrics}  # fmt: skip

    text = markdown([row("UNet", {"PTV_7000": 0.41, "Larynx": None}), row("+ Dice", {"PTV_7000": 0.52, "Larynx": 0.3})],
                    "cmd", 30, 2, "real plans")  # fmt: skip
    assert "| step | PTV_7000 | Larynx |" in text
    assert "| UNet | 0.410 |  |" in text and "| + Dice | 0.520 | 0.300 |" in text
    assert "Dice per structure" not in markdown([row("UNet", {"CTV": 0.8})], "cmd", 18, 3)
