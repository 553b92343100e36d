"""Structure sets: the one description of a structure, its encodings, and partial labels in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctv_app.lib.losses import UNCONTOURED, DeepSupervisionLoss
from ctv_app.lib.params import CTVParams
from ctv_app.lib.structures import CATALOGUE, CERVIX, Structure, Structures, decode_label, find_structure


@pytest.mark.parametrize(
    "spelled, meant",
    [
        ("CTV", "CTV"), ("CTV_45", "CTV"), ("CTV1", "CTV"), ("CTVp", "CTV"), ("CTV_45Gy", "CTV"), ("ctv high", "CTV"),
        ("BLADDER", "Bladder"), ("Urinary Bladder", "Bladder"), ("RECTUM", "Rectum"), ("Sigmoid", "Colon_Sigmoid"),
        ("Bowel Bag", "Bag_Bowel"), ("Femoral Head R", "Femur_Head_R"), ("FemurHead_L", "Femur_Head_L"),
        ("femoral-head-left", "Femur_Head_L"), ("PTV70", "PTV_7000"), ("LeftParotid", "Parotid_L"),
        ("Mandible", "Bone_Mandible"), ("SpinalCord", "SpinalCord"),
    ],
)  # fmt: skip
def test_clinical_roi_names_mean_their_tg263_structure(spelled, meant):
    assert find_structure(spelled).name == meant


@pytest.mark.parametrize("spelled", ["CTVn", "CTV_Nodes", "PTV", "Bladder_Wall_Ring", "Femur_Head", "BODY", ""])
def test_names_that_mean_no_known_structure_are_not_guessed(spelled):
    assert find_structure(spelled) is None


def test_a_model_finds_only_its_own_structures_and_names_the_unknown():
    model = Structures(["CTV", "Bladder"])
    assert model.find("BLADDER").name == "Bladder" and model.find("Rectum") is None
    assert [s.name for s in model.subset(["bladder", "CTV_45"])] == ["CTV", "Bladder"]  # the model's order
    with pytest.raises(ValueError, match="Rectum.*contours"):
        model.subset(["Rectum"])
    with pytest.raises(ValueError, match="unknown structure 'Liver_Left'"):
        Structures(["CTV", "Liver_Left"])
    with pytest.raises(ValueError, match="unique"):
        Structures(["CTV", "CTV_45"])


def test_a_structure_description_is_validated():
    with pytest.raises(ValueError, match="TG-263"):
        Structure("CTV 45 Gy", "CTV", (1, 2, 3))
    with pytest.raises(ValueError, match="roi_type"):
        Structure("X", "TARGET", (1, 2, 3))
    with pytest.raises(ValueError, match="colour"):
        Structure("X", "ORGAN", (1, 2, 300))
    with pytest.raises(ValueError, match="rule"):
        Structure("X", "ORGAN", (1, 2, 3), rule="biggest")


def test_bitmask_keeps_overlaps_and_the_label_map_gives_the_first_listed():
    model = Structures(CERVIX)
    rng = np.random.default_rng(0)
    masks = [rng.random((9, 8, 7)) < 0.4 for _ in model]
    bitmask = model.pack(masks)
    assert bitmask.dtype == np.uint8 and len(model) == 7
    for structure, mask in zip(model, masks):
        assert np.array_equal(model.mask(bitmask, structure.name), mask)
    labelmap = model.labelmap(bitmask)
    first = np.zeros(bitmask.shape, dtype=np.uint8)
    for value in range(len(model), 0, -1):
        first[masks[value - 1]] = value
    assert np.array_equal(labelmap, first)
    assert (np.sum(masks, axis=0) > 1).any()  # the test has overlaps to lose in the label map
    assert Structures(list(CATALOGUE)[:17]).bitmask_dtype == np.uint32


def test_decode_label_contains_only_what_the_label_names():
    model = Structures(["CTV", "Bladder", "Rectum"])
    labelmap = np.array([[[0, 1, 2, 3]]])
    # recorded: a viewer's label map in its own values, containing CTV and Bladder only
    channels, contained = decode_label(np.array([[[0, 5, 9, 0]]]), model, "labelmap", {"CTV": 5, "Bladder": 9})
    assert contained.tolist() == [True, True, False]
    assert channels[:, 0, 0].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    # a bitmask with an overlap: CTV (bit 0) and Rectum (bit 2) share the last voxel
    channels, contained = decode_label(np.array([[[0, 1, 4, 5]]]), model, "bitmask", {"CTV": 1, "Rectum": 3})
    assert contained.tolist() == [True, False, True]
    assert channels[0, 0, 0].tolist() == [0, 1, 0, 1] and channels[2, 0, 0].tolist() == [0, 0, 1, 1]
    # a label saved before structures were recorded: the model's values, containing those present
    channels, contained = decode_label(labelmap[..., :2], model)
    assert contained.tolist() == [True, False, False]


def test_single_structure_checkpoint_parameters_still_load():
    legacy = {k: v for k, v in CTVParams().to_dict().items() if k != "structures"} | {"labels": {"CTV": 1}}
    params = CTVParams.from_dict(legacy)
    assert params.labels == {"CTV": 1}
    assert params.structure_list[0] == CATALOGUE["CTV"]
    assert CTVParams.from_dict(params.to_dict()) == params  # stored as full descriptions, read back equal


def test_loss_leaves_out_an_uncontoured_structure_and_does_not_teach_it_as_background():
    """The gradient reaching an uncontoured channel is exactly zero; marking the same channel as contoured
    but empty (what a naive trainer does) pushes it towards background."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    target[0, 2] = UNCONTOURED  # case 0 has no Rectum contour
    for loss_name in ("dice_bce", "bce"):
        logits.grad = None
        DeepSupervisionLoss(loss_name)(logits, target).backward()
        assert torch.count_nonzero(logits.grad[0, 2]) == 0
        assert torch.count_nonzero(logits.grad[0, :2]) > 0 and torch.count_nonzero(logits.grad[1, 2]) > 0
    naive = target.clone()
    naive[0, 2] = 0.0
    logits.grad = None
    DeepSupervisionLoss()(logits, naive).backward()
    assert torch.count_nonzero(logits.grad[0, 2]) > 0
    # a case that contains nothing adds nothing; per-case losses for the quality-aware trainer
    target[1] = UNCONTOURED
    per_case = DeepSupervisionLoss(reduction="none")(logits, target)
    assert per_case.shape == (2,) and per_case[1] == 0


