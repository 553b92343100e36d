"""The deployment as a department runs it: the image built from docker/Dockerfile, the whole stack
started from docker/compose.yml (Orthanc, the trainer, 2 replicas, nginx; access control on), and
everything done through nginx on 127.0.0.1 with MONAI Label's own client.

The images come from tests/containers/images.sh (scripts/test.sh runs it before the tests enter
their private network namespace); compose is docker-compose driving podman through its
Docker-compatible socket. Orthanc and nginx are local stand-ins for the registry's images, which
this machine cannot reach. Phantom CT series are SYNTHETIC."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient

from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .conftest import series_uid
from .support import REPO, free_port, infer_retrying

STATE = Path(os.environ.get("CTV_CONTAINERS_STATE", "/var/tmp/ctv-containers"))
COMPOSE_FILES = [REPO / "docker" / "compose.yml", REPO / "tests" / "containers" / "compose.local.yml"]
IMAGES = ["localhost/ctv-label:latest", "localhost/ctv-test-orthanc:bookworm", "localhost/ctv-test-nginx:bookworm"]
SEEDS = (9301, 9302, 9303)  # SYNTHETIC phantoms
HEALTH_EVERY_S = 3.0


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    if (STATE / "containers.conf").exists():  # written by images.sh where this host needs it
        env["CONTAINERS_CONF"] = str(STATE / "containers.conf")
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(["podman", *args], capture_output=True, text=True, env=engine_env(), timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {run.stderr[-2000:]}")
    return run


class Stack:
    """One compose project on a podman API socket this test starts (and stops, by pid)."""

    def __init__(self, workdir: Path):
        self.project = f"ctvtest{secrets.token_hex(3)}"
        self.socket = workdir / "podman.sock"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**engine_env(), "DOCKER_HOST": f"unix://{self.socket}", "ORTHANC_PASSWORD": secrets.token_hex(12),
                    "CTV_PORT": f"127.0.0.1:{self.port}", "COMPOSE_HTTP_TIMEOUT": "600"}  # fmt: skip
        self.log = open(workdir / "podman-service.log", "wb")
        self.service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=engine_env())  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.service.poll() is None and time.monotonic() < deadline, "podman system service did not start"
            time.sleep(0.2)
        self.stop_health = threading.Event()
        self.health = threading.Thread(target=self._run_healthchecks, daemon=True)
        self.health.start()

    def _run_healthchecks(self) -> None:
        """podman 4.3 schedules HEALTHCHECK with systemd timers; without systemd nothing runs them and
        compose's ``service_healthy`` waits for ever. Here the engine runs each check on a schedule."""
        while not self.stop_health.wait(HEALTH_EVERY_S):
            ids = podman("ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}", check=False)
            for cid in ids.stdout.split():
                podman("healthcheck", "run", cid, check=False, timeout=60)

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
        run = subprocess.run(["docker-compose", "-p", self.project, *files, *args], capture_output=True, text=True,
                             env=self.env, cwd=REPO / "docker", timeout=timeout)  # fmt: skip
        if check:
            assert run.returncode == 0, f"docker-compose {' '.join(args)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        return run

    def containers(self, service: str) -> list[str]:
        found = podman("ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                       "--filter", f"label=com.docker.compose.service={service}")  # fmt: skip
        return found.stdout.split()

    def close(self) -> None:
        try:
            logs = self.compose("logs", "--no-color", "--timestamps", timeout=120).stdout
            (self.socket.parent / "stack.log").write_text(logs)  # kept with the test's tmp files
            self.compose("down", "-v", "--remove-orphans", timeout=300)
        finally:
            self.stop_health.set()
            self.health.join(timeout=90)
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.service.kill()
            self.log.close()


def admin_token(stack: Stack) -> str:
    logs = stack.compose("logs", "--no-color", "ctv-trainer", "ctv").stdout
    found = re.findall(r"its token, shown only now: (\S+)", logs)
    assert len(found) == 1, f"expected one printed admin token, found {len(found)}"  # replicas share /data
    return found[0]


def wait_served(url: str, token: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=10).ok:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer /info/ in {timeout_s} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert shutil.which("podman") and shutil.which("docker-compose"), "scripts/setup.sh --tests installs both"
    missing = [image for image in IMAGES if podman("image", "exists", image, check=False).returncode != 0]
    assert not missing, f"{missing}: build them with tests/containers/images.sh (scripts/test.sh does)"
    workdir = tmp_path_factory.mktemp("containers")
    stack = Stack(workdir)
    try:
        started = time.monotonic()
        try:
            stack.compose("up", "-d")
        except AssertionError:
            print(stack.compose("logs", "--no-color", "--tail", "60", timeout=120, check=False).stdout[-8000:])
            raise
        token = admin_token(stack)
        wait_served(stack.url, token)
        print(f"stack up and answering through nginx in {time.monotonic() - started:.0f} s")
        series = []
        for seed in SEEDS:
            phantom, folder = make_phantom(seed), workdir / f"dicom_{seed}"
            write_ct_series(phantom.image, phantom.affine, str(folder), patient_id=f"CONTAINER_{seed}")
            series.append(SimpleNamespace(uid=series_uid(folder), folder=folder, label=phantom.label,
                                          affine=phantom.affine))  # fmt: skip
        yield SimpleNamespace(stack=stack, token=token, series=series, workdir=workdir)
    finally:
        stack.close()
    assert not podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}").stdout.split()
    volumes = podman("volume", "ls", "-q").stdout.split()
    assert not [v for v in volumes if v.startswith(stack.project)], "down -v left volumes"


