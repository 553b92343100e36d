"""The audit trail: who saved, trained, uploaded or deleted what, and when; and who was refused.

One JSON object per line, appended with O_APPEND and fsynced before the request's answer counts
as recorded. The server never rewrites or truncates the file; rotating it is the operator's job
(move it away: the next entry starts a new file).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class AuditLog:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = (json.dumps({"time": stamp, **entry}, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, limit: int = 1000, user: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (oldest first), optionally of one user or action. A line
        cut short by a crash is skipped, not fatal."""
        if not os.path.exists(self.path):
            return []
        entries = []
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if (user is None or entry.get("user") == user) and (action is None or entry.get("action") == action):
                    entries.append(entry)
        return entries[-limit:] if limit > 0 else []
