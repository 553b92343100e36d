"""QAM + OCM maths: bounded scores, weights that sum to 1, gradients reaching both networks."""

from __future__ import annotations

import math

import pytest
import torch

from ctv_app.lib.losses import DeepSupervisionLoss
from ctv_app.lib.quality import QualityAwarenessModule, QualityWeightedLoss, overfitting_control, small_loss_weights


def test_ocm_bounds_scores_and_the_weight_ratio():
    raw = torch.tensor([-1e6, -3.0, 0.0, 2.5, 1e6])
    bounded = overfitting_control(raw, 2.0)
    assert torch.all(bounded > -2.0 - 1e-6) and torch.all(bounded < 2.0 + 1e-6)
    assert torch.all(bounded[1:] >= bounded[:-1])  # monotone: order of quality is kept
    weights = torch.softmax(bounded, dim=0)
    assert float(weights.max() / weights.min()) <= math.exp(4.0) * (1 + 1e-5)
    assert float(torch.softmax(raw, dim=0).min()) == 0.0  # without OCM a sample can vanish entirely


@pytest.mark.parametrize("ocm_lambda", [2.0, 0.5, None])
def test_weights_are_positive_and_sum_to_one(ocm_lambda):
    torch.manual_seed(0)
    qam = QualityAwarenessModule(2, in_channels=1 + 3, channels=(4, 8))
    weighting = QualityWeightedLoss(qam, ocm_lambda)
    image, label = torch.randn(6, 1, 32, 32), (torch.rand(6, 3, 32, 32) > 0.5).float()
    w = weighting.weights(image, label)
    assert w.shape == (6,) and torch.all(w > 0)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    if ocm_lambda is not None:
        assert float(w.max() / w.min()) <= math.exp(2 * ocm_lambda) * (1 + 1e-5)


def test_one_loss_trains_the_segmentation_net_and_the_qam():
    torch.manual_seed(0)
    seg = torch.nn.Conv3d(1, 1, 3, padding=1)
    qam = QualityAwarenessModule(3, in_channels=2, channels=(4, 8))
    weighting = QualityWeightedLoss(qam, 2.0)
    image = torch.randn(4, 1, 16, 16, 16)
    label = (torch.rand(4, 1, 16, 16, 16) > 0.7).float()
    per_sample = DeepSupervisionLoss(reduction="none")(seg(image), label)
    weighting(per_sample, image, label).backward()
    assert seg.weight.grad is not None and float(seg.weight.grad.abs().sum()) > 0
    qam_grads = [p.grad for p in qam.parameters()]
    assert all(g is not None for g in qam_grads) and sum(float(g.abs().sum()) for g in qam_grads) > 0


