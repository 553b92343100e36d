"""Model versions: every trained, uploaded or shipped model kept by content, and which one is served.

A version is a checkpoint named by its sha256, kept read-only and never overwritten, with a record:
its parent (the version training started from), where it came from, the labels it was trained on
(id, sha256, annotator), its parameters and structures, and its commissioning reports.

Under the server's data folder (``--conf data_dir``, never the repository), per model ``<name>``::

    models/<name>/versions/<sha256>.pt     the checkpoint
    models/<name>/versions/<sha256>.json   its record
    models/<name>/journal.jsonl            publications, approvals and rollbacks: append-only, fsynced
    models/<name>/served.pt                a copy of the served version: the file the infer task loads
                                           (research mode: ``--conf <name>_model`` instead, when given)

The journal is the one truth of which version is served: its last complete entry that counts in the
mode (research mode: any; clinical mode: approvals and rollbacks only). ``served.pt`` follows it and is
put right at every start (``reconcile``), so a kill -9 between the journal and the copy, a restart or a
replica never changes which version is served. A half-written last line (a crash while appending) is an
entry that never happened: the request that made it was never answered.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

from filelock import FileLock

from .checkpoint import load_checkpoint
from .errors import ConflictError, ImageNotFoundError, InvalidInputError
from .files import atomic_copy, atomic_write_bytes
from .provenance import file_sha256

SOURCES = ("shipped", "given", "trained", "uploaded")
# Journal actions that make a version served; research mode publishes, clinical mode approves.
SERVING_ACTIONS = {"research": ("import", "publish", "approve", "rollback"), "clinical": ("approve", "rollback")}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ModelVersions:
    """One model's versions and journal under ``<data_dir>/models/<name>/``; safe across processes (a
    file lock per model: the server, its training subprocess and replicas share the folder)."""

    def __init__(self, data_dir: str, name: str, clinical: bool = False, served_path: str | None = None):
        """``served_path``: research mode may serve a file of the operator's (``--conf <name>_model``);
        clinical mode always serves ``models/<name>/served.pt``, which only approvals write."""
        self.name = name
        self.data_dir = data_dir
        self.mode = "clinical" if clinical else "research"
        self.root = os.path.join(data_dir, "models", name)
        self.versions_dir = os.path.join(self.root, "versions")
        self.journal_path = os.path.join(self.root, "journal.jsonl")
        self.served_path = (not clinical and served_path) or os.path.join(self.root, "served.pt")
        os.makedirs(self.versions_dir, exist_ok=True)
        self.lock = FileLock(os.path.join(self.root, ".lock"))

    # --- versions ------------------------------------------------------------------------------
    def checkpoint_path(self, sha: str) -> str:
        return os.path.join(self.versions_dir, f"{sha}.pt")

    def resolve(self, version: str) -> str:
        """The full sha256 of a version named by its sha256 or a unique prefix of it (>= 8 characters)."""
        version = (version or "").strip().lower()
        if len(version) < 8 or not all(c in "0123456789abcdef" for c in version):
            raise InvalidInputError(f"version must be a sha256 or a prefix of at least 8 hex digits, not {version!r}")
        found = [f[:-5] for f in os.listdir(self.versions_dir) if f.endswith(".json") and f.startswith(version)]
        if len(found) != 1:
            raise ImageNotFoundError(
                f"model {self.name} has {'no' if not found else 'several'} versions {version}...; see GET /models/{self.name}"
            )
        return found[0]

    def record(self, sha: str) -> dict[str, Any]:
        with open(os.path.join(self.versions_dir, f"{sha}.json")) as f:
            return json.load(f)

    def records(self) -> list[dict[str, Any]]:
        """Every version's record, oldest first."""
        out = []
        for f in os.listdir(self.versions_dir):
            if f.endswith(".json"):
                out.append(self.record(f[:-5]))
        return sorted(out, key=lambda r: (r["created"], r["sha256"]))

    def add(self, path: str, source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keep the checkpoint at ``path`` as a version (a version already kept is returned unchanged)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        ckpt = load_checkpoint(path)  # only checkpoints the server can read become versions
        sha = file_sha256(path)
        with self.lock:
            record_path = os.path.join(self.versions_dir, f"{sha}.json")
            if os.path.exists(record_path):
                return self.record(sha)
            atomic_copy(path, self.checkpoint_path(sha))
            os.chmod(self.checkpoint_path(sha), 0o444)
            meta, params = ckpt.get("meta") or {}, ckpt.get("params") or {}
            record = {
                "model": self.name,
                "sha256": sha,
                "created": now(),
                "source": source,
                "parent": meta.get("started_from"),
                "training": {
                    "labels": meta.get("train_labels_detail") or [{"id": n} for n in meta.get("train_labels", [])],
                    "labels_sha256": meta.get("train_labels_sha256"),
                    "validation_labels": meta.get("val_labels", []),
                    "epoch": meta.get("epoch"),
                    "val_dice": meta.get("val_dice"),
                    "trained": meta.get("time"),
                },
                "params": params,
                "structures": [s.get("name") for s in params.get("structures", [])] if params else [],
                "commissioning": [],
                **(extra or {}),
            }
            atomic_write_bytes(json.dumps(record, indent=1).encode(), record_path)
        return record

    def add_report(self, sha: str, summary: dict[str, Any]) -> None:
        """Append a commissioning report's summary (id, sha256, passed, time) to the version's record."""
        with self.lock:
            record = self.record(sha)
            record["commissioning"].append(summary)
            atomic_write_bytes(json.dumps(record, indent=1).encode(), os.path.join(self.versions_dir, f"{sha}.json"))

    # --- the journal ---------------------------------------------------------------------------
    def journal(self) -> list[dict[str, Any]]:
        """Complete entries, oldest first (a torn last line, from a crash while appending, is skipped)."""
        if not os.path.exists(self.journal_path):
            return []
        entries = []
        with open(self.journal_path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return entries

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"time": now(), "model": self.name, **entry}
        with open(self.journal_path, "a") as f:
            if f.tell() > 0:  # a torn last line must not swallow this entry
                with open(self.journal_path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write("\n")
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def served_version(self) -> str | None:
        """The sha256 the journal says is served in this mode, or None (clinical mode: none approved yet)."""
        counted = SERVING_ACTIONS[self.mode]
        for entry in reversed(self.journal()):
            if entry["action"] in counted:
                return entry["version"]
        return None

    def approved_versions(self) -> list[str]:
        return [e["version"] for e in self.journal() if e["action"] == "approve"]

    def approved_version(self) -> str | None:
        """The version a physicist approved last or rolled back to (in either mode), or None."""
        for entry in reversed(self.journal()):
            if entry["action"] in SERVING_ACTIONS["clinical"]:
                return entry["version"]
        return None

    def reconcile(self) -> str | None:
        """Make ``served.pt`` the journal's served version (or remove it when none is); returns its sha256."""
        with self.lock:
            sha = self.served_version()
            if sha is None:
                if os.path.exists(self.served_path):
                    os.unlink(self.served_path)
            elif not os.path.exists(self.served_path) or file_sha256(self.served_path) != sha:
                atomic_copy(self.checkpoint_path(sha), self.served_path)
            return sha

    def _serve(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Journal first (the commit point), then the served file."""
        with self.lock:
            entry = self._append(entry)
            if not os.path.exists(self.served_path) or file_sha256(self.served_path) != entry["version"]:
                atomic_copy(self.checkpoint_path(entry["version"]), self.served_path)
        return entry

    def start(self, initial: str, source: str) -> str | None:
        """At server start; returns the served version. ``initial``: the weights the server was given
        (``--conf <name>_model``) or ships. Research mode serves its served file and keeps whatever is
        there as a version (an operator may replace it); clinical mode keeps ``initial`` as a candidate
        and serves only what the journal says a physicist approved."""
        if self.mode == "clinical":
            if os.path.exists(initial):
                self.add(initial, source)
            return self.reconcile()
        if not os.path.exists(self.served_path) and os.path.exists(initial):
            os.makedirs(os.path.dirname(os.path.abspath(self.served_path)), exist_ok=True)
            atomic_copy(initial, self.served_path)
        if not os.path.exists(self.served_path):
            return None
        record = self.add(self.served_path, source)
        with self.lock:
            if self.served_version() != record["sha256"]:
                self._append({"action": "import", "version": record["sha256"], "user": None,
                              "comment": f"{source} weights at start"})  # fmt: skip
        return record["sha256"]

    def publish(self, path: str, source: str, user: str | None = None) -> dict[str, Any]:
        """A new version from training or an upload: research mode serves it at once; clinical mode keeps it
        as a candidate for commissioning and approval."""
        record = self.add(path, source)
        if self.mode == "research":
            self._serve({"action": "publish", "version": record["sha256"], "user": user, "comment": source})
        return record

    def approve(self, version: str, user: str | None, comment: str) -> dict[str, Any]:
        """A physicist's approval of a version whose newest commissioning report passed."""
        sha = self.resolve(version)
        if not (comment or "").strip():
            raise InvalidInputError("an approval needs a comment: why this version may be used clinically")
        reports = self.record(sha)["commissioning"]
        if not reports:
            raise ConflictError(f"version {sha[:12]} has no commissioning report: POST /commission/{self.name}?version={sha[:12]}")
        if not reports[-1]["passed"]:
            raise ConflictError(f"version {sha[:12]}'s newest commissioning report {reports[-1]['id']} failed its acceptance criteria")
        if self.served_version() == sha and self.mode == "clinical":
            raise ConflictError(f"version {sha[:12]} is already the approved version")
        return self._serve({"action": "approve", "version": sha, "user": user, "comment": comment.strip(),
                            "report": reports[-1]["id"], "report_sha256": reports[-1]["sha256"]})  # fmt: skip

    def rollback(self, version: str, user: str | None, comment: str) -> dict[str, Any]:
        """Serve again a version approved before."""
        sha = self.resolve(version)
        if not (comment or "").strip():
            raise InvalidInputError("a rollback needs a comment: why the served version is withdrawn")
        approvals = [e for e in self.journal() if e["action"] == "approve" and e["version"] == sha]
        if not approvals:
            raise ConflictError(f"version {sha[:12]} was never approved: only an approved version can be rolled back to")
        if self.served_version() == sha:
            raise ConflictError(f"version {sha[:12]} is the served version already")
        return self._serve({"action": "rollback", "version": sha, "user": user, "comment": comment.strip(),
                            "report": approvals[-1].get("report"), "report_sha256": approvals[-1].get("report_sha256")})  # fmt: skip

    def card(self, version: str | None, shipped: dict[str, str]) -> dict[str, Any]:
        """The model card of a version (default: the served one, else the newest): intended use and limitations,
        training data, commissioning results and approval history. ``shipped``: what the weights shipped with
        the server are (intended use, limitations, data, licence), from the model's config."""
        sha = self.resolve(version) if version else (self.served_version() or (self.records() or [{}])[-1].get("sha256"))
        if not sha:
            raise ImageNotFoundError(f"model {self.name} has no versions yet")
        record = self.record(sha)
        history = [e for e in self.journal() if e["version"] == sha]
        approved = any(e["action"] in SERVING_ACTIONS["clinical"] for e in history)
        labels = record["training"]["labels"]
        annotators = Counter(label.get("annotator") or "unknown" for label in labels)
        if record["source"] == "shipped":
            use, limits, data = shipped["intended_use"], shipped["limitations"], shipped["data"]
        else:
            use = (f"Contouring {', '.join(record['structures'])} on this department's planning CT, as its commissioning "
                   "report and approval state" if approved else "None clinically: not approved by a physicist")
            limits = ("Judged only on this department's commissioning cases (below); trained on the labels listed, "
                      "so it inherits their annotators' conventions")
            data = f"{len(labels)} labels of this server's datastore ({record['source']})"
        params = record.get("params") or {}
        return {
            "model": self.name, "version": sha, "created": record["created"], "source": record["source"],
            "parent": record["parent"], "status": "served" if sha == self.served_version() else
            "approved before" if approved else "candidate",
            "intended_use": use, "limitations": limits, "data": data,
            "structures": record["structures"],
            "network": {k: params.get(k) for k in ("architecture", "filters", "target_spacing", "patch_size", "loss")},
            "training": {"labels": len(labels), "annotators": dict(annotators),
                         "validation_labels": len(record["training"]["validation_labels"]),
                         "labels_sha256": record["training"]["labels_sha256"], "epoch": record["training"]["epoch"],
                         "val_dice": record["training"]["val_dice"]},
            "commissioning": record["commissioning"],
            "approval_history": history,
        }  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What the API and page list: the mode, the served version, every version with its status."""
        served, approved = self.served_version(), set(self.approved_versions())
        versions = []
        for record in self.records():
            sha = record["sha256"]
            status = "served" if sha == served else "approved before" if sha in approved else "candidate"
            versions.append({**record, "status": status})
        return {"model": self.name, "mode": self.mode, "served": served, "versions": versions, "journal": self.journal()}
