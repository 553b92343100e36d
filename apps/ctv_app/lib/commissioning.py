"""Commissioning: the locked local test set a physicist measures a model version on before approving it.

- **Commissioning cases** (``CommissioningSet``): studies with a final (reference) label, marked by a
  reviewer or above. They are never trained or validated on (``exclude``, called by the trainer before
  its split). Once a report has used a case, its reference label is locked: saving or deleting it is a 409,
  since the report's numbers would no longer be those of the set.
- **Acceptance criteria** (``AcceptanceCriteria``): the department's, per structure, on the median over
  the commissioning cases, e.g. ``{"default": {"surface_dice_3mm": ">= 0.8", "hd95_mm": "<= 10"},
  "structures": {"Bag_Bowel": {"surface_dice_3mm": ">= 0.6"}}}`` (``--conf acceptance_criteria FILE``).
  Monitoring uses the same criteria for its alarms.
- **The report** (``commission``): the version contours every commissioning case through the served
  pipeline (``evaluation.contour_and_compare``: the metrics module's Dice, HD95, MSD, surface Dice at 2 and
  3 mm and volume difference, and the added path length), is judged against the criteria, and is compared
  case by case with the approved version on the same cases. It is written as JSON (for machines, and whose
  sha256 the approval records) and as one self-contained HTML page for people (``report_html``).

Under ``<data_dir>/commissioning/``: ``cases.json`` and ``reports/<id>.json|.html``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import operator
import os
import re
import tempfile
import time
from dataclasses import dataclass
from html import escape
from typing import Any, Callable, Mapping

import numpy as np
from filelock import FileLock

from .errors import ConflictError, ImageNotFoundError, InvalidInputError
from .evaluation import CaseComparison, contour_and_compare
from .files import atomic_write_text
from .metrics import summarise
from .provenance import file_sha256
from .transforms.labels import ENCODING_KEY, STRUCTURES_KEY

logger = logging.getLogger(__name__)

# Figures a report gives per structure, in its tables' order (those of ``metrics.compare`` and the APL).
REPORTED = ("dice", "hd95_mm", "msd_mm", "surface_dice_2mm", "surface_dice_3mm", "apl_mm", "volume_diff_ml")
HIGHER_IS_BETTER = {"dice", "surface_dice_2mm", "surface_dice_3mm", "surface_dice_voxel"}
DEFAULT_CRITERIA = {"default": {"surface_dice_3mm": ">= 0.8", "hd95_mm": "<= 10"}, "structures": {}}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*(-?[0-9.]+)\s*$")


def _atomic_json(value: Any, path: str) -> None:
    atomic_write_text(json.dumps(value, indent=1), path)


class CommissioningSet:
    """The commissioning cases of one server (every model's), kept in ``<data_dir>/commissioning/cases.json``."""

    def __init__(self, data_dir: str):
        self.root = os.path.join(data_dir, "commissioning")
        self.reports_dir = os.path.join(self.root, "reports")
        os.makedirs(self.reports_dir, exist_ok=True)
        self.path = os.path.join(self.root, "cases.json")
        self.lock = FileLock(os.path.join(self.root, ".lock"))

    @classmethod
    def of(cls, versions: Any) -> "CommissioningSet":
        return cls(versions.data_dir)

    def cases(self) -> dict[str, dict[str, Any]]:
        """image id -> {"by", "time", "locked_by": the first report that used it, or None}."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def mark(self, image_id: str, user: str | None, datastore: Any) -> dict[str, Any]:
        """Mark a study that has a final label (its reference) as a commissioning case."""
        if not datastore.get_image_uri(image_id):
            raise ImageNotFoundError(f"image '{image_id}' is not in the datastore")
        if not datastore.get_label_by_image_id(image_id, "final"):
            raise InvalidInputError(f"image '{image_id}' has no final label: a commissioning case needs its reference contours")
        with self.lock:
            cases = self.cases()
            entry = cases.setdefault(image_id, {"by": user, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                "locked_by": None})  # fmt: skip
            _atomic_json(cases, self.path)
        return entry

    def unmark(self, image_id: str) -> None:
        with self.lock:
            cases = self.cases()
            if image_id not in cases:
                raise ImageNotFoundError(f"image '{image_id}' is not a commissioning case")
            if cases[image_id]["locked_by"]:
                raise ConflictError(f"image '{image_id}' was used by commissioning report {cases[image_id]['locked_by']}: "
                                    "it stays in the set so that report can be reproduced")  # fmt: skip
            del cases[image_id]
            _atomic_json(cases, self.path)

    def check_unlocked(self, image_id: str) -> None:
        """409 when ``image_id``'s reference label is locked by a report."""
        report = self.cases().get(image_id, {}).get("locked_by")
        if report:
            raise ConflictError(f"image '{image_id}' is a commissioning case used by report {report}: its reference "
                                "label is locked (a changed reference would change that report's numbers)")  # fmt: skip

    def lock_cases(self, image_ids: list[str], report_id: str) -> None:
        with self.lock:
            cases = self.cases()
            for image_id in image_ids:
                if image_id in cases and not cases[image_id]["locked_by"]:
                    cases[image_id]["locked_by"] = report_id
            _atomic_json(cases, self.path)

    def exclude(self, datalist: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The training pairs that are not commissioning cases."""
        held = set(self.cases())
        kept = [d for d in datalist if case_id(d) not in held]
        if len(kept) < len(datalist):
            logger.info(f"{len(datalist) - len(kept)} commissioning cases left out of training and validation")
        return kept

    def select(self, datalist: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The commissioning cases among a datalist's pairs, as ``commission`` takes them."""
        held = set(self.cases())
        return [{"id": case_id(d), "image": d["image"], "label": d["label"], "encoding": d.get(ENCODING_KEY) or "labelmap",
                 "structures": d.get(STRUCTURES_KEY)} for d in datalist if case_id(d) in held]  # fmt: skip


def case_id(entry: Mapping[str, Any]) -> str:
    """A datalist pair's image id: its file name up to the first dot, or its series folder's name."""
    return os.path.basename(str(entry["image"]).rstrip("/")).split(".")[0]


@dataclass
class AcceptanceCriteria:
    """Per structure: metric -> rule on the median over the cases (``">= 0.8"``)."""

    default: dict[str, str]
    structures: dict[str, dict[str, str]]

    @classmethod
    def load(cls, path: str | None) -> "AcceptanceCriteria":
        value = DEFAULT_CRITERIA
        if path:
            with open(path) as f:
                value = json.load(f)
        criteria = cls(dict(value.get("default", {})), {k: dict(v) for k, v in value.get("structures", {}).items()})
        for rules in [criteria.default, *criteria.structures.values()]:
            for metric, rule in rules.items():
                if metric not in REPORTED or not _RULE.match(str(rule)):
                    raise ValueError(f"acceptance criterion {metric}: {rule!r}: metrics {REPORTED}, rules like '>= 0.8'")
        return criteria

    def for_structure(self, name: str) -> dict[str, str]:
        return {**self.default, **self.structures.get(name, {})}

    def as_dict(self) -> dict[str, Any]:
        return {"default": self.default, "structures": self.structures}

    @staticmethod
    def holds(rule: str, value: float | None) -> bool:
        op, limit = _RULE.match(rule).groups()
        return value is not None and _OPS[op](value, float(limit))


def _structure_summary(figures: Mapping[str, dict[str, Any]]) -> dict[str, dict]:
    """{case: figures} -> {metric: metrics.summarise over cases}."""
    return {m: summarise({case: f[m] for case, f in figures.items()}) for m in REPORTED}


def commission(
    model: str,
    version: str,
    task: Any,
    cases: list[dict[str, Any]],
    criteria: AcceptanceCriteria,
    approved: tuple[str, Any] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, Any], dict[str, CaseComparison]]:
    """The report of ``task`` (the version's infer task) on ``cases`` (``{"id", "image", "label", "encoding",
    "structures"}``) and, paired, of ``approved`` (its sha256 and infer task) on the same cases."""
    if not cases:
        raise ConflictError(f"there are no commissioning cases with {model} structures: mark some first (PUT /commission/cases/<image>)")
    per_structure: dict[str, dict[str, dict]] = {}
    approved_figures: dict[str, dict[str, dict]] = {}
    comparisons = {}
    for case in cases:
        progress(case["id"])
        comparison = contour_and_compare(task, case["image"], case["label"], case["encoding"], case["structures"])
        comparisons[case["id"]] = comparison
        for name, figures in comparison.figures.items():
            per_structure.setdefault(name, {})[case["id"]] = figures
        if approved is not None:
            before = contour_and_compare(approved[1], case["image"], case["label"], case["encoding"], case["structures"])
            for name, figures in before.figures.items():
                approved_figures.setdefault(name, {})[case["id"]] = figures
    structures = {}
    for name, figures in per_structure.items():
        summary = _structure_summary(figures)
        checks = [{"metric": m, "rule": rule, "median": summary[m]["median"],
                   "passed": AcceptanceCriteria.holds(rule, summary[m]["median"])}
                  for m, rule in criteria.for_structure(name).items()]  # fmt: skip
        entry: dict[str, Any] = {"cases": figures, "summary": summary, "criteria": checks,
                                 "passed": all(c["passed"] for c in checks)}  # fmt: skip
        if name in approved_figures:
            entry["versus_approved"] = _paired(figures, approved_figures[name])
        structures[name] = entry
    report = {
        "model": model,
        "version": version,
        "approved_version": approved[0] if approved else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": [c["id"] for c in cases],
        "criteria": criteria.as_dict(),
        "structures": structures,
        "passed": all(s["passed"] for s in structures.values()),
    }
    return report, comparisons


def _paired(candidate: dict[str, dict], approved: dict[str, dict]) -> dict[str, Any]:
    """Per metric, over the cases both scored: the median of candidate minus approved, and on how many
    cases the candidate is better (higher Dice, lower distance)."""
    out = {}
    for m in ("dice", "surface_dice_3mm", "hd95_mm", "apl_mm"):
        pairs = [(candidate[c][m], approved[c][m]) for c in candidate
                 if c in approved and candidate[c][m] is not None and approved[c][m] is not None]  # fmt: skip
        if not pairs:
            continue
        diff = np.array([a - b for a, b in pairs])
        better = int(np.sum(diff > 0) if m in HIGHER_IS_BETTER else np.sum(diff < 0))
        out[m] = {"n": len(pairs), "median_difference": float(np.median(diff)), "candidate_better": better}
    return out


def save_report(cases: CommissioningSet, report: dict[str, Any], html: str) -> dict[str, Any]:
    """Write the report's JSON and HTML and lock its cases; returns its summary for the version's record."""
    report_id = f"{report['model']}-{report['version'][:12]}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    base = os.path.join(cases.reports_dir, report_id)
    report = {**report, "id": report_id}
    _atomic_json(report, base + ".json")
    atomic_write_text(html.replace("{{REPORT_ID}}", report_id), base + ".html")
    cases.lock_cases(report["cases"], report_id)
    return {"id": report_id, "sha256": file_sha256(base + ".json"), "passed": report["passed"], "time": report["time"],
            "cases": len(report["cases"])}  # fmt: skip


# --- the HTML page ------------------------------------------------------------------------------
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _box_plots(report: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    names = list(report["structures"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=90)
    for ax, metric, title in zip(axes, ("dice", "surface_dice_3mm", "hd95_mm"), ("Dice", "surface Dice @3 mm", "HD95 (mm)")):
        data = [[v for v in report["structures"][n]["summary"][metric]["per_case"].values() if v is not None] for n in names]
        ax.boxplot(data, tick_labels=names, showfliers=True)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def _worst_cases(report: dict[str, Any], comparisons: dict[str, CaseComparison], structures: Any, n: int = 3) -> list[tuple[str, float, str]]:
    from .figures import contour_slice

    def mean_sdsc(case: str) -> float:
        values = [s["cases"][case]["surface_dice_3mm"] for s in report["structures"].values() if case in s["cases"]]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else 0.0

    worst = sorted(report["cases"], key=mean_sdsc)[:n]
    out = []
    for case in worst:
        ct, reference, predicted = comparisons[case].ras_arrays()
        fd, path = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            contour_slice(path, ct, reference, predicted, structures, f"{case}: clinical (solid) vs model (dashed)")
            with open(path, "rb") as f:
                out.append((case, mean_sdsc(case), "data:image/png;base64," + base64.b64encode(f.read()).decode()))
        finally:
            os.unlink(path)
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def report_html(report: dict[str, Any], comparisons: dict[str, CaseComparison], structures: Any) -> str:
    """One self-contained page (plots inlined as PNG): verdict, criteria, per-structure figures, the paired
    comparison with the approved version, box plots, and the three worst cases with a slice each."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    rows = []
    for name, s in report["structures"].items():
        cells = "".join(f"<td>{_fmt(s['summary'][m]['median'], 1 if m.endswith(('_mm', '_ml')) else 3)}</td>" for m in REPORTED)
        checks = "; ".join(f"{c['metric']} {escape(c['rule'])}: {'pass' if c['passed'] else 'FAIL'}" for c in s["criteria"])
        rows.append(f"<tr class={'pass' if s['passed'] else 'fail'}><th>{escape(name)}</th>{cells}<td>{checks}</td></tr>")
    paired = []
    for name, s in report["structures"].items():
        for m, p in s.get("versus_approved", {}).items():
            paired.append(f"<tr><th>{escape(name)}</th><td>{m}</td><td>{p['n']}</td><td>{p['median_difference']:+.3f}</td>"
                          f"<td>{p['candidate_better']}</td></tr>")  # fmt: skip
    worst = "".join(f"<figure><img alt='{escape(c)}' src='{uri}'><figcaption>{escape(c)}: mean surface Dice @3 mm "
                    f"{v:.3f}</figcaption></figure>" for c, v, uri in _worst_cases(report, comparisons, structures))  # fmt: skip
    header = "".join(f"<th>{m}</th>" for m in REPORTED)
    approved = report["approved_version"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Commissioning {escape(report['model'])} {report['version'][:12]}</title>
<style>body{{font:14px sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:3px 7px;text-align:right}}tr.fail{{background:#fdd}}tr.pass{{background:#efe}}
.verdict{{font-size:20px;font-weight:bold}}figure{{display:inline-block;margin:0 1em 1em 0}}img{{max-width:100%}}</style></head><body>
<h1>Commissioning report: model {escape(report['model'])}, version {report['version'][:12]}</h1>
<p>Report {{{{REPORT_ID}}}} made {report['time']} on {len(report['cases'])} commissioning cases:
{escape(', '.join(report['cases']))}. Version sha256 {report['version']}.</p>
<p class="verdict" id="verdict">{verdict}: {'every structure meets' if report['passed'] else 'not every structure meets'}
the department's acceptance criteria (on the median over the cases).</p>
<h2>Per structure (medians)</h2><table id="structures"><tr><th>structure</th>{header}<th>criteria</th></tr>{''.join(rows)}</table>
<h2>Against the approved version</h2>
<p>{'Approved version ' + approved[:12] + ', on the same cases: candidate minus approved, and cases where the candidate is better.' if approved else 'No version is approved yet: nothing to compare with.'}</p>
{'<table id="paired"><tr><th>structure</th><th>metric</th><th>cases</th><th>median difference</th><th>candidate better</th></tr>' + ''.join(paired) + '</table>' if paired else ''}
<h2>Distribution over the cases</h2><img id="boxplots" alt="box plots per structure" src="{_box_plots(report)}">
<h2>The three worst cases</h2>{worst}
<p>Metric conventions: docs/metrics.md. APL: added path length (Vaassen et al. 2020), per axial slice.</p>
</body></html>"""
