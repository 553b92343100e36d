"""Access control through the real server with CTV_AUTH_FILE: every route of its own OpenAPI (and the
pages and proxies outside it) answers 401 without a token or with a wrong one, 403 with too weak a
role, and gets past access control with the role it needs; the clients log in; the audit log."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ctv_app.lib.audit import AuditLog
from ctv_app.lib.security import ROLES, User, add_user, rule_for
from ctv_datastore.build import HELD_OUT_SEED_START, build

from ..support import APP_DIR, REPO, ServerProcess, free_port
from ..test_ohif import CHROMIUM, CHROMIUM_ARGS

IMAGE = f"phantom_{HELD_OUT_SEED_START:05d}"
PRELABELLED = f"phantom_{HELD_OUT_SEED_START + 1:05d}"  # its label is in labels/final before the server starts
ALLOWED_ORIGIN = "https://viewer.example.org"  # CTV_CORS_ORIGINS of the secured server
FOREIGN_ORIGIN = "https://evil.example.com"
TRUSTED_PROXY = "127.0.0.2"  # CTV_TRUSTED_PROXIES of the secured server (loopback has all of 127/8)
NAMES = {"annotator": "dr_a", "reviewer": "rev_b", "physicist": "phys_d", "admin": "boss_c"}
# Path parameters name nothing that exists: an admin's DELETE /model/{model} must not delete the model.
PATH_VALUES = {"model": "no_such_model", "strategy": "no_such_strategy", "method": "no_such_method",
               "session_id": "no_such_session", "case_id": "no_such_case", "what": "image",
               "result_id": "no_such_result", "fmt": "nifti", "image": "no_such_image",
               "name": "no_such_report.json"}  # fmt: skip
OUTSIDE_SCHEMA = [("GET", "/"), ("GET", "/ctv/"), ("GET", "/ctv/static/app.js"), ("GET", "/ohif/"),
                  ("GET", "/proxy/dicom/studies"), ("GET", "/favicon.ico"), ("GET", "/docs"), ("POST", "/reload")]  # fmt: skip


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    studies = folder / "studies"
    build(str(studies), [HELD_OUT_SEED_START, HELD_OUT_SEED_START + 1], labelled={HELD_OUT_SEED_START + 1})
    users_file = folder / "users.json"
    tokens = {role: add_user(str(users_file), NAMES[role], role) for role in ROLES}
    stored = users_file.read_text()
    assert not any(token in stored for token in tokens.values())  # only hashes are kept
    model = folder / "model" / "ctv.pt"  # its own copy: admins may replace models here
    model.parent.mkdir()
    shutil.copy(APP_DIR / "model" / "ctv.pt", model)
    env = {"CTV_AUTH_FILE": str(users_file), "CTV_CORS_ORIGINS": ALLOWED_ORIGIN, "CTV_TRUSTED_PROXIES": TRUSTED_PROXY}
    conf = {"ctv_model": str(model)}
    with ServerProcess(studies, folder / "server", env=env, conf=conf) as server:
        server.tokens, server.model = tokens, model
        yield server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def operations(server) -> list[tuple[str, str]]:
    spec = requests.get(f"{server.url}/openapi.json", headers=bearer(server.tokens["annotator"]), timeout=30).json()
    found = [
        (m.upper(), p) for p, ops in spec["paths"].items() for m in ops if m in ("get", "put", "post", "delete", "head")
    ]
    assert len(found) >= 40, found  # MONAI Label's API and ours, not an empty schema
    return found + OUTSIDE_SCHEMA


def call(server, method: str, path: str, headers=None, auth=None) -> requests.Response:
    url = server.url + re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
    return requests.request(method, url, headers=headers, auth=auth, timeout=120, allow_redirects=False)


# What the issue asks of each role, on the routes that do it (the walk below checks all routes).
EXPECTED_ROLES = {
    ("POST", "/infer/{model}"): "annotator",
    ("PUT", "/datastore/label"): "annotator",
    ("POST", "/ctv/api/cases"): "annotator",
    ("PUT", "/ctv/api/cases/{case_id}/annotation"): "annotator",
    ("POST", "/activelearning/{strategy}"): "annotator",
    ("DELETE", "/datastore/label"): "reviewer",
    ("POST", "/train/{model}"): "admin",
    ("PUT", "/model/{model}"): "admin",
    ("DELETE", "/model/{model}"): "admin",
    ("PUT", "/datastore/image"): "admin",
    ("DELETE", "/datastore/image"): "admin",
    ("GET", "/audit/"): "admin",
    ("PUT", "/commission/cases/{image}"): "reviewer",
    ("POST", "/commission/{model}"): "physicist",
    ("POST", "/models/{model}/approve"): "physicist",
    ("POST", "/models/{model}/rollback"): "physicist",
    ("GET", "/models/{model}"): "annotator",
}


def test_every_route_needs_a_token_and_the_right_role(secured):
    server = secured
    found = operations(server)
    assert set(EXPECTED_ROLES) <= set(found)
    assert {key: rule_for(*key).role for key in EXPECTED_ROLES} == EXPECTED_ROLES
    checked = []
    for method, path in found:
        rule = rule_for(method, path)
        if rule.role is None:
            assert path in ("/auth/", "/auth/token"), (method, path)  # the login itself
            continue
        for headers, auth in (
            (None, None),
            (bearer("wrong-token-" + "x" * 20), None),
            (None, (NAMES["admin"], "wrong")),
        ):
            r = call(server, method, path, headers, auth)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            if method != "HEAD":
                assert "token" in r.json()["detail"]
        weaker = [role for role in ROLES if not User("x", role).has(rule.role)]  # an admin approves nothing
        for role in weaker:
            r = call(server, method, path, bearer(server.tokens[role]))
            assert r.status_code == 403, (method, path, role, r.status_code, r.text)
            if method != "HEAD":
                assert f"needs the {rule.role} role" in r.json()["detail"]
        for role in set(ROLES) - set(weaker):
            r = call(server, method, path, bearer(server.tokens[role]))
            assert r.status_code not in (401, 403) and r.status_code < 500, (method, path, role, r.status_code, r.text)
        checked.append((method, path, rule.role))
    print(f"{len(checked)} routes checked: " + ", ".join(f"{m} {p} ({r})" for m, p, r in checked))
    assert {r for _, _, r in checked} == set(ROLES)
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 401  # still up, still closed


def test_annotator_contours_and_saves_but_cannot_train_or_replace(secured, tmp_path):
    server = secured
    annotator = bearer(server.tokens["annotator"])
    r = requests.post(
        f"{server.url}/infer/ctv", params={"image": IMAGE, "output": "image"}, headers=annotator, timeout=300
    )
    assert r.status_code == 200, r.text
    result = tmp_path / "result.nii.gz"
    result.write_bytes(r.content)
    saved = requests.put(
        f"{server.url}/datastore/label", params={"image": IMAGE, "tag": "final"}, headers=annotator,
        files={"label": ("label.nii.gz", result.read_bytes()), "params": (None, json.dumps({"annotator": "someone_else"}))},
        timeout=120,
    )  # fmt: skip
    assert saved.status_code == 200, saved.text
    info = requests.get(
        f"{server.url}/datastore/label/info", params={"label": IMAGE, "tag": "final"}, headers=annotator, timeout=30
    )
    assert info.json()["annotator"] == NAMES["annotator"]  # who logged in, not who the client claims to be

    # The page as this annotator: a case of a datastore study, annotated; the owner is the login.
    case = requests.post(f"{server.url}/ctv/api/cases", data={"image": IMAGE}, headers=annotator, timeout=300)
    assert case.status_code == 201, case.text
    case_id = case.json()["case"]["id"]
    annotated = requests.put(
        f"{server.url}/ctv/api/cases/{case_id}/annotation",
        files={"file": ("mine.nii.gz", result.read_bytes())},
        headers=annotator,
        timeout=120,
    )
    assert annotated.status_code == 200, annotated.text
    other = requests.get(f"{server.url}/ctv/api/cases/{case_id}", headers=bearer(server.tokens["admin"]), timeout=30)
    assert other.status_code == 404  # another user's case, even for an admin

    before = server.model.read_bytes()
    for method, path in (("POST", "/train/ctv"), ("PUT", "/model/ctv"), ("DELETE", f"/datastore/image?id={IMAGE}")):
        r = requests.request(
            method,
            server.url + path,
            headers=annotator,
            timeout=60,
            files={"file": ("m.pt", b"x")} if method == "PUT" else None,
        )
        assert r.status_code == 403, (method, path, r.text)
    assert server.model.read_bytes() == before
    listed = requests.get(f"{server.url}/datastore/?output=all", headers=annotator, timeout=30).json()
    assert IMAGE in listed["objects"]

    # The audit log: the save under the authenticated name, the refusals; admins only.
    assert requests.get(f"{server.url}/audit/", headers=annotator, timeout=30).status_code == 403
    entries = requests.get(f"{server.url}/audit/", headers=bearer(server.tokens["admin"]), timeout=30).json()
    save = [e for e in entries if e["action"] == "label.save" and e["status"] == 200]
    assert save[-1]["user"] == NAMES["annotator"] and save[-1]["image"] == IMAGE and save[-1]["tag"] == "final"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", save[-1]["time"])
    refused = {(e["action"], e["status"]) for e in entries if e["user"] == NAMES["annotator"]}
    assert {("train.start", 403), ("model.upload", 403), ("image.delete", 403)} <= refused
    only_mine = requests.get(
        f"{server.url}/audit/", params={"user": NAMES["admin"]}, headers=bearer(server.tokens["admin"]), timeout=30
    )
    assert all(e["user"] == NAMES["admin"] for e in only_mine.json())


def test_audit_log_is_only_ever_appended(secured):
    server = secured
    path = server.workdir / "audit.jsonl"
    before = path.read_bytes()
    requests.delete(
        f"{server.url}/datastore/label",
        params={"id": IMAGE, "tag": "no_such_tag"},
        headers=bearer(server.tokens["annotator"]),
        timeout=30,
    )
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    last = json.loads(after.splitlines()[-1])
    assert last["action"] == "label.delete" and last["status"] == 403 and last["user"] == NAMES["annotator"]


def test_monailabel_client_logs_in_as_slicer_does(secured, tmp_path):
    client = MONAILabelClient(secured.url, tmpdir=str(tmp_path))
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException):
        client.info()  # no token yet
    with pytest.raises(Exception):
        client.auth_token(NAMES["annotator"], "not-the-token")
    client.update_auth(client.auth_token(NAMES["annotator"], secured.tokens["annotator"]))
    assert client.auth_valid_token()
    assert "ctv" in client.info()["models"]
    result_file, result = client.infer("ctv", IMAGE, {})
    assert nib.load(result_file).shape == nib.load(secured.studies / f"{IMAGE}.nii.gz").shape
    with pytest.raises(MONAILabelClientException) as e:
        client.train_start("ctv", {})
    assert "403" in str(e.value.msg) or "403" in str(e.value)


def test_cli_with_a_token(secured, tmp_path):
    ctv = shutil.which("ctv", path=str(Path(sys.executable).parent))
    args = [ctv, "--server", secured.url, "infer", IMAGE, "--out", str(tmp_path / "out"), "--quiet"]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    run = subprocess.run(
        args[:3] + ["--token", secured.tokens["annotator"]] + args[3:], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 contoured" in run.stdout


def test_browser_logs_in_with_basic_credentials(secured):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            anonymous = browser.new_context().new_page()
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):  # 401, and no login
                anonymous.goto(f"{secured.url}/ctv/")
            credentials = {"username": NAMES["annotator"], "password": secured.tokens["annotator"]}
            page = browser.new_context(http_credentials=credentials).new_page()
            assert page.goto(f"{secured.url}/ctv/").status == 200
            status = page.evaluate("async () => (await fetch('/ctv/api/cases')).status")
            assert status == 200  # the page's own API calls carry the login
        finally:
            browser.close()


def audit_entries(server) -> list[dict]:
    return [json.loads(line) for line in (server.workdir / "audit.jsonl").read_text().splitlines()]


def request_from(source: str, server, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of one request sent from loopback address ``source`` (requests cannot choose it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60, source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def cors_headers(r: requests.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def preflight(server, origin: str, method: str = "PUT", path: str = "/datastore/label") -> requests.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method,
               "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    return requests.options(server.url + path, headers=headers, timeout=30)


def test_cross_origin_requests_are_refused_by_default(server):
    """Issue 16 item 9, on the local demo (no access control, no CTV_CORS_ORIGINS): a page of another site
    gets no CORS grant, and its preflights and simple requests are refused; the server's own pages work."""
    foreign = {"Origin": FOREIGN_ORIGIN}
    for r in (
        preflight(server, FOREIGN_ORIGIN),
        preflight(server, FOREIGN_ORIGIN, "DELETE", "/datastore/image"),
        requests.get(f"{server.url}/info/", headers=foreign, timeout=30),
        requests.post(f"{server.url}/activelearning/first", headers=foreign, timeout=30),  # no preflight needed
    ):
        assert r.status_code == 403 and "cross-origin" in r.text, (r.request.method, r.url, r.status_code, r.text)
        assert cors_headers(r) == {}, (r.request.method, r.url)
    own = {"Origin": server.url}  # what a browser sends with the page's own POSTs
    assert requests.get(f"{server.url}/ctv/", headers=own, timeout=30).status_code == 200
    r = requests.post(f"{server.url}/activelearning/first", headers=own, timeout=30)
    assert r.status_code == 200 and cors_headers(r) == {}, r.text


