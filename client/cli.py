"""``ctv``: the command-line client hospital scripts use, built on the server's REST API.

    ctv infer PATH... --server URL --out DIR [--format nifti,bitmask,rtstruct,seg] [--model hn]
    ctv status | ctv train [--model hn] [--epochs N] | ctv next [--strategy uncertain]

``infer`` takes NIfTI files, folders holding one DICOM series (sent as a zip), or the ids of
studies in the server's datastore (e.g. SeriesInstanceUIDs of a DICOMweb datastore). Each case
goes through the contouring page's API (/ctv/api: one contouring, every format, kept in the
server's history), by ``--model`` (any model the server serves, ``ctv status`` lists them with
their structures; default: the server's first); results land in OUT/<case>/ with a manifest.json
naming the input sha256, the model (name and sha256) and every structure (name, value, type, colour,
voxels, volume in ml). A case whose manifest already lists the asked formats for the same input (and
the same model, when ``--model`` names one) is skipped, so a batch can be re-run after an
interruption. OUT/structures.csv lists the volume of every structure of every case of the batch.
Exit status 1 when any case failed.

Every format holds every structure the model contours (files named by the model: ctv..., hn...):
  nifti    ctv.nii.gz, the label map viewers read: each voxel the value of one structure (0 none);
           where structures overlap, the first-listed one (the model lists its targets first)
  bitmask  ctv_bitmask.nii.gz, lossless: bit (value - 1) set where a voxel is in that structure,
           so overlapping structures are each whole (uint8 up to 8 structures, uint16 up to 16)
  rtstruct one ROI per structure; seg: one segment per structure (both need a DICOM input)
Values, names and colours are in manifest.json and in each NIfTI's header extension (JSON).

Authentication: ``--token`` (or CTV_TOKEN) is sent as a bearer token, for servers started with
MONAI Label's auth; ``--user``/``--password`` (or CTV_USER/CTV_PASSWORD) fetch one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import secrets
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from monailabel.client import MONAILabelClient
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

FORMATS = {"nifti": "nifti", "bitmask": "nifti_bitmask", "nifti_bitmask": "nifti_bitmask", "rtstruct": "rtstruct",
           "seg": "dicom_seg", "dicom_seg": "dicom_seg"}  # fmt: skip
VOLUME_COLUMNS = ("case", "structure", "value", "roi_type", "voxels", "volume_ml")
OWNER_HEADER = "X-CTV-Owner"


class CaseFailed(Exception):
    pass


@dataclass
class Source:
    """One case to contour: a local file, a DICOM folder, or a datastore study id."""

    spec: str

    @property
    def name(self) -> str:
        p = Path(self.spec)
        if p.exists():
            return p.name.removesuffix(".gz").removesuffix(".nii") if p.is_file() else p.name
        return self.spec

    def payload(self) -> tuple[str, bytes]:
        """The upload: the file itself, or a folder's files zipped (one DICOM series)."""
        p = Path(self.spec)
        if p.is_file():
            return p.name, p.read_bytes()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(p).as_posix())
        return f"{p.name}.zip", buffer.getvalue()

    def local_sha256(self) -> str | None:
        p = Path(self.spec)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_dir():  # names and contents of every file: changes when the series does
            h = hashlib.sha256()
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    h.update(f"{f.relative_to(p).as_posix()}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
            return h.hexdigest()
        return None


class CTVClient:
    def __init__(self, server: str, owner: str, token: str | None = None, timeout_s: float = 3600):
        self.server = server.rstrip("/")
        self.session = requests.Session()
        # A server busy writing a result may close a kept-alive connection just as the next poll goes out
        # ("connection reset"): GETs read state only, so they are tried again instead of failing the case.
        retry = Retry(total=5, backoff_factor=0.5, status=0, allowed_methods=frozenset({"GET"}))
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retry))
        self.session.headers[OWNER_HEADER] = owner
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self.monailabel = MONAILabelClient(self.server)
        if token:
            self.monailabel.update_auth({"token_type": "Bearer", "access_token": token})

    def _check(self, r: requests.Response) -> requests.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise CaseFailed(f"{r.status_code}: {detail}")
        return r

    def _post_case(self, source: Source, deadline: float, model: str | None = None) -> requests.Response:
        """POST the case (to be contoured by ``model``, default the server's); while the server's contouring
        queue is full (503), wait as its Retry-After says (at most 10 s between tries) until ``deadline``."""
        data = {"model": model} if model else {}
        if Path(source.spec).exists():
            name, payload = source.payload()
            form: dict[str, Any] = {"files": {"file": (name, payload)}, "data": data}
        else:
            form = {"data": {"image": source.spec, **data}}
        while True:
            r = self.session.post(f"{self.server}/ctv/api/cases", timeout=600, **form)
            if r.status_code != 503 or time.monotonic() >= deadline:
                return r
            wait = min(float(r.headers.get("Retry-After", 5)), 10.0, max(0.0, deadline - time.monotonic()))
            print(f"server busy (503): {source.name} waits {wait:.0f} s for its turn", file=sys.stderr)
            time.sleep(wait)

    def contour(self, source: Source, model: str | None = None) -> dict[str, Any]:
        """Send the case and wait for its result by ``model`` (default: the server's); returns the case
        record and the finished result."""
        deadline = time.monotonic() + self.timeout_s
        body = self._check(self._post_case(source, deadline, model)).json()
        case_id, result_id = body["case"]["id"], body["result"]["id"]
        while time.monotonic() < deadline:
            case = self._check(self.session.get(f"{self.server}/ctv/api/cases/{case_id}", timeout=60)).json()
            result = next(r for r in case["results"] if r["id"] == result_id)
            if result["status"] == "done":
                return {"case": case, "result": result}
            if result["status"] == "failed":
                raise CaseFailed(result.get("error", "contouring failed"))
            time.sleep(0.5)
        raise CaseFailed(f"no result after {self.timeout_s:.0f} s")

    def download(self, case_id: str, result_id: str, fmt: str, dest: Path) -> None:
        url = f"{self.server}/ctv/api/cases/{case_id}/results/{result_id}/{fmt}"
        r = self._check(self.session.get(url, timeout=600))
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(r.content)
        os.replace(tmp, dest)


