"""OpenKBP's real head-and-neck radiotherapy plans as a folder datastore, and this project's fixed split of them.

    python -m ctv_datastore.openkbp --out runs/openkbp --split train     # the training (+ validation) cases
    python -m ctv_datastore.openkbp --out runs/openkbp_test --split test # the test cases, for evaluation
    python -m ctv_datastore.openkbp --write-split                        # regenerate train/splits/openkbp.json

The data (``../shared/data/openkbp``, read in place, never copied into the repository; see its README):
203 planning CTs with the clinical structure set each patient was treated with, one mask per structure
(``structures/<id>/<name>.nii.gz``, OpenKBP's names), partial (not every case has every structure) and
overlapping (a PTV covers part of a parotid). OpenKBP's own test patients are not in it: they are this
project's blind test and are never obtained or used.

**The split** (``train/splits/openkbp.json``, written once by ``make_split``; regenerating gives the same
file): ``TEST_CASES`` cases for test, the rest for training and validation (the trainer holds its
validation share out of them). Iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the
stratification of multi-label data", ECML PKDD 2011) on the structures each case has, seeded with ``SEED``:
the test split holds each structure in about its share of the cases (Esophagus is in 71 of 203, so ~14
of 40). The file records each split's case ids and how many of its cases have each structure.

**The datastore** is built the way a department's would be: the CT as NIfTI (a symlink to the shared file
by default, ``--copy`` for a copy), and each case's label saved through ``CTVDatastore.save_label`` as a
lossless ``bitmask`` of every structure the case has, named by TG-263 names (``label_names``; OpenKBP's
names map through the catalogue's synonyms), so the datastore records the partial set and the trainer
leaves the missing structures out of the loss. Each saved label is read back from the datastore,
decoded (``structures.decode_label``) and compared with every mask, voxel for voxel.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np

import ctv_train
from ctv_app.lib.structures import CATALOGUE, Structures, decode_label, find_structure

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "openkbp"
SPLIT_FILE = Path(ctv_train.__file__).resolve().parent / "splits" / "openkbp.json"
SEED = 18  # issue 18; fixed once, never tuned
TEST_CASES = 40
SPLITS = ("train", "test")


# --- the cases ------------------------------------------------------------------------------------------
def load_cases(data: str | Path = DEFAULT_DATA) -> list[dict[str, Any]]:
    """``cases.json``'s cases: ``id``, ``source`` (OpenKBP's patient), ``voxel_mm``, ``voxels`` {OpenKBP name:
    voxel count}."""
    with open(Path(data) / "cases.json") as f:
        return json.load(f)["cases"]


def tg263_name(openkbp_name: str) -> str:
    """The TG-263 name a structure of OpenKBP's means (the catalogue's synonyms); a ValueError if none."""
    structure = find_structure(openkbp_name)
    if structure is None:
        raise ValueError(f"OpenKBP structure {openkbp_name!r} means no structure of the catalogue")
    return structure.name


def case_structures(case: dict[str, Any]) -> dict[str, str]:
    """A case's structures, TG-263 name -> OpenKBP name, in catalogue order."""
    named = {tg263_name(name): name for name in case["voxels"]}
    return {name: named[name] for name in CATALOGUE if name in named}


def openkbp_structures(cases: Iterable[dict[str, Any]]) -> Structures:
    """Every structure the cases have, in catalogue order (targets first, the highest dose first): the
    datastore's structures and the bit order of its labels."""
    present = {name for case in cases for name in case_structures(case)}
    return Structures([name for name in CATALOGUE if name in present])


