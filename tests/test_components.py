"""In-process checks of the pieces the server is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctv_app.lib.checkpoint import load_checkpoint, read_params, save_checkpoint
from ctv_app.lib.errors import InvalidInputError
from ctv_app.lib.losses import UNCONTOURED, DeepSupervisionLoss
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
    assert a.mask("CTV").sum() > 500
    inside = a.image[a.mask("CTV")]
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

    from ctv_app.lib.transforms import clean_mask

    for seed in range(3):
        mask = _blobs(seed=seed)
        mask[0, 10:20, 10:20, 10:20] = 1
        mask[0, 13:16, 13:16, 13:16] = 0  # an enclosed hole
        expected = FillHoles(applied_labels=[1])(
            KeepLargestConnectedComponent(applied_labels=[1], connectivity=1)(mask)
        )
        got = clean_mask(mask[0].numpy() > 0, "largest")
        assert np.array_equal(got, np.asarray(expected[0]) > 0)
        assert got[14, 14, 14]
        # "all" keeps every component (nodal targets), holes filled
        kept = clean_mask(mask[0].numpy() > 0, "all")
        assert np.array_equal(kept, np.asarray(FillHoles(applied_labels=[1])(mask)[0]) > 0)
    two = np.zeros((12, 12, 12), dtype=bool)
    two[1:4, 1:4, 1:4] = two[6:10, 6:10, 6:10] = True
    assert clean_mask(two, "all").sum() == 27 + 64 and clean_mask(two, "largest").sum() == 64
    assert not clean_mask(np.zeros((8, 8, 8), dtype=bool)).any()


def test_restore_with_floor_gives_the_same_mask_as_a_full_resample():
    src_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    dst_affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    dst_affine[:3, 3] = [100.0, 90.0, -5.0]
    prob = torch.zeros(1, 50, 45, 40)
    prob[0, 20:30, 18:27, 15:22] = 0.9
    prob[0, 25, 22, 18] = 0.4
    # Stray regions, one box each: far away, at the destination's edge, and one whose box overlaps the blob's.
    prob[0, 2:4, 2:5, 30:33] = 0.8
    prob[0, 25, 10, 10] = 0.6
    prob[0, 22, 16, 23] = 0.3
    dst_shape = (200, 180, 50)
    full = RestoreGeometry()(prob, src_affine, dst_affine, dst_shape)
    restore = RestoreGeometry(floor=0.25)
    cropped = restore(prob, src_affine, dst_affine, dst_shape)
    assert (full > 0.5).sum() > 1000
    assert torch.equal(full.as_tensor() > 0.5, cropped.as_tensor() > 0.5)
    boxes = restore.boxes(prob, src_affine, dst_affine, dst_shape)
    assert len(boxes) == 4 and sum(np.prod([s.stop - s.start for s in box]) for box in boxes) < full.numel() / 20
    # Past MAX_BOXES regions, one box around them all.
    prob[0, 0:26:2, 0:22:2, 2] = 0.7  # 143 separate specks
    full = RestoreGeometry()(prob, src_affine, dst_affine, dst_shape)
    assert len(restore.boxes(prob, src_affine, dst_affine, dst_shape)) == 1
    assert torch.equal(full.as_tensor() > 0.5, restore(prob, src_affine, dst_affine, dst_shape).as_tensor() > 0.5)
    # Resampled in slabs (bounded memory): the same values.
    slabbed = RestoreGeometry()
    slabbed.SLAB_VOXELS = 5000
    slabs = [box for box, _ in slabbed.pieces(prob, src_affine, dst_affine, dst_shape)]
    assert len(slabs) == 50 and all(box[2].stop - box[2].start == 1 for box in slabs)  # across z, growing least
    np.testing.assert_allclose(slabbed(prob, src_affine, dst_affine, dst_shape).numpy(), full.numpy(), atol=1e-6)
    empty = RestoreGeometry(floor=0.25)(torch.zeros(1, 8, 8, 8), src_affine, dst_affine, dst_shape)
    assert empty.shape == (1, *dst_shape) and empty.sum() == 0


def test_ablation_variants_differ_only_in_their_blocks():
    from ctv_app.lib.networks import ARCHITECTURES, network_for
    from ctv_app.lib.params import ARCHITECTURE_NAMES

    assert set(ARCHITECTURES) == set(ARCHITECTURE_NAMES)
    x = torch.randn(1, 1, 32, 32, 32)
    modules = {}
    for name in ARCHITECTURE_NAMES:
        net = network_for(CTVParams(architecture=name, filters=(8, 16, 32, 64), patch_size=(32, 32, 32))).eval()
        with torch.no_grad():
            assert net(x).shape == (1, len(CTVParams().structures), 32, 32, 32)  # one channel per structure
        modules[name] = [n for n, _ in net.named_modules()]
    assert not any("conv3" in n or n.endswith(".se") for n in modules["unet"])  # no residual path, no SE
    assert any("conv3" in n for n in modules["resunet"]) and not any(n.endswith(".se") for n in modules["resunet"])
    assert any(n.endswith(".se") for n in modules["se_resunet"])
    assert any("convInit" in n for n in modules["segresnet"])  # MONAI's SegResNet, the named peer
    with pytest.raises(ValueError, match="doubles"):
        network_for(CTVParams(architecture="segresnet", filters=(8, 16, 24)))
    with pytest.raises(ValueError, match="architecture"):
        CTVParams(architecture="vnet")


def test_bce_only_loss_differs_from_dice_bce_and_names_are_checked():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    logits = torch.zeros(1, 1, 8, 8, 8)
    bce = float(DeepSupervisionLoss("bce")(logits, target))
    assert bce == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target)))
    assert float(DeepSupervisionLoss("dice_bce")(logits, target)) > bce + 0.3
    with pytest.raises(ValueError, match="loss"):
        DeepSupervisionLoss("focal")


def test_augmentation_settings_are_validated_and_merge_one_at_a_time():
    params = CTVParams().updated({"augment": {"elastic_prob": 0.5}})
    assert params.augment.elastic_prob == 0.5 and params.augment.rotate_deg == 10.0
    assert CTVParams.from_dict(params.to_dict()) == params  # survives the checkpoint round trip
    with pytest.raises(ValueError, match="probabilities"):
        CTVParams().updated({"augment": {"flip_prob": 1.5}})
    with pytest.raises(TypeError):
        CTVParams().updated({"augment": {"shear": 0.1}})


def test_train_transforms_give_several_augmented_patches_per_volume():
    from monai.transforms import Compose

    from ctv_app.lib.transforms import train_transforms

    params = CTVParams(
        structures=["CTV", "Bladder"],
        patch_size=(32, 32, 32),
        augment={"elastic_prob": 1.0, "affine_prob": 1.0, "noise_prob": 1.0},
    )
    image = torch.rand(1, 40, 40, 40)
    label = torch.zeros(2, 40, 40, 40)  # as pre_transforms decodes it: a channel per structure
    label[0, 15:25, 15:25, 15:25] = 1
    data = {"image": image, "label": label, "label_contained": np.array([True, False])}  # no Bladder contour
    patches = Compose(train_transforms(params, samples_per_volume=3))(data)
    assert len(patches) == 3
    for p in patches:
        assert p["image"].shape == (1, 32, 32, 32) and p["label"].shape == (2, 32, 32, 32)
        assert set(torch.unique(p["label"][0]).tolist()) <= {0.0, 1.0}  # nearest interpolation keeps labels binary
        assert (p["label"][1] == UNCONTOURED).all() and "label_contained" not in p
    assert not torch.equal(patches[0]["image"], patches[1]["image"])


def test_uncertainty_scores_rise_with_disagreement():
    from ctv_app.lib.activelearning import _disagreement_score, _entropy_score

    sure = torch.zeros(4, 1, 10, 10, 10)  # [samples, structures, ...]
    sure[:, :, 3:7, 3:7, 3:7] = 0.99
    unsure = sure.clone()
    unsure[1:, :, 3:7, 3:7, 3:7] = torch.rand(3, 1, 4, 4, 4) * 0.5 + 0.25
    assert _entropy_score(sure) < 0.1 < _entropy_score(unsure)
    assert _disagreement_score(sure) == 0.0 < _disagreement_score(unsure)
    nothing = torch.zeros(4, 1, 10, 10, 10)
    assert _entropy_score(nothing) == 1.0 and _disagreement_score(nothing) == 1.0
    # Two structures, each predicted surely in its own place: sure. (Averaging the two structures'
    # probabilities per voxel would read each region as p = 0.5, the most unsure there is.)
    two = torch.zeros(4, 2, 10, 10, 10)
    two[:, 0, 1:4, 1:4, 1:4] = 0.99
    two[:, 1, 6:9, 6:9, 6:9] = 0.99
    assert _entropy_score(two) < 0.1 and _disagreement_score(two) == 0.0
    # A structure predicted nowhere is left out, not counted as certain or as unsure.
    partly = torch.cat([unsure, torch.zeros(4, 1, 10, 10, 10)], dim=1)
    assert _entropy_score(partly) == pytest.approx(_entropy_score(unsure))


def test_datastore_refuses_bad_labels_and_keeps_every_version(tmp_path):
    import json

    import nibabel as nib

    from ctv_app.lib.datastore import CTVDatastore

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10), np.int16), affine), tmp_path / "case1.nii.gz")
    store = CTVDatastore(str(tmp_path), structures=["CTV"], auto_reload=False)

    def label(data, aff=affine, name="upload.nii.gz"):
        path = tmp_path / "uploads" / name
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, aff), path)
        return str(path)

    good = np.zeros((20, 20, 10), np.uint8)
    good[5:10, 5:10, 2:5] = 1
    bad = [
        (label(good, np.diag([2.0, 2.0, 2.0, 1.0]), name="grid.nii.gz"), "final", "grid"),
        (label(good * 7, name="seven.nii.gz"), "final", "values [7]"),
        (label(good.astype(np.float32) * 0.5, name="half.nii.gz"), "final", "integer"),
        (label(good, name="tag.nii.gz"), "../escape", "tag"),
    ]
    for path, tag, words in bad:
        with pytest.raises(InvalidInputError, match=words.replace("[", r"\[").replace("]", r"\]")):
            store.save_label("case1", path, tag, {})
    assert not (tmp_path / "labels" / "final" / "case1.nii.gz").exists()

    store.save_label("case1", label(good), "final", {"annotator": "dr_a"})
    good[5:10, 5:10, 5] = 1
    store.save_label("case1", label(good), "final", {"user": "dr_b"})
    info = store.get_label_info("case1", "final")
    assert info["annotator"] == "dr_b" and info["version"] == 2
    assert [v["annotator"] for v in store.label_history("case1", "final")] == ["dr_a", "dr_b"]
    saved = nib.load(tmp_path / "labels" / "final" / "case1.nii.gz").get_fdata()
    assert np.array_equal(saved, good)
    index = json.loads((tmp_path / "datastore_v2.json").read_text())
    assert index["objects"]["case1"]["labels"]["final"]["info"]["version"] == 2
    assert not [p for p in (tmp_path / "labels" / "final").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("flip_permute", [False, True])
def test_separable_restore_equals_grid_sampling(flip_permute):
    """The fast axis-aligned restore gives what MONAI's grid sampling gives (to float rounding)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from ctv_app.lib.transforms.geometry import _axis_aligned, separable_linear

    rng = np.random.default_rng(3)
    prob = torch.as_tensor(rng.random((1, 20, 18, 12)), dtype=torch.float32)
    src_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    src_affine[:3, 3] = [-40.0, -30.0, 10.0]
    dst_affine = np.diag([-0.98, -0.98, 3.0, 1.0])
    dst_affine[:3, 3] = [45.0, 40.0, 5.0]
    dst_shape = (90, 80, 18)
    if flip_permute:
        dst_affine = dst_affine @ np.eye(4)[[1, 0, 2, 3]]
        dst_affine[:3, 2] *= -1
        dst_shape = (80, 90, 18)
    index_map = np.linalg.inv(src_affine) @ dst_affine
    assert _axis_aligned(index_map)
    fast = separable_linear(prob, index_map, dst_shape)
    slow = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        MetaTensor(prob, affine=torch.as_tensor(src_affine)), dst_affine=torch.as_tensor(dst_affine), spatial_size=dst_shape
    )
    np.testing.assert_allclose(fast.numpy(), slow.as_tensor().numpy(), atol=1e-4)
    assert int(((fast > 0.5) != (slow.as_tensor() > 0.5)).sum()) <= 2  # only exact ties may differ


