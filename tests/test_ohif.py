"""OHIF end to end: the OHIF v3 viewer bundled in monailabel, on the server on a real Orthanc,
driven in headless Chromium (Debian's /usr/bin/chromium) by Playwright.

Opens a study, connects the MONAI Label panel to a server serving a model of several structures (the
tests' random-weight cervix model, ``structure_sets``), sees each structure the model lists (``/info``)
as its own segment, runs `ctv`, checks that each structure's voxels land in its segment (and the
screen changed; screenshots saved), saves it with the viewer's own Save, and checks that a SEG of
every structure referencing the series lands in Orthanc; then saves it as the panel's client would
(PUT /datastore/label, naming each segment's structure) and checks what training reads back. The
study is a SYNTHETIC pelvic phantom: the real Visible Human series is a neck, with no CTV to show
(once, a blob in the air beside it; ``test_dicomweb`` checks every result there stays inside the
patient).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from . import structure_sets
from .conftest import DICOMWEB_ANNOTATOR, VH

CREDENTIALS = {"username": DICOMWEB_ANNOTATOR[0], "password": DICOMWEB_ANNOTATOR[1]}  # Basic, as a browser logs in

CHROMIUM = "/usr/bin/chromium"
# Headless in a closed network: no GPU, no background fetches to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(os.environ.get("CTV_SCREENSHOTS", Path(__file__).resolve().parents[1] / "runs" / "screenshots"))

pytestmark = [
    pytest.mark.skipif(not VH.exists(), reason="../shared/data/dicom is not present"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (scripts/setup.sh)"),
]

# The multi-structure test model on the test Orthanc (fixtures).
structures_model, structures_dw_client = structure_sets.structures_model, structure_sets.structures_dw_client
structures_dicomweb_server = structure_sets.structures_dicomweb_server

LABELMAP_VOXELS = """() => {
    const v = window.services.segmentationService.getLabelmapVolume('1'); if (!v) return -1;
    const d = v.voxelManager.getCompleteScalarDataArray(); let n = 0;
    for (let i = 0; i < d.length; i++) if (d[i]) n++;
    return n; }"""
VOLUMES_LOADED = """() => {
    const s = window.services; if (!s) return false;
    const vps = s.cornerstoneViewportService.getRenderingEngine()?.getViewports() || [];
    return vps.length > 0 && vps.every(v => { try { return !!v.getImageData(); } catch (e) { return false; } }); }"""
# The panel's segmentation: segment label -> [segment index, voxels of that index in the labelmap].
SEGMENTS = """() => {
    const s = window.services.segmentationService, seg = s.getSegmentation('1'); if (!seg) return null;
    const v = s.getLabelmapVolume('1'), d = v ? v.voxelManager.getCompleteScalarDataArray() : [];
    const counts = {}; for (let i = 0; i < d.length; i++) if (d[i]) counts[d[i]] = (counts[d[i]] || 0) + 1;
    const out = {};
    for (const x of Object.values(seg.segments)) if (x) out[x.label] = [x.segmentIndex, counts[x.segmentIndex] || 0];
    return out; }"""


def changed_pixels(before: bytes, after: bytes) -> int:
    from PIL import Image, ImageChops

    diff = ImageChops.difference(Image.open(io.BytesIO(before)).convert("RGB"), Image.open(io.BytesIO(after)).convert("RGB"))
    return int((np.asarray(diff).max(axis=2) > 40).sum())


def test_ohif_shows_every_structure_runs_ctv_and_saves_seg_to_orthanc(
    structures_dicomweb_server, structures_dw_client, orthanc, uploaded
):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    server, client = structures_dicomweb_server.url, structures_dw_client
    labels = client.info()["models"]["ctv"]["labels"]
    names = sorted(labels, key=labels.get)
    assert len(names) > 1
    series = uploaded["phantom_ohif"]
    study = next(
        s["0020000D"]["Value"][0]
        for s in orthanc.client().search_for_series(search_filters={"SeriesInstanceUID": series})
    )
    # What the server itself contours for this series (the label map viewers read): the viewer must
    # show each structure's voxels in that structure's segment.
    nifti_file, result = client.infer("ctv", series, {})
    assert result["label_names"] == labels
    labelmap = np.asarray(nib.load(nifti_file).dataobj)
    expected = {name: int((labelmap == value).sum()) for name, value in labels.items()}
    assert all(expected.values()), expected
    segs_before = {s["0020000E"]["Value"][0] for s in orthanc.client().search_for_series(search_filters={"Modality": "SEG"})}
    errors: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=CREDENTIALS)
            # The panel reads its server URL from this cookie.
            context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": server + "/", "url": server + "/"}])
            page = context.new_page()
            page.set_default_timeout(180_000)
            page.on("pageerror", lambda e: errors.append(str(e)))

            # 1. open the real study
            page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={study}")
            page.wait_for_selector("canvas.cornerstone-canvas", state="attached")
            page.wait_for_function(VOLUMES_LOADED, timeout=180_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=SCREENSHOTS / "ohif_1_study.png")

            # 2. connect the MONAI Label panel: one segment per structure of the model, each listed by name
            page.fill("#monailabelServerURL", server + "/")
            page.locator("table.settingsTable button.actionButton").click()
            page.wait_for_selector(".monaiLabelPanel p.subtitle")
            assert "CTV contouring" in page.inner_text(".monaiLabelPanel p.subtitle")
            page.wait_for_function(f"() => Object.keys(({SEGMENTS})() || {{}}).length === {len(names)}")
            assert sorted(page.evaluate(SEGMENTS)) == sorted(names)
            page.locator("label.tab-label", has_text="Class Prompts").click()
            listed = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Class Prompts"))
            listed = listed.locator("table.optionsTable tr td:nth-child(3)")
            assert sorted(listed.all_inner_texts()) == sorted(names)
            page.screenshot(path=SCREENSHOTS / "ohif_2_structures.png")

            # 3. run ctv: each structure lands in its own segment, voxel for voxel; the screen changed
            tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Auto-Segmentation"))
            page.locator("label.tab-label", has_text="Auto-Segmentation").click()
            tab.locator("select.selectBox").select_option("ctv")
            before = page.screenshot()
            with page.expect_response(lambda r: "/infer/ctv" in r.url, timeout=600_000) as response:
                tab.locator("button[title='Run Segmentation']").click()
            assert response.value.status == 200
            page.wait_for_function(f"() => ({LABELMAP_VOXELS})() > 0", timeout=60_000)
            page.wait_for_timeout(2000)
            segments = page.evaluate(SEGMENTS)
            after = page.screenshot(path=SCREENSHOTS / "ohif_3_ctv.png")
            changed = changed_pixels(before, after)
            print(f"OHIF segments {segments} (server: {expected}); {changed} screen pixels changed")
            assert {name: n for name, (_, n) in segments.items()} == expected
            assert changed > 500

            # 4. save with the viewer's own Save: a DICOM SEG goes to Orthanc through the server's proxy
            page.evaluate(
                """() => { const ds = window.extensionManager.getActiveDataSource()[0];
                window.commandsManager.runCommand('storeSegmentation', {segmentationId: '1', dataSource: ds}); }"""
            )
            page.get_by_text("Enter the report name").wait_for()
            # (not input[type=text].last: that is the panel's server URL box)
            page.get_by_text("Enter the report name").locator("xpath=following::input[1]").fill("CTV ohif e2e")
            with page.expect_response(lambda r: "/proxy/dicom/" in r.url and r.request.method == "POST") as stow:
                page.get_by_role("button", name="Save", exact=True).click()
            assert stow.value.status == 200
            page.wait_for_timeout(2000)
            page.screenshot(path=SCREENSHOTS / "ohif_4_saved.png")

            # A label saved as a client of the panel would: the raw voxels (PUT /datastore/label, label.bin)
            # hold segment indices, so label_names say which structure each index is. The server checks
            # it and writes the SEG it trains on. Done from the page.
            status = page.evaluate(
                """async ([server, series, segments]) => {
                const v = window.services.segmentationService.getLabelmapVolume('1');
                const names = Object.fromEntries(Object.entries(segments).map(([name, [i]]) => [name, i]));
                const form = new FormData();
                form.append('params', JSON.stringify({annotator: 'ohif_e2e', label_names: names}));
                form.append('label', new Blob([new Uint8Array(v.voxelManager.getCompleteScalarDataArray())]), 'label.bin');
                const r = await fetch(`${server}/datastore/label?image=${series}&tag=final`, {method: 'PUT', body: form});
                return r.status; }""",
                [server, series, segments],
            )
            assert status == 200
        finally:
            browser.close()

    segs = orthanc.client().search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": study})
    new = [orthanc.client().retrieve_series(study, s["0020000E"]["Value"][0])[0] for s in segs]
    new = [seg for seg in new if seg.SeriesInstanceUID not in segs_before]
    by_viewer = [seg for seg in new if seg.get("Manufacturer") != "ctv-label"]
    by_server = [seg for seg in new if seg.get("Manufacturer") == "ctv-label"]
    assert len(new) == 2 and len(by_viewer) == 1  # the viewer's Save, and the server's SEG of the PUT
    for seg in (by_viewer[0], by_server[0]):  # a segment per structure, named as the model names it
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert sorted(s.SegmentLabel for s in seg.SegmentSequence) == sorted(names)
    # the viewer's SEG: a frame for each slice each segment reaches
    assert by_viewer[0].NumberOfFrames == sum(int((labelmap == v).any(axis=(0, 1)).sum()) for v in labels.values())
    assert not [e for e in errors if "URL" in e], errors

    # Training takes the server-written SEG (voxel for voxel what the viewer showed, each structure in its
    # model value), not the viewer's own SEG export (which this OHIF build writes with its frames in
    # reverse slice order).
    datalist = requests.get(f"{server}/datastore/?output=train", auth=DICOMWEB_ANNOTATOR, timeout=120).json()
    label = next(d["label"] for d in datalist if series in d["image"])
    np.testing.assert_array_equal(np.asarray(nib.load(label).dataobj), labelmap)


# A SEG series as OHIF reads it: its segments' labels, and its labelmap's voxels by slice position (z) and
# by value (the segment number shown there).
SEG_SHOWN = """async (series) => {
    const s = window.services;
    const seg = s.displaySetService.getActiveDisplaySets().find(d => d.SeriesInstanceUID === series);
    if (!seg) return null;
    await seg.load({headers: {}});
    const cs = window.cornerstone, ct = window.cornerstoneTools;
    const state = ct.segmentation.state.getSegmentation(seg.displaySetInstanceUID);
    const ids = state.representationData.Labelmap.imageIds;
    const slices = {}, values = {};
    for (const id of ids) {
        const image = cs.cache.getImage(id) || await cs.imageLoader.loadAndCacheImage(id);
        let n = 0; for (const x of image.getPixelData()) if (x) { n++; values[x] = (values[x] || 0) + 1; }
        const z = cs.metaData.get('imagePlaneModule', image.referencedImageId).imagePositionPatient[2];
        slices[z.toFixed(2)] = (slices[z.toFixed(2)] || 0) + n;
    }
    return {label: Object.values(state.segments || {}).filter(Boolean).map(x => x.label), slices, values};
}"""


def test_ohif_reads_the_servers_dicom_seg(structures_dicomweb_server, structures_dw_client, orthanc, uploaded):
    """Our SEG of overlapping structures, stored in Orthanc by the server, opens in OHIF with a segment per
    structure, named, and every contoured voxel on its slice. This OHIF build reads a SEG into one
    labelmap: where segments overlap it shows the one with the highest segment number (not the label
    map's first-listed), which is what is checked."""
    from playwright.sync_api import sync_playwright

    series, client = uploaded["phantom"], structures_dw_client
    bitmask_file, _ = client.infer("ctv", series, {"label_encoding": "bitmask"})
    seg_file, result = client.infer("ctv", series, {"result_format": "dicom_seg", "store_result": True})
    segments = {int(s.SegmentNumber): s.SegmentLabel for s in pydicom.dcmread(seg_file).SegmentSequence}
    assert sorted(segments.values()) == sorted(result["label_names"])  # a segment per structure
    image = nib.load(bitmask_file)
    bitmask = np.asarray(image.dataobj)
    mask = bitmask > 0
    assert (np.count_nonzero([(bitmask >> (v - 1)) & 1 for v in result["label_names"].values()], axis=0) > 1).any()
    z = [round(float((image.affine @ [0, 0, k, 1])[2]), 2) for k in range(mask.shape[2])]
    expected = {f"{z[k]:.2f}": int(mask[:, :, k].sum()) for k in range(mask.shape[2]) if mask[:, :, k].any()}
    shown_on_top = np.zeros(bitmask.shape, np.int64)  # the highest segment number each voxel is in
    for number, label in sorted(segments.items()):
        shown_on_top[(bitmask >> (result["label_names"][label] - 1)) & 1 == 1] = number
    expected_values = {str(n): int((shown_on_top == n).sum()) for n in segments if (shown_on_top == n).any()}
    stored = result["stored"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=CREDENTIALS).new_page()
            page.set_default_timeout(180_000)
            page.goto(f"{structures_dicomweb_server.url}/ohif/monai-label?StudyInstanceUIDs={stored['StudyInstanceUID']}")
            page.wait_for_function(VOLUMES_LOADED, timeout=180_000)
            shown = page.evaluate(SEG_SHOWN, stored["SeriesInstanceUID"])
            page.screenshot(path=SCREENSHOTS / "ohif_5_server_seg.png")
        finally:
            browser.close()
    assert shown is not None, "OHIF lists no SEG for the study"
    assert shown["label"] == [segments[n] for n in sorted(segments)]
    got = {z: n for z, n in shown["slices"].items() if n}
    print(f"OHIF read our SEG: {sum(got.values())} voxels on {len(got)} slices (server: {int(mask.sum())})")
    assert got == expected
    assert shown["values"] == expected_values
