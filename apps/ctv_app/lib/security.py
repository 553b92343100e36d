"""Built-in access control, upload limit and audit trail: MONAI Label's own auth needs Keycloak.

Users hold one role each; a role includes the ones before it:

- ``annotator``: read images, run inference, save labels, use the contouring page and OHIF;
- ``reviewer``: also delete labels and rescore the worklist;
- ``physicist``: also mark commissioning cases, commission models, approve a model version for clinical
  use and roll back to an earlier approved one;
- ``admin``: also train, upload or delete models and images, read server logs and the audit log; but
  not approve or roll back models: whoever runs the IT does not sign a model off for clinical use
  (``SIGNED_OFF``: the roles held by that role only).

Users come from a JSON file named by ``CTV_AUTH_FILE``::

    {"users": [{"name": "dr_a", "role": "annotator", "token_sha256": "<sha256 of the token>"}]}

(``python -m ctv_app.lib.security add-user NAME ROLE FILE`` makes a token and adds its hash), or
from ``CTV_AUTH_TOKENS="name:role:token;name:role:token"``. With neither, access control is off:
the local demo. Clients send ``Authorization: Bearer <token>``, or Basic ``name:token``, which is
what browsers (OHIF, the /ctv/ page) and MONAI Label's ``/auth/token`` login use.

Every route needs a role (unknown routes need ``admin``) except ``GET /auth/`` and
``POST /auth/token``, which a client needs before it has a token.

Pages of other sites may not call the server (a page the user visits could otherwise drive it with
the browser's credentials): a request whose ``Origin`` is neither the server's own nor one named in
``CTV_CORS_ORIGINS`` (comma-separated, e.g. ``https://viewer.example.org``) is a 403, preflights
included; only the named origins get CORS headers. The audit log records the address the request
came from; ``X-Forwarded-For`` replaces it only when it comes from a proxy named in
``CTV_TRUSTED_PROXIES`` (IPs or networks, comma-separated; none by default).
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import gc
import hashlib
import ipaddress
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import anyio

from .audit import AuditLog, clip

ROLES = ("annotator", "reviewer", "physicist", "admin")
SIGNED_OFF = frozenset({"physicist"})  # held by that role alone, not by the roles after it
# A request body that stops arriving for this long is answered 408 and its connection closed: a
# stalled upload would otherwise hold its connection and worker forever (CTV_BODY_TIMEOUT_S to change).
BODY_TIMEOUT_S = float(os.environ.get("CTV_BODY_TIMEOUT_S", 60))


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"user '{self.name}': role must be one of {ROLES}, not {self.role!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", self.name):
            raise ValueError(f"user name {self.name!r}: letters, digits and _ . @ - only")

    def has(self, role: str) -> bool:
        if role in SIGNED_OFF:
            return self.role == role
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS = User("anonymous", "admin")  # who everyone is when access control is off
_current_user: contextvars.ContextVar[User | None] = contextvars.ContextVar("ctv_user", default=None)


def current_user() -> User | None:
    """The authenticated user of the request being served; None when access control is off."""
    return _current_user.get()


def annotator_of(label_info: dict[str, Any]) -> str:
    """Who saved a label: the authenticated user when access control is on (a claimed name is not
    trusted), else the ``annotator`` or ``user`` the client sent."""
    user = current_user()
    if user is not None:
        return user.name
    return str(label_info.get("annotator") or label_info.get("user") or "unknown")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """Users by the sha256 of their token: tokens themselves are never stored."""

    def __init__(self, by_token_sha256: dict[str, User]):
        if not by_token_sha256:
            raise ValueError("access control is configured but names no users")
        self._by_sha = dict(by_token_sha256)

    @classmethod
    def from_file(cls, path: str) -> "Users":
        with open(path) as f:
            entries = json.load(f).get("users", [])
        users = {}
        for entry in entries:
            sha = str(entry.get("token_sha256", "")).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError(f"{path}: user '{entry.get('name')}' needs token_sha256 (64 hex digits)")
            users[sha] = User(str(entry.get("name")), str(entry.get("role")))
        return cls(users)

    @classmethod
    def from_env_value(cls, value: str) -> "Users":
        users = {}
        for item in filter(None, (part.strip() for part in value.split(";"))):
            name, role, token = (item.split(":", 2) + ["", ""])[:3]
            if len(token) < 16:
                raise ValueError(f"CTV_AUTH_TOKENS: user '{name}' needs a token of at least 16 characters")
            users[token_sha256(token)] = User(name, role)
        return cls(users)

    @classmethod
    def configured(cls, env: dict[str, str] | None = None) -> "Users | None":
        """From CTV_AUTH_FILE, else CTV_AUTH_TOKENS; None (access control off) when neither is set."""
        env = os.environ if env is None else env
        if env.get("CTV_AUTH_FILE"):
            return cls.from_file(env["CTV_AUTH_FILE"])
        if env.get("CTV_AUTH_TOKENS"):
            return cls.from_env_value(env["CTV_AUTH_TOKENS"])
        return None

    @property
    def count(self) -> int:
        return len(self._by_sha)

    def by_token(self, token: str) -> User | None:
        return self._by_sha.get(token_sha256(token)) if token else None

    def by_name_and_token(self, name: str, token: str) -> User | None:
        user = self.by_token(token)
        return user if user is not None and secrets.compare_digest(user.name, name) else None

    def from_authorization(self, header: str) -> User | None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return self.by_token(value.strip())
        if scheme.lower() == "basic":
            try:
                name, _, token = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return self.by_name_and_token(name, token)
        return None


def configured_origins(env: dict[str, str] | None = None) -> frozenset[str]:
    """The other sites whose pages may call this server (``CTV_CORS_ORIGINS``); none by default."""
    env = os.environ if env is None else env
    origins = set()
    for item in filter(None, (part.strip() for part in env.get("CTV_CORS_ORIGINS", "").split(","))):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or "*" in item:
            raise ValueError(f"CTV_CORS_ORIGINS: {item!r} is not an origin such as https://viewer.example.org")
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(origins)


def trusted_proxies(env: dict[str, str] | None = None) -> list[str]:
    """The reverse proxies whose X-Forwarded-For is believed (``CTV_TRUSTED_PROXIES``); none by default."""
    env = os.environ if env is None else env
    proxies = [part.strip() for part in env.get("CTV_TRUSTED_PROXIES", "").split(",") if part.strip()]
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError as e:
            raise ValueError(f"CTV_TRUSTED_PROXIES: {proxy!r} is not an IP address or network") from e
    return proxies


def trust_forwarded_headers_from(proxies: list[str]) -> int:
    """Let uvicorn take X-Forwarded-For and X-Forwarded-Proto from ``proxies`` only; returns how many
    of its proxy-header layers were changed.

    uvicorn believes them from 127.0.0.1 unless FORWARDED_ALLOW_IPS says otherwise, and MONAI Label
    starts it before this app is loaded: any local client could name the address the audit log
    records. Its layer is found among the live objects and given the configured list."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware, _TrustedHosts

    layers = [o for o in gc.get_objects() if isinstance(o, ProxyHeadersMiddleware)]
    for layer in layers:
        if not isinstance(getattr(layer, "trusted_hosts", None), _TrustedHosts):
            raise RuntimeError("this uvicorn's proxy-header layer is not the one CTV_TRUSTED_PROXIES knows")
        layer.trusted_hosts = _TrustedHosts(proxies)
    return len(layers)


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]
    pattern: re.Pattern
    role: str | None  # None: open to anyone
    action: str | None = None  # recorded in the audit log when set