def test_served_post_processing_keeps_a_mask_forced_everywhere_inside_the_body(tmp_path):
    """The model says "CTV" in every voxel, the air around the patient included: the result keeps the
    body (with its internal gas) and nothing in the air outside it."""
    from monai.transforms import Compose
    from scipy import ndimage

    from ctv_app.lib.transforms import post_transforms, pre_transforms
    from ctv_datastore.phantom import save_nifti

    phantom = make_phantom(31)
    path = str(tmp_path / "ct.nii.gz")
    save_nifti(phantom, path)
    params = CTVParams()
    data = Compose(pre_transforms(params, keep_input=True))({"image": path})
    # logits: every structure everywhere on the model's grid
    data["pred"] = torch.full((len(params.structures), *data["image"].shape[1:]), 10.0)
    mask = np.asarray(Compose(post_transforms(params))(data)["pred"]) > 0

    air = phantom.image < -500
    labels, _ = ndimage.label(air)
    outside = np.isin(labels, np.unique(labels[0, 0, :]))  # the air joined to the corners' column
    internal_gas = air & ~outside
    assert outside.sum() > 1000 and internal_gas.sum() > 10  # the phantom has both (rectal gas)
    assert not mask[outside].any()
    middle = slice(2, -2)  # the restored volume's outermost voxels interpolate against zero padding
    assert mask[middle, middle, middle][internal_gas[middle, middle, middle]].all()
    assert mask[middle, middle, middle][~air[middle, middle, middle]].all()


