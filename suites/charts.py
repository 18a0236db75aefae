"""Inline-SVG charts for the HTML report: robust accuracy against the perturbation budget.

One chart per norm, one line per check plus the worst case over checks, drawn here as SVG
text from escaped parts, so the page needs no script or external resource to show them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from markupsafe import Markup, escape

from bastion.suites.formatting import NORM_LABELS, NORM_ORDER, fmt_eps, fmt_pct, number

if TYPE_CHECKING:
    from bastion.suites.report_model import ReportData

Series = tuple[str, list[tuple[float, float]], str, bool]
"""One line of a chart: name, sorted (eps, accuracy) points, colour, worst case?"""

# One hue per check, the same in its chart line and its table; the worst case is near-black.
PALETTE = ("#2563eb", "#ea580c", "#059669", "#c026d3", "#0891b2", "#ca8a04", "#dc2626", "#7c3aed")
WORST_COLOR = "#111827"


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


def _tag(name: str, body: str = "", **attrs: object) -> str:
    """One SVG element; attribute values are escaped, `body` must already be markup."""

    def value(v: object) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(escape(v))

    text = " ".join(f'{k.rstrip("_").replace("_", "-")}="{value(v)}"' for k, v in attrs.items())
    return f"<{name} {text}>{body}</{name}>" if body else f"<{name} {text}/>"


def chart_svg(
    norm: str,
    series: Sequence[Series],
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
    clean = number(clean_accuracy)
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


def charts(report: ReportData, checks: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """One chart per norm: each check's curve (its view's `points`) and the worst case."""
    by_norm = report.robust_accuracy_by_norm
    norms = {str(c["norm"]) for c in checks if c["norm"]} | set(by_norm)
    ordered = [n for n in NORM_ORDER if n in norms] + sorted(norms - set(NORM_ORDER))
    out: list[dict[str, object]] = []
    for norm in ordered:
        series: list[Series] = [
            (str(c["id"]), _finite(c["points"]), str(c["color"]), False)
            for c in checks
            if c["norm"] == norm
        ]
        series = [s for s in series if s[1]]
        worst = _finite([(p.eps, p.robust_accuracy) for p in by_norm.get(norm, [])])
        if worst:
            series.append(("worst case", worst, WORST_COLOR, True))
        if series:
            svg = chart_svg(norm, series, report.clean_accuracy)
            out.append({"norm": norm, "label": NORM_LABELS.get(norm, norm), "svg": svg})
    return out


def _finite(points: object) -> list[tuple[float, float]]:
    pairs = points if isinstance(points, list) else []
    return sorted((e, a) for e, a in pairs if math.isfinite(e) and math.isfinite(a))
