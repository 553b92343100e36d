"""Where this server's REST API differs from MONAI Label's, installed on its FastAPI app at start.

- Access control, the origin policy, the upload limit and the audit trail (``security.AccessControl``)
  in place of MONAI Label's CORS layer (which granted every origin), with the ``/auth/`` login routes
  that MONAI Label's clients (Slicer, ``MONAILabelClient``) use, and ``GET /audit/`` for admins.
- ``PUT /datastore/label/info`` may not set what the server records with each save
  (``datastore.SERVER_LABEL_FIELDS``): 422.
- ``POST /infer/{model}`` runs in a worker thread instead of on the event loop, so the server
  keeps answering while it computes and a full queue can say 503 (``admission.InferenceGate``);
  malformed ``params`` are a 422, not a 500.
- ``POST /reload`` (rebuild the app at run time) and ``POST /infer/wsi_v2/{model}`` (whole-slide
  pathology) are 404s, and so is ``/proxy/dicom/`` on a folder datastore (it forwarded to the
  folder's path as if it were a URL: a 500).
- MONAI Label's exceptions for a caller's mistake are 4xx (``ClientErrors``); JSON form fields
  (``params``, ``info``) must be JSON objects; ``/logs/`` numbers are bounded.
- ``PUT /model/{model}`` checks the uploaded weights load into the served network before they
  replace the served file (atomically; the previous file is kept), instead of copying any bytes.
- ``PUT /session/?uncompress=true`` unpacks only a zip, bounded like the page's (``cases.safe_extract``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Query, Response, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.endpoints import datastore as monailabel_datastore
from monailabel.endpoints import infer as monailabel_infer
from monailabel.endpoints import logs as monailabel_logs
from monailabel.endpoints import model as monailabel_model
from monailabel.endpoints import proxy as monailabel_proxy
from monailabel.endpoints import session as monailabel_session
from monailabel.endpoints import wsi_infer as monailabel_wsi_infer
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.interfaces.utils.app import app_instance

from .audit import AuditLog
from .cases import safe_extract
from .datastore import SERVER_LABEL_FIELDS
from .errors import ImageNotFoundError, InvalidInputError, NotAuthorisedError
from .security import AccessControl, Users, current_user, install, remove_cors_layer


def install_api(app, users: Users | None, audit: AuditLog, max_body_bytes: int, dicomweb: bool,
                origins: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """``dicomweb``: the datastore is a DICOMweb PACS (else OHIF's DICOM proxy has nothing to reach);
    ``origins``: other sites whose pages may call the server (``security.configured_origins``)."""
    # POST /reload rebuilt the app in a running server (and would install all of this twice): not served.
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/reload"]
    remove_cors_layer(app)
    install(app, ClientErrors)
    install(app, lambda inner: AccessControl(inner, users, audit, max_body_bytes, origins=origins))
    for path, endpoint in (("/image", add_image), ("/image/info", put_image_info), ("/label", save_label),
                           ("/label/info", put_label_info)):  # fmt: skip
        _replace_route(monailabel_datastore.router, path, "PUT", endpoint)
    _replace_route(monailabel_datastore.router, "/label", "DELETE", remove_label)
    _replace_route(monailabel_datastore.router, "/updatelabelinfo", "PUT", put_label_info)
    _replace_route(monailabel_logs.router, "/", "GET", server_log)
    _replace_route(monailabel_logs.router, "/gpu", "GET", gpu_info)
    _replace_route(monailabel_session.router, "/{session_id}", "GET", get_session)
    _replace_route(monailabel_session.router, "/", "PUT", create_session)
    if not dicomweb:
        monailabel_proxy.router.routes.clear()
        monailabel_proxy.router.add_api_route(
            "/dicom/{path:path}", _no_pacs, methods=["GET", "POST"], include_in_schema=False
        )
    monailabel_wsi_infer.router.routes.clear()  # whole-slide pathology: not a CT server's business
    monailabel_wsi_infer.router.add_api_route("/wsi_v2/{model}", _not_served, methods=["POST"], include_in_schema=False)
    _replace_route(monailabel_infer.router, "/{model}", "POST", infer)
    _replace_route(monailabel_model.router, "/{model}", "PUT", upload_model)
    app.add_api_route("/audit/", _audit_reader(audit), methods=["GET"], tags=["Audit"],
                      summary="(admin) The audit log: who saved, trained, uploaded or deleted what")  # fmt: skip
    _add_lifecycle_routes(app, audit)
    if users is not None:
        _add_login_routes(app, users)


def _replace_route(router, path: str, method: str, endpoint) -> None:
    """Swap an endpoint of one of MONAI Label's routers (the app includes the router, not copies)."""
    prefixed = router.prefix + path
    old = [r for r in router.routes if isinstance(r, APIRoute) and r.path in (path, prefixed) and method in r.methods]
    if len(old) != 1:
        raise RuntimeError(f"expected one {method} {prefixed} route in MONAI Label, found {len(old)}")
    router.routes.remove(old[0])
    router.add_api_route(path, endpoint, methods=[method], summary=old[0].summary)


class ClientErrors:
    """ASGI middleware: MONAI Label's own exceptions for a caller's mistake become 4xx, not 500.

    MONAI Label raises these from its endpoints for ids that do not exist and for input it
    cannot use; anything else is still a 500 (a bug to fix, which the fuzz test looks for)."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def status_of(e: Exception) -> int | None:
        if isinstance(e, (ImageNotFoundException, LabelNotFoundException)):
            return 404
        if isinstance(e, MONAILabelException) and e.error == MONAILabelError.INVALID_INPUT:
            return 422
        if isinstance(e, (json.JSONDecodeError, shutil.ReadError)):  # a form field, an archive
            return 422
        return None

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_watching(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_watching)
        except Exception as e:
            status = self.status_of(e) if scope["type"] == "http" else None
            if status is None or started:
                raise
            detail = e.msg if isinstance(e, MONAILabelException) else str(e)
            await JSONResponse({"detail": f"{type(e).__name__}: {detail}"}, status_code=status)(scope, receive, send)


WHOLE_LOG_BYTES = 16 * 2**20


def server_log(
    lines: int = Query(300, ge=0, le=1_000_000),
    html: bool = True,
    text: bool = False,
    refresh: int = Query(0, ge=0, le=3600),
):
    """MONAI Label's log view with its numbers bounded (a huge ``lines`` was a 500). ``lines=0`` (the whole
    file) is read once and sent as read, at most its last ``WHOLE_LOG_BYTES``: MONAI Label streamed the file
    with the length it had when asked, and a log that grew or rotated meanwhile broke the response."""
    path = os.path.join(settings.MONAI_LABEL_APP_DIR, "logs", "app.log")
    if lines == 0:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - WHOLE_LOG_BYTES))
                return Response(content=f.read(), media_type="text/plain")
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail="no server log yet") from None
    return monailabel_logs.get_logs(path, lines, html, text, refresh)


def gpu_info() -> Response:
    """nvidia-smi's report; a 404 on a machine without it (MONAI Label's answers 500 there)."""
    if shutil.which("nvidia-smi") is None:
        raise ImageNotFoundError("no GPU information: nvidia-smi is not installed on this server")
    report = subprocess.run(["nvidia-smi"], stdout=subprocess.PIPE, timeout=30).stdout.decode()
    return Response(content=report, media_type="text/plain")


def create_session(background_tasks: BackgroundTasks, uncompress: bool = False, expiry: int = 0,
                   files: list[UploadFile] = File(...)) -> dict[str, Any]:  # fmt: skip
    """MONAI Label's, except that ``uncompress`` unpacks only a zip, with the page's checks (no path
    outside the folder, bounded size and compression ratio): MONAI Label's unpacked any archive, a tar
    too, with no bound and writing wherever its member names pointed."""
    if not uncompress:
        return monailabel_session.create_session(background_tasks, uncompress, expiry, files)
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="Session Feature is Not Enabled")
    if len(files) != 1 or not (files[0].filename or "").lower().endswith(".zip"):
        raise InvalidInputError("uncompress takes one zip file (of one DICOM series)")
    folder = tempfile.mkdtemp(prefix="ctv-session-")
    try:
        with tempfile.NamedTemporaryFile(suffix=".zip") as archive:
            shutil.copyfileobj(files[0].file, archive)
            archive.flush()
            safe_extract(archive.name, folder)
        session_id, info = sessions.add_session(folder, expiry)  # moves the folder into the session store
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"session_id": session_id, "session_info": info.to_json()}


def get_session(session_id: str, update_ts: bool = False, image: bool = False):
    """MONAI Label's, except that a session holding a folder of files is a 422 when its image is asked for."""
    info = app_instance().sessions().get_session(session_id, update_ts=update_ts)
    if info and image and not os.path.isfile(info.image):
        count = len(os.listdir(info.image))
        raise InvalidInputError(f"session '{session_id}' holds a folder of {count} files, not one image file")
    return monailabel_session.get_session(session_id, update_ts, image)


