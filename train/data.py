"""Find image/label pairs in a MONAI Label folder datastore (``<dir>/*.nii.gz`` + ``<dir>/labels/final/``).

A folder that is a datastore whose labels record what they contain (``CTVDatastore.save_label`` writes
each label's ``encoding`` and ``structures`` into the index, ``datastore_v2.json``) gives the datastore's
own training datalist, read-only: each pair carries ``label_encoding`` and ``label_structures``, so the
trainer decodes a bitmask as a bitmask and leaves a partial set's missing structures out of the loss
(``transforms/labels.py``), as the server's trainer does. Any other folder (synthetic phantoms written
by ``ctv_datastore.build``) is scanned for files: its labels are label maps in the model's own values.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
DATASTORE_INDEX = "datastore_v2.json"  # MONAI Label's LocalDatastore index


def _stem(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_pairs(folder: str, label_dir: str = "labels/final") -> list[dict[str, Any]]:
    """Sorted ``[{"id", "image", "label", ...}]`` for every image in ``folder`` that has a label: the
    datastore's datalist (``datastore_pairs``) when the folder's index records its labels' structures,
    else the files found."""
    if label_dir == "labels/final":
        recorded = datastore_pairs(folder)
        if recorded is not None:
            return recorded
    return file_pairs(folder, label_dir)


def file_pairs(folder: str, label_dir: str = "labels/final") -> list[dict[str, Any]]:
    """Sorted ``[{"id", "image", "label"}]``: each image file in ``folder`` with a label file of its name."""
    labels = {}
    ldir = os.path.join(folder, label_dir)
    if os.path.isdir(ldir):
        for name in os.listdir(ldir):
            stem = _stem(name)
            if stem:
                labels[stem] = os.path.join(ldir, name)
    pairs = []
    for name in sorted(os.listdir(folder)):
        stem = _stem(name)
        if stem and stem in labels:
            pairs.append({"id": stem, "image": os.path.join(folder, name), "label": labels[stem]})
    return pairs


def datastore_pairs(folder: str) -> list[dict[str, Any]] | None:
    """The training datalist of the folder datastore at ``folder`` (``CTVDatastore.datalist``, read-only:
    nothing is rescanned, imported or rewritten), sorted by image id, each with its ``id``; None when the
    folder has no index or its index records no label's structures (labels saved before structures were
    recorded, or a folder never served). Label files the index does not list are left out, with a warning."""
    if not os.path.isfile(os.path.join(folder, DATASTORE_INDEX)):
        return None
    from ctv_app.lib.datastore import CTVDatastore
    from ctv_app.lib.structures import CATALOGUE
    from ctv_app.lib.transforms.labels import STRUCTURES_KEY

    # The structures only check saves and import RTSTRUCTs; a read-only datalist uses neither.
    store = CTVDatastore(folder, list(CATALOGUE), auto_reload=False, read_only=True)
    pairs = store.datalist()
    if not any(STRUCTURES_KEY in p for p in pairs):
        return None
    # a label file is named <image id><.nii.gz or .nii>
    pairs = sorted(({"id": _stem(os.path.basename(p["label"])), **p} for p in pairs), key=lambda p: p["id"])
    listed = {os.path.realpath(p["label"]) for p in pairs}
    unlisted = [p["id"] for p in file_pairs(folder) if os.path.realpath(p["label"]) not in listed]
    if unlisted:
        logger.warning(
            f"{folder}: label files of {unlisted} are not in the datastore's index and are left out "
            "(start the server on the folder, or save them through the datastore, to record them)"
        )
    return pairs

