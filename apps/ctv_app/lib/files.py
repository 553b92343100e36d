"""Files written whole or not at all: a temp file beside the target, fsynced, then renamed over it, so a reader
(or a crash) sees the old file or the whole new one. The datastore, the model versions, commissioning and the
page's cases write through these."""

from __future__ import annotations

import os
import shutil
import tempfile


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_copy(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` so that ``dest`` is either the old file or the whole new one."""
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(data: bytes, dest: str) -> None:
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, dest: str) -> None:
    atomic_write_bytes(text.encode(), dest)
