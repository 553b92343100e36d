"""OHIF end to end: the OHIF v3 viewer bundled in monailabel, on the server on a real Orthanc,
driven in headless Chromium (Debian's /usr/bin/chromium) by Playwright.

Opens a study, connects the MONAI Label panel, runs `ctv`, checks that the segmentation appears
(labelmap voxels and screen pixels; screenshots saved), saves it with the viewer's own Save, and
checks that a SEG referencing the series lands in Orthanc; then saves it as the panel's client
does (PUT /datastore/label) and checks what training reads back. The study is a SYNTHETIC pelvic
phantom: the real Visible Human series is a neck, with no CTV to show (once, a blob in the air
beside it; ``test_dicomweb`` checks every result there stays inside the patient).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

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

LABELMAP_VOXELS = """() => {
    const v = window.services.segmentationService.getLabelmapVolume('1'); if (!v) return -1;
    const d = v.voxelManager.getCompleteScalarDataArray(); let n = 0;
    for (let i = 0; i < d.length; i++) if (d[i]) n++;
    return n; }"""
VOLUMES_LOADED = """() => {
    const s = window.services; if (!s) return false;
    const vps = s.cornerstoneViewportService.getRenderingEngine()?.getViewports() || [];
    return vps.length > 0 && vps.every(v => { try { return !!v.getImageData(); } catch (e) { return false; } }); }"""


def changed_pixels(before: bytes, after: bytes) -> int:
    from PIL import Image, ImageChops

    diff = ImageChops.difference(Image.open(io.BytesIO(before)).convert("RGB"), Image.open(io.BytesIO(after)).convert("RGB"))
    return int((np.asarray(diff).max(axis=2) > 40).sum())


def test_ohif_runs_ctv_and_saves_seg_to_orthanc(dicomweb_server, dw_client, orthanc, uploaded):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    server = dicomweb_server.url
    series = uploaded["phantom_ohif"]
    study = next(
        s["0020000D"]["Value"][0]
        for s in orthanc.client().search_for_series(search_filters={"SeriesInstanceUID": series})
    )
    # What the server itself contours for this series: the viewer must show the same voxels.
    nifti_file, _ = dw_client.infer("ctv", series, {})
    expected_voxels = int((np.asarray(nib.load(nifti_file).dataobj) > 0).sum())
    assert expected_voxels > 0
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

            # 2. connect the MONAI Label panel and run ctv
            page.fill("#monailabelServerURL", server + "/")
            page.locator("table.settingsTable button.actionButton").click()
            page.wait_for_selector(".monaiLabelPanel p.subtitle")
            assert "CTV contouring" in page.inner_text(".monaiLabelPanel p.subtitle")
            page.wait_for_timeout(1500)  # the panel creates its segmentation
            tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Auto-Segmentation"))
            page.locator("label.tab-label", has_text="Auto-Segmentation").click()
            tab.locator("select.selectBox").select_option("ctv")
            before = page.screenshot()
            with page.expect_response(lambda r: "/infer/ctv" in r.url, timeout=600_000) as response:
                tab.locator("button[title='Run Segmentation']").click()
            assert response.value.status == 200
            page.wait_for_function(f"() => ({LABELMAP_VOXELS})() > 0", timeout=60_000)
            page.wait_for_timeout(2000)

            # 3. the segmentation appears: the labelmap holds the server's voxels, and the screen changed
            shown = page.evaluate(LABELMAP_VOXELS)
            after = page.screenshot(path=SCREENSHOTS / "ohif_2_ctv.png")
            changed = changed_pixels(before, after)
            print(f"OHIF labelmap: {shown} voxels (server: {expected_voxels}); {changed} screen pixels changed")
            assert shown == expected_voxels
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
            page.screenshot(path=SCREENSHOTS / "ohif_3_saved.png")

            # The panel's own client saves a label as raw voxels (PUT /datastore/label, label.bin): the
            # server checks it and writes the SEG it trains on. Done from the page, as the panel would.
            status = page.evaluate(
                """async ([server, series]) => {
                const v = window.services.segmentationService.getLabelmapVolume('1');
                const form = new FormData();
                form.append('params', JSON.stringify({annotator: 'ohif_e2e'}));
                form.append('label', new Blob([new Uint8Array(v.voxelManager.getCompleteScalarDataArray())]), 'label.bin');
                const r = await fetch(`${server}/datastore/label?image=${series}&tag=final`, {method: 'PUT', body: form});
                return r.status; }""",
                [server, series],
            )
            assert status == 200
        finally:
            browser.close()

    segs = orthanc.client().search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": study})
    new = [orthanc.client().retrieve_series(study, s["0020000E"]["Value"][0])[0] for s in segs]
    new = [seg for seg in new if seg.SeriesInstanceUID not in segs_before]
    by_viewer = [seg for seg in new if seg.get("Manufacturer") != "ctv-label"]
    assert len(new) == 2 and len(by_viewer) == 1  # the viewer's Save, and the server's SEG of the PUT
    seg = by_viewer[0]
    contoured_slices = int(np.asarray(nib.load(nifti_file).dataobj).any(axis=(0, 1)).sum())  # a frame each
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series and seg.NumberOfFrames == contoured_slices
    assert seg.SegmentSequence[0].SegmentLabel == "CTV"
    assert not [e for e in errors if "URL" in e], errors

    # Training takes the server-written SEG (voxel for voxel what the viewer showed), not the viewer's
    # own SEG export (which this OHIF build writes with its frames in reverse slice order).
    datalist = requests.get(f"{server}/datastore/?output=train", auth=DICOMWEB_ANNOTATOR, timeout=120).json()
    label = next(d["label"] for d in datalist if series in d["image"])
    np.testing.assert_array_equal(np.asarray(nib.load(label).dataobj), np.asarray(nib.load(nifti_file).dataobj))


SEG_SLICE_COUNTS = """async () => {
    const s = window.services;
    const seg = s.displaySetService.getActiveDisplaySets().find(d => d.Modality === 'SEG');
    if (!seg) return null;
    await seg.load({headers: {}});
    const cs = window.cornerstone, ct = window.cornerstoneTools;
    const state = ct.segmentation.state.getSegmentation(seg.displaySetInstanceUID);
    const ids = state.representationData.Labelmap.imageIds;
    const counts = {};
    for (const id of ids) {
        const image = cs.cache.getImage(id) || await cs.imageLoader.loadAndCacheImage(id);
        let n = 0; for (const x of image.getPixelData()) if (x) n++;
        const z = cs.metaData.get('imagePlaneModule', image.referencedImageId).imagePositionPatient[2];
        counts[z.toFixed(2)] = (counts[z.toFixed(2)] || 0) + n;
    }
    return {label: Object.values(state.segments || {}).filter(Boolean).map(x => x.label), counts};
}"""


def test_ohif_reads_the_servers_dicom_seg(dicomweb_server, dw_client, orthanc, uploaded):
    """Our SEG, stored in Orthanc by the server, opens in OHIF with the contour on the right slices."""
    from playwright.sync_api import sync_playwright

    series = uploaded["phantom"]
    nifti_file, _ = dw_client.infer("ctv", series, {})
    seg_file, result = dw_client.infer("ctv", series, {"result_format": "dicom_seg", "store_result": True})
    image = nib.load(nifti_file)
    mask = np.asarray(image.dataobj) > 0
    z = [round(float((image.affine @ [0, 0, k, 1])[2]), 2) for k in range(mask.shape[2])]
    expected = {f"{z[k]:.2f}": int(mask[:, :, k].sum()) for k in range(mask.shape[2]) if mask[:, :, k].any()}
    study = result["stored"]["StudyInstanceUID"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=CREDENTIALS).new_page()
            page.set_default_timeout(180_000)
            page.goto(f"{dicomweb_server.url}/ohif/monai-label?StudyInstanceUIDs={study}")
            page.wait_for_function(VOLUMES_LOADED, timeout=180_000)
            shown = page.evaluate(SEG_SLICE_COUNTS)
            page.screenshot(path=SCREENSHOTS / "ohif_4_server_seg.png")
        finally:
            browser.close()
    assert shown is not None, "OHIF lists no SEG for the study"
    assert shown["label"] == ["CTV"]
    got = {z: n for z, n in shown["counts"].items() if n}
    print(f"OHIF read our SEG: {sum(got.values())} voxels on {len(got)} slices (server: {int(mask.sum())})")
    assert got == expected
