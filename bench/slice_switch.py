"""Slice switch time of the contouring page (/ctv/), in headless Chromium (Debian's), on this machine.

    .venv/bin/python bench/slice_switch.py [--switches 200]

A switch is timed from the key press (ArrowUp, dispatched in the page) to the next animation
frame after the canvas was drawn: CT slice + auto contour overlay; the drawing itself (the
page's own timer) is printed too, since frames round everything up to 16.7 ms. Cases: the real CT
(122x101, 112 slices) and a SYNTHETIC 512x512x120 phantom. Peer in the same run: putting an
already rendered 512x512 frame on the canvas (the floor any client-side viewer pays). Prints
median and 95th percentile and the ratio to the peer; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctv_datastore.phantom import FULL_SHAPE, FULL_SPACING, make_phantom, save_nifti  # noqa: E402
from tests.support import REAL_CT, ServerProcess  # noqa: E402
from tests.test_ohif import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

TIME_SWITCHES = """async (n) => {
    const times = [];
    for (let i = 0; i < n; i++) {
        const t0 = performance.now();
        document.dispatchEvent(new KeyboardEvent('keydown', {key: i % 2 ? 'ArrowDown' : 'ArrowUp'}));
        await new Promise(r => requestAnimationFrame(() => r()));
        times.push(performance.now() - t0);
    }
    return times; }"""
TIME_PEER = """async (n) => {
    const c = document.getElementById('view-main'), ctx = c.getContext('2d');
    const frame = ctx.getImageData(0, 0, c.width, c.height), times = [];
    for (let i = 0; i < n; i++) {
        const t0 = performance.now();
        ctx.putImageData(frame, 0, 0);
        await new Promise(r => requestAnimationFrame(() => r()));
        times.push(performance.now() - t0);
    }
    return times; }"""


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    return f"median {statistics.median(ordered):6.2f} ms, p95 {ordered[int(0.95 * (len(ordered) - 1))]:6.2f} ms"


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--switches", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "studies").mkdir()
        cases = {"phantom 512x512x120 (SYNTHETIC)": tmp / "phantom_full.nii.gz"}
        save_nifti(make_phantom(9500, FULL_SHAPE, FULL_SPACING), str(cases["phantom 512x512x120 (SYNTHETIC)"]))
        if REAL_CT.exists():
            cases = {"real CT 122x101x112": REAL_CT, **cases}
        with ServerProcess(tmp / "studies", tmp / "server") as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(f"{server.url}/ctv/")
            for name, path in cases.items():
                page.set_input_files("#file", str(path))
                page.click("#upload")
                page.wait_for_function(f"() => window.ctvState.case && window.ctvState.case.input.name === '{path.name}'"
                                       " && window.ctvState.mask !== null")
                page.evaluate("() => showSlice(Math.floor(window.ctvState.meta.slices / 2))")
                ours = page.evaluate(TIME_SWITCHES, args.switches)
                drawing = page.evaluate(f"() => window.ctvTimings.slice(-{args.switches})")
                peer = page.evaluate(TIME_PEER, args.switches)
                ratio = statistics.median(ours) / statistics.median(peer)
                print(f"{name}\n  key -> next frame: {summary(ours)} (frames are 16.7 ms at 60 Hz)"
                      f"\n  drawing alone:     {summary(drawing)}"
                      f"\n  peer, putImageData of a ready frame -> next frame: {summary(peer)}; ratio {ratio:.2f}")
            browser.close()


if __name__ == "__main__":
    main()
