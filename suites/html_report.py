"""The HTML report: one self-contained page from a report.json dict and its gallery.

The page has no external resources (inline CSS, inline SVG charts from `charts`, images
as data URIs) and a Content-Security-Policy that forbids loading any, so it can be mailed,
attached to a CI run or opened offline. Every string from the report is escaped by
jinja2's autoescape; the SVG is built from escaped parts. Older or partial reports
render: every key is optional and every number may be null.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from bastion.fileio import write_atomic
from bastion.suites.charts import PALETTE, _charts, _series_points
from bastion.suites.formatting import (
    NORM_LABELS,
    _number,
    bar_width,
    fmt_count,
    fmt_eps,
    fmt_num,
    fmt_pct,
    fmt_seconds,
)

from .gallery import GalleryItem, amplified_difference, display_scale, png_data_uri

TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---------------------------------------------------------------- view model


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _pairs(*items: tuple[str, Any]) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in items if v is not None and v != ""]


def _param(key: str, value: Any) -> str:
    """A suite parameter for display: numbers shortened, eps as k/255 where it is one."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_param(key, v) for v in value)
    if _number(value) is None:
        return str(value)
    if key.startswith("eps"):
        text = fmt_eps(value)
        return text[text.index("(") + 1 : -1] if "(" in text else text
    return fmt_num(value)


def _checks(
    report: Mapping[str, Any], figures: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    checks = []
    figures = figures or {}
    classes = _dict(report.get("data")).get("classes")
    names = [str(c) for c in classes] if isinstance(classes, list) else []
    raw = report.get("checks")
    for i, check in enumerate(raw if isinstance(raw, list) else []):
        check = _dict(check)
        results = [_dict(r) for r in check.get("results") or [] if isinstance(r, Mapping)]
        params = _dict(check.get("params"))
        checks.append(
            {
                "id": str(check.get("id") or check.get("attack") or f"check {i + 1}"),
                "anchor": f"check-{i + 1}",
                "attack": check.get("attack"),
                "norm": str(check["norm"]) if check.get("norm") else None,
                "params": [(str(k), _param(str(k), v)) for k, v in params.items()],
                "cascade": check.get("cascade"),
                "n": check.get("n"),
                "criterion": check.get("criterion"),
                "passed": check.get("passed"),
                "seconds": check.get("seconds"),
                "kind": check.get("kind", "attack"),
                "intervals": [_dict(r) for r in check.get("intervals") or []],
                "fooling": _fooling(check, figures.get(str(check.get("id"))), names),
                "scaling": _scaling(check, figures.get(str(check.get("id"))), names),
                "results": results,
                "points": _series_points(results),
                "color": PALETTE[i % len(PALETTE)],
            }
        )
    return checks


def _fooling(check: Mapping[str, Any], images: Any, names: list[str]) -> dict[str, Any] | None:
    """A fooling check's figures and its per-class tiles (with images when the run kept them)."""
    fooling = check.get("fooling")
    if not isinstance(fooling, Mapping):
        return None
    rows = [_dict(r) for r in fooling.get("classes") or [] if isinstance(r, Mapping)]
    tiles = []
    for k, row in enumerate(rows):
        predicted = _number(row.get("predicted"))
        image = images[k] if isinstance(images, list) and k < len(images) else None
        tiles.append(
            {
                **row,
                "predicted_name": _class_name(names, predicted),
                "fooled": (_number(row.get("confidence")) or 0.0) >= 0.99
                and predicted == _number(row.get("class")),
                "uri": png_data_uri(image) if image is not None else None,
                "size": png_size(image) if image is not None else None,
            }
        )
    return {**fooling, "tiles": tiles}


def _scaling(check: Mapping[str, Any], examples: Any, names: list[str]) -> dict[str, Any] | None:
    """A scaling check's rows, each with its example triptych when the run kept one."""
    rows = check.get("scaling")
    if not isinstance(rows, list):
        return None
    examples = examples if isinstance(examples, Mapping) else {}
    view = []
    for row in (_dict(r) for r in rows):
        ex = examples.get(row.get("scaler"))
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
                "source_name": _class_name(names, _number(ex.get("source_class"))),
                "target_name": _class_name(names, _number(ex.get("target_class"))),
                "predicted_name": _class_name(names, _number(ex.get("predicted_class"))),
                "success": ex.get("success"),
            }
        view.append({**row, "example": pictures})
    return {"rows": view, "vulnerable": check.get("vulnerable")}


