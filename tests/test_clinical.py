"""The clinical lifecycle through the real server (issue 19): clinical mode, model versions, the
commissioning set and report, a physicist's approval and rollback, surviving restarts and kill -9.

One server in clinical mode with access control on (a user per role), on small synthetic phantoms: the
shipped demo weights (trained on phantoms, not clinical) are given as the first candidate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from ctv_app.lib.checkpoint import load_checkpoint, save_checkpoint
from ctv_app.lib.errors import ConflictError
from ctv_app.lib.metrics import compare
from ctv_app.lib.networks import network_for
from ctv_app.lib.params import CTVParams
from ctv_app.lib.provenance import file_sha256
from ctv_app.lib.security import add_user
from ctv_app.lib.versions import ModelVersions
from ctv_datastore.build import HELD_OUT_SEED_START, build

from .support import APP_DIR, ServerProcess

TRAIN_SEEDS = [3100, 3101, 3102, 3103]
COMMISSIONING = [f"phantom_{s:05d}" for s in range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 3)]
# Lenient on purpose: the demo weights pass, random weights fail (the department's own are stricter). The demo
# weights' bowel bag has a median HD95 of 49 mm on these phantoms: its own criterion.
CRITERIA = {"default": {"dice": ">= 0.5", "hd95_mm": "<= 30"}, "structures": {"Bag_Bowel": {"hd95_mm": "<= 80"}}}
ROLES = ("annotator", "reviewer", "physicist", "admin")
SHIPPED = APP_DIR / "model" / "ctv.pt"


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinic")
    studies = root / "studies"
    build(str(studies), TRAIN_SEEDS + [HELD_OUT_SEED_START + i for i in range(3)],
          labelled=set(TRAIN_SEEDS) | {HELD_OUT_SEED_START + i for i in range(3)})  # fmt: skip
    users = root / "users.json"
    tokens = {role: add_user(str(users), f"{role}_1", role) for role in ROLES}
    (root / "criteria.json").write_text(json.dumps(CRITERIA))
    given = root / "given" / "ctv.pt"
    given.parent.mkdir()
    shutil.copy(SHIPPED, given)
    conf = {"clinical_mode": "true", "ctv_model": str(given), "acceptance_criteria": str(root / "criteria.json"),
            "data_dir": str(root / "data")}  # fmt: skip
    return {"root": root, "studies": studies, "tokens": tokens, "conf": conf, "given": given,
            "env": {"CTV_AUTH_FILE": str(users)}, "shipped_sha": file_sha256(SHIPPED)}  # fmt: skip


def start(clinic) -> ServerProcess:
    return ServerProcess(clinic["studies"], clinic["root"] / "server", conf=clinic["conf"], env=clinic["env"])


def call(server, clinic, role: str, method: str, path: str, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {clinic['tokens'][role]}"}
    return requests.request(method, server.url + path, headers=headers, timeout=600, **kw)


def served_by_infer(server, clinic) -> str | None:
    """The model version a result names, or None when /infer refuses (503)."""
    r = call(server, clinic, "annotator", "POST", f"/infer/ctv?image={COMMISSIONING[0]}&output=json", json={})
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    return r.json()["provenance"]["model"]["sha256"]


def random_weights(path: Path, like: Path, seed: int = 1) -> Path:
    import torch

    torch.manual_seed(seed)
    params = CTVParams.from_dict(load_checkpoint(str(like))["params"])
    save_checkpoint(str(path), network_for(params).state_dict(), params, {"note": "random weights: fails commissioning"})
    return path


def test_commission_approve_train_rollback_and_survive_kill(clinic, tmp_path):
    given_sha = file_sha256(clinic["given"])
    with start(clinic) as server:
        # Clinical mode serves nothing a physicist has not approved; the given weights are a candidate.
        assert served_by_infer(server, clinic) is None
        r = call(server, clinic, "annotator", "POST", f"/infer/ctv?image={COMMISSIONING[0]}&output=json", json={})
        assert "approved" in r.json()["detail"]
        listed = call(server, clinic, "annotator", "GET", "/models/ctv").json()
        assert listed["mode"] == "clinical" and listed["served"] is None
        assert [(v["sha256"], v["source"], v["status"]) for v in listed["versions"]] == [(given_sha, "shipped", "candidate")]

        # No report: no approval.
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/approve?version={given_sha[:12]}&comment=ok")
        assert r.status_code == 409 and "no commissioning report" in r.json()["detail"]

        # Commissioning cases: marked by a reviewer or above, with a reference label.
        assert call(server, clinic, "annotator", "PUT", f"/commission/cases/{COMMISSIONING[0]}").status_code == 403
        for image in COMMISSIONING:
            assert call(server, clinic, "reviewer", "PUT", f"/commission/cases/{image}").status_code == 200
        assert call(server, clinic, "reviewer", "PUT", "/commission/cases/no_such_image").status_code == 404

        # The report: the metrics module's numbers, judged against the criteria.
        r = call(server, clinic, "physicist", "POST", f"/commission/ctv?version={given_sha[:12]}")
        assert r.status_code == 200, r.text
        summary = r.json()
        assert summary["passed"] is True, summary
        report = call(server, clinic, "annotator", "GET", summary["json"]).json()
        assert sorted(report["cases"]) == sorted(COMMISSIONING)
        check_report_numbers(report, clinic)
        html = call(server, clinic, "annotator", "GET", summary["html"])
        assert html.status_code == 200 and "PASSED" in html.text and "data:image/png;base64," in html.text
        (clinic["root"] / "report.html").write_text(html.text)
        check_report_renders(clinic["root"] / "report.html")

        # The reference labels a report used are locked.
        label = clinic["studies"] / "labels" / "final" / f"{COMMISSIONING[0]}.nii.gz"
        with open(label, "rb") as f:
            r = call(server, clinic, "admin", "PUT", f"/datastore/label?image={COMMISSIONING[0]}", files={"label": f})
        assert r.status_code == 409 and "locked" in r.json()["detail"]
        r = call(server, clinic, "admin", "DELETE", f"/datastore/label?id={COMMISSIONING[0]}&tag=final")
        assert r.status_code == 409
        assert call(server, clinic, "reviewer", "DELETE", f"/commission/cases/{COMMISSIONING[0]}").status_code == 409

        # Only a physicist approves, with a comment; then results name the approved version.
        for role in ("annotator", "reviewer", "admin"):
            r = call(server, clinic, role, "POST", f"/models/ctv/approve?version={given_sha[:12]}&comment=ok")
            assert r.status_code == 403, (role, r.text)
        assert call(server, clinic, "physicist", "POST", f"/models/ctv/approve?version={given_sha[:12]}").status_code == 422
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/approve?version={given_sha[:12]}&comment=passed commissioning")
        assert r.status_code == 200, r.text
        assert r.json()["report_sha256"] == summary["sha256"]
        assert served_by_infer(server, clinic) == given_sha

        # A failing candidate (random weights, uploaded by an admin) is kept, commissioned, refused.
        bad = random_weights(tmp_path / "random.pt", clinic["given"])
        with open(bad, "rb") as f:
            r = call(server, clinic, "admin", "PUT", "/model/ctv", files={"file": f})
        assert r.status_code == 200 and r.json()["served"] is False, r.text
        bad_sha = r.json()["sha256"]
        from ctv_client.cli import main as ctv  # the script client, as a physicist's script would run it

        out = tmp_path / "reports"
        assert ctv(["--server", server.url, "--token", clinic["tokens"]["physicist"], "commission", "--version",
                    bad_sha[:12], "--out", str(out)]) == 1  # fmt: skip
        (bad_json,) = out.glob("*.json")
        bad_report = json.loads(bad_json.read_text())
        assert bad_report["passed"] is False and bad_report["version"] == bad_sha and (out / f"{bad_json.stem}.html").exists()
        assert bad_report["approved_version"] == given_sha  # paired with the approved version
        assert all("versus_approved" in s for s in bad_report["structures"].values())
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/approve?version={bad_sha[:12]}&comment=try")
        assert r.status_code == 409 and "failed" in r.json()["detail"]
        assert served_by_infer(server, clinic) == given_sha

        # Training makes a candidate and leaves the served model byte-identical; commissioning cases stay out.
        served_file = Path(clinic["conf"]["data_dir"]) / "models" / "ctv" / "served.pt"
        before = file_sha256(served_file)
        params = {"max_epochs": 2, "val_split": 0.25, "train_batch_size": 2, "patches_per_volume": 1, "name": "clinic"}
        assert call(server, clinic, "admin", "POST", "/train/ctv", json=params).status_code == 200
        wait_for_training(server, clinic)
        assert file_sha256(served_file) == before and served_by_infer(server, clinic) == given_sha
        trained = [v for v in call(server, clinic, "annotator", "GET", "/models/ctv").json()["versions"]
                   if v["source"] == "trained"]  # fmt: skip
        assert len(trained) == 1 and trained[0]["status"] == "candidate" and trained[0]["parent"] == given_sha
        seen = {entry["id"] for entry in trained[0]["training"]["labels"]}
        seen |= set(trained[0]["training"]["validation_labels"])
        assert seen == {f"phantom_{s:05d}.nii.gz" for s in TRAIN_SEEDS}, seen  # no commissioning case
        assert all(entry["sha256"] for entry in trained[0]["training"]["labels"])
        candidate = trained[0]["sha256"]
        r = call(server, clinic, "physicist", "POST", f"/commission/ctv?version={candidate[:12]}")
        assert r.status_code == 200, r.text
        if not r.json()["passed"]:  # two epochs may not be enough: approve needs a pass, so force the story
            pytest.fail(f"the fine-tuned candidate failed lenient criteria: {r.json()}")
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/approve?version={candidate[:12]}&comment=fine-tuned")
        assert r.status_code == 200
        assert served_by_infer(server, clinic) == candidate

        # Rollback: only to a version approved before.
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/rollback?version={bad_sha[:12]}&comment=x")
        assert r.status_code == 409
        r = call(server, clinic, "reviewer", "POST", f"/models/ctv/rollback?version={given_sha[:12]}&comment=x")
        assert r.status_code == 403
        r = call(server, clinic, "physicist", "POST", f"/models/ctv/rollback?version={given_sha[:12]}&comment=edits rose")
        assert r.status_code == 200
        assert served_by_infer(server, clinic) == given_sha
        audit = [json.loads(line) for line in (clinic["root"] / "server" / "audit.jsonl").read_text().splitlines()]
        actions = [(e["action"], e.get("user"), e.get("version")) for e in audit if e["action"].startswith("model.")]
        assert ("model.approved", "physicist_1", given_sha) in actions
        assert ("model.rolled_back", "physicist_1", given_sha) in actions
        assert all(e.get("comment") and e.get("report_sha256") for e in audit if e["action"] == "model.approved")

    # A restart serves the same version.
    with start(clinic) as server:
        assert served_by_infer(server, clinic) == given_sha
        # kill -9 while an approval is in flight: after a restart, the journal, the served file and the
        # results agree on one version (the approval happened, or it did not).
        r = call(server, clinic, "physicist", "POST", f"/commission/ctv?version={candidate[:12]}")  # a fresh report
        assert r.status_code == 200
        import threading

        threading.Thread(target=lambda: _quietly(call, server, clinic, "physicist", "POST",
                         f"/models/ctv/approve?version={candidate[:12]}&comment=again"), daemon=True).start()  # fmt: skip
        time.sleep(0.05)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
    with start(clinic) as server:
        versions = ModelVersions(clinic["conf"]["data_dir"], "ctv", clinical=True)
        journal_says = versions.served_version()
        assert journal_says in (given_sha, candidate)
        assert served_by_infer(server, clinic) == journal_says == file_sha256(versions.served_path)
    assert file_sha256(SHIPPED) == clinic["shipped_sha"] and file_sha256(clinic["given"]) == given_sha


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except requests.RequestException:
        pass


def wait_for_training(server, clinic, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = call(server, clinic, "annotator", "GET", "/train/").json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            assert status.get("status") == "DONE", status
            return
        time.sleep(2)
    raise AssertionError("training did not finish")


def check_report_numbers(report: dict, clinic) -> None:
    """The report's figures are the metrics module's for the same masks: contour each case in-process with
    the same version and compare with ``metrics.compare`` here."""
    import nibabel as nib

    from ctv_app.lib.structures import decode_label
    from ctv_train.evaluate import served_infer_task

    version = Path(clinic["conf"]["data_dir"]) / "models" / "ctv" / "versions" / f"{report['version']}.pt"
    task = served_infer_task(str(version))
    structures = task.served("cpu").params.structure_list
    for case in report["cases"]:
        result, _ = task({"image": str(clinic["studies"] / f"{case}.nii.gz"), "device": "cpu", "label_encoding": "bitmask"})
        bitmask = np.asarray(nib.load(result).dataobj)
        os.unlink(result)
        label = nib.load(clinic["studies"] / "labels" / "final" / f"{case}.nii.gz")
        truth, contained = decode_label(np.asarray(label.dataobj), structures)
        spacing = tuple(float(s) for s in label.header.get_zooms()[:3])
        for c, name in enumerate(structures.names):
            if not contained[c]:
                continue
            mine = compare(structures.mask(bitmask, name), truth[c] > 0, spacing).as_dict()
            theirs = report["structures"][name]["cases"][case]
            for metric in ("dice", "hd95_mm", "msd_mm", "surface_dice_2mm", "surface_dice_3mm", "volume_diff_ml"):
                assert theirs[metric] == pytest.approx(mine[metric], abs=1e-9), (case, name, metric)


def test_monitoring_follows_known_edits_raises_the_alarm_and_ranks_the_most_edited(tmp_path):
    """Corrections with known edits of the served model's contours: the stored agreement is the metrics
    module's, the added path length of a slice the model missed is that slice's contour, and the alarm
    follows the rolling median of surface Dice @3 mm against the default criterion (>= 0.8)."""
    import nibabel as nib
    from monailabel.client import MONAILabelClient

    from ctv_app.lib.metrics import added_path_length, contour_pixels
    from ctv_app.lib.structures import Structures

    images = [f"phantom_{s:05d}" for s in (HELD_OUT_SEED_START + 5, HELD_OUT_SEED_START + 6, HELD_OUT_SEED_START + 7)]
    studies = tmp_path / "studies"
    build(str(studies), [HELD_OUT_SEED_START + 5, HELD_OUT_SEED_START + 6, HELD_OUT_SEED_START + 7], labelled=set())
    model = tmp_path / "model" / "ctv.pt"
    model.parent.mkdir()
    shutil.copy(SHIPPED, model)
    conf = {"ctv_model": str(model), "monitor_window": "3"}
    with ServerProcess(studies, tmp_path / "server", conf=conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        expected = {}
        for i, image in enumerate(images):
            result, params = client.infer("ctv", image, {"label_encoding": "bitmask", "result_compress": False})
            ref = nib.load(result)
            pred = np.asarray(ref.dataobj)
            structures = Structures([s["name"] for s in params["structures"]])
            ctv = structures.mask(pred, "CTV")
            final_ctv = ctv.copy()
            if i == 0:  # the model stopped one slice short: the clinician draws one more, a copy of its top slice
                top = int(np.flatnonzero(ctv.any(axis=(0, 1)))[-1])
                final_ctv[..., top + 1] = ctv[..., top]
            else:  # a gross correction: the CTV moved 12 voxels to one side
                final_ctv = np.roll(ctv, 12, axis=0)
            final = pred & ~np.asarray(1, pred.dtype)  # every structure as the model drew it, but the CTV (bit 0)
            final |= final_ctv.astype(pred.dtype)
            path = tmp_path / f"{image}_final.nii.gz"
            nib.save(nib.Nifti1Image(final, ref.affine), path)
            client.save_label(image, str(path), tag="final",
                              params={"encoding": "bitmask", "label_names": structures.labels})  # fmt: skip
            spacing = tuple(float(s) for s in ref.header.get_zooms()[:3])
            expected[image] = compare(ctv, final_ctv, spacing).as_dict()
            expected[image]["apl_mm"] = added_path_length(ctv, final_ctv, spacing)
            if i == 0:
                pixel_mm = (spacing[0] + spacing[1]) / 2
                assert expected[image]["apl_mm"] == pytest.approx(contour_pixels(ctv[..., top]).sum() * pixel_mm)
                voxel_ml = np.prod(spacing) / 1000
                added_ml = ctv[..., top].sum() * voxel_ml
            summary = requests.get(f"{server.url}/monitoring/ctv", timeout=30).json()
            stored = summary["edits"][-1]
            assert stored["image"] == image and stored["version"] == file_sha256(model)
            for metric in ("surface_dice_3mm", "dice", "apl_mm"):
                assert stored["structures"]["CTV"][metric] == pytest.approx(expected[image][metric], abs=1e-9), metric
            untouched = {n: f for n, f in stored["structures"].items() if n != "CTV"}
            assert untouched and all(f["apl_mm"] == 0 and f["added_ml"] == 0 and f["removed_ml"] == 0 for f in untouched.values())
            if i == 0:
                assert stored["structures"]["CTV"]["added_ml"] == pytest.approx(added_ml)
                assert stored["structures"]["CTV"]["removed_ml"] == 0
                first_ok = expected[image]["surface_dice_3mm"] >= 0.8
                assert summary["structures"]["CTV"]["alarm"] is (not first_ok)
        # Two gross corrections: the median of the last three falls below 0.8, the alarm is on everywhere.
        assert max(expected[i]["surface_dice_3mm"] for i in images[1:]) < 0.8
        summary = requests.get(f"{server.url}/monitoring/ctv", timeout=30).json()
        assert summary["structures"]["CTV"]["alarm"] is True
        assert [n for n, s in summary["structures"].items() if s["alarm"]] == ["CTV"]
        assert "CTV" in requests.get(f"{server.url}/info/", timeout=30).json()["lifecycle"]["ctv"]["alarms"]
        audit = [json.loads(line) for line in (tmp_path / "server" / "audit.jsonl").read_text().splitlines()]
        assert [e["structure"] for e in audit if e["action"] == "monitoring.alarm"] == ["CTV"]
        # most_edited offers the study whose correction redrew the most contour.
        most = max(images, key=lambda i: sum(f["apl_mm"] for f in next(
            e for e in reversed(summary["edits"]) if e["image"] == i)["structures"].values()))  # fmt: skip
        assert client.next_sample("most_edited", {})["id"] == most
        check_quality_page(server.url, most)


def check_quality_page(url: str, most: str) -> None:
    """The models-and-quality page in Chromium: the alarm, the chart's CTV line, the versions and card."""
    from playwright.sync_api import sync_playwright

    from .test_ohif import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1200, "height": 1300}).new_page()
        page.goto(f"{url}/ctv/static/clinical.html?model=ctv")
        page.wait_for_function("() => document.body.dataset.loaded || document.body.dataset.error", timeout=60_000)
        assert page.evaluate("() => document.body.dataset.loaded") == "ctv", page.evaluate("() => document.body.dataset.error")
        assert page.is_visible("#alarm") and "CTV" in page.inner_text("#alarm")
        assert page.locator("#chart polyline[data-structure=CTV]").count() == 1
        assert page.locator("#chart circle").count() >= 3
        assert page.inner_text("#most-edited tbody tr:first-child td:first-child") == most
        assert page.locator("#versions tbody tr.served").count() == 1
        assert "SYNTHETIC" in page.inner_text("#card")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "clinical_quality.png"), full_page=True)
        browser.close()


