"""What every result names: the exact input bytes and the exact model it came from."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from typing import Any

from .checkpoint import file_sha256
from .dicom.series import find_ct_series
from .params import CTVParams


def input_sha256(path: str) -> str:
    """sha256 of a file; for a DICOM series folder, of the CT series' SOPInstanceUIDs and file
    digests in SOPInstanceUID order (file names and other objects in the folder do not count)."""
    if os.path.isdir(path):
        series = find_ct_series(path)
        h = hashlib.sha256()
        for uid, file in sorted((str(hd.SOPInstanceUID), p) for hd, p in zip(series.headers, series.paths)):
            h.update(f"{uid}:{file_sha256(file)}\n".encode())
        return h.hexdigest()
    return file_sha256(path)


def labels_record(label_paths: list[str]) -> dict[str, Any]:
    """The training labels a model saw: file names, and one sha256 over names and file digests."""
    h = hashlib.sha256()
    names = []
    for path in sorted(label_paths, key=os.path.basename):
        name = os.path.basename(path)
        names.append(name)
        h.update(f"{name}:{file_sha256(path)}\n".encode())
    return {"train_labels": names, "train_labels_sha256": h.hexdigest()}


def software_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("ctv-label", "monai", "monailabel", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "unknown"
    return versions


def model_record(name: str, path: str, checkpoint: dict[str, Any], sha256: str, params: CTVParams) -> dict[str, Any]:
    """``sha256`` is of the bytes the weights were loaded from: the model version; ``params``: those the
    results are computed with (the checkpoint's, with the server's overrides)."""
    meta = checkpoint.get("meta", {})
    return {
        "name": name,
        "file": os.path.basename(path),
        "sha256": sha256,
        "trained": meta.get("time"),
        "epoch": meta.get("epoch"),
        "val_dice": meta.get("val_dice"),
        "train_labels_sha256": meta.get("train_labels_sha256"),
        "params": params.to_dict(),
    }