def test_body_mask_cuts_a_thin_bridge_and_low_density_haze_and_keeps_lungs_and_gas():
    """The known defect on the Visible Human neck: the body took in low-density material touching the
    patient (-315 to -565 HU, outside the clinical BODY) and the model drew on it. Here a synthetic
    patient (1 mm pixels, 3 mm slices) has such a haze beside it and a 3 mm strip of -200 HU (a pad or
    mask) running 30 mm down to a couch block: neither the haze nor the strip's far part nor the couch
    is body; the lungs and bowel gas inside it are."""
    from ctv_app.lib.transforms.postprocessing import axial_axis, patient_body

    x, y = np.meshgrid(np.arange(200), np.arange(160), indexing="ij")
    patient = ((x - 100) / 60) ** 2 + ((y - 70) / 40) ** 2 <= 1  # skin at y = 110 below the centre
    lungs = (((abs(x - 100) - 25) / 15) ** 2 + ((y - 70) / 12) ** 2) <= 1
    gas = (x - 100) ** 2 + (y - 95) ** 2 <= 25
    haze = (x >= 25) & (x < 45) & (y >= 60) & (y < 80) & ~patient  # against the left side
    strip = (x >= 99) & (x < 102) & (y >= 100) & (y < 140) & ~patient
    couch = (x >= 30) & (x < 170) & (y >= 140) & (y < 155)
    hu = np.full((200, 160), -1000.0)
    hu[patient | couch] = 40.0
    hu[haze], hu[strip], hu[lungs] = -450.0, -200.0, -800.0
    hu[gas] = -1000.0
    volume = np.repeat(hu[..., None], 8, axis=2)

    body = patient_body(volume, axis=2, reach=slice(0, 8), spacing=(1.0, 1.0, 3.0))
    assert body[patient].all()  # lungs and bowel gas included
    assert not body[haze].any() and not body[couch].any()
    assert not body[strip & (y >= 115)].any()  # cut within 5 mm of the skin

    phantom = make_phantom(9101)  # the structures of the synthetic pelvis all lie inside its body
    hu, axis = phantom.image.astype(np.float32), axial_axis(phantom.affine)
    spacing = tuple(np.linalg.norm(phantom.affine[:3, :3], axis=0))
    body = patient_body(hu, axis, slice(0, hu.shape[axis]), spacing)
    assert body[phantom.label > 0].all() and body[hu > -100].all()