def test_only_configured_origins_are_allowed_across_sites(secured):
    """Issue 16 item 9: CTV_CORS_ORIGINS names the sites whose pages may call the server."""
    admin = bearer(secured.tokens["admin"])
    allowed = preflight(secured, ALLOWED_ORIGIN)
    assert allowed.status_code in (200, 204), allowed.text
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "PUT" in allowed.headers["Access-Control-Allow-Methods"]
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
    r = requests.get(f"{secured.url}/info/", headers={**admin, "Origin": ALLOWED_ORIGIN}, timeout=30)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    for r in (
        preflight(secured, FOREIGN_ORIGIN),
        requests.get(f"{secured.url}/info/", headers={**admin, "Origin": FOREIGN_ORIGIN}, timeout=30),
        requests.get(f"{secured.url}/info/", headers={**admin, "Origin": "null"}, timeout=30),
    ):
        assert r.status_code == 403 and cors_headers(r) == {}, (r.request.method, r.status_code, r.headers, r.text)


def test_refusals_cannot_flood_the_audit_log(secured):
    """Issue 16 item 13: 200 unauthenticated requests with 10 kB query strings; what the log keeps is bounded."""
    path = secured.workdir / "audit.jsonl"
    before = path.stat().st_size
    long = "x" * 5000
    for n in range(200):
        status = request_from("127.0.0.4", secured, "GET", f"/datastore/label/info?label={long}{n}&tag={long}", {})
        assert status == 401
    written = path.read_bytes()[before:]
    print(f"200 refusals with 10 kB query strings wrote {len(written):,} bytes to the audit log")
    assert len(written) < 64_000  # 2.4 MB for 40 such requests before
    mine = [e for e in map(json.loads, written.splitlines()) if e.get("client") == "127.0.0.4"]
    assert 1 <= len(mine) <= 60 and all(len(e["label"]) <= 201 and len(e["tag"]) <= 201 for e in mine)
    assert requests.get(f"{secured.url}/info/", headers=bearer(secured.tokens["annotator"]), timeout=30).ok


