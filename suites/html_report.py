"""The HTML report: one self-contained page from the typed report and its gallery.

The page has no external resources (inline CSS, inline SVG charts from `charts`, images
as data URIs) and a Content-Security-Policy that forbids loading any, so it can be mailed,
attached to a CI run or opened offline. Every string from the report is escaped by
jinja2's autoescape; the SVG is built from escaped parts. The view reads the model's
fields; a check kind adds its own parts (`CheckKind.html`). Figures may be null.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np

from bastion.fileio import write_atomic
from bastion.suites.charts import PALETTE, charts
from bastion.suites.formatting import (
    NORM_LABELS,
    bar_width,
    fmt_count,
    fmt_eps,
    fmt_num,
    fmt_pct,
    fmt_seconds,
    number,
)
from bastion.suites.json_codec import JsonObject, encode
from bastion.suites.kinds import kind_of
from bastion.suites.report_model import CheckEntry, Normalization, ReportData

from .gallery import GalleryItem, amplified_difference, display_scale, png_data_uri

TEMPLATES = Path(__file__).resolve().parent / "templates"
View = dict[str, object]
"""What the template reads for one part of the page (built from the typed report)."""


# ---------------------------------------------------------------- view model


def _pairs(*items: tuple[str, object]) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in items if v is not None and v != ""]


def _param(key: str, value: object) -> str:
    """A suite parameter for display: numbers shortened, eps as k/255 where it is one."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_param(key, v) for v in value)
    v = number(value)
    if v is None:
        return str(value)
    if key.startswith("eps"):
        text = fmt_eps(v)
        return text[text.index("(") + 1 : -1] if "(" in text else text
    return fmt_num(v)


def _json(value: object) -> JsonObject:
    out = encode(value)
    assert isinstance(out, dict)
    return out


def _checks(report: ReportData, figures: Mapping[str, object] | None = None) -> list[View]:
    checks = []
    figures = figures or {}
    names = [str(c) for c in report.data.classes]
    for i, check in enumerate(report.checks):
        results = [_json(r) for r in check.results]
        view: View = {
            "id": check.id,
            "anchor": f"check-{i + 1}",
            "attack": check.attack,
            "norm": check.norm or None,
            "params": [(str(k), _param(str(k), v)) for k, v in check.params.items()],
            "cascade": check.cascade,
            "n": check.n,
            "criterion": check.criterion,
            "passed": check.passed,
            "seconds": check.seconds,
            "forward": check.forward,
            "backward": check.backward,
            # a minimum-norm attack (CW) runs once for every eps: its per-eps rows have no
            # time or passes of their own, so the page shows the run's totals across them
            "one_run": bool(results) and all(r.get("seconds") is None for r in results),
            "kind": check.kind,
            "intervals": [_json(r) for r in check.intervals or []],
            "results": results,
            "points": sorted((r.eps, r.robust_accuracy) for r in check.results),
            "color": PALETTE[i % len(PALETTE)],
            "template": "kind_attack.html",  # a per-eps table unless the kind has its own
        }
        view.update(kind_of(check).html(check, figures.get(check.id), names))
        checks.append(view)
    return checks


def fooling_view(check: CheckEntry, images: object, names: list[str]) -> View | None:
    """A fooling check's figures and its per-class tiles (with images when the run kept them)."""
    if check.fooling is None:
        return None
    tiles = []
    for k, row in enumerate(check.fooling.classes):
        image = images[k] if isinstance(images, list) and k < len(images) else None
        tiles.append(
            {
                **_json(row),
                "predicted_name": _class_name(names, row.predicted),
                "fooled": row.confidence >= 0.99 and row.predicted == row.klass,
                "uri": png_data_uri(image) if image is not None else None,
                "size": png_size(image) if image is not None else None,
            }
        )
    return {**_json(check.fooling), "tiles": tiles}