def already_done(folder: Path, local_sha: str | None, formats: list[str], model: str | None = None) -> bool:
    """The manifest of an earlier run covers these formats for the same input (and ``model``, if named),
    and its files exist."""
    path = folder / "manifest.json"
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    if local_sha is not None and manifest.get("source_sha256") != local_sha:
        return False
    if model is not None and manifest.get("model") != model:
        return False
    covered = set(manifest["files"]) | set(manifest.get("not_available", []))
    return set(formats) <= covered and all((folder / name).exists() for name in manifest["files"].values())


def infer_one(
    client: CTVClient, source: Source, formats: list[str], folder: Path, local_sha: str | None, model: str | None = None
) -> None:
    outcome = client.contour(source, model)
    case, result = outcome["case"], outcome["result"]
    available = [f for f in formats if f in result["files"]]
    if not available:
        raise CaseFailed(f"{', '.join(formats)}: need a DICOM input; this case is {case['input']['kind']}")
    folder.mkdir(parents=True, exist_ok=True)
    files = {fmt: result["files"][fmt] for fmt in available}
    for fmt, name in files.items():
        client.download(case["id"], result["id"], fmt, folder / name)
    manifest = {
        "source": source.spec, "source_sha256": local_sha, "case": case["id"], "result": result["id"],
        "input_sha256": case["input"]["sha256"], "contoured_sha256": case["input"].get("contoured_sha256"),
        "model": result.get("model_name"), "model_sha256": result["model"], "files": files,
        "not_available": [f for f in formats if f not in files],
        "structures": result["structures"],
    }  # fmt: skip
    tmp = folder / "manifest.json.part"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / "manifest.json")  # written last: a case counts as done only when complete


def write_volumes(out: Path, folders: list[Path]) -> Path:
    """OUT/structures.csv: one row per structure of each case's manifest (this batch's cases, done now or before)."""
    path = out / "structures.csv"
    tmp = path.with_suffix(".csv.part")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VOLUME_COLUMNS)
        for folder in folders:
            manifest = json.loads((folder / "manifest.json").read_text())
            for s in manifest.get("structures", []):  # none in a manifest written before structure sets
                writer.writerow([folder.name, s["name"], s["value"], s["roi_type"], s["voxels"], s["volume_ml"]])
    os.replace(tmp, path)
    return path


def infer(args: argparse.Namespace, client: CTVClient) -> int:
    formats = list(dict.fromkeys(FORMATS[f.strip()] for f in args.format.split(",") if f.strip()))
    out = Path(args.out)
    failed: dict[str, str] = {}
    done = skipped = 0
    finished: list[Path] = []
    bar = tqdm(args.paths, unit="case", file=sys.stderr, disable=args.quiet)
    for spec in bar:
        source = Source(spec)
        bar.set_postfix_str(source.name[:30])
        folder = out / source.name
        local_sha = source.local_sha256()
        if already_done(folder, local_sha, formats, args.model):
            skipped += 1
            finished.append(folder)
            continue
        try:
            infer_one(client, source, formats, folder, local_sha, args.model)
            done += 1
            finished.append(folder)
        except (CaseFailed, requests.RequestException, OSError) as e:
            failed[spec] = str(e)
    bar.close()
    print(f"{done} contoured, {skipped} already done, {len(failed)} failed")
    if finished:
        print(f"structure volumes: {write_volumes(out, finished)}")
    for spec, why in failed.items():
        print(f"FAILED {spec}: {why}")
    return 1 if failed else 0