def test_repeated_refusals_are_counted_in_one_line(tmp_path):
    """Issue 16 item 13: past the bound, a minute's refusals of one client are one line with their count."""
    now = [1_000.0]
    audit = AuditLog(str(tmp_path / "audit.jsonl"), refusals_per_minute=3, clock=lambda: now[0])
    for n in range(50):
        audit.record_refusal({"user": None, "action": "refused", "status": 401, "client": "192.0.2.1", "n": n})
        audit.record_refusal({"user": None, "action": "refused", "status": 401, "client": "192.0.2.2", "n": n})
        now[0] += 1.0  # 50 s: one minute for both clients
    assert [e.get("n") for e in audit.read() if e["client"] == "192.0.2.1"] == [0, 1, 2]
    now[0] += 30.0
    audit.record_refusal({"user": None, "action": "refused", "status": 401, "client": "192.0.2.1", "n": 50})
    entries = audit.read()
    summaries = [e for e in entries if e["action"] == "refused.repeated"]
    assert {(e["client"], e["count"]) for e in summaries} == {("192.0.2.1", 47), ("192.0.2.2", 47)}
    assert entries[-1]["n"] == 50  # a new minute: recorded again


def test_forwarded_addresses_are_believed_only_from_configured_proxies(secured):
    """Issue 16 item 13: X-Forwarded-For / X-Real-IP name the audited address only when the configured proxy
    (CTV_TRUSTED_PROXIES) sends them; a local client cannot fake its address."""
    admin = bearer(secured.tokens["admin"])
    forged = {**admin, "X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}
    request_from("127.0.0.1", secured, "DELETE", "/datastore/label?id=xff_untrusted&tag=final", forged)
    proxied = {**admin, "X-Forwarded-For": "198.51.100.9", "X-Real-IP": "198.51.100.9"}
    request_from(TRUSTED_PROXY, secured, "DELETE", "/datastore/label?id=xff_trusted&tag=final", proxied)
    clients = {e["id"]: e["client"] for e in audit_entries(secured) if e.get("id", "").startswith("xff_")}
    assert clients == {"xff_untrusted": "127.0.0.1", "xff_trusted": "198.51.100.9"}


def put_label(server, image: str, path: Path, token: str) -> requests.Response:
    return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                        files={"label": (path.name, path.read_bytes())}, headers=bearer(token), timeout=120)  # fmt: skip


