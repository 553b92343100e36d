"""The contouring page at /ctv/ in headless Chromium (Debian's), driven by Playwright; and its API.

Uploads the real CT, sees the contour drawn on the canvas, pages with the keyboard, plays, downloads
and checks the files, and sees a corrupt upload refused. With a multi-structure model: a legend row per
structure (colour, name, volume), each structure drawn in its colour, and one toggled off gone from the
overlay while the structures it overlapped show. Screenshots go to runs/screenshots/ (CTV_SCREENSHOTS
overrides). Two users uploading at once stay apart.
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

from ctv_app.lib.structures import Structures
from ctv_app.lib.web import display_volume

from . import structure_sets
from .conftest import HELD_OUT_SEEDS, VH
from .support import REAL_CT
from .test_ohif import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

# The multi-structure test model and its server (fixtures).
structures_model, structures_server = structure_sets.structures_model, structure_sets.structures_server

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

            # Downloads: the NIfTI results (label map, bitmask) on the input's grid, naming the input's sha256
            # and the model.
            links = page.locator("#downloads a")
            formats = [links.nth(i).get_attribute("data-format") for i in range(links.count())]
            assert formats == ["nifti", "nifti_bitmask"]
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


# What the main canvas shows of one structure (``bit``) on the current slice, against the page's bitmask:
# ``expected``: pixels in any structure shown; ``tinted``: pixels not grey; ``alone``/``alone_grey``: pixels of
# this structure in no other structure shown, and how many of them are grey; ``shared``/``shared_tinted``:
# pixels of it also in another structure shown; ``top``/``top_colour``: its outline pixels where no
# structure listed before it is shown (drawn last, opaque), and how many of them have its exact colour.
STRUCTURE_PIXELS = """(bit) => {
    const s = window.ctvState, {rows, cols} = s.meta, n = rows * cols, off = s.slice * n, m = s.mask;
    const shown = s.structures.filter((x) => !s.hidden.has(x.name));
    const visible = shown.reduce((a, x) => a | (1 << (x.value - 1)), 0), others = visible & ~bit;
    const me = s.structures.find((x) => (1 << (x.value - 1)) === bit);
    const before = shown.filter((x) => x.value < me.value).reduce((a, x) => a | (1 << (x.value - 1)), 0);
    const c = document.getElementById('view-main'), d = c.getContext('2d').getImageData(0, 0, cols, rows).data;
    const r = {expected: 0, tinted: 0, alone: 0, alone_grey: 0, shared: 0, shared_tinted: 0, top: 0, top_colour: 0};
    for (let i = 0; i < n; i++) {
        const v = m[off + i], p = 4 * i, tinted = d[p] !== d[p + 1] || d[p + 1] !== d[p + 2];
        if (v & visible) r.expected++;
        if (tinted) r.tinted++;
        if (!(v & bit)) continue;
        if (v & others) { r.shared++; if (tinted) r.shared_tinted++; } else { r.alone++; if (!tinted) r.alone_grey++; }
        const row = (i / cols) | 0, col = i - row * cols;
        const edge = col === 0 || col === cols - 1 || row === 0 || row === rows - 1 || !(m[off + i - 1] & bit) ||
            !(m[off + i + 1] & bit) || !(m[off + i - cols] & bit) || !(m[off + i + cols] & bit);
        if (edge && !(v & before)) {
            r.top++;
            if (d[p] === me.colour[0] && d[p + 1] === me.colour[1] && d[p + 2] === me.colour[2]) r.top_colour++;
        }
    }
    return r; }"""
# The slice where a structure shows most of itself alone or on top of the others.
SLICE_OF_STRUCTURE = """(bit) => { const s = window.ctvState, n = s.meta.rows * s.meta.cols, m = s.mask;
    const me = s.structures.find((x) => (1 << (x.value - 1)) === bit);
    const before = s.structures.filter((x) => x.value < me.value).reduce((a, x) => a | (1 << (x.value - 1)), 0);
    let best = 0, most = -1;
    for (let k = 0; k < s.meta.slices; k++) { let v = 0;
        for (let i = k * n; i < (k + 1) * n; i++) if ((m[i] & bit) && !(m[i] & before)) v++;
        if (v > most) { most = v; best = k; } }
    return best; }"""


def test_page_legend_and_toggles_show_every_structure(structures_server, tmp_path):
    """A model of several overlapping structures: the legend lists each (colour, name, volume), each is
    drawn in its colour, and one toggled off leaves the overlay while the structures it overlapped show."""
    from playwright.sync_api import sync_playwright

    server = structures_server
    labels = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["ctv"]["labels"]
    names = sorted(labels, key=labels.get)
    assert len(names) > 1
    with sync_playwright() as p:
        browser, page = browser_page(p)
        try:
            page.goto(f"{server.url}/ctv/")
            upload(page, REAL_CT)
            page.wait_for_selector("#viewer-panel:not([hidden])")
            page.wait_for_function("() => window.ctvState.mask !== null")
            structures = page.evaluate("() => window.ctvState.structures")
            assert [(s["name"], s["value"]) for s in structures] == [(n, labels[n]) for n in names]

            # The legend: every structure of the model, in its order, with its colour and volume.
            rows = page.locator("#structures tr")
            assert [rows.nth(i).get_attribute("data-structure") for i in range(rows.count())] == names
            for i, s in enumerate(structures):
                row = rows.nth(i)
                assert s["voxels"] > 0, f"the test model gives no {s['name']}"
                assert row.locator(".name").inner_text() == s["name"]
                assert row.locator(".volume").inner_text() == f"{s['volume_ml']:.1f} ml"
                swatch = row.locator(".swatch").evaluate("e => e.style.background")
                assert swatch == "rgb({}, {}, {})".format(*s["colour"])
                assert row.locator("input[type=checkbox]").is_checked()
            # The page's bitmask holds each structure whole: its voxel count is the result's.
            counts = page.evaluate("""() => { const s = window.ctvState;
                return s.structures.map((x) => { let v = 0; const bit = 1 << (x.value - 1);
                    for (let i = 0; i < s.mask.length; i++) if (s.mask[i] & bit) v++; return v; }); }""")
            assert counts == [s["voxels"] for s in structures]
            page.evaluate(f"() => showSlice({page.evaluate(BUSIEST_SLICE)})")
            page.screenshot(path=SCREENSHOTS / "page_5_structures.png")

            overlapped = 0
            for s in structures:
                bit = 1 << (s["value"] - 1)
                toggle = page.locator(f'#structures tr[data-structure="{s["name"]}"] input')
                page.evaluate(f"() => showSlice({page.evaluate(SLICE_OF_STRUCTURE, bit)})")
                shown = page.evaluate(STRUCTURE_PIXELS, bit)
                # Drawn: exactly the pixels of the structures shown are tinted; its outline is its own colour.
                assert shown["tinted"] == shown["expected"] > 0, (s["name"], shown)
                assert shown["top"] > 0 and shown["top_colour"] == shown["top"], (s["name"], shown)
                assert shown["alone_grey"] == 0, (s["name"], shown)
                toggle.click()
                hidden = page.evaluate(STRUCTURE_PIXELS, bit)
                if s["name"] == names[0]:
                    page.screenshot(path=SCREENSHOTS / "page_6_structure_hidden.png")
                toggle.click()
                # Hidden: its colour is gone; where it was alone the CT shows, where it overlapped another
                # structure that one shows (the page has every structure whole, not a label map).
                assert hidden["tinted"] == hidden["expected"], (s["name"], hidden)
                assert hidden["top_colour"] == 0 and hidden["alone_grey"] == hidden["alone"], (s["name"], hidden)
                assert hidden["shared_tinted"] == hidden["shared"], (s["name"], hidden)
                overlapped += hidden["shared"] > 0
            assert overlapped > 0  # the test model's structures overlap: the toggles showed what lies beneath

            links = page.locator("#downloads a")
            saved = {}
            for i in range(links.count()):
                fmt = links.nth(i).get_attribute("data-format")
                with page.expect_download() as download:
                    links.nth(i).click()
                saved[fmt] = tmp_path / f"{fmt}.nii.gz"
                download.value.save_as(saved[fmt])
            view = bytes(page.evaluate("() => Array.from(new Uint8Array(window.ctvState.mask.buffer))"))
        finally:
            browser.close()

    # The files: the bitmask holds every structure whole (overlaps included); the label map is its
    # first-listed structure per voxel; both carry the structures in their header.
    assert set(saved) == {"nifti", "nifti_bitmask"}
    bitmask_image, labelmap_image = nib.load(saved["nifti_bitmask"]), nib.load(saved["nifti"])
    bitmask, labelmap = np.asarray(bitmask_image.dataobj), np.asarray(labelmap_image.dataobj)
    model = Structures([{k: s[k] for k in ("name", "roi_type", "colour")} for s in structures])
    assert [int(np.count_nonzero(model.mask(bitmask, n))) for n in names] == [s["voxels"] for s in structures]
    assert np.count_nonzero([model.mask(bitmask, n) for n in names], axis=0).max() > 1  # overlaps kept
    np.testing.assert_array_equal(labelmap, model.labelmap(bitmask))
    for image, encoding in ((bitmask_image, "bitmask"), (labelmap_image, "labelmap")):
        header = json.loads(image.header.extensions[0].get_content())
        assert header["encoding"] == encoding and [s["name"] for s in header["structures"]] == names
    # What the page drew from is that bitmask, in display orientation.
    assert view == display_volume(bitmask, bitmask_image.affine).astype(bitmask.dtype.newbyteorder("<")).tobytes()


def test_a_result_from_before_structure_sets_is_still_shown(tmp_path):
    """A stored result of the single-structure server (one CTV mask, ``ctv_volume_ml``, no bitmask): the
    page gets it described as its one structure, and its mask as that structure's bit."""
    from ctv_app.lib.cases import CaseStore
    from ctv_app.lib.structures import CATALOGUE
    from ctv_app.lib.transforms.validation import load_ct
    from ctv_app.lib.web import ContouringService, public
    from ctv_datastore.phantom import make_phantom

    phantom = make_phantom(HELD_OUT_SEEDS[0], shape=(48, 40, 24))
    ct, mask = tmp_path / "ct.nii.gz", tmp_path / "ctv.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), ct)
    legacy = phantom.mask("CTV").astype(np.uint8)
    nib.save(nib.Nifti1Image(legacy, phantom.affine), mask)
    store = CaseStore(str(tmp_path / "cases"))
    case = store.create("owner-" + "l" * 32, ct.name, str(ct), validate=load_ct)
    result = store.new_result(case)
    files = store.publish_files(case, result["id"], {"nifti": str(mask)})
    store.set_result(case, result["id"], status="done", stage="done", files=files, model="0" * 64, ctv_volume_ml=12.5)

    ctv = CATALOGUE["CTV"]
    shown = public(case)["results"][0]
    assert shown["structures"] == [
        {"name": "CTV", "value": 1, "roi_type": ctv.roi_type, "colour": list(ctv.colour), "volume_ml": 12.5}
    ]
    assert "structures" not in case.record["results"][0]  # the stored record is left as it was
    service = ContouringService(store, None, "ctv", (-160.0, 240.0), None)
    view = np.fromfile(service.view_bytes(case, "mask", result["id"]), np.uint8)
    np.testing.assert_array_equal(view, display_volume(legacy, phantom.affine).reshape(-1))