def _no_pacs(path: str) -> None:
    raise ImageNotFoundError("no DICOM proxy: this server's datastore is a folder, not a DICOMweb PACS")


def _not_served(model: str) -> None:
    raise ImageNotFoundError("whole-slide (pathology) inference is not served here: this server contours CT")


def json_object(text: str, field: str) -> dict[str, Any]:
    """A form field that must hold a JSON object (MONAI Label's ``params`` and ``info``); 422 otherwise."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as e:
        raise InvalidInputError(f"{field} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidInputError(f"{field} must be a JSON object, not {type(value).__name__}")
    return value


def _user_name() -> str | None:
    user = current_user()
    return user.name if user else None


# MONAI Label's datastore writes, with their JSON form fields checked first (a list or a number was a 500).
def add_image(background_tasks: BackgroundTasks, image: Optional[str] = None, params: str = Form("{}"),
              file: UploadFile = File(...)):  # fmt: skip
    json_object(params, "params")
    return monailabel_datastore.add_image(background_tasks, image, params, file, _user_name())


def put_image_info(image: str, info: str = Form("{}")):
    json_object(info, "info")
    return monailabel_datastore.update_image_info(image, info, _user_name())


def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"), tag: str = "final",
               label: UploadFile = File(...)):  # fmt: skip
    json_object(params, "params")
    if tag == "final":
        app_instance().commissioning.check_unlocked(image)
    return monailabel_datastore.save_label(background_tasks, image, params, tag, label, _user_name())


def remove_label(id: str, tag: str):
    if tag == "final":
        app_instance().commissioning.check_unlocked(id)
    return monailabel_datastore.remove_label(id, tag, _user_name())


def put_label_info(label: str, tag: str, info: str = Form("{}")):
    fields = json_object(info, "info")
    forged = sorted(SERVER_LABEL_FIELDS & set(fields))
    if forged:  # recovery and review trust these: only a save writes them
        raise InvalidInputError(f"label info fields {forged} are recorded by the server with each save; send others")
    return monailabel_datastore.update_label_info(label, tag, info, _user_name())


def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[monailabel_infer.ResultType] = None,
):
    """MONAI Label's inference, run in a worker thread (a plain ``def``) with its inputs checked."""
    json_object(params, "params")
    if not (file or image or session_id):
        raise InvalidInputError("send an image id, an image file or a session id")
    if session_id and not image and not file and not app_instance().sessions().get_session(session_id):
        raise ImageNotFoundError(f"session '{session_id}' does not exist (or has expired)")
    return monailabel_infer.run_inference(background_tasks, model, image, session_id, params, file, label, output)


