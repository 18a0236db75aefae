"""The HTML report: one self-contained page from a report.json dict and its gallery.

The page has no external resources (inline CSS, inline SVG charts drawn here, images as
data URIs) and a Content-Security-Policy that forbids loading any, so it can be mailed,
attached to a CI run or opened offline. Every string from the report is escaped by
jinja2's autoescape; the SVG is built here from escaped parts. Older or partial reports
render: every key is optional and every number may be null.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from bastion.fileio import write_atomic

from .gallery import GalleryItem, amplified_difference, display_scale, png_data_uri

TEMPLATES = Path(__file__).resolve().parent / "templates"
NORM_ORDER = ("linf", "l2", "l1", "l0")
NORM_LABELS = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}
# One hue per check, the same in its chart line and its table; the worst case is near-black.
PALETTE = ("#2563eb", "#ea580c", "#059669", "#c026d3", "#0891b2", "#ca8a04", "#dc2626", "#7c3aed")
WORST_COLOR = "#111827"
DASH = "—"


# ---------------------------------------------------------------- number formatting


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return None if math.isnan(value) else float(value)


def fmt_pct(value: Any, digits: int = 1) -> str:
    v = _number(value)
    return DASH if v is None or math.isinf(v) else f"{100 * v:.{digits}f}%"


def fmt_num(value: Any, digits: int = 4) -> str:
    v = _number(value)
    if v is None:
        return DASH
    return "∞" if math.isinf(v) else f"{v:.{digits}g}"


def fmt_count(value: Any) -> str:
    v = _number(value)
    return DASH if v is None or math.isinf(v) else f"{round(v):,}"


def fmt_seconds(value: Any) -> str:
    v = _number(value)
    if v is None or math.isinf(v):
        return DASH
    if v < 60:
        return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
    minutes, seconds = divmod(round(v), 60)
    return (
        f"{minutes} min {seconds:02d} s"
        if minutes < 60
        else f"{minutes // 60} h {minutes % 60:02d} min"
    )


def bar_width(value: Any) -> str:
    """A CSS width for an accuracy bar (`"80.0%"`), or `""` when there is no number."""
    v = _number(value)
    return "" if v is None or math.isinf(v) else f"{100 * min(max(v, 0.0), 1.0):.1f}%"


def fmt_eps(value: Any) -> str:
    """`0.03137` → `0.03137 (8/255)`: pixel budgets are usually chosen as k/255."""
    v = _number(value)
    if v is None:
        return DASH
    text = f"{v:.4g}"
    if 0 < v <= 1:
        k = v * 255
        if abs(k - round(k)) < 1e-6 and round(k) != 255:
            frac = Fraction(round(k), 255)
            text += f" ({frac.numerator}/{frac.denominator})"
    return text


# ---------------------------------------------------------------- charts


def _nice_axis(high: float, target: int = 5) -> tuple[float, list[float]]:
    """A round upper bound ≥ `high` and evenly spaced round ticks from 0 to it."""
    if not high > 0:
        high = 1.0
    raw = high / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    count = math.ceil(high / step - 1e-9)
    return count * step, [i * step for i in range(count + 1)]


def _tick_label(value: float) -> str:
    return f"{round(value, 10):g}"


def _series_points(rows: Any) -> list[tuple[float, float]]:
    points = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, Mapping):
            eps, acc = _number(row.get("eps")), _number(row.get("robust_accuracy"))
            if eps is not None and acc is not None and math.isfinite(eps) and math.isfinite(acc):
                points.append((eps, acc))
    return sorted(points)


def _tag(name: str, body: str = "", **attrs: Any) -> str:
    """One SVG element; attribute values are escaped, `body` must already be markup."""

    def value(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(escape(v))

    text = " ".join(f'{k.rstrip("_").replace("_", "-")}="{value(v)}"' for k, v in attrs.items())
    return f"<{name} {text}>{body}</{name}>" if body else f"<{name} {text}/>"


def chart_svg(
    norm: str,
    series: Sequence[tuple[str, list[tuple[float, float]], str, bool]],
    clean_accuracy: float | None,
) -> Markup:
    """An accuracy-vs-epsilon chart: one line with markers per `(label, points, colour, worst)`.

    The x axis runs from 0 to a round number above the largest eps (0 to 1 when every eps
    is 0), the y axis from 0 to 100 %; the clean accuracy is a dotted reference line, and a
    legend on the right names every series (hover a marker for its value).
    """
    width, left, legend_w, top, bottom = 640, 58, 176, 18, 50
    height = max(330, top + 22 * (len(series) + 2) + 20)
    plot_w, plot_h = width - left - legend_w, height - top - bottom
    x_max, x_ticks = _nice_axis(max((e for _, pts, _, _ in series for e, _ in pts), default=0.0))

    def x(eps: float) -> float:
        return left + plot_w * eps / x_max

    def y(acc: float) -> float:
        return top + plot_h * (1 - min(max(acc, 0.0), 1.0))

    right, base = left + plot_w, top + plot_h
    label = NORM_LABELS.get(norm, norm)
    out = [_tag("rect", x=left, y=top, width=plot_w, height=plot_h, class_="plot-bg")]
    for i in range(6):
        out.append(_tag("line", class_="grid", x1=left, x2=right, y1=y(i / 5), y2=y(i / 5)))
        out.append(
            _tag("text", f"{20 * i}%", class_="tick", x=left - 8, y=y(i / 5) + 4, text_anchor="end")
        )
    for tick in x_ticks:
        out.append(_tag("line", class_="grid", x1=x(tick), x2=x(tick), y1=top, y2=base))
        tick_text = _tick_label(tick)
        out.append(
            _tag("text", tick_text, class_="tick", x=x(tick), y=base + 18, text_anchor="middle")
        )
    out += [
        _tag("line", class_="axis", x1=left, x2=right, y1=base, y2=base),
        _tag("line", class_="axis", x1=left, x2=left, y1=top, y2=base),
        _tag(
            "text",
            str(escape(f"{label} perturbation budget ε")),
            class_="axis-label",
            x=left + plot_w / 2,
            y=height - 8,
            text_anchor="middle",
        ),
        _tag(
            "text",
            "robust accuracy",
            class_="axis-label",
            transform=f"translate(14 {top + plot_h / 2:.1f}) rotate(-90)",
            text_anchor="middle",
        ),
    ]
    legend = []
    clean = _number(clean_accuracy)
    if clean is not None and math.isfinite(clean):
        tip = _tag("title", f"clean accuracy {fmt_pct(clean)}")
        out.append(
            _tag("line", tip, class_="clean-line", x1=left, x2=right, y1=y(clean), y2=y(clean))
        )
        legend.append(
            (_tag("line", class_="clean-line", x1=0, x2=22, y1=0, y2=0), "clean accuracy")
        )
    # The worst case goes underneath as a wide translucent band, so that a check that is
    # itself the worst case stays visible on top of it.
    for name, points, color, worst in sorted(series, key=lambda s: not s[3]):
        cls = "series worst" if worst else "series"
        coords = " ".join(f"{x(e):.1f},{y(a):.1f}" for e, a in points)
        marks = [_tag("polyline", points=coords, fill="none")]
        for e, a in points:
            tip = _tag("title", str(escape(f"{name} · ε = {fmt_eps(e)}: {fmt_pct(a)}")))
            if worst:
                marks.append(_tag("rect", tip, x=x(e) - 3, y=y(a) - 3, width=6, height=6))
            else:
                marks.append(_tag("circle", tip, cx=x(e), cy=y(a), r=4))
        out.append(_tag("g", "".join(marks), class_=cls, stroke=color, fill=color))
    for name, _, color, worst in series:
        cls = "series worst" if worst else "series"
        marker = (
            _tag("rect", x=8, y=-3, width=6, height=6)
            if worst
            else _tag("circle", cx=11, cy=0, r=4)
        )
        swatch = _tag("line", x1=0, x2=22, y1=0, y2=0) + marker
        legend.append((_tag("g", swatch, class_=cls, stroke=color, fill=color), name))
    for i, (swatch, name) in enumerate(legend):
        short = name if len(name) <= 17 else name[:9] + "…" + name[-7:]
        text = _tag("text", str(escape(short)) + _tag("title", str(escape(name))), x=30, y=4)
        out.append(
            _tag(
                "g",
                swatch + text,
                class_="legend",
                transform=f"translate({right + 18} {top + 10 + 22 * i})",
            )
        )
    body = "".join(out)
    return Markup(
        _tag(
            "svg",
            body,
            class_="chart",
            data_norm=norm,
            viewBox=f"0 0 {width} {height}",
            width=width,
            height=height,
            role="img",
            aria_label=f"Robust accuracy against {label} perturbation budget",
            xmlns="http://www.w3.org/2000/svg",
        )
    )


def _charts(report: Mapping[str, Any], checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_norm = report.get("robust_accuracy_by_norm")
    by_norm = by_norm if isinstance(by_norm, Mapping) else {}
    norms = {c["norm"] for c in checks if c["norm"]} | {str(n) for n in by_norm}
    ordered = [n for n in NORM_ORDER if n in norms] + sorted(norms - set(NORM_ORDER))
    charts = []
    for norm in ordered:
        series = [(c["id"], c["points"], c["color"], False) for c in checks if c["norm"] == norm]
        series = [s for s in series if s[1]]
        worst = _series_points(by_norm.get(norm))
        worst_name = "worst case"
        if not worst and norm not in by_norm and len(series) > 1:
            # An older report without the per-sample worst case: the lowest check per eps
            # is an upper bound on it, and is labelled as such.
            lowest: dict[float, float] = {}
            for _, pts, _, _ in series:
                for e, a in pts:
                    lowest[e] = min(a, lowest.get(e, a))
            worst, worst_name = sorted(lowest.items()), "lowest check"
        if worst:
            series.append((worst_name, worst, WORST_COLOR, True))
        if series:
            svg = chart_svg(norm, series, report.get("clean_accuracy"))
            charts.append({"norm": norm, "label": NORM_LABELS.get(norm, norm), "svg": svg})
    return charts


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


def _checks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    checks = []
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
                "results": results,
                "points": _series_points(results),
                "color": PALETTE[i % len(PALETTE)],
            }
        )
    return checks


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


def _passes(passes: Mapping[str, Any]) -> str | None:
    if not passes:
        return None
    forward, backward = fmt_count(passes.get("forward")), fmt_count(passes.get("backward"))
    return f"{forward} forward · {backward} backward"


def _context(report: Mapping[str, Any], gallery: Sequence[GalleryItem]) -> dict[str, Any]:
    model, data = _dict(report.get("model")), _dict(report.get("data"))
    env, suite = _dict(report.get("environment")), _dict(report.get("suite"))
    timings, passes = _dict(report.get("timings")), _dict(report.get("passes"))
    checks = _checks(report)
    flags = _flags(report)
    sha = str(model.get("sha256") or "")
    classes = data.get("classes")
    shape = model.get("input_shape")
    details = {
        "Model": _pairs(
            ("Source", model.get("source")),
            ("Format", model.get("format")),
            ("SHA-256", sha[:16] + "…" if len(sha) > 16 else sha or None),
            ("Classes", model.get("num_classes")),
            ("Input", "×".join(str(s) for s in shape) if isinstance(shape, list) else shape),
        ),
        "Data": _pairs(
            ("Spec", data.get("spec")),
            ("Split", data.get("split")),
            ("Samples", fmt_count(data["n"]) if "n" in data else None),
            ("Classes", len(classes) if isinstance(classes, list) else None),
        ),
        "Run": _pairs(
            ("Suite", suite.get("name")),
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
        "flags": flags,
        "severity_counts": {
            s: sum(f["severity"] == s for f in flags) for s in ("error", "warning", "info")
        },
        "passed": report.get("passed"),
        "criteria_met": sum(bool(p) for p in criteria),
        "criteria_total": len(criteria),
        "checks": checks,
        "charts": _charts(report, checks),
        "gallery": _gallery(gallery, {c["id"]: c["norm"] for c in checks}),
        "norm_labels": NORM_LABELS,
    }


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


def render_html(report: Mapping[str, Any], gallery: Sequence[GalleryItem] = ()) -> str:
    """The report page as one self-contained HTML string (see the module docstring)."""
    return _environment().get_template("report.html").render(**_context(report, gallery))


def write_html(
    report: Mapping[str, Any], gallery: Sequence[GalleryItem], path: str | os.PathLike[str]
) -> None:
    """Write the page to `path` atomically (a temporary file beside it, then a rename).

    A reader never sees a half-written report, and an existing file is replaced whole.
    """
    write_atomic(path, render_html(report, gallery))
