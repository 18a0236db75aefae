"""The headline: robust accuracy per threat model, worst case per point over every check.

A sample counts as robust at a threat model (norm, eps) when the model classifies it
correctly and no check of that norm broke it within eps: an eps-bounded attack at a radius
<= eps, or a minimum-norm attack (CW, the verifier's counterexamples) at a distance <= eps.
Every threat model is read over the same samples, all the run evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bastion.errors import ConfigError
from bastion.suites.report_model import CheckEntry, ThreatAttack, ThreatEntry
from bastion.threats import FailUnder, ThreatModel

if TYPE_CHECKING:
    from bastion.suites.run_context import RunState
    from bastion.suites.suite import Check, Suite


def evaluates(check: Check, threat: ThreatModel) -> bool:
    """Whether `check` attacks at `threat`: its norm, and the radius itself or any radius
    (minimum-norm searches are read at every radius)."""
    if not check.robustness or check.norm != threat.norm:
        return False
    if not check.bounded:
        return True
    return any(threat.matches(check.norm, e) for e in check.eps)


def covered(suite: Suite, threat: ThreatModel) -> bool:
    return any(evaluates(c, threat) for c in suite.checks)


def resolve_threats(
    suite: Suite, asked: tuple[ThreatModel, ...], defaults: tuple[ThreatModel, ...]
) -> tuple[ThreatModel, ...]:
    """The threat models a run reports on. Asked-for ones must be covered by a check of the
    (expanded) suite; defaults the suite does not cover are dropped; with none left, the
    largest radius each norm's checks evaluate stands in (a suite without threat checks)."""
    if asked:
        for t in asked:
            if not covered(suite, t):
                raise ConfigError(
                    f"no check of suite {suite.name!r} attacks at {t}; use a suite with "
                    f"{t.norm} checks (quick, standard, autoattack) or add `threats = true` to one"
                )
        return asked
    kept = tuple(t for t in defaults if covered(suite, t))
    if kept:
        return kept
    out = []
    for norm in sorted(suite.norms()):
        radii = [e for c in suite.checks if c.robustness and c.norm == norm for e in c.eps]
        if radii and norm in ("linf", "l2"):
            out.append(ThreatModel(norm, max(radii)))
    return tuple(out)


def threat_entries(
    suite: Suite,
    state: RunState,
    checks: list[CheckEntry],
    threats: tuple[ThreatModel, ...],
    fail_under: tuple[FailUnder, ...],
) -> list[ThreatEntry]:
    """One entry per threat model: worst-case robust accuracy over all n samples, each
    evaluating check's own figure beside it, and the fail-under verdict."""
    n = state.n
    correct = state.correct
    by_id = {c.id: c for c in checks}
    out = []
    for t in threats:
        broken = state.broken(t.norm)
        robust = correct & ~(broken <= t.eps * (1 + 1e-9))
        attacks: dict[str, ThreatAttack] = {}
        for c in suite.checks:
            if not evaluates(c, t):
                continue
            entry = by_id[c.id]
            row = next((r for r in entry.results if t.matches(t.norm, r.eps)), None)
            attacks[c.id] = ThreatAttack(
                attack=c.attack,
                robust_accuracy=None if row is None else row.robust_accuracy,
                n=entry.n,
            )
        acc = float(robust.double().mean()) if n else 0.0
        criteria = [f for f in fail_under if f.applies_to(t)]
        out.append(
            ThreatEntry(
                threat=str(t),
                norm=t.norm,
                eps=t.eps,
                robust_accuracy=acc,
                n=n,
                attacks=attacks,
                fail_under=max((f.min_accuracy for f in criteria), default=None),
                passed=all(acc >= f.min_accuracy for f in criteria) if criteria else None,
            )
        )
    return out


def check_fail_under(fail_under: tuple[FailUnder, ...], threats: tuple[ThreatModel, ...]) -> None:
    """Refuse a criterion on a threat model the run does not evaluate."""
    for f in fail_under:
        if f.threat is not None and not any(f.applies_to(t) for t in threats):
            have = ", ".join(str(t) for t in threats) or "none"
            raise ConfigError(
                f"fail-under names {f.threat}, which this run does not evaluate (threat "
                f"models: {have}); add --threat {f.threat} or name one of those"
            )


def find_threat(entries: list[ThreatEntry], text: str) -> ThreatEntry:
    """The entry of threat model `text` (`linf:8/255`); ConfigError naming the evaluated ones."""
    t = ThreatModel.parse(text)
    for e in entries:
        if t.matches(e.norm, e.eps):
            return e
    have = ", ".join(e.threat for e in entries) or "none"
    raise ConfigError(f"threat model {t} was not evaluated; evaluated: {have}")
