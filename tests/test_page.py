"""The contouring page at /ctv/ in headless Chromium (Debian's), driven by Playwright; and its API.

Uploads the real CT, sees the contour drawn on the canvas, pages with the keyboard, plays, downloads
and checks the files, and sees a corrupt upload refused. Screenshots go to runs/screenshots/
(CTV_SCREENSHOTS overrides). Two users uploading at once stay apart.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from .conftest import HELD_OUT_SEEDS, VH
from .support import REAL_CT
from .test_ohif import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

pytestmark = pytest.mark.skipif(not REAL_CT.exists(), reason="../shared/data is not present")

TINTED_PIXELS = """(id) => {
    const c = document.getElementById(id); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) n++;
    return n; }"""
MASK_SLICE_VOXELS = """(k) => { const s = window.ctvState, n = s.meta.rows * s.meta.cols; let v = 0;
    for (let i = k * n; i < (k + 1) * n; i++) if (s.mask[i]) v++; return v; }"""
BUSIEST_SLICE = """() => { const s = window.ctvState, n = s.meta.rows * s.meta.cols; let best = 0, most = -1;
    for (let k = 0; k < s.meta.slices; k++) { let v = 0; for (let i = k * n; i < (k + 1) * n; i++) if (s.mask[i]) v++;
      if (v > most) { most = v; best = k; } } return best; }"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def browser_page(p):
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    page = browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True).new_page()
    page.set_default_timeout(300_000)
    return browser, page


