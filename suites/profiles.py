"""Run profiles: the fast profile trims a suite for pull requests; nightly runs use it whole.

The fast profile keeps every check and eps (thresholds still read the same rows) but
evaluates at most 64 samples, caps PGD/BIM at 10 steps, APGD and FAB at 25 iterations
(APGD-T, FAB-T: 3 targets), Square at 1,000 queries and CW-L2 at 2 binary-search steps ×
100 iterations. Its figures are noisier and its attacks weaker, so robust accuracy reads
higher than in a full run: use it to catch regressions early, not to quote numbers.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

from bastion.suites.suite import Check, Suite

FAST_N = 64
# what a one-check command run (`bastion attack`) gives an attack whose paper budget takes
# minutes per batch on a CPU (CW: 9 × 10,000); a suite file can ask for more
CPU_BUDGET: dict[str, dict[str, int]] = {
    "CarliniWagnerL2": {"binary_search_steps": 5, "max_iterations": 1000},
}
FAST_CAPS: dict[str, dict[str, int]] = {
    "PGD": {"steps": 10},
    "BIM": {"steps": 10},
    "CarliniWagnerL2": {"binary_search_steps": 2, "max_iterations": 100},
    "APGD": {"n_iter": 25},
    "APGDT": {"n_iter": 25, "n_target_classes": 3},
    "Square": {"n_queries": 1000},
    "FAB": {"n_iter": 25, "n_target_classes": 3},
}


def fast_n(n: int | None, available: int) -> int:
    """The number of samples a fast run evaluates."""
    return min(n if n is not None else available, available, FAST_N)


def fast_check(check: Check) -> Check:
    params: dict[str, Any] = dict(check.params)
    for name, cap in FAST_CAPS.get(check.attack, {}).items():
        default = inspect.signature(check.spec.cls).parameters[name].default
        params[name] = min(int(params.get(name, default)), cap)
    return replace(check, params=params, n=min(check.n or FAST_N, FAST_N))


def fast_suite(suite: Suite) -> Suite:
    """`suite` with every check trimmed to the fast profile."""
    return replace(suite, checks=tuple(fast_check(c) for c in suite.checks))
