"""The report entry of a `verify` check: verified accuracy per eps and robustness intervals."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.suites.runner import RunState
    from bastion.suites.suite import Check


def verify_entry(
    check: Check, state: RunState, items: list[dict[str, Any]], total: int
) -> dict[str, Any]:
    """Per eps: verified accuracy (SAFE over all n images), the fractions UNSAFE and
    UNKNOWN, and `robust_accuracy` (an upper bound: not UNSAFE and correctly classified);
    per image: the interval [safe_up_to, adversarial_at] and the per-layer bound statistics
    (unstable neurons, widths) at the largest eps verified."""
    n = min(check.n or total, total)
    mine = [r for r in items if r.get("kind") == "verify" and r["check"] == check.id]
    eps_list = sorted(check.eps)
    statuses: dict[int, list[str]] = {}
    intervals = []
    seconds = 0.0
    for rec in mine:
        rows = rec["rows"]
        seconds += rec["seconds"]
        for k, i in enumerate(rows["index"]):
            statuses[i] = rows["status"][k]
            intervals.append(
                {
                    "index": i,
                    "label": int(state.label[i]),
                    "safe_up_to": rows["safe_up_to"][k],
                    "adversarial_at": rows["adversarial_at"][k],
                    "seconds": rows["seconds"][k],
                    "layers": rows.get("layers", [[]] * len(rows["index"]))[k],
                }
            )
    results = []
    for j, eps in enumerate(eps_list):
        column = [statuses[i][j] for i in sorted(statuses)]
        count = {s: column.count(s) for s in ("SAFE", "UNSAFE", "UNKNOWN", "MISCLASSIFIED")}
        results.append(
            {
                "eps": eps,
                "verified_accuracy": count["SAFE"] / n if n else 0.0,
                "robust_accuracy": (count["SAFE"] + count["UNKNOWN"]) / n if n else 0.0,
                "unsafe": count["UNSAFE"],
                "unknown": count["UNKNOWN"],
                "misclassified": count["MISCLASSIFIED"],
                "verified": len(column),
            }
        )
    entry: dict[str, Any] = {
        **check.to_dict(),
        "n": n,
        "results": results,
        "intervals": sorted(intervals, key=lambda r: r["index"]),
        "seconds": seconds,
        "forward": 0,
        "backward": 0,
        "passed": None,
    }
    if check.criterion is not None:
        crit = check.criterion
        rows_at = [r for r in results if crit.eps is None or math.isclose(r["eps"], crit.eps)]
        entry["passed"] = all(crit.holds(r.get(crit.metric)) for r in rows_at)
    return entry
