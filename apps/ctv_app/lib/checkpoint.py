"""CTV checkpoints: weights plus the parameters and provenance they were trained with.

Layout: ``{"model": state_dict, "params": CTVParams dict, "meta": {...}}``. ``"model"`` is the
key MONAI Label's BasicInferTask loads. Writes are atomic (temp file + rename) so a reader
never sees a half-written file, and a crash mid-save leaves the previous checkpoint intact.

A checkpoint holds tensors and plain data only (dict, list, tuple, str, int, float, bool, None), and
every checkpoint is read with ``torch.load(weights_only=True)``: unpickling anything else could run
code named by the file (an uploaded model, a file put beside the served one).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from typing import IO, Any

import torch

from .params import CTVParams
from .provenance import file_sha256


def save_checkpoint(path: str, state_dict: dict, params: CTVParams, meta: dict[str, Any]) -> str:
    """Write atomically; returns the file's sha256, which is the model version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": state_dict, "params": params.to_dict(), "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        load_checkpoint(tmp)  # never publish a file the safe loader refuses (e.g. numpy values in meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other service accounts read served models
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return file_sha256(path)


def load_checkpoint(source: str | IO[bytes], map_location: str = "cpu") -> dict[str, Any]:
    """Load from a path, or from a file object holding bytes already read (and hashed); tensors and
    plain data only (the one place checkpoints are unpickled)."""
    name = getattr(source, "name", source if isinstance(source, str) else "the checkpoint")
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it names {named.group(1)}" if named else "it is not a PyTorch checkpoint"
        raise ValueError(
            f"{name} refused without unpickling it ({reason}); a checkpoint holds only tensors and plain data"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{name} is not a CTV checkpoint (no 'model' entry)")
    return ckpt


def read_params(path: str) -> CTVParams | None:
    """The parameters a checkpoint was trained with, or None for a bare state dict / missing file."""
    if not path or not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    return CTVParams.from_dict(ckpt["params"]) if "params" in ckpt else None


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 over the parameters and buffers: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