def check_report_renders(path: Path) -> None:
    """The self-contained report in Chromium, offline: its box plots and worst-case slices are drawn."""
    from playwright.sync_api import sync_playwright

    from .test_ohif import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1250, "height": 1400}).new_page()
        page.goto(path.as_uri())
        drawn = page.evaluate("() => [...document.images].map((i) => i.complete && i.naturalWidth > 100)")
        assert len(drawn) == 4 and all(drawn), drawn  # the box plots and the three worst cases
        assert page.inner_text("#verdict").startswith("PASSED")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "commissioning_report.png"), full_page=True)
        browser.close()


def test_journal_is_the_truth_after_a_torn_append_or_a_stale_served_file(tmp_path):
    """A crash while appending leaves a torn last line: an entry that never happened. A crash between the
    journal and the served file's copy leaves a stale file: the next start puts it right from the journal."""
    data = tmp_path / "data"
    first = random_weights(tmp_path / "a.pt", SHIPPED)
    versions = ModelVersions(str(data), "ctv", clinical=True)
    versions.start(str(SHIPPED), "shipped")
    other = versions.add(str(first), "uploaded")["sha256"]
    shipped = file_sha256(SHIPPED)
    assert versions.served_version() is None and not os.path.exists(versions.served_path)
    for sha in (shipped, other):
        versions.add_report(sha, {"id": f"r-{sha[:6]}", "sha256": "0" * 64, "passed": True, "time": "t", "cases": 3})
    versions.approve(shipped, "phys", "first")
    assert file_sha256(versions.served_path) == shipped
    with open(versions.journal_path, "a") as f:  # a torn approval of the other version
        f.write('{"action": "approve", "version": "' + other[:20])
    restarted = ModelVersions(str(data), "ctv", clinical=True)
    assert restarted.served_version() == shipped and restarted.reconcile() == shipped
    restarted.approve(other, "phys", "second")  # appends after the torn line, on a line of its own
    assert restarted.served_version() == other and len(restarted.journal()) == 2
    shutil.copy(SHIPPED, restarted.served_path)  # a crash before the served file was replaced
    again = ModelVersions(str(data), "ctv", clinical=True)
    again.start(str(SHIPPED), "shipped")
    assert file_sha256(again.served_path) == other
    third = again.add(str(random_weights(tmp_path / "b.pt", SHIPPED, seed=2)), "uploaded")["sha256"]
    with pytest.raises(ConflictError, match="never approved"):
        again.rollback(third[:12], "phys", "x")
    with pytest.raises(ConflictError, match="already"):
        again.rollback(other[:12], "phys", "x")
    assert again.rollback(shipped[:12], "phys", "back")["version"] == shipped
    assert file_sha256(again.served_path) == shipped


