"""Run the real server as a child process; used by the tests and the benchmarks."""

from __future__ import annotations

import io
import json
import os
import pwd
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


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/<pid>/status, in MB (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def infer_retrying(url: str, image: str, token: str | None = None, tries: int = 5) -> tuple[dict, int]:
    """POST /infer as a hospital script behind nginx would: retry what nginx may not replay (a POST
    already sent to a server that died). Returns the result and the attempts it took."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(1, tries + 1):
        try:
            r = requests.post(f"{url}/infer/ctv", params={"image": image, "output": "json"}, headers=headers,
                              timeout=600)  # fmt: skip
        except requests.ConnectionError:
            r = None
        if r is not None and r.status_code == 200:
            return r.json(), attempt
        if r is not None and r.status_code not in (502, 503, 504):
            raise AssertionError(f"{r.status_code}: {r.text}")
        time.sleep(float(r.headers.get("Retry-After", 1)) if r is not None else 1)
    raise AssertionError(f"{image}: no answer after {tries} tries")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``monailabel start_server`` on 127.0.0.1:<free port>; stopped by its own pid on exit."""

    def __init__(
        self,
        studies: Path | str,
        workdir: Path,
        conf: dict[str, str] | None = None,
        startup_timeout_s: float = 180,
        env: dict[str, str] | None = None,
    ):
        """``studies``: a folder, or a DICOMweb URL; ``env``: extra environment (e.g. credentials)."""
        self.studies = studies if str(studies).startswith("http") else Path(studies)
        self.workdir, self.conf, self.extra_env = Path(workdir), conf or {}, env or {}
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
        env.update(self.extra_env)
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
        # The page's uploads, the audit log and the model versions go to the work folder, never into the app folder.
        defaults = {"cases_path": str(self.workdir / "cases"), "audit_log": str(self.workdir / "audit.jsonl"),
                    "data_dir": str(self.workdir / "data")}  # fmt: skip
        for key, value in {**defaults, **self.conf}.items():
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
                if requests.get(f"{self.url}/info/", timeout=2).status_code in (200, 401):  # 401: auth on
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


ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancProcess:
    """A real Orthanc with DICOMweb, for the tests: its own config and storage in ``workdir``,
    authentication on, no DICOM port, refusing remote HTTP, reached via 127.0.0.1 only (and the
    test run itself sits in a private network namespace, see scripts/test.sh). Stopped by pid."""

    user, password = "ctv", "ctv-test-only"

    def __init__(self, workdir: Path, startup_timeout_s: float = 60):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    def config(self) -> dict:
        return {
            "Name": "ctv-test-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado", "Ssl": False},
            "StableAge": 1,
        }

    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def __enter__(self) -> "OrthancProcess":
        if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
            raise RuntimeError("Orthanc and its DICOMweb plugin are not installed: run scripts/setup.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth(), timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"Orthanc not up after {self.startup_timeout_s}s")
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        from dicomweb_client import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        return DICOMwebClient(self.dicomweb_url, session=create_session_from_user_pass(*self.auth()))

    def stow(self, paths: list[Path | str]) -> None:
        """STOW-RS the files (as valid Part 10 files: WADO-RS must read them back)."""
        import pydicom

        datasets = []
        for p in paths:
            ds = pydicom.dcmread(p)
            buffer = io.BytesIO()
            ds.save_as(buffer, write_like_original=False)
            buffer.seek(0)
            datasets.append(pydicom.dcmread(buffer))
        self.client().store_instances(datasets)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_TEMPLATE = REPO / "docker" / "nginx" / "ctv.conf.template"


def render_nginx_site(replicas: list[str], trainer: str, listen: str) -> str:
    """docker/nginx/ctv.conf.template with its ${CTV_*} filled, as the nginx image's envsubst does."""
    values = {
        "CTV_REPLICAS": " ".join(f"server {r} max_fails=1 fail_timeout=10s;" for r in replicas),
        "CTV_TRAINER": f"server {trainer};",
        "CTV_LISTEN": listen,
    }
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


class NginxProcess:
    """Debian's nginx in the foreground with the project's site config, on 127.0.0.1; its own
    prefix, logs and temp folders in ``workdir``; stopped by pid."""

    def __init__(self, workdir: Path, replicas: list[str], trainer: str, startup_timeout_s: float = 30):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.site = render_nginx_site(replicas, trainer, f"127.0.0.1:{self.port}")
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        temp = " ".join(f"{kind}_temp_path {kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # Run as root, nginx's workers would become "nobody", who cannot enter pytest's 0700 tmp dirs: a
        # request body too big for memory (a label over 16 KB) then fails with 500. Workers keep our user
        # (nginx ignores the directive when not root).
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};"
        return (
            f"daemon off; master_process on; worker_processes 1; pid nginx.pid; error_log error.log info; {user}\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log access.log; {temp}\n{self.site}\n}}\n"
        )

    def __enter__(self) -> "NginxProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "nginx.conf").write_text(self.config())
        cmd = [NGINX, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"), "-e", str(self.workdir / "error.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            try:
                requests.get(f"{self.url}/", timeout=2)
                return self
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"nginx not up after {self.startup_timeout_s}s:\n{self.error_log()}")
                time.sleep(0.2)

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
