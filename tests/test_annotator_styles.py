"""Simulated annotator styles, and the review loop finding them: the ``ctv`` trainer with quality
weighting on a phantom datastore where half the labels were re-contoured the ways careless annotators
do (too wide, too tight, slices missing, shifted). The model's agreement with each label must score
every style lower (ROC AUC >= 0.8) and ``review`` must offer a restyled label first; the QAM must find
the under-contoured ones (eroded, or slices missing), the ones its volume-following score can see."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from ctv_datastore.build import build
from ctv_app.lib.metrics import roc_auc
from ctv_train.annotator_styles import STYLES, make_styled_datastore, restyle
from ctv_train.data import find_pairs

from .support import APP_DIR

EPOCHS = 30  # CI-sized: 6 mm voxels, filters 8-64
SHIPPED_MODEL = APP_DIR / "model" / "ctv.pt"  # tests serve a copy


def test_roc_auc():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 3], [2, 2]) == 0.5
    assert roc_auc([2], [2]) == 0.5
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([], [1.0])


def test_styles_change_the_label_the_way_they_say():
    label = np.zeros((40, 40, 20), np.uint8)
    label[10:30, 12:28, 4:16] = 1
    rng = np.random.default_rng(0)
    wide, info = restyle(label, "wide", rng)
    assert 2 <= info["voxels"] <= 4 and np.all(wide[label > 0] == 1) and wide.sum() > label.sum()
    assert not wide[..., :4].any() and not wide[..., 16:].any()  # grown within the slices only
    tight, info = restyle(label, "tight", rng)
    assert np.all(label[tight > 0] == 1) and 0 < tight.sum() < label.sum()
    assert tight[..., 4:16].any(axis=(0, 1)).all()
    missing, info = restyle(label, "missing_slices", rng)
    kept = missing.any(axis=(0, 1))
    assert kept.sum() == 12 - info["slices"] and 3 <= info["slices"] <= 6
    assert np.array_equal(missing[..., kept], label[..., kept])
    shifted, info = restyle(label, "shift", rng)
    dx, dy, dz = info["vector"]
    assert dz == 0 and abs(np.hypot(dx, dy) - info["voxels"]) <= 0.71 and 2 <= info["voxels"] <= 4
    assert np.array_equal(shifted, np.roll(label, (dx, dy), axis=(0, 1)))  # moved whole, nothing else
    with pytest.raises(ValueError, match="unknown annotator style"):
        restyle(label, "sloppy", rng)


def test_styled_datastore_restyles_the_requested_fraction(tmp_path):
    build(str(tmp_path / "clean"), [41, 42, 43, 44], labelled={41, 42, 43, 44})
    record = make_styled_datastore(str(tmp_path / "clean"), str(tmp_path / "styled"), 0.5, seed=1)
    styles = [r["style"] for r in record.values()]
    assert styles.count("true") == 2 and set(styles) - {"true"} <= set(STYLES)
    for pair in find_pairs(str(tmp_path / "styled")):
        truth = np.asarray(nib.load(str(tmp_path / "clean" / "labels" / "final" / (pair["id"] + ".nii.gz"))).dataobj)
        styled = np.asarray(nib.load(pair["label"]).dataobj)
        assert np.array_equal(styled, truth) == (record[pair["id"]]["style"] == "true")
        assert record[pair["id"]]["dice_to_truth"] < 0.95 or record[pair["id"]]["style"] == "true"


def test_styled_structure_sets_restyle_each_structure_and_keep_what_they_contain(tmp_path):
    """A datastore of recorded structure sets (real clinical sets, e.g. OpenKBP's) is restyled structure by
    structure: an untouched label keeps its bitmask, a wide one grows every structure it contains, a tight
    one shrinks every one, a shifted one moves them all by one vector, overlaps stay possible, and the styled copy records the same (partial) structures."""
    from ctv_app.lib.datastore import CTVDatastore
    from ctv_app.lib.structures import Structures, voxels_of
    from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY

    seeds = [41, 42, 43, 44, 45, 46, 47, 48]
    build(str(tmp_path / "clean"), seeds, labelled=set())
    structures = Structures(["CTV", "Bladder", "Rectum"])
    store = CTVDatastore(str(tmp_path / "clean"), structures, auto_reload=False)
    for seed in seeds:
        image = nib.load(str(tmp_path / "clean" / f"phantom_{seed:05d}.nii.gz"))
        bitmask = np.zeros(image.shape, np.uint8)
        bitmask[30:60, 30:60, 20:40] |= 1  # CTV
        bitmask[50:80, 40:70, 25:45] |= 2  # Bladder, overlapping the CTV
        contains = {"CTV": 1, "Bladder": 2}
        if seed % 2:  # every other set also draws a Rectum; the others did not contour it
            bitmask[40:50, 70:80, 10:50] |= 4
            contains["Rectum"] = 3
        label = tmp_path / f"{seed}.nii.gz"
        nib.save(nib.Nifti1Image(bitmask, image.affine), str(label))
        store.save_label(f"phantom_{seed:05d}", str(label), "final", {"encoding": "bitmask", "label_names": contains})

    record = make_styled_datastore(str(tmp_path / "clean"), str(tmp_path / "styled"), 0.5, seed=3, margin=(1, 2))
    assert sorted(r["style"] for r in record.values()) == sorted(["true"] * 4 + list(STYLES))
    clean = {p["id"]: p for p in find_pairs(str(tmp_path / "clean"))}
    for pair in find_pairs(str(tmp_path / "styled")):
        truth_pair, style = clean[pair["id"]], record[pair["id"]]["style"]
        assert pair[STRUCTURES_KEY] == truth_pair[STRUCTURES_KEY] and pair[ENCODING_KEY] == "bitmask"
        styled, truth = (np.asarray(nib.load(p["label"]).dataobj) for p in (pair, truth_pair))
        assert np.array_equal(styled, truth) == (style == "true")
        for name, value in pair[STRUCTURES_KEY].items():
            got, want = voxels_of(styled, value, "bitmask"), voxels_of(truth, value, "bitmask")
            if style == "wide":
                assert got[want].all() and got.sum() > want.sum(), name
            elif style == "tight":
                assert not got[~want].any() and 0 < got.sum() < want.sum(), name
            elif style == "missing_slices":
                kept = got.any(axis=(0, 1))
                assert np.array_equal(got[..., kept], want[..., kept]) and kept.sum() < want.any(axis=(0, 1)).sum()
            elif style == "shift":  # one vector for the whole structure set: the annotator's, not the organ's
                vector = record[pair["id"]]["structures"][name]["vector"]
                assert vector == record[pair["id"]]["structures"]["CTV"]["vector"] and any(vector), name
                assert np.array_equal(got, np.roll(want, vector[:2], axis=(0, 1))), name
        if style == "wide":  # grown structures overlap more, both bits kept
            assert ((styled & 3) == 3).sum() > ((truth & 3) == 3).sum()
        assert 0 < record[pair["id"]]["dice_to_truth"] <= 1


def test_review_finds_restyled_labels(tmp_path):
    from ctv_app.lib.datastore import CTVDatastore
    from ctv_app.lib.checkpoint import read_params
    from ctv_app.lib.structures import CERVIX
    from ctv_app.lib.infers.ctv import CTVInfer
    from ctv_app.lib.networks import network_for
    from ctv_app.lib.params import CTVParams
    from ctv_app.lib.review import LabelAgreementScoring, LabelQualityScoring, Review
    from ctv_app.lib.trainers.ctv import CTVTrain

    seeds = list(range(5000, 5012))
    build(str(tmp_path / "clean"), seeds, labelled=set(seeds))
    record = make_styled_datastore(str(tmp_path / "clean"), str(tmp_path / "studies"), 0.5, 0, STYLES)
    # The cervix datastore of the model's structures: its labels, saved without a structure record, are
    # label maps in the model's values.
    store = CTVDatastore(str(tmp_path / "studies"), structures=CERVIX, auto_reload=False)

    def auc(scores: dict, styles) -> float:
        true = [s for i, s in scores.items() if record[i]["style"] == "true"]
        return roc_auc(true, [s for i, s in scores.items() if record[i]["style"] in styles])

    # Agreement needs a model that contours these structures well: the shipped phantom weights (a copy).
    shipped = tmp_path / "shipped" / "ctv.pt"
    shipped.parent.mkdir()
    shutil.copy(SHIPPED_MODEL, shipped)
    params = read_params(str(shipped))
    infer = CTVInfer(path=str(shipped), network=network_for(params), params=params, preload=True)
    agreement = LabelAgreementScoring(infer)
    scores = agreement({}, store)["scores"]
    report = {i: (record[i]["style"], round(s, 3)) for i, s in scores.items()}
    assert set(scores) == {f"phantom_{s:05d}" for s in seeds}
    for style in STYLES:  # over-contouring and shifts too, which the QAM misses
        assert auc(scores, {style}) >= 0.8, (style, report)
    stored = store.get_label_info("phantom_05001", "final")["label_agreement"]
    assert stored["score"] == scores["phantom_05001"] and stored["model"] == infer.model_record()["sha256"]
    assert "CTV" in stored["structures"] and set(stored["structures"]) <= set(CERVIX)
    assert all(0 <= f["surface_dice_voxel"] <= 1 and f["label_ml"] > 0 for f in stored["structures"].values())
    chosen = Review(agreement)({}, store)
    assert chosen["method"] == "label_agreement" and record[chosen["id"]]["style"] != "true"
    assert chosen["score"] == min(scores.values()) and chosen["scored"] == 12
    assert chosen["median_score"] == pytest.approx(float(np.median(list(scores.values()))))

    # The QAM of a model trained with quality weighting on these labels.
    params = CTVParams(filters=(8, 16, 32, 64), patch_size=(32, 32, 32), target_spacing=(6, 6, 6))
    served = tmp_path / "model" / "ctv.pt"
    request = {"max_epochs": EPOCHS, "train_batch_size": 4, "patches_per_volume": 2, "val_split": 0.2}
    request.update({"quality_weighting": True, "pretrained": False, "learning_rate": 3e-3, "multi_gpu": False})
    CTVTrain(served_path=str(served), params=params)(request, store)
    infer = CTVInfer(path=str(served), network=network_for(params), params=params, preload=True)
    scores = LabelQualityScoring(infer)({}, store)["scores"]
    report = {i: (record[i]["style"], round(s, 4)) for i, s in scores.items()}
    assert auc(scores, {"tight", "missing_slices"}) >= 0.8, report
    assert record[Review(LabelQualityScoring(infer))({}, store)["id"]]["style"] in ("tight", "missing_slices")