@pytest.mark.parametrize(
    "spacing, axis, radius_mm",
    [((0.977, 0.977, 3.0), 2, 3.0), ((3.9, 3.9, 2.5), 2, 3.0), ((1.0, 3.0, 0.7), 1, 5.0), ((0.5, 0.8, 2.0), 2, 6.0),
     ((2.0, 0.3, 0.3), 0, 4.0)],
)  # fmt: skip
def test_in_plane_morphology_is_scipys_to_the_voxel(spacing, axis, radius_mm):
    """The body's erosion and dilation by a disk (rectangles, segments of doubling runs) against scipy's
    ``binary_erosion`` / ``binary_dilation`` with the same disk and iterations, borders included."""
    from scipy import ndimage

    from ctv_app.lib.transforms.postprocessing import in_plane_disk, in_plane_morphology

    rng = np.random.default_rng(int(radius_mm * 10))
    mask = ndimage.binary_opening(rng.random((61, 50, 37)) > 0.3)
    mask[:, :, :3] = True  # tissue at the array's edge: the border counts as outside
    disk, times = in_plane_disk(spacing, axis, radius_mm)
    for iterations in (times, 2 * times):
        assert np.array_equal(in_plane_morphology(mask, disk, iterations, erode=True),
                              ndimage.binary_erosion(mask, disk, iterations=iterations))  # fmt: skip
        assert np.array_equal(in_plane_morphology(mask, disk, iterations, erode=False),
                              ndimage.binary_dilation(mask, disk, iterations=iterations))  # fmt: skip


