"""In-process checks of the pieces the server is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctv_app.lib.checkpoint import load_checkpoint, read_params, save_checkpoint
from ctv_app.lib.errors import InvalidInputError
from ctv_app.lib.losses import DeepSupervisionLoss
from ctv_app.lib.networks import IterativeRefinementNet, SEResDynUNet, build_network
from ctv_app.lib.params import CTVParams
from ctv_app.lib.transforms import RestoreGeometry, ValidateCT
from ctv_datastore.phantom import make_phantom


def test_deep_supervision_heads_only_in_training_mode():
    net = build_network((8, 16, 32, 64), deep_supr_num=2)
    x = torch.randn(2, 1, 32, 32, 16)
    net.train()
    assert net(x).shape == (2, 3, 1, 32, 32, 16)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 1, 32, 32, 16)


def test_network_has_squeeze_excitation_in_residual_blocks():
    net = build_network((8, 16, 32, 64))
    names = [n for n, _ in net.named_modules()]
    assert any(n.endswith(".se") for n in names) and any("conv3" in n for n in names)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(filters=(8, 16, 32)), "one entry per level"),
        (dict(filters=(8, 16, 0, 64)), "positive"),
        (dict(deep_supr_num=3), "deep_supr_num"),
        (dict(se_reduction=0), "se_reduction"),
        (dict(in_channels=0), "in_channels"),
    ],
)
def test_network_rejects_bad_arguments(kwargs, words):
    args = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        kernel_size=[3] * 4,
        strides=[1, 2, 2, 2],
        filters=(8, 16, 32, 64),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        SEResDynUNet(**args)


def test_iterative_refinement_feeds_its_own_mask_back():
    net = build_network((8, 16, 32), refinement_passes=3, deep_supr_num=1)
    assert isinstance(net, IterativeRefinementNet) and net.net.in_channels == 2
    seen = []
    net.net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0][:, 1].clone()))
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 16, 16))
    assert len(seen) == 3
    assert torch.count_nonzero(seen[0]) == 0  # first pass starts from an all-zero mask
    assert torch.count_nonzero(seen[1]) > 0
    with pytest.raises(ValueError, match="passes"):
        IterativeRefinementNet(net.net, 1, 1, passes=0)


def test_loss_weights_heads_and_can_give_per_sample_values():
    target = torch.zeros(2, 1, 16, 16, 16)
    target[:, :, 4:12, 4:12, 4:12] = 1
    good = (target * 20 - 10)[:, None].repeat(1, 3, 1, 1, 1, 1)
    bad = -good
    loss = DeepSupervisionLoss()
    assert float(loss(good, target)) < 0.05 < float(loss(bad, target))
    per_sample = DeepSupervisionLoss(reduction="none")(torch.cat([good[:1], bad[1:]]), target)
    assert per_sample.shape == (2,) and per_sample[0] < per_sample[1]


def test_phantom_is_deterministic_and_label_follows_anatomy():
    a, b = make_phantom(42), make_phantom(42)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, make_phantom(43).label)
    assert a.label.sum() > 500
    inside = a.image[a.label > 0]
    assert -150 < np.median(inside) < 120  # soft tissue and parametrial fat, no bone or air
    assert a.image.min() <= -900 and a.image.max() >= 500


def test_restore_geometry_inverts_an_oblique_flipped_grid_exactly():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    dst_affine = np.eye(4)
    dst_affine[:3, :3] = rot @ np.diag([0.8, 1.1, 2.5])
    dst_affine[:3, 3] = [12.0, -40.0, 7.0]
    dst_shape = (37, 29, 11)
    # Identity mapping (source grid == destination grid) must reproduce the input bit for bit.
    x = torch.rand(1, *dst_shape)
    out = RestoreGeometry()(x, dst_affine, dst_affine, dst_shape)
    assert out.shape[1:] == dst_shape
    assert torch.allclose(out.as_tensor(), x, atol=1e-5)
    assert np.allclose(np.asarray(out.affine), dst_affine)


def test_validate_ct_rejects_non_ct():
    ok = MetaTensor(torch.full((1, 16, 16, 8), -1000.0), affine=torch.eye(4))
    ok[0, 4:12, 4:12] = 40.0
    assert ValidateCT()(ok) is ok
    with pytest.raises(InvalidInputError, match="does not look like CT"):
        ValidateCT()(MetaTensor(torch.rand(1, 16, 16, 8) * 255, affine=torch.eye(4)))
    with pytest.raises(InvalidInputError, match="NaN"):
        bad = ok.clone()
        bad[0, 0, 0, 0] = float("nan")
        ValidateCT()(bad)
    with pytest.raises(InvalidInputError, match="at least"):
        ValidateCT()(MetaTensor(torch.full((1, 16, 16, 2), -1000.0), affine=torch.eye(4)))


def test_params_validate_and_round_trip_through_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        CTVParams(patch_size=(50, 48, 40))
    with pytest.raises(ValueError, match="unknown"):
        CTVParams.from_dict({"spacing": 3})
    params = CTVParams.from_conf({"ctv_flip_tta": "true", "ctv_window": "[-200, 300]", "models": "ctv"})
    assert params.flip_tta is True and params.window == (-200.0, 300.0)
    path = tmp_path / "m.pt"
    net = build_network(params.filters)
    digest = save_checkpoint(str(path), net.state_dict(), params, {"epoch": 3})
    assert len(digest) == 64
    assert read_params(str(path)) == params
    assert load_checkpoint(str(path))["meta"]["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def _blobs(shape=(40, 36, 30), seed=0) -> torch.Tensor:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return torch.as_tensor((noise > 0.08)[None], dtype=torch.float32)


def test_clean_mask_matches_monai_largest_component_and_fill_holes():
    from monai.transforms import FillHoles, KeepLargestConnectedComponent

    from ctv_app.lib.transforms import CleanMask

    for seed in range(3):
        mask = _blobs(seed=seed)
        mask[0, 10:20, 10:20, 10:20] = 1
        mask[0, 13:16, 13:16, 13:16] = 0  # an enclosed hole
        expected = FillHoles(applied_labels=[1])(
            KeepLargestConnectedComponent(applied_labels=[1], connectivity=1)(mask)
        )
        got = CleanMask()(mask)
        assert torch.equal(torch.as_tensor(got) > 0, torch.as_tensor(expected) > 0)
        assert int(torch.as_tensor(got)[0, 14, 14, 14]) == 1
    assert CleanMask()(torch.zeros(1, 8, 8, 8)).sum() == 0


def test_restore_with_floor_gives_the_same_mask_as_a_full_resample():
    src_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    dst_affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    dst_affine[:3, 3] = [100.0, 90.0, -5.0]
    prob = torch.zeros(1, 50, 45, 40)
    prob[0, 20:30, 18:27, 15:22] = 0.9
    prob[0, 25, 22, 18] = 0.4
    dst_shape = (200, 180, 50)
    full = RestoreGeometry()(prob, src_affine, dst_affine, dst_shape)
    cropped = RestoreGeometry(floor=0.25)(prob, src_affine, dst_affine, dst_shape)
    assert (full > 0.5).sum() > 1000
    assert torch.equal(full.as_tensor() > 0.5, cropped.as_tensor() > 0.5)
    empty = RestoreGeometry(floor=0.25)(torch.zeros(1, 8, 8, 8), src_affine, dst_affine, dst_shape)
    assert empty.shape == (1, *dst_shape) and empty.sum() == 0
