"""Bad input through the real server: a 4xx naming the problem, the server stays up, nothing written."""

from __future__ import annotations

import gzip
import io
import json
import socket
import tarfile
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from ..conftest import HELD_OUT_SEEDS
from ..support import REAL_CT, ServerProcess
from ..test_cli import ctv

OWNER = {"X-CTV-Owner": "reliability-" + "r" * 32}


def nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_sform(np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine, code=1)  # a qform cannot
    header.set_qform(None, code=0)  # hold a zero spacing: the sform alone, written as given
    nib.save(nib.Nifti1Image(data, None, header), path)
    return path


def ct_like(shape=(32, 32, 8)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(-500, 400, shape).astype(np.float32)


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the 422 must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(REAL_CT.read_bytes()[:4000] if REAL_CT.exists() else gzip.compress(b"\x00" * 100)[:20])
    nan, inf = ct_like(), ct_like()
    nan[3, 3, 3], inf[4, 4, 4] = np.nan, np.inf
    return {
        "zero bytes": (empty, "empty file"),
        "truncated NIfTI": (truncated, "not a readable 3D image"),
        "2D": (nifti(folder / "flat.nii.gz", ct_like((64, 64))), "3D volume"),
        "4D": (nifti(folder / "timeseries.nii.gz", ct_like((16, 16, 8, 3))), "single-channel 3D volume"),
        "spacing 0": (nifti(folder / "zero_spacing.nii.gz", ct_like(), np.diag([0.0, 1.0, 3.0, 1.0])), "spacing"),
        "spacing 1e6": (nifti(folder / "huge_spacing.nii.gz", ct_like(), np.diag([1e6, 1.0, 3.0, 1.0])), "spacing"),
        "NaN voxels": (nifti(folder / "nan.nii.gz", nan), "NaN or infinite"),
        "inf voxels": (nifti(folder / "inf.nii.gz", inf), "NaN or infinite"),
        "not CT": (nifti(folder / "mr.nii.gz", np.random.default_rng(1).uniform(0, 255, (32, 32, 8)).astype(np.uint8)),
                   "does not look like CT"),
    }  # fmt: skip


def test_bad_uploads_are_4xx_and_the_server_stays_up(server, tmp_path):
    cases_before = sorted((server.workdir / "cases").glob("*")) if (server.workdir / "cases").exists() else []
    for name, (path, words) in bad_files(tmp_path).items():
        r = requests.post(
            f"{server.url}/infer/ctv?output=json", files={"file": (path.name, path.read_bytes())}, timeout=120
        )
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json()["detail"])
        assert str(tmp_path) not in r.text and "/tmp" not in r.json()["detail"]  # no server paths in messages
        page = requests.post(f"{server.url}/ctv/api/cases", files={"file": (path.name, path.read_bytes())},
                             headers=OWNER, timeout=120)  # fmt: skip
        assert page.status_code == 422, (name, page.status_code, page.text)
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200
    cases_after = sorted((server.workdir / "cases").glob("*")) if (server.workdir / "cases").exists() else []
    assert cases_after == cases_before  # nothing stored, not even a staging folder


def test_corrupt_zip_and_dicom_are_refused(server, tmp_path):
    not_zip = b"PK\x03\x04 this is not really a zip"
    bad_dicom = io.BytesIO()
    with zipfile.ZipFile(bad_dicom, "w") as z:
        z.writestr("series/CT_1.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00truncated")
    for name, data, words in (("broken.zip", not_zip, "not a readable zip"),
                              ("series.zip", bad_dicom.getvalue(), "no DICOM image files")):  # fmt: skip
        r = requests.post(f"{server.url}/ctv/api/cases", files={"file": (name, data)}, headers=OWNER, timeout=60)
        assert r.status_code == 422 and words in r.json()["detail"], (name, r.text)


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "/etc/passwd", "a\x00b", "..%2F..%2Fetc%2Fpasswd"])
def test_path_traversal_ids_are_not_files(server, image_id):
    r = requests.post(f"{server.url}/infer/ctv", params={"image": image_id, "output": "json"}, timeout=60)
    assert r.status_code in (404, 422), r.text
    label = requests.put(
        f"{server.url}/datastore/label", params={"image": "phantom_09100", "tag": image_id},
        files={"label": ("x.nii.gz", b"")}, timeout=60,
    )  # fmt: skip
    assert label.status_code in (404, 422), label.text


