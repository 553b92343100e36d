"""The contouring page at /ctv/ and its API at /ctv/api/ (upload, contour, view, download, history).

The page is static (``apps/ctv_app/web/``); everything it shows comes from this API. Contouring
runs the same infer task as ``/infer/<model>`` (``model``: any served model, ``GET /ctv/api/models``;
default the first served), one case at a time in a background worker, so the page polls the result's
stage. Slices are rendered in the browser from volumes the server prepares
once per case, in display orientation (axial, patient right on the left of the screen, anterior
up): the CT windowed to uint8, and each result's structures as a bitmask (bit ``value - 1`` set
where a voxel is in that structure, so overlapping structures are each shown whole and one hidden
on the page reveals the one beneath). The legend's names, colours and volumes are the result's.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import pydicom
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from .admission import RetryAfter, when_admitted
from .cases import Case, CaseStore
from .datastore import check_label, read_label_on_grid
from .dicom.results import check_referenceable, write_dicom_result
from .dicom.series import read_series_headers
from .errors import ConflictError, CTVError, ImageNotFoundError, InvalidInputError, NotAuthorisedError, ServerBusyError
from .infers.ctv import write_nifti
from .provenance import input_sha256
from .security import current_user
from .structures import CATALOGUE, Structures
from .transforms.validation import load_ct

logger = logging.getLogger(__name__)

WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "web")
OWNER_COOKIE = "ctv_owner"
OWNER_HEADER = "X-CTV-Owner"
# ``nifti``: the label map viewers read (the first-listed structure where structures overlap);
# ``nifti_bitmask``: every structure whole (docs/model.md, "Structure sets"). Named by the model.
FILE_NAMES = {"nifti": "{model}.nii.gz", "nifti_bitmask": "{model}_bitmask.nii.gz", "rtstruct": "{model}_rtstruct.dcm",
              "dicom_seg": "{model}_seg.dcm"}  # fmt: skip


def display_volume(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(slice, row, col) for axial display: RAS-reoriented, patient right on screen left, anterior up,
    first slice inferior."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(np.asarray(array), ornt)
    return np.ascontiguousarray(np.transpose(ras[::-1, ::-1, :], (2, 1, 0)))  # [k][j flipped][i flipped]


def display_spacing(affine: np.ndarray) -> dict[str, float]:
    """Voxel spacing along the axes ``display_volume`` draws: columns R-L, rows A-P, slices S-I."""
    ornt = nib.orientations.io_orientation(affine)
    ras = np.empty(3)
    ras[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)  # input axis i lies along RAS axis ornt[i, 0]
    return {"col": float(ras[0]), "row": float(ras[1]), "slice": float(ras[2])}


class ContouringService:
    def __init__(self, store: CaseStore, app: Any, model: str, window: tuple[float, float], rt_config: Any,
                 max_pending: int = 16, models: Mapping[str, Structures] | None = None):  # fmt: skip
        """``model``: the default model, whose ``window`` the CT is shown in; ``models``: every model served
        (name -> its structures; default ``model`` alone); ``max_pending``: contours queued or running, all
        cases together (one per case at most)."""
        self.store, self.app, self.model = store, app, model
        self.models = dict(models) if models is not None else {model: None}
        self.window, self.rt_config = window, rt_config
        self.max_pending = max_pending
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctv-contour")
        self._pending: set[str] = set()  # ids of the cases with a contour queued or running
        self._pending_lock = threading.Lock()
        self._retry_after = RetryAfter(expected_s=30.0)  # a contour's time, until one is measured

    def create_case(self, owner: str, filename: str, upload: str) -> Case:
        case = self.store.create(owner, filename, upload, validate=load_ct)
        self.store.update(case, lambda r: r["input"].update({"contoured_sha256": input_sha256(case.input_path)}))
        return case

    def check_capacity(self) -> None:
        """503 + Retry-After while ``max_pending`` contours are queued or running."""
        with self._pending_lock:
            if len(self._pending) >= self.max_pending:
                raise self._busy()

    def _busy(self) -> ServerBusyError:
        return ServerBusyError(
            f"{len(self._pending)} contours are already queued or running (limit {self.max_pending}); retry later",
            retry_after_s=self._retry_after.seconds(len(self._pending)),
        )

    def model_of(self, model: str | None) -> str:
        """The model a request names (404 naming those served if it is not one), else the default."""
        if not model:
            return self.model
        if model not in self.models:
            raise ImageNotFoundError(f"model '{model}' is not served here; available: {sorted(self.models)}")
        return model

    def contour(self, case: Case, model: str | None = None) -> dict[str, Any]:
        """Queue a contour of ``case`` by ``model`` (default: the default model): 409 while the case has one
        queued or running, 503 when the queue is full."""
        model = self.model_of(model)
        with self._pending_lock:
            if case.id in self._pending:
                raise ConflictError(f"case {case.id} is already being contoured; wait for that result")
            if len(self._pending) >= self.max_pending:
                raise self._busy()
            self._pending.add(case.id)
        try:
            result = self.store.new_result(case)
            self.store.set_result(case, result["id"], model_name=model)
            result["model_name"] = model
            self._worker.submit(self._run, case, result["id"], model)
        except Exception:
            self._done(case.id, None)
            raise
        return result

    def _done(self, case_id: str, seconds: float | None) -> None:
        with self._pending_lock:
            self._pending.discard(case_id)
            if seconds is not None:
                self._retry_after.observe(seconds)

    def _run(self, case: Case, result_id: str, model: str) -> None:
        work = tempfile.mkdtemp(prefix="ctv-result-")
        started = time.monotonic()
        try:
            self.store.set_result(case, result_id, status="running", stage="contouring")
            # The lossless form: every other file (label map, RTSTRUCT, SEG) is written from it.
            request = {"model": model, "image": case.input_path, "result_format": "nifti",
                       "label_encoding": "bitmask"}  # fmt: skip
            out = when_admitted(lambda: self.app.infer(request))  # a full queue: wait for a turn
            params = out["params"]
            provenance = params["provenance"]
            if provenance["input"]["sha256"] != case.record["input"]["contoured_sha256"]:
                raise RuntimeError("the contoured input is not this case's input")
            self.store.set_result(case, result_id, stage="writing")
            file_names = {fmt: name.format(model=model) for fmt, name in FILE_NAMES.items()}
            files = {fmt: os.path.join(work, file_names[fmt]) for fmt in ("nifti", "nifti_bitmask")}
            shutil.move(out["file"], files["nifti_bitmask"])
            bitmask = np.asarray(nib.load(files["nifti_bitmask"]).dataobj)
            structures = result_structures(params)
            described = [{k: s[k] for k in ("name", "value", "roi_type", "colour")} for s in params["structures"]]
            path = write_nifti(structures.labelmap(bitmask), np.asarray(provenance["input"]["affine"]), provenance,
                               {"encoding": "labelmap", "structures": described})  # fmt: skip
            shutil.move(path, files["nifti"])
            notes = {}
            if case.is_dicom:
                # The headers are read once more here; their digest shows they are the bytes contoured.
                series = read_series_headers(case.input_path)
                if series.sha256 != provenance["input"]["sha256"]:
                    raise RuntimeError("the case's input changed after it was contoured")
                try:
                    check_referenceable(series.headers, "this series")
                except InvalidInputError as e:  # the NIfTI result stands; DICOM results could not reference it
                    notes["dicom_refused"] = str(e)
                else:
                    for fmt in ("rtstruct", "dicom_seg"):
                        path, _ = write_dicom_result(fmt, bitmask, structures, series, self.rt_config, provenance)
                        files[fmt] = os.path.join(work, file_names[fmt])
                        shutil.move(path, files[fmt])
            names = self.store.publish_files(case, result_id, files)
            self.store.set_result(
                case, result_id, status="done", stage="done", files=names, **notes,
                model=provenance["model"]["sha256"], input_sha256=provenance["input"]["sha256"],
                structures=params["structures"], latencies=params.get("latencies"),
            )  # fmt: skip
        except Exception as e:  # the page shows it; the server and the other cases carry on
            logger.exception(f"contouring case {case.id} failed")
            message = e.detail if isinstance(e, HTTPException) else str(e)
            self.store.set_result(case, result_id, status="failed", stage="failed", error=str(message))
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self._done(case.id, time.monotonic() - started)

    # --- what the viewer draws -------------------------------------------------------------------
    def view_bytes(self, case: Case, what: str, result_id: str | None = None) -> str:
        """Path of a cached display volume: the windowed CT (uint8), a result's structures (the bitmask:
        little-endian uint8, 16 or 32 by the number of structures), or the annotation (uint8, 0/1).
        One file each, named only by ids of the case's own record (``result_id`` for a mask)."""
        cache = os.path.join(case.folder, "view")
        os.makedirs(cache, exist_ok=True)
        name = f"mask_{case.result(result_id)['id']}.bitmask" if what == "mask" else f"{what}.u8"
        path = os.path.join(cache, name)
        if not os.path.exists(path):
            image = load_ct(case.input_path)
            affine = np.asarray(image.meta["original_affine"])
            if what == "image":
                lo, hi = self.window
                data = np.clip((np.asarray(image[0]) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
            elif what == "mask":
                files, folder = case.result(result_id)["files"], case.result_folder(result_id)
                if "nifti_bitmask" in files:
                    data = np.asarray(nib.load(os.path.join(folder, files["nifti_bitmask"])).dataobj)
                    data = data.astype(data.dtype.newbyteorder("<"))
                else:  # a result from before structure sets: one CTV mask, which is bit 0
                    data = (np.asarray(nib.load(os.path.join(folder, files["nifti"])).dataobj) > 0).astype(np.uint8)
            else:
                data = (np.asarray(nib.load(os.path.join(case.folder, "annotation.nii.gz")).dataobj) > 0).astype(np.uint8)
            tmp = path + f".{secrets.token_hex(4)}.tmp"
            display_volume(data, affine).tofile(tmp)
            os.replace(tmp, path)
        return path

    def view_meta(self, case: Case) -> dict[str, Any]:
        image = load_ct(case.input_path)
        affine = np.asarray(image.meta["original_affine"])
        shape = display_volume(np.zeros(image.shape[1:], np.uint8), affine).shape
        lo, hi = self.window
        return {
            "slices": shape[0], "rows": shape[1], "cols": shape[2],
            "spacing_mm": display_spacing(affine),
            "window": {"name": "soft tissue (the model's window)", "level": (lo + hi) / 2, "width": hi - lo},
        }  # fmt: skip


def result_structures(result: dict[str, Any]) -> Structures:
    """The structures of a result (``result``: its result JSON) as the model that made it describes them
    (with the SNOMED code and rule the DICOM writers need), in the result's order."""
    model = Structures(result["provenance"]["model"]["params"]["structures"])
    return Structures(model.subset([s["name"] for s in result["structures"]]))


def public(case: Case) -> dict[str, Any]:
    """What the page and the client see of a case. A result from before structure sets (one CTV mask and
    its ``ctv_volume_ml``) is described as that one structure, so the page still shows it."""
    record = case.public()
    record["results"] = [dict(r) for r in record["results"]]  # never change the stored record here
    for r in record["results"]:
        if r.get("status") == "done" and "structures" not in r:
            ctv = CATALOGUE["CTV"]
            r["structures"] = [{"name": ctv.name, "value": 1, "roi_type": ctv.roi_type, "colour": list(ctv.colour),
                                "volume_ml": r.get("ctv_volume_ml")}]  # fmt: skip
    return record


def owner_of(request: Request) -> str:
    """The authenticated user when access control is on; else the browser's owner cookie or header."""
    user = current_user()
    if user is not None:
        return f"user:{user.name}"
    token = request.headers.get(OWNER_HEADER) or request.cookies.get(OWNER_COOKIE)
    if not token or len(token) < 16:
        raise NotAuthorisedError(f"no owner token: open /ctv/ in a browser, or send the {OWNER_HEADER} header")
    return token


def build_router(service: ContouringService, labels: set[int]) -> APIRouter:
    router = APIRouter(prefix="/ctv", tags=["CTV page"])
    @router.get("/", include_in_schema=False)
    def page(request: Request):
        response = FileResponse(os.path.join(WEB_DIR, "index.html"), media_type="text/html")
        if not request.cookies.get(OWNER_COOKIE):
            response.set_cookie(OWNER_COOKIE, secrets.token_urlsafe(32), httponly=True, samesite="strict")
        return response

    @router.get("/api/models")
    def models(owner: str = Depends(owner_of)) -> list[dict[str, Any]]:
        """The models served, the default first, each with the structures it contours (name, type, colour)."""
        names = [service.model, *(n for n in service.models if n != service.model)]
        return [
            {"name": n, "default": n == service.model,
             "structures": [{"name": s.name, "roi_type": s.roi_type, "colour": list(s.colour)}
                            for s in service.models[n] or []]}
            for n in names
        ]  # fmt: skip

    @router.post("/api/cases")
    def upload(
        file: UploadFile | None = File(None),
        image: str | None = Form(None),
        model: str | None = Form(None),
        owner: str = Depends(owner_of),
    ) -> JSONResponse:
        """Store and check an upload (NIfTI, or a zip of one DICOM series) or a datastore study
        (``image``: its id), then contour it with ``model`` (default: the first served)."""
        model = service.model_of(model)  # an unknown model: 404 before anything is stored
        service.check_capacity()  # before anything is stored: a full queue would not contour it
        if image:
            path = service.app.datastore().get_image_uri(image)
            if not path:
                raise ImageNotFoundError(f"image '{image}' is not in the datastore")
            name = image if os.path.isdir(path) else os.path.basename(path)
            case = service.create_case(owner, name, path)
            label = service.app.datastore().get_label_uri(image, "final")
            if label and os.path.isfile(label):  # the study's saved annotation, shown beside the contour
                # Its values were checked when it was saved (a label map, or a bitmask of overlapping
                # structures); the page shows any structure of it as the annotation.
                read_label_on_grid(label, case.id, case.input_path)
                shutil.copyfile(label, os.path.join(case.folder, "annotation.nii.gz"))
                service.store.update(case, lambda r: r.update(annotation={"name": f"{image} (datastore final label)"}))
        elif file is not None:
            fd, tmp = tempfile.mkstemp(prefix="ctv-upload-")
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(file.file, out)
                case = service.create_case(owner, file.filename or "", tmp)
            finally:
                os.unlink(tmp)
        else:
            raise InvalidInputError("send a file (NIfTI or a zip of a DICOM series) or image=<datastore id>")
        try:
            result = service.contour(case, model)
        except ServerBusyError:  # the queue filled while this upload was checked: keep no case without a result
            shutil.rmtree(case.folder, ignore_errors=True)
            raise
        return JSONResponse({"case": public(case), "result": result}, status_code=201)

    @router.get("/api/cases")
    def history(owner: str = Depends(owner_of)) -> list[dict[str, Any]]:
        return [public(c) for c in service.store.list(owner)]

    @router.get("/api/cases/{case_id}")
    def case(case_id: str, owner: str = Depends(owner_of)) -> dict[str, Any]:
        return public(service.store.get(owner, case_id))

    @router.post("/api/cases/{case_id}/contour")
    def recontour(case_id: str, model: str | None = None, owner: str = Depends(owner_of)) -> dict[str, Any]:
        """Contour again with the weights served now of ``model`` (default: the first served); earlier
        results are kept."""
        return service.contour(service.store.get(owner, case_id), model)

    @router.put("/api/cases/{case_id}/annotation")
    def annotate(case_id: str, file: UploadFile = File(...), owner: str = Depends(owner_of)) -> dict[str, Any]:
        case = service.store.get(owner, case_id)
        fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=case.folder)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(file.file, out)
            check_label(tmp, case.id, case.input_path, labels, name=file.filename)
            os.replace(tmp, os.path.join(case.folder, "annotation.nii.gz"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        cached = os.path.join(case.folder, "view", "annotation.u8")
        if os.path.exists(cached):
            os.unlink(cached)
        service.store.update(case, lambda r: r.update(annotation={"name": file.filename}))
        return public(case)

    @router.get("/api/cases/{case_id}/view")
    def view(case_id: str, owner: str = Depends(owner_of)) -> dict[str, Any]:
        return service.view_meta(service.store.get(owner, case_id))

    @router.get("/api/cases/{case_id}/view/{what}")
    def view_bytes(case_id: str, what: str, result: str | None = None, owner: str = Depends(owner_of)) -> FileResponse:
        case = service.store.get(owner, case_id)
        if what not in ("image", "mask", "annotation"):
            raise ImageNotFoundError(f"no view '{what}'")
        if result is not None:
            case.result(result)  # 404 unless it is one of this case's results
            if what != "mask":
                raise InvalidInputError(f"the {what} view has no result: only view/mask takes ?result=<id>")
        if what == "mask" and (not result or case.result(result).get("status") != "done"):
            raise InvalidInputError("name a finished result: ?result=<id>")
        if what == "annotation" and not case.record.get("annotation"):
            raise ImageNotFoundError(f"case {case_id} has no annotation")
        return FileResponse(service.view_bytes(case, what, result), media_type="application/octet-stream")

    @router.get("/api/cases/{case_id}/results/{result_id}/{fmt}")
    def download(case_id: str, result_id: str, fmt: str, owner: str = Depends(owner_of)) -> FileResponse:
        case = service.store.get(owner, case_id)
        result = case.result(result_id)
        name = result.get("files", {}).get(fmt)
        if name is None:
            available = sorted(result.get("files", {}))
            raise InvalidInputError(f"result {result_id} has no '{fmt}' file (available: {available})")
        path = os.path.join(case.result_folder(result_id), name)
        embedded = embedded_input_sha256(path)
        if embedded != case.record["input"]["contoured_sha256"]:  # never another input's result
            raise CTVError(f"result file {name} names input {embedded}, not this case's input")
        return FileResponse(path, filename=f"{case.id[:8]}_{result_id[:8]}_{name}")

    return router


def embedded_input_sha256(path: str) -> str | None:
    """The input sha256 a result file carries (NIfTI header extension, or DICOM description)."""
    if path.endswith(".nii.gz"):
        for ext in nib.load(path).header.extensions:
            try:
                return json.loads(ext.get_content())["input"]["sha256"]
            except (ValueError, KeyError, TypeError):
                continue
        return None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    text = str(ds.get("StructureSetDescription", "") or ds.get("ImageComments", ""))
    marker = "input sha256 "
    return text.split(marker, 1)[1][:64] if marker in text else None


def mount(fastapi_app, service: ContouringService, labels: set[int]) -> None:
    """Add the page, its API and its static files to MONAI Label's FastAPI app."""
    fastapi_app.include_router(build_router(service, labels))
    fastapi_app.mount("/ctv/static", StaticFiles(directory=WEB_DIR), name="ctv-static")

    @fastapi_app.get("/ctv", include_in_schema=False)
    def ctv_no_slash() -> Response:
        return RedirectResponse("/ctv/")