def test_loss_on_one_structure_is_the_monai_dice_plus_bce():
    from monai.losses import DiceLoss

    torch.manual_seed(1)
    logits = torch.randn(2, 1, 6, 6, 6)
    target = (torch.rand(2, 1, 6, 6, 6) > 0.6).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + DiceLoss(sigmoid=True)(
        logits, target
    )
    assert torch.allclose(DeepSupervisionLoss()(logits, target), expected, atol=1e-6)


def test_a_single_structure_checkpoint_serves_and_other_structures_are_refused(tmp_path):
    """Checkpoints from before structure sets (``labels: {"CTV": 1}``) load and serve; a server never swaps
    in, nor starts with, weights of other structures than those asked for."""
    from ctv_app.lib.checkpoint import save_checkpoint
    from ctv_app.lib.configs.ctv import CTVConfig
    from ctv_app.lib.networks import network_for
    from ctv_datastore.phantom import make_phantom, save_nifti
    from ctv_train.evaluate import served_infer_task

    import nibabel as nib

    single = CTVParams(structures=["CTV"], filters=(8, 16, 32), patch_size=(32, 32, 32))
    legacy = {k: v for k, v in single.to_dict().items() if k != "structures"} | {"labels": {"CTV": 1}}
    model = tmp_path / "ctv.pt"
    torch.save({"model": network_for(single).state_dict(), "params": legacy, "meta": {}}, model)
    image = str(tmp_path / "ct.nii.gz")
    save_nifti(make_phantom(5), image)

    task = served_infer_task(str(model))
    result_path, result = task({"image": image, "device": "cpu"})
    assert result["label_names"] == {"CTV": 1} and [s["name"] for s in result["structures"]] == ["CTV"]
    assert set(np.unique(np.asarray(nib.load(result_path).dataobj))) <= {0, 1}

    several = CTVParams(structures=["CTV", "Bladder"], filters=(8, 16, 32), patch_size=(32, 32, 32))
    other = tmp_path / "other.pt"
    save_checkpoint(str(other), network_for(several).state_dict(), several, {})
    with pytest.raises(ValueError, match=r"it contours \['CTV', 'Bladder'\], this server serves \['CTV'\]"):
        task.check_weights(str(other))
    config = CTVConfig()
    with pytest.raises(ValueError, match="ctv_structures asks for"):
        config.init("ctv", str(tmp_path), {"ctv_model": str(model), "ctv_structures": '["CTV","Bladder"]'}, None)