def upload_model(model: str, file: UploadFile = File(...)) -> dict[str, Any]:
    """A new version of the model, only with weights the served network loads (422 otherwise); research mode
    serves it at once, clinical mode keeps it as a candidate (lib/versions.py)."""
    instance = app_instance()
    task = instance._infers.get(model)
    if task is None or not hasattr(task, "check_weights"):
        raise ImageNotFoundError(f"model '{model}' is not served here; available: {sorted(instance._infers)}")
    versions = instance.versions(model)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".pt", dir=versions.root)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
        try:
            record = task.check_weights(tmp)
        except Exception as e:
            raise InvalidInputError(f"refused: these are not weights this server can serve as '{model}': {e}") from e
        version = versions.publish(tmp, "uploaded", _user_name())
    finally:
        os.unlink(tmp)
    served = versions.served_version() == version["sha256"]
    return {"sha256": version["sha256"], "served": served, "mode": versions.mode,
            "model": {**record, "file": os.path.basename(versions.served_path)}}  # fmt: skip


def _add_lifecycle_routes(app, audit: AuditLog) -> None:
    """Model versions, commissioning, approval and rollback (docs/clinical.md); roles in security.RULES."""

    def list_versions(model: str) -> dict[str, Any]:
        """The model's mode, served version, versions (with their commissioning reports) and journal."""
        return app_instance().versions(model).summary()

    def card(model: str, version: Optional[str] = None) -> dict[str, Any]:
        """A version's model card (default: the served version)."""
        instance = app_instance()
        return instance.versions(model).card(version, instance.models[model].shipped_card)

    def approve(model: str, version: str = Query(...), comment: str = Query("")) -> dict[str, Any]:
        """(physicist) Serve a version whose newest commissioning report passed."""
        entry = app_instance().versions(model).approve(version, _user_name(), comment)
        audit.record({"user": entry["user"], "action": "model.approved", "model": model, "version": entry["version"],
                      "comment": entry["comment"], "report": entry["report"], "report_sha256": entry["report_sha256"]})  # fmt: skip
        return entry

    def rollback(model: str, version: str = Query(...), comment: str = Query("")) -> dict[str, Any]:
        """(physicist) Serve again a version approved before."""
        entry = app_instance().versions(model).rollback(version, _user_name(), comment)
        audit.record({"user": entry["user"], "action": "model.rolled_back", "model": model, "version": entry["version"],
                      "comment": entry["comment"], "report": entry["report"], "report_sha256": entry["report_sha256"]})  # fmt: skip
        return entry

    def list_cases() -> dict[str, Any]:
        return app_instance().commissioning.cases()

    def mark_case(image: str) -> dict[str, Any]:
        """(reviewer) Keep a study with a final label aside as a commissioning case: never trained on."""
        instance = app_instance()
        return instance.commissioning.mark(image, _user_name(), instance.datastore())

    def unmark_case(image: str) -> dict[str, str]:
        app_instance().commissioning.unmark(image)
        return {"removed": image}

    def commission_model(model: str, version: str = Query(...)) -> dict[str, Any]:
        """(physicist) The commissioning report of a version on every commissioning case: JSON and HTML."""
        summary = app_instance().commission(model, version)
        return {**summary, "json": f"/commission/reports/{summary['id']}.json",
                "html": f"/commission/reports/{summary['id']}.html"}  # fmt: skip

    def get_report(name: str) -> Response:
        stem, _, ext = name.rpartition(".")
        if ext not in ("json", "html") or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", stem):
            raise ImageNotFoundError(f"no report {name!r}: reports are <id>.json or <id>.html")
        path = os.path.join(app_instance().commissioning.reports_dir, name)
        if not os.path.exists(path):
            raise ImageNotFoundError(f"no report {name!r}")
        with open(path, "rb") as f:
            return Response(f.read(), media_type="application/json" if ext == "json" else "text/html")

    def monitoring(model: str) -> dict[str, Any]:
        """Agreement of the served model's contours with clinicians' final ones: per structure, alarms, most edited."""
        instance = app_instance()
        instance.versions(model)  # 404 for a model not served
        return instance.monitor.summary(model)

    tags = ["Clinical lifecycle"]
    app.add_api_route("/monitoring/{model}", monitoring, methods=["GET"], tags=tags)
    app.add_api_route("/models/{model}", list_versions, methods=["GET"], tags=tags)
    app.add_api_route("/models/{model}/card", card, methods=["GET"], tags=tags)
    app.add_api_route("/models/{model}/approve", approve, methods=["POST"], tags=tags)
    app.add_api_route("/models/{model}/rollback", rollback, methods=["POST"], tags=tags)
    app.add_api_route("/commission/cases", list_cases, methods=["GET"], tags=tags)
    app.add_api_route("/commission/cases/{image}", mark_case, methods=["PUT"], tags=tags)
    app.add_api_route("/commission/cases/{image}", unmark_case, methods=["DELETE"], tags=tags)
    app.add_api_route("/commission/reports/{name}", get_report, methods=["GET"], tags=tags)
    app.add_api_route("/commission/{model}", commission_model, methods=["POST"], tags=tags)