def upload(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.click("#upload")


def slice_no(page) -> int:
    return int(page.evaluate("() => document.body.dataset.slice"))


def test_page_upload_view_navigate_download(server, tmp_path):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a CT")
    with sync_playwright() as p:
        browser, page = browser_page(p)
        try:
            page.goto(f"{server.url}/ctv/")
            # A corrupt upload: a visible message, and nothing stored.
            upload(page, corrupt)
            page.wait_for_selector("#error:not([hidden])")
            assert "not a readable" in page.inner_text("#error")
            page.screenshot(path=SCREENSHOTS / "page_1_corrupt_upload.png")
            assert page.locator("#history li").count() == 0

            upload(page, REAL_CT)
            page.wait_for_selector("#viewer-panel:not([hidden])")
            page.wait_for_function("() => window.ctvState.mask !== null")
            assert page.locator("#history li").count() == 1
            assert "W 400 / L 40" in page.inner_text("#window")

            # The overlay: on the slice with most contour, exactly the contour's voxels are tinted.
            k = page.evaluate(BUSIEST_SLICE)
            page.evaluate(f"() => showSlice({k})")
            voxels = page.evaluate(MASK_SLICE_VOXELS, k)
            assert voxels > 0
            assert page.evaluate(TINTED_PIXELS, "view-main") == voxels
            page.screenshot(path=SCREENSHOTS / "page_2_contour.png")
            page.select_option("#layout", "side")
            page.screenshot(path=SCREENSHOTS / "page_3_side_by_side.png")
            assert page.evaluate(TINTED_PIXELS, "view-image") == 0 and page.evaluate(TINTED_PIXELS, "view-main") == voxels

            # Keyboard paging.
            page.locator("#slice").focus()
            page.keyboard.press("Home")
            assert slice_no(page) == 0
            page.keyboard.press("ArrowUp")
            assert slice_no(page) == 1
            page.keyboard.press("PageUp")
            assert slice_no(page) == 11
            page.keyboard.press("PageDown")
            assert slice_no(page) == 1
            page.keyboard.press("End")
            slices = page.evaluate("() => window.ctvState.meta.slices")
            assert slice_no(page) == slices - 1 == 111  # the real CT has 112 axial slices

            # Autoplay advances, at the interval asked for.
            page.keyboard.press("Home")
            page.fill("#interval", "100")
            page.click("#play")
            page.wait_for_timeout(1500)
            page.click("#play")
            moved = slice_no(page)
            assert 5 <= moved <= 20, moved
            timings = page.evaluate("() => window.ctvTimings")
            print(f"slice switch: median {np.median(timings):.1f} ms, max {np.max(timings):.1f} ms over {len(timings)}")

            # Downloads: the NIfTI result on the input's grid, naming the input's sha256 and the model.
            links = page.locator("#downloads a")
            assert [links.nth(i).get_attribute("data-format") for i in range(links.count())] == ["nifti"]
            with page.expect_download() as download:
                links.first.click()
            saved = tmp_path / "ctv.nii.gz"
            download.value.save_as(saved)
            provenance_text = page.inner_text("#provenance")

            # A saved annotation (here: the contour with every other row removed) is drawn beside it.
            result = nib.load(saved)
            edited = np.asarray(result.dataobj).copy()
            edited[:, ::2, :] = 0
            annotation = tmp_path / "annotation.nii.gz"
            nib.save(nib.Nifti1Image(edited, result.affine), annotation)
            page.set_input_files("#annotation-file", str(annotation))
            page.click("#annotation-upload")
            page.wait_for_function("() => window.ctvState.annotation !== null")
            page.select_option("#layout", "side")
            page.evaluate(f"() => showSlice({k})")
            on_slice = page.evaluate(MASK_SLICE_VOXELS.replace("s.mask", "s.annotation"), k)
            assert 0 < on_slice < voxels
            assert page.evaluate(TINTED_PIXELS, "view-annotation") == on_slice
            page.screenshot(path=SCREENSHOTS / "page_4_annotation.png")
        finally:
            browser.close()
    result, source = nib.load(saved), nib.load(REAL_CT)
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    embedded = json.loads(result.header.extensions[0].get_content())
    assert embedded["input"]["sha256"] == sha256(REAL_CT)
    assert embedded["input"]["sha256"] in provenance_text and embedded["model"]["sha256"] in provenance_text


def test_dicom_zip_gets_rtstruct_and_seg_naming_its_input(server, tmp_path):
    """API level: a zipped DICOM series gives NIfTI, RTSTRUCT and SEG, each naming the input."""
    archive = tmp_path / "vh.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(VH.glob("CT_*.dcm")):
            z.write(f, f"series/{f.name}")
    s = requests.Session()
    s.headers["X-CTV-Owner"] = "owner-" + "a" * 32
    r = s.post(f"{server.url}/ctv/api/cases", files={"file": ("vh.zip", archive.read_bytes())}, timeout=120)
    assert r.status_code == 201, r.text
    case_id, result_id = r.json()["case"]["id"], r.json()["result"]["id"]
    case = wait_done(s, server.url, case_id, result_id)
    result = next(x for x in case["results"] if x["id"] == result_id)
    assert set(result["files"]) == {"nifti", "rtstruct", "dicom_seg"}
    assert case["input"]["sha256"] == sha256(archive)
    contoured = case["input"]["contoured_sha256"]
    for fmt, text_of in (("rtstruct", "StructureSetDescription"), ("dicom_seg", "ImageComments")):
        got = s.get(f"{server.url}/ctv/api/cases/{case_id}/results/{result_id}/{fmt}", timeout=60)
        assert got.status_code == 200
        path = tmp_path / f"{fmt}.dcm"
        path.write_bytes(got.content)
        ds = pydicom.dcmread(path)
        assert f"input sha256 {contoured}" in str(ds.get(text_of)) and result["model"] in str(ds.get(text_of))
    assert s.get(f"{server.url}/ctv/api/cases/{case_id}/results/{result_id}/stl", timeout=30).status_code == 422
    # Re-contouring keeps the earlier result.
    second = s.post(f"{server.url}/ctv/api/cases/{case_id}/contour", timeout=60).json()
    case = wait_done(s, server.url, case_id, second["id"])
    assert [x["status"] for x in case["results"]] == ["done", "done"]


def wait_done(session: requests.Session, url: str, case_id: str, result_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        case = session.get(f"{url}/ctv/api/cases/{case_id}", timeout=30).json()
        result = next(x for x in case["results"] if x["id"] == result_id)
        assert result["status"] != "failed", result
        if result["status"] == "done":
            return case
        time.sleep(0.3)
    raise AssertionError(f"case {case_id} not contoured in {timeout_s} s")


def test_two_users_uploading_at_once_stay_apart(server, studies):
    inputs = {"alice": REAL_CT, "bob": studies / f"phantom_{HELD_OUT_SEEDS[0]:05d}.nii.gz"}
    sessions = {name: requests.Session() for name in inputs}
    for name, s in sessions.items():
        s.headers["X-CTV-Owner"] = f"{name}-" + "x" * 32
    created: dict[str, dict] = {}
    barrier = threading.Barrier(len(inputs))

    def send(name: str) -> None:
        data = inputs[name].read_bytes()
        barrier.wait()  # both uploads in flight together
        r = sessions[name].post(f"{server.url}/ctv/api/cases", files={"file": (inputs[name].name, data)}, timeout=300)
        created[name] = r.json()

    threads = [threading.Thread(target=send, args=(n,)) for n in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for name, s in sessions.items():
        case = created[name]["case"]
        wait_done(s, server.url, case["id"], created[name]["result"]["id"])
        assert case["input"]["sha256"] == sha256(inputs[name])
        assert [c["id"] for c in s.get(f"{server.url}/ctv/api/cases", timeout=30).json()] == [case["id"]]
    alice, bob = created["alice"]["case"]["id"], created["bob"]["case"]["id"]
    assert sessions["bob"].get(f"{server.url}/ctv/api/cases/{alice}", timeout=30).status_code == 404
    assert sessions["alice"].get(f"{server.url}/ctv/api/cases/{bob}/view/image", timeout=30).status_code == 404
    assert requests.get(f"{server.url}/ctv/api/cases", timeout=30).status_code == 401  # no owner at all


def owner_session(name: str) -> requests.Session:
    s = requests.Session()
    s.headers["X-CTV-Owner"] = f"{name}-" + "o" * 32
    return s


def test_sagittal_series_is_shown_with_the_spacing_of_its_displayed_axes(server, tmp_path):
    """A sagittal-acquired DICOM series (columns along A-P, rows along S-I, slices along R-L) with
    three different spacings: the view reports each spacing for the axis it is drawn along."""
    from ctv_datastore.dicom_export import write_ct_series
    from ctv_datastore.phantom import make_phantom

    spacing = (1.5, 2.5, 4.0)  # x (R-L), y (A-P), z (S-I)
    phantom = make_phantom(HELD_OUT_SEEDS[1], shape=(48, 40, 24), spacing=spacing)
    sagittal = np.transpose(phantom.image, (1, 2, 0))  # index (y, z, x): a cycle, not a swap
    affine = phantom.affine[:, [1, 2, 0, 3]]
    write_ct_series(sagittal, affine, str(tmp_path / "series"))
    archive = tmp_path / "sagittal.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "series").iterdir()):
            z.write(f, f.name)
    s = owner_session("sagittal")
    r = s.post(f"{server.url}/ctv/api/cases", files={"file": (archive.name, archive.read_bytes())}, timeout=120)
    assert r.status_code == 201, r.text
    view = s.get(f"{server.url}/ctv/api/cases/{r.json()['case']['id']}/view", timeout=60).json()
    # Display: axial slices (S-I), rows A-P, columns R-L, whatever the acquisition order.
    assert (view["slices"], view["rows"], view["cols"]) == (24, 40, 48)
    assert view["spacing_mm"] == pytest.approx({"col": spacing[0], "row": spacing[1], "slice": spacing[2]})


def test_page_api_refuses_unknown_results_and_duplicate_contours_and_shows_no_paths(server, studies, tmp_path):
    s = owner_session("checks")
    image = studies / f"phantom_{HELD_OUT_SEEDS[2]:05d}.nii.gz"
    r = s.post(f"{server.url}/ctv/api/cases", files={"file": (image.name, image.read_bytes())}, timeout=120)
    assert r.status_code == 201, r.text
    case_id, result_id = r.json()["case"]["id"], r.json()["result"]["id"]
    # One pending contour per case: asking again while the first is queued or running is a conflict.
    again = s.post(f"{server.url}/ctv/api/cases/{case_id}/contour", timeout=60)
    assert again.status_code == 409 and "already" in again.json()["detail"], again.text
    wait_done(s, server.url, case_id, result_id)

    # view?result= names a result of this case or nothing: never a new cache file, never a path.
    view_dir = server.workdir / "cases" / case_id / "view"
    assert s.get(f"{server.url}/ctv/api/cases/{case_id}/view/image", timeout=60).status_code == 200
    cached = sorted(view_dir.iterdir())
    for value in ("../../x", "/etc/passwd", "abc", "0" * 32, "..%2F..%2Fx"):
        for what in ("image", "mask"):
            got = s.get(f"{server.url}/ctv/api/cases/{case_id}/view/{what}", params={"result": value}, timeout=60)
            assert got.status_code in (404, 422), (what, value, got.status_code, got.text)
    assert sorted(view_dir.iterdir()) == cached
    mask = s.get(f"{server.url}/ctv/api/cases/{case_id}/view/mask", params={"result": result_id}, timeout=60)
    assert mask.status_code == 200

    # After it finished, a new contour is welcome again.
    second = s.post(f"{server.url}/ctv/api/cases/{case_id}/contour", timeout=60)
    assert second.status_code == 200, second.text
    wait_done(s, server.url, case_id, second.json()["id"])

    # An unreadable annotation: the message names the upload, not the server's file.
    broken = s.put(f"{server.url}/ctv/api/cases/{case_id}/annotation",
                   files={"file": ("my_contour.nii.gz", b"not a NIfTI file")}, timeout=60)  # fmt: skip
    assert broken.status_code == 422, broken.text
    detail = broken.json()["detail"]
    assert "my_contour.nii.gz" in detail and "/tmp" not in detail and str(server.workdir) not in detail, detail
