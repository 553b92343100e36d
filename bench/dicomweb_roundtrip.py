"""Full DICOMweb round trip on this machine: a real Orthanc, the real server, the real series.

    .venv/bin/python bench/dicomweb_roundtrip.py [--repeats 5]

Round trip = QIDO (series lookup) + WADO-RS download into an empty cache + load and checks +
inference + RTSTRUCT writing + STOW-RS back to Orthanc, timed at the client. Cases: the real
Visible Human series (4 slices 512x512) and a SYNTHETIC phantom series (64 slices 112x96).
Peers in the same run: the same series already in the server's cache (no download), and the
same series from a folder datastore (no PACS at all). Prints medians and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

from ctv_datastore.dicom_export import write_ct_series  # noqa: E402
from ctv_datastore.phantom import make_phantom  # noqa: E402
from tests.support import SHARED_DATA, OrthancProcess, ServerProcess  # noqa: E402

VH = SHARED_DATA / "dicom" / "visible_human_4slice_rt"


def median_time(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not VH.exists():
        sys.exit("../shared/data/dicom is absent")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        studies = tmp / "studies"
        (studies / "visible_human").mkdir(parents=True)
        for f in VH.glob("CT_*.dcm"):
            shutil.copy(f, studies / "visible_human" / f.name)
        phantom = make_phantom(9101)
        write_ct_series(phantom.image, phantom.affine, str(studies / "phantom"))
        uids = {
            name: str(pydicom.dcmread(next((studies / name).glob("*.dcm"))).SeriesInstanceUID)
            for name in ("visible_human", "phantom")
        }
        with OrthancProcess(tmp / "orthanc") as orthanc:
            orthanc.stow(sorted((studies / "visible_human").glob("*.dcm")) + sorted((studies / "phantom").glob("*.dcm")))
            env = {
                "MONAI_LABEL_DICOMWEB_USERNAME": orthanc.user,
                "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.password,
                "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp / "cache"),
            }
            with ServerProcess(orthanc.dicomweb_url, tmp / "dw", env=env) as dw, ServerProcess(
                studies, tmp / "local"
            ) as local:
                pacs = MONAILabelClient(dw.url, tmpdir=str(tmp / "c1"))
                folder = MONAILabelClient(local.url, tmpdir=str(tmp / "c2"))
                params = {"result_format": "rtstruct"}
                pacs.infer("ctv", uids["phantom"], params)  # warm-up: model load
                folder.infer("ctv", "phantom", params)

                def empty_cache() -> None:
                    for d in (tmp / "cache").rglob("1.*"):
                        if d.is_dir() and d.parent.name != "labels":
                            shutil.rmtree(d, ignore_errors=True)

                print(f"{'case':32s} {'round trip':>11s} {'cached':>8s} {'folder':>8s}  ratios (vs folder)")
                for name, uid in uids.items():
                    stored = {**params, "store_result": True}
                    full = median_time(lambda: pacs.infer("ctv", uid, stored), args.repeats, before=empty_cache)
                    cached = median_time(lambda: pacs.infer("ctv", uid, stored), args.repeats)
                    local_s = median_time(lambda: folder.infer("ctv", name, params), args.repeats)
                    print(
                        f"{name:32s} {full:10.2f}s {cached:7.2f}s {local_s:7.2f}s  "
                        f"round trip x{full / local_s:.2f}, cached x{cached / local_s:.2f}"
                    )


if __name__ == "__main__":
    main()