def test_research_mode_training_publishes_a_version_and_never_writes_the_shipped_weights(tmp_path):
    """A server started the standard way (no --conf ctv_model) trains into its data folder: the served
    version changes, the shipped file in the repository does not."""
    from monailabel.client import MONAILabelClient

    studies = tmp_path / "studies"
    build(str(studies), [3200, 3201, 3202], labelled={3200, 3201, 3202})
    shipped = file_sha256(SHIPPED)
    with ServerProcess(studies, tmp_path / "server") as server:  # ServerProcess gives only data_dir
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        before = requests.get(f"{server.url}/models/ctv", timeout=30).json()
        assert before["mode"] == "research" and before["served"] == shipped
        # No validation split: research mode publishes every epoch (nothing to compare the served model with).
        client.train_start("ctv", {"max_epochs": 1, "val_split": 0, "train_batch_size": 2, "patches_per_volume": 1})
        deadline = time.monotonic() + 900
        while client.train_status().get("status") in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
        assert client.train_status()["status"] == "DONE"
        after = requests.get(f"{server.url}/models/ctv", timeout=30).json()
        trained = [v for v in after["versions"] if v["source"] == "trained"]
        assert len(trained) == 1 and after["served"] == trained[0]["sha256"] and trained[0]["parent"] == shipped
        assert [e["action"] for e in after["journal"]] == ["import", "publish"]
        _, result = client.infer("ctv", "phantom_03200", {})
        assert result["provenance"]["model"]["sha256"] == after["served"]
    assert file_sha256(SHIPPED) == shipped