def empty_label(server, image: str, folder: Path) -> Path:
    """An all-background label on the image's grid."""
    ct = nib.load(server.studies / f"{image}.nii.gz")
    path = folder / f"{image}_empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ct.shape, np.uint8), ct.affine), path)
    return path


def label_info(server, image: str) -> dict:
    r = requests.get(f"{server.url}/datastore/label/info", params={"label": image, "tag": "final"},
                     headers=bearer(server.tokens["admin"]), timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_label_info_cannot_forge_what_the_server_records(secured, tmp_path):
    """Issue 16 item 11: annotator, version, sha256 and previous_sha256 are the server's to write."""
    token = secured.tokens["annotator"]
    assert put_label(secured, IMAGE, empty_label(secured, IMAGE, tmp_path), token).status_code == 200
    before = label_info(secured, IMAGE)
    for route in ("/datastore/label/info", "/datastore/updatelabelinfo"):
        for forged in ({"version": 0}, {"sha256": "0" * 64, "comment": "ok"}, {"annotator": "dr_x"},
                       {"previous_sha256": None, "version": 99}):  # fmt: skip
            r = requests.put(secured.url + route, params={"label": IMAGE, "tag": "final"},
                             files={"info": (None, json.dumps(forged))}, headers=bearer(token), timeout=30)  # fmt: skip
            assert r.status_code == 422, (route, forged, r.status_code, r.text)
            assert all(field in r.json()["detail"] for field in forged if field != "comment"), r.text
    assert label_info(secured, IMAGE) == before
    r = requests.put(f"{secured.url}/datastore/label/info", params={"label": IMAGE, "tag": "final"},
                     files={"info": (None, json.dumps({"comment": "checked"}))}, headers=bearer(token), timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text  # the client's own fields are still the client's
    assert label_info(secured, IMAGE) == {**before, "comment": "checked", "user": NAMES["annotator"]}


def test_infer_cannot_save_a_label(secured, tmp_path):
    """Issue 16 item 12: /infer with save_label would replace the final label with the raw contour, unaudited as
    a save: refused before the model runs; labels are saved with PUT /datastore/label."""
    token = secured.tokens["annotator"]
    assert put_label(secured, IMAGE, empty_label(secured, IMAGE, tmp_path), token).status_code == 200
    label = secured.studies / "labels" / "final" / f"{IMAGE}.nii.gz"
    before, info = label.read_bytes(), label_info(secured, IMAGE)
    params = {"save_label": True, "label_tag": "final"}
    r = requests.post(f"{secured.url}/infer/ctv", params={"image": IMAGE, "output": "json"},
                      files={"params": (None, json.dumps(params))}, headers=bearer(token), timeout=300)  # fmt: skip
    assert r.status_code == 422 and "save_label" in r.json()["detail"], r.text
    assert label.read_bytes() == before and label_info(secured, IMAGE) == info


def test_first_save_keeps_a_label_found_on_disk_as_v1(secured, tmp_path):
    """Issue 16 item 14: a label placed in labels/final by hand (or imported) is version 1 of its history
    when the first correction is saved through the server, not lost."""
    found = secured.studies / "labels" / "final" / f"{PRELABELLED}.nii.gz"
    original = found.read_bytes()
    image = nib.load(found)
    mask = np.asarray(image.dataobj).astype(np.uint8)
    assert mask.any()
    mask[..., mask.shape[2] // 2] = 0  # the correction: one slice removed
    corrected = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(mask, image.affine), corrected)
    r = put_label(secured, PRELABELLED, corrected, secured.tokens["annotator"])
    assert r.status_code == 200, r.text
    history = secured.studies / ".label_history" / "final" / PRELABELLED
    records = [json.loads(p.read_text()) for p in sorted(history.glob("*.json"))]
    copies = sorted(history.glob("*.nii.gz"))
    assert [r["version"] for r in records] == [1, 2]
    assert copies[0].read_bytes() == original and records[0]["sha256"] == hashlib.sha256(original).hexdigest()
    assert copies[1].read_bytes() == corrected.read_bytes() == found.read_bytes()
    assert records[1]["previous_sha256"] == records[0]["sha256"]
    info = label_info(secured, PRELABELLED)
    assert info["version"] == 2 and info["sha256"] == hashlib.sha256(found.read_bytes()).hexdigest()


def test_docker_entrypoint_turns_access_control_on(tmp_path):
    """docker/entrypoint.sh as the container runs it (here on 127.0.0.1): first start makes an admin."""
    studies = tmp_path / "studies"
    build(str(studies), [HELD_OUT_SEED_START], labelled=set())
    port = free_port()
    env = {**os.environ, "CTV_DATA": str(tmp_path / "data"), "STUDIES": str(studies), "HOST": "127.0.0.1",
           "PORT": str(port), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}  # fmt: skip
    env.pop("CTV_AUTH_TOKENS", None), env.pop("CTV_AUTH_FILE", None)
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "docker" / "entrypoint.sh")], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/info/", timeout=2).status_code == 401:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise AssertionError(log.read_text()[-3000:])
        token = re.search(r"its token, shown only now: (\S+)", log.read_text()).group(1)
        assert requests.get(f"{url}/info/", headers=bearer(token), timeout=10).status_code == 200
        assert requests.get(f"{url}/audit/", headers=bearer(token), timeout=10).status_code == 200
        assert (tmp_path / "data" / "audit.jsonl").exists()
        # Clinical mode: the shipped weights are a candidate version; nothing is served before an approval.
        lifecycle = requests.get(f"{url}/info/", headers=bearer(token), timeout=10).json()["lifecycle"]["ctv"]
        assert lifecycle["mode"] == "clinical" and lifecycle["served_version"] is None
        shipped = hashlib.sha256((REPO / "apps" / "ctv_app" / "model" / "ctv.pt").read_bytes()).hexdigest()
        assert (tmp_path / "data" / "models" / "ctv" / "versions" / f"{shipped}.pt").exists()
        assert token not in (tmp_path / "data" / "users.json").read_text()
        health = subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")], env={**os.environ, "PORT": str(port)})
        assert health.returncode == 0  # the container's HEALTHCHECK: up, and asking for a token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
