"""Find image/label pairs in a MONAI Label folder datastore (``<dir>/*.nii.gz`` + ``<dir>/labels/final/``)."""

from __future__ import annotations

import os

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def _stem(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_pairs(folder: str, label_dir: str = "labels/final") -> list[dict[str, str]]:
    """Sorted ``[{"image", "label", "id"}]`` for every image in ``folder`` that has a label."""
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
