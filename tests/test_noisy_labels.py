"""The 2-D noisy-label experiment's pieces: the split, the label noise, train + evaluate CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ctv_app.lib.metrics import roc_auc
from ctv_train.noisy_labels import (
    METHODS,
    N_TRAIN,
    _prepare,
    _prepare_masks,
    add_label_noise,
    build_net,
    load_npz,
    perturb,
    quality_scores,
    sample_losses,
    split,
)


def test_split_is_fixed_and_disjoint():
    train, test = split(207, seed=0)
    assert len(train) == N_TRAIN and len(test) == 42 and not set(train) & set(test)
    again_train, _ = split(207, seed=0)
    assert np.array_equal(train, again_train)


def test_perturb_grows_or_shrinks_by_the_given_distance():
    mask = np.zeros((64, 64), np.uint8)
    mask[22:42, 22:42] = 1  # 20x20 square
    grown, shrunk = perturb(mask, 3, dilate=True), perturb(mask, 3, dilate=False)
    assert grown[22:42, 22:42].all() and grown[19, 32] == 1 and grown[18, 32] == 0
    assert shrunk.sum() == 14 * 14 and shrunk[25, 25] == 1 and shrunk[24, 25] == 0
    assert perturb(mask, 11, dilate=False).sum() == 0  # a thin structure can vanish, as in the protocol


def test_label_noise_hits_the_requested_fraction_only():
    masks = np.zeros((20, 3, 32, 32), np.uint8)
    masks[:, :, 8:24, 8:24] = 1
    masks[:, 1] = np.roll(masks[:, 1], 3, axis=-1)
    noisy, chosen = add_label_noise(masks, 0.5, (1, 4), seed=1)
    assert len(chosen) == 10
    changed = [i for i in range(20) if not np.array_equal(noisy[i], masks[i])]
    assert changed == chosen
    assert add_label_noise(masks, 0.5, (1, 4), seed=1)[1] == chosen  # seeded


def toy_npz(folder) -> str:
    """165 + 5 synthetic 32x32 'X-rays' with a bright square as every structure (not JSRT)."""
    rng = np.random.default_rng(0)
    n = 170  # 165 train + 5 test
    images = rng.integers(0, 60, (n, 32, 32)).astype(np.uint8)
    masks = np.zeros((n, 3, 32, 32), np.uint8)
    for i in range(n):
        r, c = rng.integers(6, 20, 2)
        masks[i, 0, r : r + 8, c : c + 8] = 1
        images[i][masks[i, 0] > 0] += 150
    masks[:, 1] = masks[:, 0]
    masks[:, 2] = masks[:, 0]
    data = folder / "toy.npz"
    np.savez(
        data,
        images=images,
        masks=masks,
        names=np.array([f"t{i}" for i in range(n)]),
        structures=np.array(["lungs", "heart", "clavicles"]),
    )
    return str(data)


TINY = ["--epochs", "2", "--size", "32", "--features", "4", "8", "16", "32", "64", "4"]


@pytest.mark.parametrize(
    "method", ["baseline", "qam_ocm", "qam_ocm_centred_lr1e-3", "qam_ocm_centred_sees_prediction", "small_loss_ocm"]
)
def test_train_and_evaluate_cli_agree(tmp_path, method):
    data = toy_npz(tmp_path)
    model = tmp_path / "m.pt"
    cmd = [sys.executable, "-m", "ctv_train.noisy_labels", "train", "--data", str(data), "--out", str(model)]
    cmd += ["--method", method, "--noisy", "0.25", "--level", "1-8", *TINY]
    trained = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    at_training = json.loads(trained.stdout.strip().splitlines()[-1])
    cmd = [sys.executable, "-m", "ctv_train.noisy_labels", "evaluate", "--model", str(model), "--data", str(data)]
    evaluated = subprocess.run(cmd + ["--split", "test"], capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert set(scores) == {"lungs", "heart", "clavicles", "mean"}
    assert scores["mean"] == pytest.approx(at_training["mean"])
    assert 0.0 <= scores["mean"] <= 1.0

    # The training curve ends at the last epoch with the final test Dice. Its loss AUC is what the saved
    # network's losses give the clean and corrupted training labels; a QAM run keeps its QAM, and the
    # curve's label-review AUC is what that QAM gives them.
    import torch

    from ctv_app.lib.quality import QualityAwarenessModule, QualityWeightedLoss

    ckpt = torch.load(model, weights_only=False)
    last = ckpt["meta"]["curve"][-1]
    assert last["epoch"] == 2 and last["test_mean"] == pytest.approx(scores["mean"])
    cmd = [sys.executable, "-m", "ctv_train.noisy_labels", "curve", "--models", str(model)]
    printed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and f"| 2 | {scores['mean']:.3f} | {last['loss_auc']:.3f} |" in printed.stdout
    assert ("qam" in ckpt) == METHODS[method].quality == ("review_auc" in last)
    images, masks, structures = load_npz(data)
    train_idx, _ = split(len(images))
    noisy, corrupted = add_label_noise(masks[train_idx], 0.25, (1, 8), seed=0)
    assert corrupted == ckpt["meta"]["corrupted_train_indices"]
    x, y = _prepare(images[train_idx], 32), _prepare_masks(noisy, 32)
    clean = np.setdiff1d(np.arange(len(x)), corrupted)
    net = build_net((4, 8, 16, 32, 64, 4), len(structures))
    net.load_state_dict(ckpt["model"])
    losses = sample_losses(net, x, y)
    assert last["loss_auc"] == pytest.approx(roc_auc(-losses[clean], -losses[corrupted]))
    if METHODS[method].quality:
        sees = METHODS[method].sees_prediction  # the QAM also reads the network's probabilities
        qam = QualityAwarenessModule(2, in_channels=1 + len(structures) * (2 if sees else 1))
        weighting = QualityWeightedLoss(qam)
        weighting.qam.load_state_dict(ckpt["qam"])
        raw = quality_scores(weighting, x, y, net=net if sees else None)
        assert last["review_auc"] == pytest.approx(roc_auc(raw[clean], raw[corrupted]))


def test_table_trains_missing_runs_once_and_writes_json_rows(tmp_path):
    data = toy_npz(tmp_path)
    cmd = [sys.executable, "-m", "ctv_train.noisy_labels", "table", "--data", data, "--out", str(tmp_path / "runs")]
    cmd += ["--rows", "0:-", "0.5:5-13", "--methods", "baseline", "--json", str(tmp_path / "rows.json"), *TINY]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("training ") == 2 and "| 50% | 5-13 | baseline |" in first.stdout
    assert "0.755 / 0.807 / 0.393 / 0.652" in first.stdout  # the published row beside ours
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["noisy"], r["level"], r["method"]) for r in rows] == [(0.0, "-", "baseline"), (0.5, "5-13", "baseline")]
    assert all(set(r) == {"noisy", "level", "method", "lungs", "heart", "clavicles", "mean"} for r in rows)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training " not in again.stdout  # finished runs are kept, not redone
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