def _class_name(names: list[str], k: float | None) -> str:
    if k is None:
        return "–"
    return names[int(k)] if 0 <= k < len(names) else str(int(k))


def _flags(report: Mapping[str, Any]) -> list[dict[str, str]]:
    flags = []
    raw = report.get("flags")
    for flag in raw if isinstance(raw, list) else []:
        flag = _dict(flag) if isinstance(flag, Mapping) else {"message": str(flag)}
        severity = str(flag.get("severity") or "warning").lower()
        flags.append(
            {
                "name": str(flag.get("name") or ""),
                "severity": severity if severity in ("info", "warning", "error") else "warning",
                "message": str(flag.get("message") or ""),
            }
        )
    return flags


def _gallery(items: Sequence[GalleryItem], norms: Mapping[str, str | None]) -> list[dict[str, Any]]:
    view = []
    for item in items:
        view.append(
            {
                "item": item,
                "norm": NORM_LABELS.get(norms.get(item.check) or "", ""),
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


def png_size(image: Any) -> tuple[int, int]:
    """The (width, height) in pixels of `png_data_uri(image)` at its default scale."""
    h, w = image.shape[0], image.shape[1]
    s = display_scale(h, w)
    return w * s, h * s


def _before_after(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (check, eps, undefended, defended) when the run had a defense."""
    before = _dict(report.get("undefended"))
    if not before:
        return []
    rows = [
        {
            "check": "clean accuracy",
            "eps": None,
            "before": before.get("clean_accuracy"),
            "after": report.get("clean_accuracy"),
        }
    ]
    old_checks = _dict(before.get("checks"))
    for check in report.get("checks") or []:
        old = {r["eps"]: r.get("robust_accuracy") for r in old_checks.get(check["id"]) or []}
        for r in check.get("results") or []:
            rows.append(
                {
                    "check": check["id"],
                    "eps": r.get("eps"),
                    "before": old.get(r.get("eps")),
                    "after": r.get("robust_accuracy"),
                }
            )
    return rows


def _defense(model: Mapping[str, Any]) -> str | None:
    if not model.get("defense"):
        return None
    return f"{model['defense']}{' (adaptive: + BPDA)' if model.get('adaptive') else ''}"


def _passes(passes: Mapping[str, Any]) -> str | None:
    if not passes:
        return None
    forward, backward = fmt_count(passes.get("forward")), fmt_count(passes.get("backward"))
    return f"{forward} forward · {backward} backward"


def _context(
    report: Mapping[str, Any],
    gallery: Sequence[GalleryItem],
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    model, data = _dict(report.get("model")), _dict(report.get("data"))
    env, suite = _dict(report.get("environment")), _dict(report.get("suite"))
    timings, passes = _dict(report.get("timings")), _dict(report.get("passes"))
    checks = _checks(report, figures)
    flags = _flags(report)
    sha = str(model.get("sha256") or "")
    classes = data.get("classes")
    shape = model.get("input_shape")
    details = {
        "Model": _pairs(
            ("Source", model.get("source")),
            ("Format", model.get("format")),
            ("SHA-256", sha[:16] + "…" if len(sha) > 16 else sha or None),
            ("Defense", _defense(model)),
            ("Classes", model.get("num_classes")),
            ("Input", "×".join(str(s) for s in shape) if isinstance(shape, list) else shape),
            ("Normalization", _normalization(report)),
        ),
        "Data": _pairs(
            ("Spec", data.get("spec")),
            ("Split", data.get("split")),
            ("Samples", fmt_count(data["n"]) if "n" in data else None),
            ("Classes", len(classes) if isinstance(classes, list) else None),
        ),
        "Run": _pairs(
            ("Suite", suite.get("name")),
            ("Threat models", ", ".join(t["threat"] for t in _threats(report)) or None),
            ("Seed", report.get("seed")),
            ("Created", report.get("created")),
            (
                "Total time",
                fmt_seconds(timings["total_seconds"]) if "total_seconds" in timings else None,
            ),
            ("Passes", _passes(passes)),
        ),
        "Environment": _pairs(
            ("Bastion", report.get("bastion_version")),
            ("Python", env.get("python")),
            ("PyTorch", env.get("torch")),
            ("Device", env.get("device")),
            ("Threads", env.get("threads")),
            ("Platform", env.get("platform")),
        ),
    }
    clean, robust = _number(report.get("clean_accuracy")), _number(report.get("robust_accuracy"))
    criteria = [c["passed"] for c in checks if c["passed"] is not None]
    return {
        "version": str(report.get("bastion_version") or ""),
        "created": report.get("created"),
        "n_samples": _number(data.get("n")),
        "total_seconds": _number(timings.get("total_seconds")),
        "title": str(model.get("source") or "Unnamed model"),
        "subtitle": " · ".join(
            str(v) for v in (data.get("spec"), suite.get("name") and f"suite {suite['name']}") if v
        ),
        "details": {k: v for k, v in details.items() if v},
        "sha256": sha,
        "clean": clean,
        "robust": robust,
        "drop": clean - robust if clean is not None and robust is not None else None,
        "threats": _threats(report),
        "flags": flags,
        "severity_counts": {
            s: sum(f["severity"] == s for f in flags) for s in ("error", "warning", "info")
        },
        "passed": report.get("passed"),
        "criteria_met": sum(bool(p) for p in criteria),
        "criteria_total": len(criteria),
        "checks": checks,
        "before_after": _before_after(report),
        "charts": _charts(report, checks),
        "gallery": _gallery(gallery, {c["id"]: c["norm"] for c in checks}),
        "norm_labels": NORM_LABELS,
    }


def _normalization(report: Mapping[str, Any]) -> str | None:
    norm = report.get("normalization")
    if "normalization" not in report:
        return None
    if not isinstance(norm, Mapping):
        return "none ([0, 1] pixels)"
    return f"mean {norm.get('mean')} · std {norm.get('std')}"


def _threats(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The headline cards: one per threat model."""
    out = []
    for t in report.get("threat_models") or []:
        if not isinstance(t, Mapping) or "threat" not in t:
            continue
        out.append(
            {
                "threat": str(t["threat"]),
                "robust": _number(t.get("robust_accuracy")),
                "n": _number(t.get("n")),
                "attacks": len(t.get("attacks") or {}),
                "passed": t.get("passed"),
                "fail_under": _number(t.get("fail_under")),
            }
        )
    return out


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
    report: Mapping[str, Any],
    gallery: Sequence[GalleryItem] = (),
    figures: Mapping[str, Any] | None = None,
) -> str:
    """The report page as one self-contained HTML string (see the module docstring).
    `figures` holds the images of fooling and scaling checks by check id (`Report.figures`)."""
    context = _context(report, gallery, figures)
    return _environment().get_template("report.html").render(**context)


def write_html(
    report: Mapping[str, Any],
    gallery: Sequence[GalleryItem],
    path: str | os.PathLike[str],
    figures: Mapping[str, Any] | None = None,
) -> None:
    """Write the page to `path` atomically (a temporary file beside it, then a rename).

    A reader never sees a half-written report, and an existing file is replaced whole.
    """
    write_atomic(path, render_html(report, gallery, figures))