def nrrd_header(*fields: str) -> bytes:
    lines = ["NRRD0004", "type: uint8", "dimension: 3", *fields, "encoding: raw", "endian: little",
             "space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,3)"]  # fmt: skip
    return ("\n".join(lines) + "\n\n").encode()


def metaimage_header(dim_size: str, data_file: str) -> bytes:
    lines = ["ObjectType = Image", "NDims = 3", dim_size, "ElementType = MET_UCHAR", f"ElementDataFile = {data_file}"]
    return ("\n".join(lines) + "\n").encode()


def test_headers_naming_another_file_as_their_data_are_refused_unread(server):
    """An NRRD or MetaImage header can name any file on the server as its voxels: it was read (contoured
    under the header's sha256) or its size leaked in the error. Refused from the header, before any read."""
    target = Path("/etc/passwd")
    size = target.stat().st_size
    fits = f"sizes: 1 1 {size}"  # exactly the file's size: read whole before
    uploads = {
        "detached.nhdr": nrrd_header(fits, f"data file: {target}"),
        "detached.nrrd": nrrd_header("sizes: 64 64 64", f"datafile: {target}"),  # wrong size: the error told it
        "relative.nhdr": nrrd_header(fits, "data file: ../../../../../../etc/passwd"),
        "detached.mha": metaimage_header(f"DimSize = 1 1 {size}", str(target)),
        "detached.mhd": metaimage_header("DimSize = 64 64 64", str(target)),
    }
    for name, header in uploads.items():
        r = requests.post(f"{server.url}/infer/ctv?output=json", files={"file": (name, header)}, timeout=120)
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert "detached" in r.json()["detail"] and "attached data" in r.json()["detail"], (name, r.text)
        assert str(size) not in r.text, (name, r.text)  # nor its size
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200


def test_image_over_the_voxel_limit_is_refused_from_its_header(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    big = nifti(tmp_path / "big.nii.gz", ct_like((64, 64, 40)))  # 163,840 voxels
    env = {"CTV_MAX_VOXELS": "100000", "CTV_MAX_UPLOAD_MB": "1"}
    with ServerProcess(studies, tmp_path / "server", env=env) as server:
        r = requests.post(
            f"{server.url}/infer/ctv?output=json", files={"file": (big.name, big.read_bytes())}, timeout=120
        )
        assert r.status_code == 422 and "163,840 voxels" in r.json()["detail"] and "100,000" in r.json()["detail"]
        # NRRD and MetaImage say their size in a text header: a few bytes can claim 10^9 voxels.
        for name, header in (("big.nrrd", nrrd_header("sizes: 1000 1000 1000")),
                             ("big.mha", metaimage_header("DimSize = 1000 1000 1000", "LOCAL"))):  # fmt: skip
            r = requests.post(f"{server.url}/infer/ctv?output=json", files={"file": (name, header + bytes(64))},
                              timeout=120)  # fmt: skip
            detail = r.json()["detail"]
            assert r.status_code == 422 and "1,000,000,000 voxels" in detail and "CTV_MAX_VOXELS" in detail, r.text

        # Over the upload limit: 413 before the body is read, whichever route; nothing is written.
        oversized = np.random.default_rng(2).bytes(3 << 20)
        for method, path in (("POST", "/infer/ctv"), ("POST", "/ctv/api/cases"), ("PUT", "/datastore/label?image=x")):
            r = requests.request(
                method, server.url + path, files={"file": ("big.nii", oversized)}, headers=OWNER, timeout=60
            )
            assert r.status_code == 413 and "1,048,576 bytes" in r.json()["detail"], (path, r.status_code, r.text)
        cases = tmp_path / "server" / "cases"
        assert not cases.exists() or not any(cases.iterdir())
        # Streamed without a length, the body is counted as it arrives.
        body, content_type = requests.models.RequestEncodingMixin._encode_files({"file": ("big.nii", oversized)}, {})
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        r = requests.post(f"{server.url}/infer/ctv", data=chunks, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code == 413, r.text
        assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200


def test_label_on_another_grid_is_refused_and_nothing_is_written(server, studies, tmp_path):
    image_id = next(p.name.removesuffix(".nii.gz") for p in sorted(studies.glob("phantom_*.nii.gz")))
    image = nib.load(studies / f"{image_id}.nii.gz")
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    cases = {
        "shape": (
            nib.Nifti1Image(np.zeros(tuple(s + 1 for s in image.shape), np.uint8), image.affine),
            "does not match",
        ),
        "grid": (nib.Nifti1Image(np.zeros(image.shape, np.uint8), shifted), "not on its image's grid"),
        "values": (nib.Nifti1Image(np.full(image.shape, 99, np.uint8), image.affine), "holds values [99]"),
    }
    for name, (label, words) in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(label, path)
        r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "reliability"},
                         files={"label": (path.name, path.read_bytes())}, timeout=60)  # fmt: skip
        assert r.status_code == 422 and words in r.json()["detail"], (name, r.text)
    assert not (studies / "labels" / "reliability").exists() or not any((studies / "labels" / "reliability").iterdir())
    assert not (studies / ".label_history" / "reliability").exists()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def claiming_size(archive: bytes, size: int) -> bytes:
    """The zip with its (one) member's uncompressed size in both headers replaced: headers can lie."""
    data = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + offset : at + offset + 4] = size.to_bytes(4, "little")
    return bytes(data)


