"""What every result names: the exact input bytes and the exact model it came from."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .dicom.series import SeriesRead, read_series_headers
from .params import CTVParams


@dataclass(frozen=True)
class InputRead:
    """What the model read for one request: ``sha256`` of those very bytes (``input_sha256``'s
    definition), and for a DICOM series the headers and geometry parsed from them, which a DICOM
    result references. Kept from the read to the writer, so neither is taken from the path again."""

    sha256: str
    series: SeriesRead | None = None


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (a version of a model, a label, an input)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def input_sha256(path: str) -> str:
    """sha256 of a file; for a DICOM series folder, ``series_sha256`` of the CT series' files."""
    if os.path.isdir(path):
        return read_series_headers(path).sha256
    return file_sha256(path)


def labels_record(label_paths: list[str], annotators: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The training labels a model saw: file names, one sha256 over names and file digests, and each label's
    sha256 and annotator (``annotators``: file name -> who saved it, where known)."""
    h = hashlib.sha256()
    names, detail = [], []
    for path in sorted(label_paths, key=os.path.basename):
        name, sha = os.path.basename(path), file_sha256(path)
        names.append(name)
        detail.append({"id": name, "sha256": sha, "annotator": (annotators or {}).get(name)})
        h.update(f"{name}:{sha}\n".encode())
    return {"train_labels": names, "train_labels_sha256": h.hexdigest(), "train_labels_detail": detail}


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
