"""Fuzz every operation of the server's own OpenAPI with schemathesis, bounded in examples and
time, logged in as an admin so that every route is reached: no response may be a 5xx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from ctv_datastore.build import HELD_OUT_SEED_START, build

from ..support import APP_DIR, ServerProcess

ADMIN_TOKEN = "fuzz-admin-token-" + "f" * 20
EXAMPLES_PER_OPERATION = 25
TIME_LIMIT_S = 600


def test_fuzzing_the_openapi_finds_no_server_error(tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is installed by scripts/setup.sh --tests"
    studies = tmp_path / "studies"
    build(str(studies), [HELD_OUT_SEED_START, HELD_OUT_SEED_START + 1], labelled={HELD_OUT_SEED_START})
    model = tmp_path / "model" / "ctv.pt"  # its own copy: the fuzzer may upload or delete models
    model.parent.mkdir()
    shutil.copy(APP_DIR / "model" / "ctv.pt", model)
    env = {"CTV_AUTH_TOKENS": f"fuzz_admin:admin:{ADMIN_TOKEN}"}
    with ServerProcess(studies, tmp_path / "server", env=env, conf={"ctv_model": str(model)}) as server:
        start = time.monotonic()
        run = subprocess.run(
            [st, "run", f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
             "--checks", "not_a_server_error", "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "1",
             "--request-timeout", "120", "--workers", "1", "--no-color",
             "--report", "junit", "--report-junit-path", str(tmp_path / "fuzz.xml")],
            capture_output=True, text=True, timeout=TIME_LIMIT_S,
            cwd=tmp_path,  # schemathesis keeps its example cache in ./.schemathesis: not in the repository
        )  # fmt: skip
        wall = time.monotonic() - start
        summary = re.search(r"(\d+) generated, .*", run.stdout)
        print(f"schemathesis: {summary.group(0) if summary else '?'} in {wall:.0f} s")
        assert run.returncode == 0, run.stdout[-8000:] + "\n" + server.log_tail()
        assert summary and int(summary.group(1)) >= 40 * EXAMPLES_PER_OPERATION // 2  # it did fuzz
        assert requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).ok
        # The whole log, asked for while the server writes it: sent as read (a streamed file broke mid-answer).
        whole = requests.get(f"{server.url}/logs/?lines=0", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        assert whole.ok and int(whole.headers["content-length"]) == len(whole.content) > 0
        assert "engine:" in whole.text  # the server's own log: the engine it chose is there
