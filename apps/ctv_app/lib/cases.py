"""Uploaded cases of the contouring page: every input and every result kept, each user's apart.

    <root>/<case id>/case.json          owner (sha256 of the owner token), input record, results
    <root>/<case id>/input/<file>       the upload as received (NIfTI, or the DICOM zip)
    <root>/<case id>/input/series/      the zip's DICOM series, extracted
    <root>/<case id>/results/<result id>/ctv.nii.gz, ctv_rtstruct.dcm, ctv_seg.dcm

A case is checked in a staging folder and appears (one rename) only when its input is a valid
CT; a result's files appear the same way. Case and result ids are random (uuid4), and a case is
only found under the owner that created it, so two users never see each other's data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from .provenance import file_sha256
from .files import atomic_write_text
from .errors import ImageNotFoundError, InvalidInputError, PayloadTooLargeError
from .transforms.validation import MAX_VOXELS

MAX_ZIP_FILES = 5000
# A zip is unpacked on the server's disk, so what it unpacks to is bounded before and while it is
# unpacked (the headers can lie): by default the largest CT accepted (CTV_MAX_VOXELS at 2 bytes a
# voxel) plus 64 KiB of DICOM header per file. CT slices deflate about 2-4:1; 100:1 is a zip bomb.
MAX_UNZIPPED_BYTES = int(
    float(os.environ.get("CTV_MAX_UNZIPPED_MB") or (MAX_VOXELS * 2 + MAX_ZIP_FILES * 65536) / 2**20) * 2**20
)
MAX_COMPRESSION_RATIO = 100
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def owner_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _too_large(size: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the zip unpacks to {size:,} bytes or more; the limit is {MAX_UNZIPPED_BYTES:,} (CTV_MAX_UNZIPPED_MB)"
    )


def safe_extract(zip_path: str, dest: str) -> None:
    """Extract a zip of DICOM files: no absolute paths, no '..', bounded file count, unpacked size
    and compression ratio (413 or 422), each member's CRC checked (422)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise InvalidInputError(f"the upload is not a readable zip file: {e}") from e
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise InvalidInputError(f"the zip holds {len(members)} files; at most {MAX_ZIP_FILES}")
        declared = sum(m.file_size for m in members)
        if declared > MAX_UNZIPPED_BYTES:
            raise _too_large(declared)
        ratio = declared / max(1, sum(m.compress_size for m in members))
        if ratio > MAX_COMPRESSION_RATIO:
            raise InvalidInputError(
                f"the zip compresses {ratio:,.0f}:1, more than a CT series can ({MAX_COMPRESSION_RATIO}:1): refused"
            )
        budget = MAX_UNZIPPED_BYTES  # counted as written: the declared sizes are only a claim
        for m in members:
            parts = m.filename.replace("\\", "/").split("/")
            if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise InvalidInputError(f"the zip holds an unsafe path: {m.filename!r}")
            target = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with archive.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise _too_large(MAX_UNZIPPED_BYTES + 1)
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
                # a bad CRC, truncated or corrupt data, an unsupported method, encryption
                raise InvalidInputError(f"the zip's file {m.filename!r} cannot be unpacked: {e}") from e


@dataclass
class Case:
    id: str
    folder: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def input_path(self) -> str:
        """What the model reads: the NIfTI file, or the folder of the extracted DICOM series."""
        return os.path.join(self.folder, "input", self.record["input"]["read_as"])

    @property
    def is_dicom(self) -> bool:
        return self.record["input"]["kind"] == "dicom"

    def result(self, result_id: str) -> dict[str, Any]:
        for r in self.record["results"]:
            if r["id"] == result_id:
                return r
        raise ImageNotFoundError(f"case {self.id} has no result {result_id}")

    def result_folder(self, result_id: str) -> str:
        return os.path.join(self.folder, "results", self.result(result_id)["id"])

    def public(self) -> dict[str, Any]:
        """What the page and the client see (no owner, no server paths)."""
        r = self.record
        return {"id": self.id, "created": r["created"], "input": {k: v for k, v in r["input"].items() if k != "read_as"},
                "results": r["results"], "annotation": r.get("annotation")}  # fmt: skip