def test_qam_learns_to_down_weight_samples_whose_labels_disagree_with_the_image():
    """Labels that follow the image (bright square) vs labels that do not: the QAM, trained by the
    weighted loss alone against a fixed predictor, moves weight to the consistent ones."""
    torch.manual_seed(0)
    n, size = 8, 16
    image = torch.zeros(n, 1, size, size)
    image[:, :, 4:12, 4:12] = 1.0
    label = image.clone()
    label[n // 2 :] = 0.0
    label[n // 2 :, :, 0:4, 0:16] = 1.0  # wrong: a band where the image has nothing
    prediction_logits = (image * 8 - 4).detach()  # a segmentation net that follows the image
    per_sample = DeepSupervisionLoss(reduction="none")(prediction_logits, label)
    qam = QualityAwarenessModule(2, in_channels=2, channels=(4, 8))
    weighting = QualityWeightedLoss(qam, 2.0)
    opt = torch.optim.Adam(qam.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        weighting(per_sample, image, label).backward()
        opt.step()
    w = weighting.weights(image, label).detach()
    assert float(w[: n // 2].min()) > float(w[n // 2 :].max())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="spatial_dims"):
        QualityAwarenessModule(4, 2)
    with pytest.raises(ValueError, match="in_channels"):
        QualityAwarenessModule(2, 1)
    with pytest.raises(ValueError, match="ocm_lambda"):
        QualityWeightedLoss(QualityAwarenessModule(2, 2), 0.0)
    weighting = QualityWeightedLoss(QualityAwarenessModule(2, 2, channels=(4,)), 2.0)
    with pytest.raises(ValueError, match="one loss per case"):
        weighting(torch.tensor(1.0), torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))


def test_ctv_trainer_trains_with_quality_weighting_and_publishes_its_qam(tmp_path):
    from ctv_app.lib.checkpoint import load_checkpoint
    from ctv_app.lib.datastore import CTVDatastore
    from ctv_app.lib.params import CTVParams
    from ctv_app.lib.trainers.ctv import CTVTrain
    from ctv_datastore.build import build

    build(str(tmp_path / "studies"), [31, 32, 33, 34, 35], labelled={31, 32, 33, 34, 35})
    store = CTVDatastore(str(tmp_path / "studies"), structures=["CTV"], auto_reload=False)
    params = CTVParams(filters=(8, 16, 32), patch_size=(32, 32, 32), target_spacing=(6, 6, 6))
    served = tmp_path / "model" / "ctv.pt"
    task = CTVTrain(served_path=str(served), params=params)
    request = {"max_epochs": 1, "train_batch_size": 2, "patches_per_volume": 2, "val_split": 0.2}
    request.update({"quality_weighting": True, "pretrained": False, "learning_rate": 1e-3, "multi_gpu": False})
    with pytest.raises(ValueError, match="quality_weighting"):
        task({**request, "train_batch_size": 1}, store)
    task(request, store)
    meta = load_checkpoint(str(served))["meta"]
    assert meta["train_config"]["quality_weighting"] is True
    assert any(k.startswith("qam.features") for k in meta["qam"])

    # The review loop: the published QAM scores every final label; `review` offers the lowest.
    from ctv_app.lib.infers.ctv import CTVInfer
    from ctv_app.lib.networks import network_for
    from ctv_app.lib.review import LabelQualityScoring, NoQualityModelError, Review

    store.update_label_info("phantom_00033", "final", {"annotator": "dr_c"})
    infer = CTVInfer(path=str(served), network=network_for(params), params=params, preload=True)
    scoring = LabelQualityScoring(infer)
    scores = scoring({}, store)["scores"]
    assert set(scores) == {f"phantom_{s:05d}" for s in (31, 32, 33, 34, 35)}
    info = store.get_label_info("phantom_00033", "final")["label_quality"]
    assert info["annotator"] == "dr_c" and info["score"] == scores["phantom_00033"]
    assert info["model"] == infer.model_record()["sha256"]
    chosen = Review(scoring)({}, store)
    assert chosen["id"] == min(scores, key=scores.get)

    from ctv_app.lib.checkpoint import save_checkpoint

    ckpt = load_checkpoint(str(served))
    save_checkpoint(str(served), ckpt["model"], params, {k: v for k, v in ckpt["meta"].items() if k != "qam"})
    with pytest.raises(NoQualityModelError, match="quality_weighting"):
        Review(scoring)({}, store)


def test_centred_scores_keep_their_spread_when_the_raw_scores_drift_together():
    """The softmax ignores a shift common to the batch, so nothing anchors the raw scores: drifted together
    (here the QAM's last bias at +50), tanh saturates and the OCM gives every sample the same weight.
    Centred over the batch first, the same scores keep their differences and their order."""
    torch.manual_seed(0)
    qam = QualityAwarenessModule(2, in_channels=2, channels=(4, 8))
    image, label = torch.randn(6, 1, 32, 32), (torch.rand(6, 1, 32, 32) > 0.5).float()
    raw = qam(image, label).detach()
    assert float(raw.max() - raw.min()) > 1e-3
    with torch.no_grad():
        qam.features[-1].bias += 50.0
    plain, centred = QualityWeightedLoss(qam, 2.0), QualityWeightedLoss(qam, 2.0, centre=True)
    w_plain, w_centred = plain.weights(image, label).detach(), centred.weights(image, label).detach()
    assert float(w_plain.max() / w_plain.min()) < 1 + 1e-4  # saturated: uniform weights
    assert float(w_centred.max() / w_centred.min()) > 1 + 1e-3
    assert torch.equal(torch.argsort(w_centred), torch.argsort(raw))  # the QAM's order of quality is kept


def test_per_case_weighting_scores_and_weighs_whole_cases():
    """Patches of a case come in consecutive runs (MONAI's list collate of a multi-sample crop). Per case,
    the loss is taken over all the case's voxels (a patch with little foreground no longer decides its
    case's Dice), the case's score is the mean of its patches', and the softmax is over the cases."""
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 8, 8, 8)
    target = torch.zeros(4, 2, 8, 8, 8)
    target[0, :, 2:6, 2:6, 2:6] = 1  # case 0: a patch full of structure, and one that grazes it
    target[1, :, 7:, 7:, 7:] = 1
    target[2:, :, 1:7, 1:7, 1:7] = 1  # case 1: both patches well inside
    per_case = DeepSupervisionLoss(reduction="none", patches_per_case=2)(logits, target)
    whole_cases = [torch.cat([logits[i], logits[i + 1]], dim=-1) for i in (0, 2)]
    targets = [torch.cat([target[i], target[i + 1]], dim=-1) for i in (0, 2)]
    expected = DeepSupervisionLoss(reduction="none")(torch.stack(whole_cases), torch.stack(targets))
    assert torch.allclose(per_case, expected, atol=1e-6)
    per_patch = DeepSupervisionLoss(reduction="none")(logits, target)
    assert not torch.allclose(per_case, per_patch.reshape(2, 2).mean(1), atol=1e-3)  # not a mean of patches

    qam = QualityAwarenessModule(3, in_channels=3, channels=(4,))
    image = torch.randn(4, 1, 8, 8, 8)
    weighting = QualityWeightedLoss(qam, 2.0, patches_per_case=2)
    raw = qam(image, target).detach()
    expected_weights = torch.softmax(overfitting_control(raw.reshape(2, 2).mean(1), 2.0), dim=0)
    assert torch.allclose(weighting.weights(image, target).detach(), expected_weights, atol=1e-6)
    loss = weighting(per_case, image, target)
    assert torch.allclose(loss, (expected_weights * per_case).sum(), atol=1e-6)
    with pytest.raises(ValueError, match="one loss per case"):
        weighting(per_patch, image, target)
    with pytest.raises(ValueError, match="not whole cases"):
        DeepSupervisionLoss(reduction="none", patches_per_case=3)(logits, target)


def test_small_loss_weights_favour_low_losses_within_the_ocm_bound():
    """No QAM: the batch's own losses, standardised and bounded by lambda*tanh, rank the samples. The
    weights are detached, so each sample's gradient is its weight."""
    losses = torch.tensor([0.05, 0.2, 0.9, 0.1, 0.4], requires_grad=True)
    w = small_loss_weights(losses, 2.0)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and not w.requires_grad
    assert torch.equal(torch.argsort(w), torch.argsort(-losses.detach()))  # lower loss, more weight
    assert float(w.max() / w.min()) <= math.exp(4.0) + 1e-4
    (w * losses).sum().backward()
    assert torch.allclose(losses.grad, w)
    assert torch.allclose(small_loss_weights(torch.full((4,), 0.3)), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="ocm_lambda"):
        small_loss_weights(losses, 0.0)
