"""The audit trail: who saved, trained, uploaded or deleted what, and when; and who was refused.

One JSON object per line, appended with O_APPEND and fsynced before the request's answer counts
as recorded. The server never rewrites or truncates the file; rotating it is the operator's job
(move it away: the next entry starts a new file).

Anyone can be refused, so refusals are bounded: text from the request is cut to ``FIELD_CHARS``
characters, and of one client's refusals with one status (and user) the first
``REFUSALS_PER_MINUTE`` in a minute are recorded; the rest are counted, and the count recorded as
one ``refused.repeated`` line when that minute is over.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

FIELD_CHARS = 200
REFUSALS_PER_MINUTE = 60
_MAX_REFUSING_CLIENTS = 10_000  # beyond this many at once, the rest share one count


def clip(text: str, chars: int = FIELD_CHARS) -> str:
    """Request text as the audit log keeps it: at most ``chars`` characters, and marked when cut."""
    return text if len(text) <= chars else text[:chars] + "…"


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class AuditLog:
    def __init__(
        self, path: str, refusals_per_minute: int = REFUSALS_PER_MINUTE, clock: Callable[[], float] = time.time
    ):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.refusals_per_minute, self._clock = refusals_per_minute, clock
        self._lock = threading.Lock()
        self._refusals: dict[tuple, list] = {}  # (client, user, status) -> [minute's start, recorded, not recorded]

    def record(self, entry: dict[str, Any]) -> None:
        self._append([entry])

    def record_refusal(self, entry: dict[str, Any]) -> None:
        """A refused request (its ``client``, ``user`` and ``status`` say whose), within the bound."""
        now = self._clock()
        with self._lock:
            lines = self._finished_minutes(now)
            key = (entry.get("client"), entry.get("user"), entry.get("status"))
            if key not in self._refusals and len(self._refusals) >= _MAX_REFUSING_CLIENTS:
                key = ("*", None, entry.get("status"))
            counts = self._refusals.setdefault(key, [now, 0, 0])
            if counts[1] < self.refusals_per_minute:
                counts[1] += 1
                lines.append(entry)
            else:
                counts[2] += 1
        self._append(lines, now)

    def _finished_minutes(self, now: float) -> list[dict[str, Any]]:
        """Summary lines of the refusal counts whose minute is over (those counts are dropped)."""
        lines = []
        for key, (start, _, unrecorded) in list(self._refusals.items()):
            if now - start >= 60:
                del self._refusals[key]
                if unrecorded:
                    client, user, status = key
                    lines.append({"user": user, "action": "refused.repeated", "status": status, "client": client,
                                  "count": unrecorded, "since": _stamp(start)})  # fmt: skip
        return lines

    def _append(self, entries: list[dict[str, Any]], now: float | None = None) -> None:
        if not entries:
            return
        stamp = _stamp(self._clock() if now is None else now)
        data = b"".join((json.dumps({"time": stamp, **e}, default=str) + "\n").encode() for e in entries)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
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