class CaseStore:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()  # case.json read-modify-write within this process

    # --- cases -----------------------------------------------------------------------------------
    def create(self, owner: str, filename: str, upload: str, validate) -> Case:
        """Store an input as a new case after ``validate(path)`` accepts what the model will read.

        ``upload``: a NIfTI file or a zip of one DICOM series (named by ``filename``), or a folder
        holding a DICOM series (a study of the server's datastore)."""
        name = os.path.basename(filename or "upload")
        if os.path.isdir(upload):
            kind = "dicom"
        else:
            kind = "nifti" if name.endswith(NIFTI_SUFFIXES) else "dicom" if name.endswith(".zip") else None
        if kind is None:
            raise InvalidInputError(f"'{name}': upload a NIfTI file (.nii, .nii.gz) or a zip of one DICOM series")
        case_id = uuid.uuid4().hex
        staging = tempfile.mkdtemp(prefix=".staging-", dir=self.root)
        try:
            os.makedirs(os.path.join(staging, "input"))
            stored = os.path.join(staging, "input", name)
            read_as = name
            if os.path.isdir(upload):  # kept as a zip too: the case's input is one file with one sha256
                shutil.copytree(upload, os.path.join(staging, "input", "series"), symlinks=False)
                stored = shutil.make_archive(stored, "zip", os.path.join(staging, "input", "series"))
                read_as = "series"
            else:
                shutil.copyfile(upload, stored)
            if kind == "dicom" and read_as != "series":
                safe_extract(stored, os.path.join(staging, "input", "series"))
                read_as = "series"
            validate(os.path.join(staging, "input", read_as))
            record = {
                "id": case_id,
                "owner": owner_key(owner),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "input": {"name": os.path.basename(stored), "kind": kind, "sha256": file_sha256(stored), "read_as": read_as},
                "results": [],
            }
            atomic_write_text(json.dumps(record, indent=2), os.path.join(staging, "case.json"))
            os.replace(staging, os.path.join(self.root, case_id))
        finally:
            if os.path.isdir(staging):
                shutil.rmtree(staging, ignore_errors=True)
        return Case(case_id, os.path.join(self.root, case_id), record)

    def get(self, owner: str, case_id: str) -> Case:
        folder = os.path.join(self.root, case_id)
        if not (len(case_id) == 32 and case_id.isalnum()) or not os.path.isfile(os.path.join(folder, "case.json")):
            raise ImageNotFoundError(f"no case {case_id}")
        with open(os.path.join(folder, "case.json")) as f:
            record = json.load(f)
        if record["owner"] != owner_key(owner):
            raise ImageNotFoundError(f"no case {case_id}")  # someone else's: not even its existence
        return Case(case_id, folder, record)

    def list(self, owner: str) -> list[Case]:
        cases = []
        for name in sorted(os.listdir(self.root)):
            if not name.startswith("."):
                try:
                    cases.append(self.get(owner, name))
                except ImageNotFoundError:
                    continue
        return sorted(cases, key=lambda c: c.record["created"], reverse=True)

    def update(self, case: Case, change) -> dict[str, Any]:
        """Apply ``change(record)`` to the case's record and write it atomically."""
        with self._lock:
            path = os.path.join(case.folder, "case.json")
            with open(path) as f:
                record = json.load(f)
            change(record)
            atomic_write_text(json.dumps(record, indent=2), path)
            case.record = record
            return record

    # --- results ---------------------------------------------------------------------------------
    def new_result(self, case: Case) -> dict[str, Any]:
        result = {"id": uuid.uuid4().hex, "status": "queued", "stage": "queued", "created": time.time(), "files": {}}
        self.update(case, lambda r: r["results"].append(result))
        return result

    def set_result(self, case: Case, result_id: str, **values: Any) -> None:
        def change(record: dict[str, Any]) -> None:
            for r in record["results"]:
                if r["id"] == result_id:
                    r.update(values)

        self.update(case, change)

    def publish_files(self, case: Case, result_id: str, files: dict[str, str]) -> dict[str, str]:
        """Move a result's files in place in one rename; returns format -> file name."""
        staging = tempfile.mkdtemp(prefix=".staging-", dir=case.folder)
        names = {}
        for fmt, path in files.items():
            name = os.path.basename(path)
            shutil.move(path, os.path.join(staging, name))
            names[fmt] = name
        os.makedirs(os.path.join(case.folder, "results"), exist_ok=True)
        os.replace(staging, os.path.join(case.folder, "results", result_id))
        return names
