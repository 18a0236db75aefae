"""The report entry of a `fooling` check: the fraction of classes fooled, per-class figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.suites.suite import Check


def fooling_entry(check: Check, items: list[dict[str, Any]]) -> dict[str, Any]:
    """`fooling.fooled_fraction`: classes labelled as themselves with >= 99 % confidence
    on their evolved image (also at 99.99 %); per class the confidence, the model's label
    and the generation that found the image. `results` stays empty: no eps, no robust
    accuracy."""
    rec = next((r for r in items if r.get("kind") == "fooling" and r["check"] == check.id), None)
    res: dict[str, Any] = rec["result"] if rec is not None else {}
    fooling = {
        "fooled_fraction": res.get("fooled_0.99"),
        "fooled_fraction_0.9999": res.get("fooled_0.9999"),
        "median_confidence": res.get("median_confidence"),
        "generations": res.get("generations"),
        "queries": res.get("queries"),
        "classes": res.get("classes", []),
    }
    entry: dict[str, Any] = {
        **check.to_dict(),
        "results": [],
        "fooling": fooling,
        "seconds": rec["seconds"] if rec is not None else 0.0,
        "forward": rec["forward"] if rec is not None else 0,
        "backward": rec["backward"] if rec is not None else 0,
        "passed": None,
    }
    if check.criterion is not None:
        entry["passed"] = check.criterion.holds(fooling["fooled_fraction"])
    return entry
