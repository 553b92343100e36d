"""Real head-and-neck plans (OpenKBP, ``../shared/data/openkbp``, read in place): the project's fixed split
(``train/splits/openkbp.json``) and the product datastore built from them (``ctv_datastore.openkbp``). The
real-data tests skip with a message when ``../shared`` is absent."""

from __future__ import annotations

import json
import os
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from ctv_app.lib.structures import Structures, decode_label, find_structure
from ctv_app.lib.transforms.labels import ENCODING_KEY, STRUCTURES_KEY
from ctv_datastore import openkbp
from ctv_train.data import find_pairs

from .support import SHARED_DATA

OPENKBP = SHARED_DATA / "openkbp"
needs_openkbp = pytest.mark.skipif(
    not (OPENKBP / "cases.json").exists(), reason="../shared/data/openkbp is not present (real OpenKBP plans)"
)
# OpenKBP's structure names and the TG-263 names the catalogue's synonyms must give them.
OPENKBP_NAMES = {
    "PTV70": "PTV_7000", "PTV63": "PTV_6300", "PTV56": "PTV_5600", "Brainstem": "Brainstem",
    "SpinalCord": "SpinalCord", "LeftParotid": "Parotid_L", "RightParotid": "Parotid_R", "Esophagus": "Esophagus",
    "Larynx": "Larynx", "Mandible": "Bone_Mandible",
}  # fmt: skip


# --------------------------------------------------------------------------------------- the split
def test_stratified_split_has_exact_sizes_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = {f"c{i:03d}": {s for s in "abcde" if rng.random() < (0.2 + 0.15 * "abcde".index(s))} for i in range(50)}
    first = openkbp.stratified_split(labels, {"train": 40, "test": 10}, seed=1)
    assert first == openkbp.stratified_split(labels, {"train": 40, "test": 10}, seed=1)
    assert first != openkbp.stratified_split(labels, {"train": 40, "test": 10}, seed=2)
    assert len(first["test"]) == 10 and len(first["train"]) == 40
    assert sorted(first["train"] + first["test"]) == sorted(labels)
    for s in "abcde":  # each label in about its share (a fifth) of the test part
        total = sum(s in v for v in labels.values())
        assert abs(sum(s in labels[i] for i in first["test"]) - total / 5) <= 2, s


@needs_openkbp
def test_every_openkbp_name_maps_to_its_tg263_structure():
    with open(OPENKBP / "cases.json") as f:
        document = json.load(f)
    names = set(document["labels"]) | {n for case in document["cases"] for n in case["voxels"]}
    assert names == set(OPENKBP_NAMES)
    assert {name: find_structure(name).name for name in names} == OPENKBP_NAMES


@needs_openkbp
def test_split_file_is_disjoint_covers_cases_json_and_counts_its_structures():
    cases = {case["id"]: case for case in openkbp.load_cases(OPENKBP)}
    split = openkbp.load_split()
    train, test = (split["splits"][k]["cases"] for k in ("train", "test"))
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(cases) and len(train) + len(test) == split["cases"] == 203
    assert len(test) == openkbp.TEST_CASES and split["seed"] == openkbp.SEED
    for part, ids in (("train", train), ("test", test)):
        assert split["splits"][part]["n"] == len(ids) and ids == sorted(ids)
        counts = Counter(OPENKBP_NAMES[n] for i in ids for n in cases[i]["voxels"])
        assert split["splits"][part]["structures"] == {name: counts[name] for name in split["structures"]}, part
    for name, total in split["structures"].items():  # stratified: each structure in its share of the test cases
        assert abs(split["splits"]["test"]["structures"][name] - total * len(test) / len(cases)) <= 1, name


@needs_openkbp
def test_split_file_regenerates_from_its_seed():
    """``python -m ctv_datastore.openkbp --write-split`` writes this very file."""
    regenerated = openkbp.split_text(openkbp.make_split(openkbp.load_cases(OPENKBP)))
    assert regenerated == openkbp.SPLIT_FILE.read_text()


# ------------------------------------------------------------------------------- the datastore
# Partial and overlapping sets: 3 structures; all 10; 9 without the brainstem.
DATASTORE_CASES = ["openkbp_train_038", "openkbp_train_099", "openkbp_validation_238"]


@needs_openkbp
def test_openkbp_datastore_labels_decode_to_every_mask_overlaps_included(tmp_path):
    out = tmp_path / "openkbp"
    assert openkbp.build(out, DATASTORE_CASES, OPENKBP, log=lambda _: None) == {"saved": 3}
    assert openkbp.build(out, DATASTORE_CASES, OPENKBP, log=lambda _: None) == {"kept": 3}  # a rebuild keeps them
    known = Structures(OPENKBP_NAMES.values())
    pairs = find_pairs(str(out))
    assert [p["id"] for p in pairs] == DATASTORE_CASES
    overlapping = []
    for pair in pairs:
        case = pair["id"]
        assert os.path.islink(out / f"{case}.nii.gz") and pair["image"] == str((OPENKBP / f"{case}.nii.gz").resolve())
        masks = {
            OPENKBP_NAMES[f.name.removesuffix(".nii.gz")]: np.asarray(nib.load(f).dataobj) != 0
            for f in sorted((OPENKBP / "structures" / case).glob("*.nii.gz"))
        }
        assert pair[ENCODING_KEY] == "bitmask" and set(pair[STRUCTURES_KEY]) == set(masks)
        label = nib.load(pair["label"])
        assert np.allclose(label.affine, nib.load(pair["image"]).affine)
        channels, contained = decode_label(np.asarray(label.dataobj), known, "bitmask", pair[STRUCTURES_KEY])
        for c, name in enumerate(known.names):
            assert contained[c] == (name in masks), (case, name)
            if name in masks:
                assert np.array_equal(channels[c] > 0, masks[name]), (case, name)
        if sum(channels[c] > 0 for c in range(len(known))).max() > 1:
            overlapping.append(case)
    assert overlapping == DATASTORE_CASES[1:]  # voxels in two structures at once (PTVs over organs), each kept