def scaling_view(check: CheckEntry, examples: object, names: list[str]) -> View | None:
    """A scaling check's rows, each with its example triptych when the run kept one."""
    if check.scaling is None:
        return None
    examples = examples if isinstance(examples, Mapping) else {}
    view = []
    for row in check.scaling:
        ex = examples.get(row.scaler)
        pictures = None
        if isinstance(ex, Mapping):
            arrays = {
                k: np.asarray(ex[k], dtype=np.float64) / 255.0 for k in ("source", "attack", "seen")
            }
            big = arrays["source"].shape
            # what the model sees, drawn at the source's size: the resize made visible
            scale = display_scale(big[0], big[1]) * max(1, big[0] // arrays["seen"].shape[0])
            pictures = {
                "source_uri": png_data_uri(arrays["source"]),
                "attack_uri": png_data_uri(arrays["attack"]),
                "seen_uri": png_data_uri(arrays["seen"], scale=scale),
                "size": png_size(arrays["source"]),
                "source_name": _class_name(names, number(ex.get("source_class"))),
                "target_name": _class_name(names, number(ex.get("target_class"))),
                "predicted_name": _class_name(names, number(ex.get("predicted_class"))),
                "success": ex.get("success"),
            }
        view.append({**_json(row), "example": pictures})
    return {"rows": view, "vulnerable": check.vulnerable}


def _class_name(names: list[str], k: float | None) -> str:
    if k is None:
        return "–"
    return names[int(k)] if 0 <= k < len(names) else str(int(k))


def _flags(report: ReportData) -> list[View]:
    return [
        {
            "name": f.name,
            "severity": f.severity if f.severity in ("info", "warning", "error") else "warning",
            "message": f.message,
        }
        for f in report.flags
    ]


def _gallery(items: Sequence[GalleryItem], norms: Mapping[str, object]) -> list[View]:
    view = []
    for item in items:
        view.append(
            {
                "item": item,
                "norm": NORM_LABELS.get(str(norms.get(item.check) or ""), ""),
                "eps": fmt_eps(item.eps),
                "eps_raw": repr(float(item.eps)),
                "fooled": item.adv_pred != item.label,
                "clean_uri": png_data_uri(item.clean),
                "adv_uri": png_data_uri(item.adv),
                "diff_uri": png_data_uri(amplified_difference(item.clean, item.adv)),
                "size": png_size(item.clean),
            }
        )
    return view


def png_size(image: np.ndarray) -> tuple[int, int]:
    """The (width, height) in pixels of `png_data_uri(image)` at its default scale."""
    h, w = image.shape[0], image.shape[1]
    s = display_scale(h, w)
    return w * s, h * s


def _before_after(report: ReportData) -> list[View]:
    """Rows (check, eps, undefended, defended) when the run had a defense."""
    before = report.undefended
    if before is None:
        return []
    rows: list[View] = [
        {
            "check": "clean accuracy",
            "eps": None,
            "before": before.clean_accuracy,
            "after": report.clean_accuracy,
        }
    ]
    for check in report.checks:
        for r in check.results:
            rows.append(
                {
                    "check": check.id,
                    "eps": r.eps,
                    "before": before.robust_at(check.id, r.eps),
                    "after": r.robust_accuracy,
                }
            )
    return rows


def _defense(model: JsonObject) -> str | None:
    if not model.get("defense"):
        return None
    return f"{model['defense']}{' (adaptive: + BPDA)' if model.get('adaptive') else ''}"


def _context(
    report: ReportData,
    gallery: Sequence[GalleryItem],
    figures: Mapping[str, object] | None = None,
) -> View:
    model, data, env = report.model, report.data, report.environment
    checks = _checks(report, figures)
    flags = _flags(report)
    sha = str(model.get("sha256") or "")
    shape = model.get("input_shape")
    passes = report.passes
    details = {
        "Model": _pairs(
            ("Source", model.get("source")),
            ("Format", model.get("format")),
            ("SHA-256", sha[:16] + "…" if len(sha) > 16 else sha or None),
            ("Defense", _defense(model)),
            ("Classes", model.get("num_classes")),
            ("Input", "×".join(str(s) for s in shape) if isinstance(shape, list) else shape),
            ("Normalization", _normalization(report.normalization)),
        ),
        "Data": _pairs(
            ("Spec", data.spec),
            ("Split", data.split),
            ("Samples", fmt_count(data.n)),
            ("Classes", len(data.classes)),
        ),
        "Run": _pairs(
            ("Suite", report.suite_name),
            ("Threat models", ", ".join(t.threat for t in report.threat_models) or None),
            ("Seed", report.seed),
            ("Created", report.created),
            ("Total time", fmt_seconds(report.timings.total_seconds)),
            (
                "Passes",
                f"{fmt_count(passes.forward)} forward · {fmt_count(passes.backward)} backward",
            ),
        ),
        "Environment": _pairs(
            ("Bastion", report.bastion_version),
            ("Python", env.python),
            ("PyTorch", env.torch),
            ("Device", env.device),
            ("Threads", env.threads),
            ("Platform", env.platform),
        ),
    }
    clean, robust = report.clean_accuracy, report.robust_accuracy
    criteria = [c.passed for c in report.checks if c.passed is not None]
    return {
        "version": report.bastion_version,
        "created": report.created,
        "n_samples": data.n,
        "total_seconds": report.timings.total_seconds,
        "title": str(model.get("source") or "Unnamed model"),
        "subtitle": f"{data.spec} · suite {report.suite_name}",
        "details": {k: v for k, v in details.items() if v},
        "sha256": sha,
        "clean": clean,
        "robust": robust,
        "drop": clean - robust,
        "threats": _threats(report),
        "flags": flags,
        "severity_counts": {
            s: sum(f["severity"] == s for f in flags) for s in ("error", "warning", "info")
        },
        "passed": report.passed,
        "criteria_met": sum(bool(p) for p in criteria),
        "criteria_total": len(criteria),
        "checks": checks,
        "before_after": _before_after(report),
        "defense": _json(report.defense) if report.defense is not None else None,
        "charts": charts(report, checks),
        "gallery": _gallery(gallery, {str(c["id"]): c["norm"] for c in checks}),
        "norm_labels": NORM_LABELS,
    }


def _normalization(norm: Normalization | None) -> str:
    if norm is None:
        return "none ([0, 1] pixels)"
    return f"mean {norm.mean} · std {norm.std}"


def _threats(report: ReportData) -> list[View]:
    """The headline cards: one per threat model."""
    return [
        {
            "threat": t.threat,
            "robust": t.robust_accuracy,
            "n": t.n,
            "attacks": len(t.attacks),
            "passed": t.passed,
            "fail_under": t.fail_under,
        }
        for t in report.threat_models
    ]


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=fmt_pct, num=fmt_num, count=fmt_count, seconds=fmt_seconds, eps=fmt_eps, bar=bar_width
    )
    return env


def render_html(
    report: ReportData,
    gallery: Sequence[GalleryItem] = (),
    figures: Mapping[str, object] | None = None,
) -> str:
    """The report page as one self-contained HTML string (see the module docstring).
    `figures` holds the images of fooling and scaling checks by check id (`Report.figures`)."""
    context = _context(report, gallery, figures)
    return _environment().get_template("report.html").render(**context)


def write_html(
    report: ReportData,
    gallery: Sequence[GalleryItem],
    path: str | os.PathLike[str],
    figures: Mapping[str, object] | None = None,
) -> None:
    """Write the page to `path` atomically (a temporary file beside it, then a rename).

    A reader never sees a half-written report, and an existing file is replaced whole.
    """
    write_atomic(path, render_html(report, gallery, figures))