def _rule(methods: str, pattern: str, role: str | None, action: str | None = None) -> Rule:
    return Rule(frozenset(methods.split()), re.compile(f"(?:{pattern})\\Z"), role, action)


# First match wins; a route no rule names needs admin.
RULES: tuple[Rule, ...] = (
    _rule("GET", r"/auth/", None),
    _rule("POST", r"/auth/token", None),
    _rule("GET", r"/(info/?)?|/auth/token/valid|/openapi\.json|/docs|/favicon\.ico|/static/.*", "annotator"),
    _rule("POST", r"/infer/.*", "annotator", "infer"),
    _rule("POST", r"/batch/infer/.*", "admin", "infer.batch"),
    _rule("GET", r"/train/?", "annotator"),
    _rule("POST", r"/train/.*", "admin", "train.start"),
    _rule("DELETE", r"/train/?", "admin", "train.stop"),
    _rule("PUT", r"/model/.*", "admin", "model.upload"),
    _rule("DELETE", r"/model/.*", "admin", "model.delete"),
    _rule("GET", r"/model/.*", "admin"),
    _rule("POST", r"/activelearning/.*", "annotator"),
    _rule("GET", r"/scoring/?", "annotator"),
    _rule("POST", r"/scoring/.*", "reviewer", "scoring.run"),
    _rule("DELETE", r"/scoring/?", "reviewer", "scoring.stop"),
    _rule("GET", r"/datastore/dataset", "admin", "datastore.export"),
    _rule("GET", r"/datastore/.*", "annotator"),
    _rule("PUT", r"/datastore/label", "annotator", "label.save"),
    _rule("PUT", r"/datastore/(label/info|updatelabelinfo)", "annotator", "label.info"),
    _rule("DELETE", r"/datastore/label", "reviewer", "label.delete"),
    _rule("PUT", r"/datastore/(image)?", "admin", "image.upload"),
    _rule("PUT", r"/datastore/image/info", "admin", "image.info"),
    _rule("DELETE", r"/datastore/(image)?", "admin", "image.delete"),
    _rule("GET PUT DELETE", r"/session/.*", "annotator", None),
    _rule("GET", r"/(ohif|proxy)/.*", "annotator"),
    _rule("POST", r"/proxy/dicom/.*", "annotator", "dicom.store"),
    _rule("GET", r"/audit/?", "admin"),
    _rule("GET", r"/models/[^/]+(/card)?|/commission/cases|/commission/reports/[^/]+|/monitoring/[^/]+", "annotator"),
    _rule("POST", r"/models/[^/]+/approve", "physicist", "model.approve"),
    _rule("POST", r"/models/[^/]+/rollback", "physicist", "model.rollback"),
    _rule("PUT DELETE", r"/commission/cases/[^/]+", "reviewer", "commission.case"),
    _rule("POST", r"/commission/[^/]+", "physicist", "commission.report"),
    _rule("GET", r"/ctv(/.*)?", "annotator"),
    _rule("POST", r"/ctv/api/cases", "annotator", "case.upload"),
    _rule("POST", r"/ctv/api/cases/[^/]+/contour", "annotator", "case.contour"),
    _rule("PUT", r"/ctv/api/cases/[^/]+/annotation", "annotator", "case.annotate"),
)
ADMIN_ONLY = Rule(frozenset(), re.compile(""), "admin", "other")


