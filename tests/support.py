"""Run the real server as a child process; used by the tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "ctv_app"
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CT = SHARED_DATA / "ct" / "abdomen_pelvis_3mm.nii.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``monailabel start_server`` on 127.0.0.1:<free port>; stopped by its own pid on exit."""

    def __init__(
        self, studies: Path, workdir: Path, conf: dict[str, str] | None = None, startup_timeout_s: float = 180
    ):
        self.studies, self.workdir, self.conf = Path(studies), Path(workdir), conf or {}
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> "ServerProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["MONAI_LABEL_SESSION_PATH"] = str(self.workdir / "sessions")
        monailabel = shutil.which("monailabel", path=env["PATH"])
        if not monailabel:
            raise RuntimeError("the monailabel command is not installed in this environment")
        cmd = [
            monailabel,
            "start_server",
            "--app",
            str(APP_DIR),
            "--studies",
            str(self.studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for key, value in self.conf.items():
            cmd += ["--conf", key, value]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server not up after {self.startup_timeout_s}s:\n{self.log_tail()}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        """Stop the server and whatever it started (training, scoring): its own process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: the group id is the server's pid
        except ProcessLookupError:
            pass