# --- the split ------------------------------------------------------------------------------------------
def stratified_split(labels: dict[str, set[str]], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Iterative stratification (Sechidis et al. 2011) of items with label sets into parts of exactly ``sizes``.

    Repeatedly take the label that the fewest unassigned items have; give each of those items (in a seeded
    random order) to the part that still wants the most of that label (its share of the label's items not
    yet filled), ties to the part that wants the most items, then at random. A part that is full takes no
    more. Items without labels fill the parts last."""
    if sum(sizes.values()) != len(labels):
        raise ValueError(f"sizes {sizes} do not add up to {len(labels)} items")
    rng = random.Random(seed)
    order = sorted(labels)
    rng.shuffle(order)
    n = len(order)
    totals = Counter(label for item in order for label in labels[item])
    want_items = dict(sizes)
    want = {part: {label: count * size / n for label, count in totals.items()} for part, size in sizes.items()}
    parts: dict[str, list[str]] = {part: [] for part in sizes}
    remaining = list(order)

    def assign(item: str, label: str | None) -> None:
        open_parts = [p for p in parts if want_items[p] > 0]
        part = max(open_parts, key=lambda p: (want[p][label] if label else 0.0, want_items[p], rng.random()))
        parts[part].append(item)
        want_items[part] -= 1
        for other in labels[item]:
            want[part][other] -= 1

    while remaining:
        counts = Counter(label for item in remaining for label in labels[item])
        if not counts:
            for item in remaining:
                assign(item, None)
            break
        rarest = min(counts, key=lambda label: (counts[label], label))
        for item in [i for i in remaining if rarest in labels[i]]:
            assign(item, rarest)
        remaining = [i for i in remaining if rarest not in labels[i]]
    return {part: sorted(items) for part, items in parts.items()}


def make_split(cases: list[dict[str, Any]], test_cases: int = TEST_CASES, seed: int = SEED) -> dict[str, Any]:
    """The split document (what ``train/splits/openkbp.json`` holds): method, seed, and per split its case
    ids and how many of its cases have each structure (TG-263 names)."""
    labels = {case["id"]: set(case_structures(case)) for case in cases}
    parts = stratified_split(labels, {"train": len(cases) - test_cases, "test": test_cases}, seed)
    names = openkbp_structures(cases).names

    def counts(ids: Iterable[str]) -> dict[str, int]:
        found = Counter(name for i in ids for name in labels[i])
        return {name: found[name] for name in names}

    return {
        "about": "The project's fixed split of the OpenKBP cases in ../shared/data/openkbp (its train and validation "
        "patients). 'train' is for training and validation (the trainer holds its validation share out of it), "
        "'test' is for reporting only. OpenKBP's own test patients are not here: they are never used.",
        "method": "iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011) on the structures "
        "each case has (TG-263 names), exact split sizes; ctv_datastore.openkbp.make_split",
        "seed": seed,
        "regenerate": "python -m ctv_datastore.openkbp --write-split",
        "cases": len(cases),
        "structures": counts(labels),
        "splits": {part: {"n": len(ids), "structures": counts(ids), "cases": ids} for part, ids in parts.items()},
    }


def split_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def load_split(path: str | Path = SPLIT_FILE) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def split_cases(split: str, path: str | Path = SPLIT_FILE) -> list[str]:
    """The case ids of a split (``train`` or ``test``) of the fixed split."""
    splits = load_split(path)["splits"]
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)}, got {split!r}")
    return list(splits[split]["cases"])


# --- the datastore --------------------------------------------------------------------------------------
def structure_masks(data: Path, case: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A case's masks, TG-263 name -> boolean volume, and their affine (each mask must be on the CT's grid)."""
    ct = nib.load(data / f"{case['id']}.nii.gz")
    masks = {}
    for name, openkbp_name in case_structures(case).items():
        img = nib.load(data / "structures" / case["id"] / f"{openkbp_name}.nii.gz")
        if img.shape != ct.shape or not np.allclose(img.affine, ct.affine, atol=1e-3):
            raise ValueError(f"{case['id']}/{openkbp_name}: the mask is not on the CT's grid")
        masks[name] = np.asarray(img.dataobj) != 0
    return masks, ct.affine


def label_differences(
    label: np.ndarray, recorded: dict[str, Any], masks: dict[str, np.ndarray], structures: Structures
) -> list[str]:
    """What a stored label (its data and the info the datastore recorded) gets wrong against the masks: empty
    when decoding it gives every mask exactly, and only them."""
    encoding, contains = recorded.get("encoding", "labelmap"), recorded.get("structures")
    channels, contained = decode_label(label, structures, encoding, contains)
    problems = []
    for c, name in enumerate(structures.names):
        if name not in masks:
            if contained[c]:
                problems.append(f"{name}: recorded, but the case has no such structure")
            continue
        if not contained[c]:
            problems.append(f"{name}: not recorded")
        elif (wrong := int(((channels[c] > 0) != masks[name]).sum())) != 0:
            problems.append(f"{name}: {wrong} voxels differ")
    return problems


def build(
    out: str | Path, case_ids: list[str], data: str | Path = DEFAULT_DATA, copy: bool = False, log=print
) -> dict[str, int]:
    """The folder datastore of ``case_ids`` in ``out``: images linked (or copied), labels saved through
    ``CTVDatastore.save_label`` and each checked against its masks. Rebuilding keeps labels that match.
    Returns how many labels were saved and kept."""
    from ctv_app.lib.datastore import CTVDatastore  # the app's datastore: imports the server's stack

    data, out = Path(data).resolve(), Path(out)
    cases = {case["id"]: case for case in load_cases(data)}
    if unknown := [i for i in case_ids if i not in cases]:
        raise ValueError(f"cases not in {data / 'cases.json'}: {unknown}")
    structures = openkbp_structures(cases.values())
    out.mkdir(parents=True, exist_ok=True)
    for case_id in case_ids:
        image, source = out / f"{case_id}.nii.gz", data / f"{case_id}.nii.gz"
        if image.is_symlink() or image.exists():
            continue
        if copy:
            shutil.copyfile(source, image)
        else:
            os.symlink(source, image)
    store = CTVDatastore(str(out), structures, auto_reload=False)
    done = Counter()
    for case_id in case_ids:
        case = cases[case_id]
        masks, affine = structure_masks(data, case)
        if store.get_label_by_image_id(case_id, "final"):
            stored = np.asarray(nib.load(store.get_label_uri(case_id, "final")).dataobj)
            if not label_differences(stored, store.get_label_info(case_id, "final"), masks, structures):
                done["kept"] += 1
                continue
        bitmask = structures.pack([masks.get(name) for name in structures.names])
        fd, tmp = tempfile.mkstemp(suffix=".nii.gz")
        os.close(fd)
        try:
            nib.save(nib.Nifti1Image(bitmask, affine), tmp)
            store.save_label(
                case_id,
                tmp,
                "final",
                {
                    "annotator": "openkbp",  # the treating clinicians' contours, as OpenKBP publishes them
                    "source": f"OpenKBP {case['source']}",
                    "openkbp_names": case_structures(case),
                    "encoding": "bitmask",
                    "label_names": {name: structures.value(name) for name in masks},
                },
            )
        finally:
            os.unlink(tmp)
        stored = np.asarray(nib.load(store.get_label_uri(case_id, "final")).dataobj)
        if problems := label_differences(stored, store.get_label_info(case_id, "final"), masks, structures):
            raise RuntimeError(f"{case_id}: the saved label does not decode to its masks: {problems}")
        done["saved"] += 1
        log(f"{case_id}: bitmask of {list(masks)} saved and checked")
    return dict(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the OpenKBP folder (cases.json, CTs, structures/)")
    ap.add_argument("--out", help="the datastore folder to write (outside the repository, e.g. runs/openkbp)")
    ap.add_argument("--split", choices=SPLITS, help="which cases of train/splits/openkbp.json")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases of the split (a quick look)")
    ap.add_argument("--copy", action="store_true", help="copy the CTs instead of linking to them")
    ap.add_argument("--write-split", action="store_true", help=f"write {SPLIT_FILE} from cases.json (seed {SEED})")
    args = ap.parse_args()
    if args.write_split:
        document = make_split(load_cases(args.data))
        SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
        SPLIT_FILE.write_text(split_text(document))
        print(f"{SPLIT_FILE}: " + ", ".join(f"{k} {v['n']}" for k, v in document["splits"].items()))
        if not args.out:
            return
    if not (args.out and args.split):
        ap.error("--out and --split are needed to build a datastore")
    ids = split_cases(args.split)
    if args.limit:
        ids = ids[: args.limit]
    done = build(args.out, ids, args.data, args.copy)
    saved, kept = done.get("saved", 0), done.get("kept", 0)
    print(f"{args.out}: {len(ids)} OpenKBP cases ({args.split}); labels saved {saved}, kept {kept}")


if __name__ == "__main__":
    main()