def client_for(env, tmp_path: Path) -> MONAILabelClient:
    client = MONAILabelClient(env.stack.url, tmpdir=str(tmp_path))
    assert client.auth_enabled()
    client.update_auth(client.auth_token("admin", env.token))
    return client


def test_a_series_stored_through_nginx_is_contoured_as_rtstruct(stack, tmp_path):
    pacs = DICOMwebClient(f"{stack.stack.url}/proxy/dicom", headers={"Authorization": f"Bearer {stack.token}"})
    for case in stack.series:
        pacs.store_instances([pydicom.dcmread(f) for f in sorted(case.folder.glob("*.dcm"))])
    client = client_for(stack, tmp_path)
    assert {c.uid for c in stack.series} <= set(client.datastore()["objects"])
    case = stack.series[0]
    result_file, result = client.infer("ctv", case.uid, {"result_format": "rtstruct"})
    ds = pydicom.dcmread(result_file)
    assert ds.Modality == "RTSTRUCT" and result["dicom"]["referenced_series"] == case.uid
    headers = pydicom.dcmread(next(case.folder.glob("*.dcm")), stop_before_pixels=True)
    assert ds.StudyInstanceUID == headers.StudyInstanceUID and ds.PatientID == headers.PatientID
    assert [str(r.ROIName) for r in ds.StructureSetROISequence]


def test_a_saved_label_trains_and_both_replicas_serve_the_new_model(stack, tmp_path):
    client = client_for(stack, tmp_path)
    for case in stack.series[:2]:  # the phantoms' own structures, as a clinician's corrected labels
        path = tmp_path / f"{case.uid}.nii.gz"
        nib.save(nib.Nifti1Image(case.label.astype(np.uint8), case.affine), path)
        client.save_label(case.uid, str(path), tag="final", params={"annotator": "container_test"})
    before = client.infer("ctv", stack.series[2].uid, {})[1]["provenance"]["model"]["sha256"]
    client.train_start("ctv", {"max_epochs": 1, "val_split": 0.0, "name": "containers", "pretrained": True})
    # A fresh client polls: MONAILabelClient 0.8.5 keeps the POST's content-length among its headers
    # (http_method updates the client's own dict), so its next GET promises a body it never sends and
    # nginx answers 408 after a minute. Found here; a server reached directly did not mind.
    poller = client_for(stack, tmp_path / "poller")
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        status = poller.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(3)
    assert status.get("status") == "DONE", status
    served = {}
    ask = ("import json, sys, urllib.request as u; r = u.Request('http://127.0.0.1:8000/infer/ctv?output=json&image=' "
           "+ sys.argv[1], data=b'', headers={'Authorization': 'Bearer ' + sys.argv[2]}); "
           "print(json.load(u.urlopen(r, timeout=600))['provenance']['model']['sha256'])")
    for cid in stack.stack.containers("ctv") + stack.stack.containers("ctv-trainer"):  # each server asked itself
        served[cid] = podman("exec", cid, "python", "-c", ask, stack.series[2].uid, stack.token, timeout=700).stdout.strip()
    assert len(served) == 3 and len(set(served.values())) == 1, served
    assert next(iter(served.values())) != before
    after = client.infer("ctv", stack.series[2].uid, {})[1]["provenance"]["model"]["sha256"]
    assert after == next(iter(served.values()))
    stack.trained = after