def case_folders(server) -> list[Path]:
    cases = server.workdir / "cases"
    return sorted(cases.iterdir()) if cases.exists() else []


def test_zip_bombs_and_broken_zips_are_refused_and_nothing_is_kept(server):
    slice_bytes = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8
    stored = zip_of({"series/CT_1.dcm": slice_bytes}, zipfile.ZIP_STORED)
    bad_crc = stored.replace(bytes(range(256)), bytes(range(1, 256)) + b"\x00", 1)
    uploads = {
        # 64 MiB of zeros in 64 KiB: no CT series compresses like that.
        "bomb.zip": (zip_of({"series/CT_1.dcm": bytes(64 << 20)}), 422, "compress"),
        "claims_3gib.zip": (claiming_size(zip_of({"series/CT_1.dcm": slice_bytes}), 3 << 30), 413, "unpacks to"),
        "bad_crc.zip": (bad_crc, 422, "CRC"),
        "claims_less.zip": (claiming_size(stored, len(slice_bytes) // 2), 422, "CRC"),
    }
    before = case_folders(server)
    for name, (data, status, words) in uploads.items():
        r = requests.post(f"{server.url}/ctv/api/cases", files={"file": (name, data)}, headers=OWNER, timeout=120)
        assert r.status_code == status and words in r.json()["detail"], (name, r.status_code, r.text)
        assert "/tmp" not in r.json()["detail"], r.text
    assert case_folders(server) == before  # nothing kept, not even a staging folder
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200


def test_params_of_the_wrong_type_are_422_naming_the_param(server, studies):
    image_id = next(p.name.removesuffix(".nii.gz") for p in sorted(studies.glob("phantom_*.nii.gz")))
    for params, words in (({"threshold": "abc"}, "threshold"), ({"threshold": 2}, "threshold"),
                          ({"threshold": None}, "threshold"), ({"flip_tta": "maybe"}, "flip_tta")):  # fmt: skip
        r = requests.post(f"{server.url}/infer/ctv", params={"image": image_id, "output": "json"},
                          data={"params": json.dumps(params)}, timeout=120)  # fmt: skip
        assert r.status_code == 422 and words in r.json()["detail"], (params, r.status_code, r.text)


def test_an_unreadable_label_is_422_without_a_server_path(server, studies):
    image_id = next(p.name.removesuffix(".nii.gz") for p in sorted(studies.glob("phantom_*.nii.gz")))
    for data in (b"", b"not a NIfTI file"):
        r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "reliability"},
                         files={"label": ("mine.nii.gz", data)}, timeout=60)  # fmt: skip
        assert r.status_code == 422 and "not a readable NIfTI" in r.json()["detail"], r.text
        assert "/tmp" not in r.json()["detail"] and "tmp" not in r.json()["detail"], r.text


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """A server with short limits: body timeout 2 s, 1 MiB unzipped, one pending contour in all."""
    studies = tmp_path_factory.mktemp("strict_studies")
    env = {"CTV_BODY_TIMEOUT_S": "2", "CTV_MAX_UNZIPPED_MB": "1"}
    with ServerProcess(studies, tmp_path_factory.mktemp("strict"), env=env, conf={"contour_max_pending": "1"}) as s:
        yield s