def _audit_reader(audit: AuditLog):
    def read_audit(limit: int = 1000, user: Optional[str] = None, action: Optional[str] = None) -> list[dict]:
        """The newest entries, oldest first."""
        if not 1 <= limit <= 100_000:
            raise InvalidInputError("limit must be between 1 and 100000")
        return audit.read(limit=limit, user=user, action=action)

    return read_audit


def _add_login_routes(app, users: Users) -> None:
    """The routes MONAI Label's clients call when a server has auth: the token is the password."""

    def auth_enabled() -> dict[str, Any]:
        return {"enabled": True, "client_id": "ctv", "realm": "built-in (CTV_AUTH_FILE / CTV_AUTH_TOKENS)"}

    def token(form: OAuth2PasswordRequestForm = Depends()) -> dict[str, str]:
        if users.by_name_and_token(form.username, form.password) is None:
            raise NotAuthorisedError("unknown user name or token")
        return {"access_token": form.password, "token_type": "Bearer"}

    def token_valid() -> dict[str, Any]:
        user = current_user()
        if user is None:
            raise HTTPException(status_code=401, detail="not authenticated")
        return {"username": user.name, "roles": [user.role]}

    app.add_api_route("/auth/", auth_enabled, methods=["GET"], tags=["Auth"], summary="Is auth enabled")
    app.add_api_route("/auth/token", token, methods=["POST"], tags=["Auth"],
                      summary="Log in: user name and token (as password) -> bearer token")  # fmt: skip
    app.add_api_route("/auth/token/valid", token_valid, methods=["GET"], tags=["Auth"], summary="Who am I")
