"""Admission control for inference: a bounded number of requests wait, the rest are told when to retry.

A CPU server runs one inference at a time well (torch already uses every core); letting requests
pile up only makes every one of them late and grows memory. ``max_waiting`` requests may wait
for the ``workers``; the next one gets a 503 with Retry-After, estimated from recent latency.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from fastapi import HTTPException

from .errors import ServerBusyError


class RetryAfter:
    """When a refused caller should come back: the recent service time (an exponential average of the
    measured ones, ``expected_s`` until one is measured) times the work ahead of it. Callers hold their
    own lock around it."""

    def __init__(self, expected_s: float):
        self._mean_s = expected_s

    def observe(self, seconds: float) -> None:
        self._mean_s = 0.8 * self._mean_s + 0.2 * seconds

    def seconds(self, work_ahead: float) -> int:
        return max(1, math.ceil(self._mean_s * work_ahead))


class InferenceGate:
    def __init__(self, workers: int = 1, max_waiting: int = 8, expected_s: float = 5.0):
        """``expected_s``: the latency assumed until one is measured (for Retry-After)."""
        if workers < 1 or max_waiting < 0:
            raise ValueError(f"workers must be >= 1 and max_waiting >= 0 (got {workers}, {max_waiting})")
        self.workers, self.max_waiting = workers, max_waiting
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._admitted = 0
        self._retry_after = RetryAfter(expected_s)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Wait for a worker, or raise ServerBusyError at once if too many already wait."""
        with self._lock:
            if self._admitted >= self.workers + self.max_waiting:
                waiting = self._admitted - self.workers
                raise ServerBusyError(
                    f"{waiting} inference requests are already waiting (limit {self.max_waiting}); retry later",
                    retry_after_s=self._retry_after.seconds(self._admitted / self.workers),
                )
            self._admitted += 1
        try:
            with self._slots:
                start = time.monotonic()
                yield
                with self._lock:
                    self._retry_after.observe(time.monotonic() - start)
        finally:
            with self._lock:
                self._admitted -= 1


def when_admitted(call: Callable[[], Any], patience_s: float = 1800) -> Any:
    """``call()``, waited for and retried while it is refused with 503 + Retry-After: for work
    that is already queued elsewhere (the contouring page's worker), not for HTTP clients."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except HTTPException as e:
            retry_after = (e.headers or {}).get("Retry-After")
            if e.status_code != 503 or retry_after is None or time.monotonic() + float(retry_after) > deadline:
                raise
            time.sleep(float(retry_after))
