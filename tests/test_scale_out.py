"""Scale-out without containers: two servers share one Orthanc (DICOMweb) and one model file,
behind Debian's nginx running docker/nginx/ctv.conf.template, all on loopback. Training runs on the
trainer and both replicas serve what it publishes; a replica killed mid-load loses no request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests

from ctv_app.lib.provenance import file_sha256
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .conftest import series_uid
from .support import APP_DIR, REPO, NginxProcess, OrthancProcess, ServerProcess, infer_retrying

SEEDS = (9201, 9202, 9203)  # held-out phantoms (SYNTHETIC)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    with OrthancProcess(root / "orthanc") as orthanc:
        series = []
        for seed in SEEDS:
            phantom, folder = make_phantom(seed), root / f"dicom_{seed}"
            write_ct_series(phantom.image, phantom.affine, str(folder), patient_id=f"SCALE_{seed}")
            orthanc.stow(sorted(folder.glob("*.dcm")))
            series.append(series_uid(folder))
        model = root / "model" / "ctv.pt"  # one model file for all servers, as the shared /data volume
        model.parent.mkdir()
        shutil.copy(APP_DIR / "model" / "ctv.pt", model)
        pacs = {"MONAI_LABEL_DICOMWEB_USERNAME": orthanc.user, "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.password}

        def replica(name: str) -> ServerProcess:
            env = {**pacs, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / name / "cache")}
            return ServerProcess(orthanc.dicomweb_url, root / name, conf={"ctv_model": str(model)}, env=env)

        with replica("trainer") as trainer, replica("replica") as other:
            backends = [f"127.0.0.1:{trainer.port}", f"127.0.0.1:{other.port}"]
            with NginxProcess(root / "nginx", backends, trainer=backends[0]) as nginx:
                yield SimpleNamespace(nginx=nginx, trainer=trainer, replica=other, series=series, model=model,
                                      orthanc=orthanc)  # fmt: skip


def infers_served(server: ServerProcess) -> int:
    lines = (server.workdir / "audit.jsonl").read_text().splitlines()
    return sum(json.loads(line)["action"] == "infer" and json.loads(line)["status"] == 200 for line in lines)


def test_requests_through_nginx_reach_both_replicas(cluster):
    for image in cluster.series + cluster.series[:1]:
        result, _ = infer_retrying(cluster.nginx.url, image)
        assert result["provenance"]["input"]["image"] == image
    assert infers_served(cluster.trainer) >= 1 and infers_served(cluster.replica) >= 1
    health = [sys.executable, str(REPO / "docker" / "healthcheck.py")]  # the container's HEALTHCHECK
    assert subprocess.run(health, env={**os.environ, "PORT": str(cluster.replica.port)}).returncode == 0


def test_training_on_the_trainer_is_served_by_both_replicas(cluster, tmp_path):
    url = cluster.nginx.url
    for image in cluster.series[:2]:  # the model's own contours, saved as corrected labels (to the PACS)
        contour = requests.post(f"{url}/infer/ctv", params={"image": image, "output": "image"}, timeout=600)
        assert contour.status_code == 200, contour.text
        saved = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                             files={"label": ("label.nii.gz", contour.content)}, timeout=300)  # fmt: skip
        assert saved.status_code == 200, saved.text
    before = file_sha256(cluster.model)
    params = {"max_epochs": 1, "val_split": 0.0, "name": "scale_out", "pretrained": True}
    started = requests.post(f"{url}/train/ctv", json=params, timeout=60)
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()  # /train/ goes to the trainer
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(2)
    assert status.get("status") == "DONE", status
    published = file_sha256(cluster.model)
    assert published != before
    for server in (cluster.trainer, cluster.replica):  # each asked directly, not through nginx
        result, _ = infer_retrying(server.url, cluster.series[2])
        assert result["provenance"]["model"]["sha256"] == published, server.url


def test_ohif_shows_a_study_through_nginx(cluster):
    """The bundled OHIF, served by the replicas through nginx, reads DICOM through their proxies."""
    from playwright.sync_api import sync_playwright

    from .test_ohif import CHROMIUM, CHROMIUM_ARGS, VOLUMES_LOADED

    found = cluster.orthanc.client().search_for_series(search_filters={"SeriesInstanceUID": cluster.series[0]})
    study = found[0]["0020000D"]["Value"][0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(180_000)
            page.goto(f"{cluster.nginx.url}/ohif/viewer?StudyInstanceUIDs={study}")
            page.wait_for_function(VOLUMES_LOADED, timeout=180_000)
        finally:
            browser.close()
    access = (cluster.nginx.workdir / "access.log").read_text().splitlines()
    proxied = [(line.split('"')[2].split()[0], line.split('"')[1]) for line in access if "/proxy/dicom/" in line]
    # 499 is nginx's "client closed the request": OHIF cancels frame fetches it no longer needs (its
    # request pool drops prefetches when the viewports change), so it is not a proxy failure.
    failed = [f"{status} {request}" for status, request in proxied if not status.startswith(("2", "3", "499"))]
    assert proxied and not failed, failed[:10]


def test_a_replica_killed_mid_load_loses_no_request(cluster):
    images = [cluster.series[i % len(cluster.series)] for i in range(16)]
    done = []
    lock = threading.Lock()
    served_before = infers_served(cluster.replica)

    def one(image: str) -> tuple[str, dict, int]:
        result, tries = infer_retrying(cluster.nginx.url, image)
        with lock:
            done.append(image)
        return image, result, tries

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, image) for image in images]
        deadline = time.monotonic() + 300
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(cluster.replica.proc.pid, signal.SIGKILL)  # mid-run: requests are in flight on it
        killed_at = len(done)
        # Idempotent requests during the failure: nginx itself moves them to the live server.
        gets = [requests.get(f"{cluster.nginx.url}/datastore/?output=all", timeout=60).status_code for _ in range(6)]
        outcomes = [f.result(timeout=900) for f in futures]
    retried = sum(tries > 1 for _, _, tries in outcomes)
    print(f"killed the replica after {killed_at}/16 answers; {retried} requests retried by the client; "
          f"replica served {infers_served(cluster.replica) - served_before} before dying")  # fmt: skip
    assert [image for image, _, _ in outcomes] == images
    assert all(result["provenance"]["input"]["image"] == image for image, result, _ in outcomes)
    assert gets == [200] * 6
    assert requests.get(f"{cluster.trainer.url}/info/", timeout=10).status_code == 200