def test_checkpoints_hold_only_what_the_safe_loader_reads(tmp_path):
    """Issue 16 item 8: a checkpoint that ``torch.load(weights_only=True)`` refuses is never written, and the
    shipped demo weights load that way."""
    params = CTVParams()
    path = tmp_path / "m.pt"
    state = build_network(params.filters).state_dict()
    save_checkpoint(str(path), state, params, {"epoch": 1})
    with pytest.raises(ValueError, match="numpy"):
        save_checkpoint(str(path), state, params, {"epoch": 2, "val_dice": np.float64(0.9)})
    assert load_checkpoint(str(path))["meta"]["epoch"] == 1  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    from .support import APP_DIR

    assert load_checkpoint(str(APP_DIR / "model" / "ctv.pt"))["model"]


def test_a_checkpoint_swapped_in_brings_its_parameters_and_keeps_the_conf_overrides(tmp_path):
    """Issue 16 item 3: a new file at the served path is served with its own parameters, with ``--conf`` on top,
    by every stage of the pipeline, and its provenance names exactly those."""
    from monai.transforms import ScaleIntensityRanged, Spacingd

    from ctv_train.evaluate import served_infer_task

    from .support import APP_DIR

    shipped = load_checkpoint(str(APP_DIR / "model" / "ctv.pt"))
    model = tmp_path / "ctv.pt"
    save_checkpoint(str(model), shipped["model"], CTVParams.from_dict(shipped["params"]), shipped["meta"])
    task = served_infer_task(str(model), {"ctv_threshold": "0.3"})
    swapped = {**shipped["params"], "target_spacing": [5.0, 5.0, 5.0], "window": [-100.0, 200.0], "threshold": 0.6}
    save_checkpoint(str(model), shipped["model"], CTVParams.from_dict(swapped), shipped["meta"])

    chain = task.pre_transforms()
    assert next(t for t in chain if isinstance(t, Spacingd)).spacing_transform.pixdim.tolist() == [5.0, 5.0, 5.0]
    window = next(t for t in chain if isinstance(t, ScaleIntensityRanged)).scaler
    assert (window.a_min, window.a_max) == (-100.0, 200.0)
    served = CTVParams.from_dict(task.model_record()["params"])
    assert served == CTVParams.from_dict(swapped).updated({"threshold": 0.3})