def status(args: argparse.Namespace, client: CTVClient) -> int:
    info = client.monailabel.info()
    store = client.monailabel.datastore()
    train = requests.get(f"{client.server}/train/?check_if_running=false", headers=client.session.headers, timeout=30)
    print(json.dumps({
        "models": {k: {"labels": v.get("labels")} for k, v in info.get("models", {}).items()},
        "datastore": {"studies": len(store.get("objects", {}))},
        "training": train.json() if train.ok else train.text,
    }, indent=2, default=str))  # fmt: skip
    return 0


def train(args: argparse.Namespace, client: CTVClient) -> int:
    params = {"max_epochs": args.epochs} if args.epochs else {}
    print(json.dumps(client.monailabel.train_start(args.model, params), indent=2, default=str))
    return 0


def next_sample(args: argparse.Namespace, client: CTVClient) -> int:
    print(json.dumps(client.monailabel.next_sample(args.strategy, {}), indent=2, default=str))
    return 0


def commission(args: argparse.Namespace, client: CTVClient) -> int:
    """Mark commissioning cases (reviewer), then make the report of a version (physicist); writes its JSON
    and HTML to --out. Exit 0 when it passed the acceptance criteria, 1 when it failed."""
    for image in args.mark or []:
        client._check(client.session.put(f"{client.server}/commission/cases/{image}", timeout=60))
    version = args.version
    if not version:  # the newest version
        listing = client._check(client.session.get(f"{client.server}/models/{args.model}", timeout=60)).json()
        if not listing["versions"]:
            raise SystemExit(f"model {args.model} has no versions")
        version = listing["versions"][-1]["sha256"]
    r = client._check(client.session.post(f"{client.server}/commission/{args.model}", params={"version": version},
                                          timeout=client.timeout_s))  # fmt: skip
    summary = r.json()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("json", "html"):
        body = client._check(client.session.get(client.server + summary[kind], timeout=120)).content
        (out / f"{summary['id']}.{kind}").write_bytes(body)
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("CTV_SERVER", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("CTV_TOKEN"))
    parser.add_argument("--user", default=os.environ.get("CTV_USER"))
    parser.add_argument("--password", default=os.environ.get("CTV_PASSWORD"))
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("infer", help="contour cases and download the results")
    p.add_argument("paths", nargs="+", help="NIfTI files, DICOM series folders, or datastore study ids")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="nifti,bitmask", help="comma-separated, each with every structure: nifti "
                   "(label map), bitmask (lossless, overlaps kept), rtstruct, seg (DICOM input); default: %(default)s")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--model", help="the model to contour with, e.g. hn (default: the server's first; see status)")
    p.set_defaults(run=infer)
    commands.add_parser("status", help="models, datastore size, training state").set_defaults(run=status)
    p = commands.add_parser("train", help="start training on the saved labels")
    p.add_argument("--model", default="ctv")
    p.add_argument("--epochs", type=int)
    p.set_defaults(run=train)
    p = commands.add_parser("commission", help="the commissioning report of a model version (docs/clinical.md)")
    p.add_argument("--model", default="ctv")
    p.add_argument("--version", help="sha256 or a prefix of 8+ hex digits (default: the newest version)")
    p.add_argument("--mark", nargs="*", help="first mark these datastore studies as commissioning cases")
    p.add_argument("--out", required=True, help="folder for the report's JSON and HTML")
    p.set_defaults(run=commission)
    p = commands.add_parser("next", help="the study to contour next (active learning)")
    p.add_argument("--strategy", default="uncertain")
    p.set_defaults(run=next_sample)
    args = parser.parse_args(argv)

    unknown = [f for f in getattr(args, "format", "").split(",") if f.strip() and f.strip() not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; use nifti, bitmask, rtstruct, seg")
    token = args.token
    if not token and args.user:
        token = MONAILabelClient(args.server).auth_token(args.user, args.password).get("access_token")
    owner_file = Path(getattr(args, "out", ".")) / ".ctv_owner"
    if getattr(args, "out", None) and owner_file.exists():
        owner = owner_file.read_text().strip()  # the same owner on a re-run: its cases stay visible
    else:
        owner = secrets.token_urlsafe(32)
        if getattr(args, "out", None):
            owner_file.parent.mkdir(parents=True, exist_ok=True)
            owner_file.write_text(owner)
    return args.run(args, CTVClient(args.server, owner, token))


if __name__ == "__main__":
    sys.exit(main())