def test_datastore_study_with_a_bitmask_label_opens_with_its_annotation(structures_model, tmp_path):
    """A study whose saved label is a bitmask of overlapping structures (as a clinical RTSTRUCT imports)
    opens on the page, its label shown as the annotation: any structure of it."""
    from monailabel.client import MONAILabelClient

    from ctv_datastore.build import build
    from ctv_datastore.phantom import make_phantom

    from .support import ServerProcess

    seed = HELD_OUT_SEEDS[2]
    build(str(tmp_path / "studies"), [seed], labelled=set())
    image_id, phantom = f"phantom_{seed:05d}", make_phantom(seed)
    ctv, bladder = phantom.mask("CTV"), phantom.mask("Bladder")
    grown = ctv | np.roll(ctv, 3, axis=1)  # the CTV grown into the bladder: overlapping structures
    # The client's own bits (label_names: bit value - 1): values no label map of the model's has.
    bitmask = (grown.astype(np.uint8) * 1) | (bladder.astype(np.uint8) * 32)
    assert ((bitmask & 1) & (bitmask >> 5)).any()
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(bitmask, phantom.affine), label)
    with ServerProcess(tmp_path / "studies", tmp_path / "server", conf={"ctv_model": str(structures_model)}) as server:
        MONAILabelClient(server.url, tmpdir=str(tmp_path)).save_label(
            image_id, str(label), tag="final", params={"encoding": "bitmask", "label_names": {"CTV": 1, "Bladder": 6}}
        )
        s = owner_session("bitmask-label")
        r = s.post(f"{server.url}/ctv/api/cases", data={"image": image_id}, timeout=120)
        assert r.status_code == 201, r.text
        case_id = r.json()["case"]["id"]
        assert r.json()["case"]["annotation"]["name"] == f"{image_id} (datastore final label)"
        shown = s.get(f"{server.url}/ctv/api/cases/{case_id}/view/annotation", timeout=60)
        assert shown.status_code == 200
        wait_done(s, server.url, case_id, r.json()["result"]["id"])
    assert shown.content == display_volume((bitmask > 0).astype(np.uint8), phantom.affine).tobytes()


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
    assert set(result["files"]) == {"nifti", "nifti_bitmask", "rtstruct", "dicom_seg"}
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