def test_a_replica_container_killed_mid_load_loses_no_request(stack):
    images = [stack.series[i % len(stack.series)].uid for i in range(12)]
    done: list[str] = []
    lock = threading.Lock()

    def one(image: str) -> tuple[str, dict, int]:
        result, tries = infer_retrying(stack.stack.url, image, stack.token)
        with lock:
            done.append(image)
        return image, result, tries

    victim = stack.stack.containers("ctv")[0]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, image) for image in images]
        deadline = time.monotonic() + 600
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        podman("kill", "--signal", "KILL", victim)
        killed_at = len(done)
        outcomes = [f.result(timeout=1200) for f in futures]
    print(f"killed replica {victim[:12]} after {killed_at}/12 answers; "
          f"{sum(t > 1 for _, _, t in outcomes)} requests retried by the client")
    assert [image for image, _, _ in outcomes] == images
    assert all(result["provenance"]["input"]["image"] == image for image, result, _ in outcomes)


def test_the_server_runs_as_non_root_and_writes_only_its_volumes(stack):
    cid = stack.stack.containers("ctv-trainer")[0]
    assert podman("exec", cid, "id", "-u").stdout.strip() == "10001"
    written = podman("exec", cid, "sh", "-c", "touch /opt/ctv/x 2>&1; touch /usr/x 2>&1; touch /data/x && echo ok",
                     check=False).stdout  # fmt: skip
    assert written.count("Permission denied") == 2 and written.strip().endswith("ok"), written
    added = [line[2:] for line in podman("diff", cid).stdout.splitlines() if line.startswith("A ")]
    # /tmp: the DICOMweb cache and the log file, both made again by a new container
    outside = [path for path in added if not path.startswith(("/data/", "/tmp/", "/run/", "/dev/"))]
    print("written outside the volumes:", outside)
    assert not outside, outside


def test_volumes_keep_labels_users_the_audit_log_and_the_model_across_down_and_up(stack, tmp_path):
    auth = {"Authorization": f"Bearer {stack.token}"}
    labelled = requests.get(f"{stack.stack.url}/datastore/?output=stats", headers=auth, timeout=60).json()["completed"]
    assert labelled >= 2  # the labels saved above, as SEGs in the PACS
    before = requests.get(f"{stack.stack.url}/audit/", headers=auth, timeout=60).json()
    stack.stack.compose("down")  # the containers and network go; the named volumes stay
    assert not stack.stack.containers("ctv-trainer")
    stack.stack.compose("up", "-d")
    wait_served(stack.stack.url, stack.token)  # the same admin token: users.json is on the volume
    assert requests.get(f"{stack.stack.url}/datastore/?output=stats", headers=auth, timeout=60).json()["completed"] == labelled
    after = requests.get(f"{stack.stack.url}/audit/", headers=auth, timeout=60).json()
    assert len(after) >= len(before) and after[: len(before)] == before  # nothing lost
    result_file, result = client_for(stack, tmp_path).infer("ctv", stack.series[0].uid, {})
    assert nib.load(result_file).shape == stack.series[0].label.shape
    assert result["provenance"]["model"]["sha256"] == stack.trained  # the trained model, from the volume
