"""Load: 10 clients, 50 /infer/ctv uploads in total, against a server whose queue holds 3. Every
request succeeds or is told 503 + Retry-After (and then succeeds on retry); every result names
the input its client sent; memory stays bounded. Figures are printed (bench/load.py measures)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest
import requests

from ctv_app.lib.admission import InferenceGate, when_admitted
from ctv_app.lib.errors import ServerBusyError

from ..support import REPO, ServerProcess

spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
bench_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_load)

MAX_WAITING = 3
PEAK_RSS_LIMIT_MB = 3000  # issue 7's memory goal for the server


def test_ten_clients_fifty_requests(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    conf, env = {"infer_max_waiting": str(MAX_WAITING)}, {"MALLOC_ARENA_MAX": "2"}  # as scripts/run.sh and docker
    with ServerProcess(studies, tmp_path / "server", conf=conf, env=env) as server:
        # Warm-up under the same concurrency: buffers and allocator arenas reach their working size.
        warm = bench_load.run_load(server.url, server.proc.pid, clients=10, total=20, time_limit_s=600)
        assert warm["succeeded"] == 20
        figures = bench_load.run_load(server.url, server.proc.pid, clients=10, total=50, time_limit_s=900)
        assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200
    outcomes = figures.pop("outcomes")
    print("load:", json.dumps(figures))
    assert figures["succeeded"] == 50, [o for o in outcomes if o.get("status") != 200]
    assert figures["mismatched"] == 0  # each result is of the bytes its own client sent
    assert figures["busy_503"] > 0  # the queue limit was reached ...
    assert figures["busy_without_retry_after"] == 0  # ... and every 503 said when to come back
    assert figures["vmhwm_mb"] < PEAK_RSS_LIMIT_MB
    # No leak per request: 50 requests later, resident memory is less than 150 MB (3 MB a request)
    # above what it was after the warm-up.
    assert figures["rss_after_mb"] < figures["rss_before_mb"] + 150, figures


def test_gate_refuses_past_its_queue_and_the_page_worker_waits_its_turn():
    gate = InferenceGate(workers=1, max_waiting=1, expected_s=0.5)
    release = threading.Event()

    def hold() -> None:
        with gate.slot():
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(2)]  # one runs, one waits
    for t in holders:
        t.start()
    deadline = time.monotonic() + 10
    while gate._admitted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ServerBusyError) as refused:
        with gate.slot():
            pass
    assert refused.value.status_code == 503 and int(refused.value.headers["Retry-After"]) >= 1

    def run_once() -> str:
        with gate.slot():
            return "contoured"

    done: list[str] = []
    page = threading.Thread(target=lambda: done.append(when_admitted(run_once, patience_s=60)))
    page.start()
    time.sleep(0.3)
    assert not done  # still refused: it waits instead of failing
    release.set()
    page.join(30)
    for t in holders:
        t.join(30)
    assert done == ["contoured"]