def test_a_stalled_body_is_answered_408_and_closed(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=15) as sock:
        sock.sendall(b"POST /infer/ctv?output=json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                     b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.nii\"\r\n\r\n" + bytes(100))
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"2 s" in reply and time.monotonic() - started < 12
    assert requests.get(f"{strict_server.url}/info/", timeout=10).status_code == 200


def test_the_unzipped_size_and_the_contour_queue_are_bounded(strict_server, studies):
    honest = zip_of({f"series/CT_{i}.dcm": np.random.default_rng(i).bytes(400_000) for i in range(3)})
    r = requests.post(f"{strict_server.url}/ctv/api/cases", files={"file": ("big.zip", honest)}, headers=OWNER,
                      timeout=60)  # fmt: skip
    assert r.status_code == 413 and "CTV_MAX_UNZIPPED_MB" in r.json()["detail"], r.text
    assert case_folders(strict_server) == []

    first, second = (studies / f"phantom_{seed:05d}.nii.gz" for seed in HELD_OUT_SEEDS[:2])
    a = requests.post(f"{strict_server.url}/ctv/api/cases", files={"file": (first.name, first.read_bytes())},
                      headers=OWNER, timeout=120)  # fmt: skip
    assert a.status_code == 201, a.text
    b = requests.post(f"{strict_server.url}/ctv/api/cases", files={"file": (second.name, second.read_bytes())},
                      headers=OWNER, timeout=120)  # fmt: skip
    assert b.status_code == 503 and int(b.headers["Retry-After"]) >= 1, b.text
    assert case_folders(strict_server) == [strict_server.workdir / "cases" / a.json()["case"]["id"]]


def test_the_ctv_client_waits_its_turn_when_the_contour_queue_is_full(strict_server, studies, tmp_path):
    """A hospital script is not failed by a full queue: the `ctv` client waits as Retry-After says."""
    deadline = time.monotonic() + 300
    while True:  # the real CT (a longer contour) takes the one place once earlier cases are done
        busy = requests.post(f"{strict_server.url}/ctv/api/cases", headers=OWNER, timeout=120,
                             files={"file": (REAL_CT.name, REAL_CT.read_bytes())})  # fmt: skip
        if busy.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert busy.status_code == 201, busy.text
    case = studies / f"phantom_{HELD_OUT_SEEDS[2]:05d}.nii.gz"
    run = ctv(strict_server, "infer", str(case), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "server busy (503)" in run.stderr and "1 contoured, 0 already done, 0 failed" in run.stdout


def test_session_archives_are_unpacked_with_the_same_bounds(server, tmp_path):
    """PUT /session/?uncompress=true unpacked any archive without bounds: a tar could write outside
    its folder and a zip bomb fill the disk. Only a zip is unpacked, with the page's checks."""
    escaped = Path(tempfile.gettempdir()) / f"escaped_{uuid.uuid4().hex}.txt"
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo(f"../{escaped.name}")
        info.size = 5
        t.addfile(info, io.BytesIO(b"owned"))
    bomb = zip_of({"CT_1.dcm": bytes(64 << 20)})
    for name, data, status, words in (("slip.tar", tar.getvalue(), 422, "zip"), ("bomb.zip", bomb, 422, "compress")):
        r = requests.put(f"{server.url}/session/", params={"uncompress": "true"}, files={"files": (name, data)},
                         timeout=120)  # fmt: skip
        assert r.status_code == status and words in r.json()["detail"], (name, r.status_code, r.text)
    assert not escaped.exists()
    series = zip_of({f"CT_{i}.dcm": np.random.default_rng(i).bytes(1000) for i in range(3)})
    r = requests.put(f"{server.url}/session/", params={"uncompress": "true"}, files={"files": ("ok.zip", series)},
                     timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    session = requests.get(f"{server.url}/session/{r.json()['session_id']}", timeout=30).json()
    assert sorted(p.name for p in Path(session["image"]).iterdir()) == ["CT_0.dcm", "CT_1.dcm", "CT_2.dcm"]
