"""Numbers as the HTML report shows them: percentages, counts, durations, pixel budgets.

Every formatter takes anything a report.json may hold (a number, null, a string from an
older report) and returns text; the fmt_* ones show a value that is not a number as a dash.
"""

from __future__ import annotations

import math
import numbers

from bastion.threats import format_eps

NORM_ORDER = ("linf", "l2", "l1", "l0")
NORM_LABELS = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}
DASH = "—"


def number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return None if math.isnan(value) else float(value)


def fmt_pct(value: object, digits: int = 1) -> str:
    v = number(value)
    return DASH if v is None or math.isinf(v) else f"{100 * v:.{digits}f}%"


def fmt_num(value: object, digits: int = 4) -> str:
    v = number(value)
    if v is None:
        return DASH
    return "∞" if math.isinf(v) else f"{v:.{digits}g}"


def fmt_count(value: object) -> str:
    v = number(value)
    return DASH if v is None or math.isinf(v) else f"{round(v):,}"


def fmt_seconds(value: object) -> str:
    v = number(value)
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


def bar_width(value: object) -> str:
    """A CSS width for an accuracy bar (`"80.0%"`), or `""` when there is no number."""
    v = number(value)
    return "" if v is None or math.isinf(v) else f"{100 * min(max(v, 0.0), 1.0):.1f}%"


def fmt_eps(value: object) -> str:
    """`0.03137` → `0.03137 (8/255)`: pixel budgets are usually chosen as k/255; a short
    decimal such as 0.2 stays as it is (not `0.2 (1/5)`)."""
    v = number(value)
    if v is None:
        return DASH
    text = f"{v:.4g}"
    as_fraction = format_eps(v)  # `8/255` where the decimal would not be short and exact
    return f"{text} ({as_fraction})" if "/" in as_fraction else text


def cell(value: object, spec: str) -> str:
    """A figure for the terminal (`format(value, spec)`); `–` for a missing one."""
    return "–" if value is None else format(value, spec)