def rule_for(method: str, path: str) -> Rule:
    method = "GET" if method == "HEAD" else method  # HEAD asks what GET would answer
    for rule in RULES:
        if method in rule.methods and rule.pattern.match(path):
            return rule
    return ADMIN_ONLY


Send = Callable[[dict], Awaitable[None]]
_AUDITED_QUERY = ("image", "id", "tag", "label", "model", "version", "comment")
_REFUSED = (401, 403, 408, 413)  # this middleware's refusals: anyone can cause them, so bounded in the log


class AccessControl:
    """ASGI middleware: origins, authenticate, check the route's role, bound the body's size and its stalls, audit.

    With ``users`` None (access control off) every request is served as ``anonymous``; the
    upload limits and the audit log apply either way. ``origins``: other sites whose pages may call
    the server (``configured_origins``); their requests get CORS headers, other sites' a 403."""

    def __init__(self, app, users: Users | None, audit: AuditLog, max_body_bytes: int,
                 body_timeout_s: float = BODY_TIMEOUT_S, origins: frozenset[str] = frozenset()):  # fmt: skip
        self.app, self.users, self.audit, self.max_body_bytes = app, users, audit, max_body_bytes
        self.body_timeout_s, self.origins = body_timeout_s, origins

    async def __call__(self, scope: dict, receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        rule = rule_for(method, path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        user = ANONYMOUS if self.users is None else self.users.from_authorization(headers.get("authorization", ""))
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            if origin.lower() not in self.origins:
                await self._record(scope, rule, user, 403, origin=clip(origin))
                await _send_error(send, 403, f"cross-origin request from {clip(origin, 100)} refused: only this "
                                  "server's own pages and the sites in CTV_CORS_ORIGINS may call it")
                return
            send = _granting(send, origin)
            if method == "OPTIONS" and "access-control-request-method" in headers:
                await _answer_preflight(send, headers.get("access-control-request-headers", ""))
                return
        refusal = None
        if self.users is not None and rule.role is not None:
            if user is None:
                refusal = (401, "a valid token is required (Authorization: Bearer <token>, or Basic name:token)")
            elif not user.has(rule.role):
                refusal = (403, f"{method} {path} needs the {rule.role} role; '{user.name}' is {user.role}")
        if refusal is None and _declared_length(headers) > self.max_body_bytes:
            refusal = (413, self._too_large())
        if refusal is not None:
            await self._record(scope, rule, user, refusal[0])
            await _send_error(send, *refusal)
            return

        started = answered = False  # answered: this middleware sent a 413 or 408 while the body streamed in
        body_done = False
        received = 0

        async def send_recorded(message: dict) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
                await self._record(scope, rule, user, message["status"])  # recorded before it is answered
            await send(message)

        async def receive_bounded() -> dict:
            nonlocal received, answered, body_done
            if answered:
                return {"type": "http.disconnect"}
            if body_done or started:  # later calls only wait for a disconnect: no time limit
                return await receive()
            try:
                with anyio.fail_after(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                await self._record(scope, rule, user, 408)
                await _send_error(send, 408, f"the request body stalled: nothing arrived for {self.body_timeout_s:g} s")
                answered = True
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_body_bytes and not started:
                await self._record(scope, rule, user, 413)
                await _send_error(send, 413, self._too_large())
                answered = True
                return {"type": "http.disconnect"}
            return message

        token = _current_user.set(None if self.users is None else user)
        try:
            await self.app(scope, receive_bounded, send_recorded)
        except Exception:
            if answered:  # after a 413 the app only complains that the client went away
                return
            if not started:
                await self._record(scope, rule, user, 500)
            raise
        finally:
            _current_user.reset(token)

    def _too_large(self) -> str:
        return f"the upload is larger than this server's limit of {self.max_body_bytes:,} bytes"

    async def _record(self, scope: dict, rule: Rule, user: User | None, status: int, **extra: str) -> None:
        if rule.action is None and status not in (401, 403):
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        entry: dict[str, Any] = {
            "user": user.name if user else None,
            "role": user.role if user else None,
            "action": rule.action or "refused",
            "method": scope["method"],
            "path": clip(scope["path"]),
            "status": status,
            "client": (scope.get("client") or ("", 0))[0],  # a trusted proxy's X-Forwarded-For (uvicorn)
        }
        entry.update({k: clip(query[k][0]) for k in _AUDITED_QUERY if k in query})
        entry.update(extra)
        record = self.audit.record_refusal if status in _REFUSED else self.audit.record
        await anyio.to_thread.run_sync(record, entry)


def _declared_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


def _granting(send: Send, origin: str) -> Send:
    """``send``, with the CORS headers that let a page of ``origin`` (a configured one) read the answer."""

    async def send_granting(message: dict) -> None:
        if message["type"] == "http.response.start":
            granted = [(b"access-control-allow-origin", origin.encode("latin-1")),
                       (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]  # fmt: skip
            message = {**message, "headers": [*message.get("headers", []), *granted]}
        await send(message)

    return send_granting


async def _answer_preflight(send: Send, requested_headers: str) -> None:
    headers = [(b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE"),
               (b"access-control-allow-headers", requested_headers.encode("latin-1")),
               (b"access-control-max-age", b"600"), (b"content-length", b"0")]  # fmt: skip
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="CTV", charset="UTF-8"'))
    if status == 408:  # the rest of the body may never come: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _layers(app):
    """(outer, inner) pairs of the middleware stack of an app that is already built (MONAI Label
    creates the app before ours is loaded), outermost first."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    outer = app.middleware_stack
    for _ in range(16):
        inner = getattr(outer, "app", None)
        if inner is None:
            return
        yield outer, inner
        outer = inner


def install(app, middleware: Callable[[Any], Any]) -> None:
    """Put ``middleware`` around the routes of an app whose middleware stack is already built."""
    for outer, inner in _layers(app):
        if inner is app.router:
            outer.app = middleware(inner)
            return
    raise RuntimeError("could not find the router in the server's middleware stack")


def remove_cors_layer(app) -> None:
    """MONAI Label's CORS layer grants every origin, with credentials: removed (``AccessControl``
    applies this server's origin policy instead)."""
    from starlette.middleware.cors import CORSMiddleware

    for outer, inner in _layers(app):
        if isinstance(inner, CORSMiddleware):
            outer.app = inner.app
            return


def add_user(path: str, name: str, role: str) -> str:
    """Add a user with a new random token to the users file (created if missing); returns the token."""
    token = secrets.token_urlsafe(32)
    user = User(name, role)
    data = {"users": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if any(u.get("name") == name for u in data["users"]):
        raise ValueError(f"user '{name}' is already in {path}")
    data["users"].append({"name": user.name, "role": user.role, "token_sha256": token_sha256(token),
                          "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
    tmp = f"{path}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctv_app.lib.security", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-user", help="add a user with a new token; prints the token once")
    add.add_argument("name")
    add.add_argument("role", choices=ROLES)
    add.add_argument("file", help="users file (CTV_AUTH_FILE)")
    args = parser.parse_args(argv)
    try:
        print(add_user(args.file, args.name, args.role))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
