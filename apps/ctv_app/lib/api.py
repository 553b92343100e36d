"""Where this server's REST API differs from MONAI Label's, installed on its FastAPI app at start.

- Access control, the upload limit and the audit trail (``security.AccessControl``), with the
  ``/auth/`` login routes that MONAI Label's clients (Slicer, ``MONAILabelClient``) use, and
  ``GET /audit/`` for admins.
- ``POST /infer/{model}`` runs in a worker thread instead of on the event loop, so the server
  keeps answering while it computes and a full queue can say 503 (``admission.InferenceGate``);
  malformed ``params`` are a 422, not a 500.
- ``PUT /model/{model}`` checks the uploaded weights load into the served network before they
  replace the served file (atomically; the previous file is kept), instead of copying any bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.endpoints import infer as monailabel_infer
from monailabel.endpoints import model as monailabel_model
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import file_checksum

from .audit import AuditLog
from .checkpoint import file_sha256
from .datastore import atomic_copy
from .errors import ImageNotFoundError, InvalidInputError, NotAuthorisedError
from .security import AccessControl, Users, current_user, install


def install_api(app, users: Users | None, audit: AuditLog, max_body_bytes: int) -> None:
    install(app, lambda inner: AccessControl(inner, users, audit, max_body_bytes))
    _replace_route(monailabel_infer.router, "/{model}", "POST", infer)
    _replace_route(monailabel_model.router, "/{model}", "PUT", upload_model)
    app.add_api_route("/audit/", _audit_reader(audit), methods=["GET"], tags=["Audit"],
                      summary="(admin) The audit log: who saved, trained, uploaded or deleted what")  # fmt: skip
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
    try:
        parsed = json.loads(params) if params else {}
    except ValueError as e:
        raise InvalidInputError(f"params is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise InvalidInputError("params must be a JSON object")
    if not (file or image or session_id):
        raise InvalidInputError("send an image id, an image file or a session id")
    if session_id and not image and not file and not app_instance().sessions().get_session(session_id):
        raise ImageNotFoundError(f"session '{session_id}' does not exist (or has expired)")
    return monailabel_infer.run_inference(background_tasks, model, image, session_id, params, file, label, output)


def upload_model(model: str, file: UploadFile = File(...)) -> dict[str, Any]:
    """Replace the served weights, only with weights the served network loads (422 otherwise)."""
    instance = app_instance()
    task = instance._infers.get(model)
    if task is None or not hasattr(task, "check_weights"):
        raise ImageNotFoundError(f"model '{model}' is not served here; available: {sorted(instance._infers)}")
    served = task.get_path(validate=False)
    folder = os.path.dirname(served)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
        try:
            record = task.check_weights(tmp)
        except Exception as e:
            raise InvalidInputError(f"refused: these are not weights this server can serve as '{model}': {e}") from e
        if os.path.exists(served):
            kept = f"{served}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.replaced"
            shutil.copy2(served, kept)
        atomic_copy(tmp, served)
    finally:
        os.unlink(tmp)
    return {"sha256": file_sha256(served), "checksum": file_checksum(served), "model": record}


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

