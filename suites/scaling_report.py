"""The report entry of a `scaling` check: one audit row per resizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.suites.suite import Check


def scaling_entry(check: Check, items: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """`scaling`: per scaler (in the check's order) vulnerable?, attack success, PSNR/SSIM
    to the source, success after the median filter, detection rate, false-positive rate
    and advice; `vulnerable` is true when any scaler is. A `detection_rate` criterion must
    hold for every scaler. `results` stays empty: no eps, no robust accuracy."""
    mine = [r for r in items if r.get("kind") == "scaling" and r["check"] == check.id]
    # items are keyed `scaling|ID||B` with B the scaler's place in the check
    rows = [r["audit"] for r in sorted(mine, key=lambda r: int(r["key"].rsplit("|", 1)[1]))]
    entry: dict[str, Any] = {
        **check.to_dict(),
        "n": n,
        "results": [],
        "scaling": rows,
        "vulnerable": any(r["vulnerable"] for r in rows),
        "seconds": sum(r["seconds"] for r in mine),
        "forward": sum(r["forward"] for r in mine),
        "backward": 0,
        "passed": None,
    }
    if check.criterion is not None:
        crit = check.criterion
        entry["passed"] = bool(rows) and all(crit.holds(r[crit.metric]) for r in rows)
    return entry
