"""Flags read off a finished run: signs that its numbers cannot be trusted as they stand.

After AutoAttack's `checks.py` (Square stronger than the gradient attacks) and the
literature on gradient masking (Athalye et al. 2018) and catastrophic overfitting (Wong et
al. 2020): a single-step attack far weaker than a multi-step one, the DLR loss breaking
many points cross-entropy left, a black-box attack breaking points every gradient attack
left, robust accuracy rising with eps, and clean accuracy near chance (wrong normalisation,
labels or an untrained model). Flags are reported first and never change the exit code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bastion.suites.kind_attack import breaks
from bastion.suites.report_model import AttackResult, CheckEntry, Flag, ThreatEntry
from bastion.suites.threat_report import evaluates
from bastion.threats import ThreatModel

if TYPE_CHECKING:
    from bastion.suites.results_log import Item
    from bastion.suites.run_context import RunState
    from bastion.suites.suite import Check, Suite

SINGLE_STEP_GAP = 0.10  # FGSM robust accuracy above the worst case by more than this
LOSS_GAP = 0.05  # the DLR loss breaking more than this fraction of points CE left
CHANCE_FACTOR = 1.5  # clean accuracy at most this many times chance
BLACK_BOX = ("Square", "FeatureGameMCTS", "SafeCV")


def flag(name: str, message: str) -> Flag:
    return Flag(name=name, severity="warning", message=message)


def _uses_dlr(check: Check) -> bool:
    return check.attack == "APGDT" or (
        check.attack == "APGD" and str(check.params.get("loss", "ce")).lower() == "dlr"
    )


def _uses_ce(check: Check) -> bool:
    ce_attacks = ("PGD", "BIM")
    return check.attack in ce_attacks or (
        check.attack == "APGD" and str(check.params.get("loss", "ce")).lower() == "ce"
    )


def evaluation_flags(
    suite: Suite,
    state: RunState,
    items: list[Item],
    checks: list[CheckEntry],
    threats: list[ThreatEntry],
    num_classes: int,
) -> list[Flag]:
    """The flags of a finished run, from its per-check figures and per-sample results."""
    out: list[Flag] = []
    n = state.n
    clean = float(state.correct.double().mean()) if n else 0.0
    chance = 1.0 / max(num_classes, 2)
    if n and clean <= CHANCE_FACTOR * chance:
        out.append(
            flag(
                "clean_accuracy_near_chance",
                f"clean accuracy {clean:.1%} is within {CHANCE_FACTOR}× of chance "
                f"({chance:.1%}): check the normalisation (--mean/--std, on the 0–1 scale), "
                "that the labels match the model's class order (folder: data sorts class "
                "folders by name), and that the model is trained; robust accuracy means "
                "nothing until this is fixed",
            )
        )
    for entry in threats:
        t = ThreatModel(entry.norm, entry.eps)
        mine = [c for c in suite.checks if evaluates(c, t)]
        out += _single_step_gap(t, entry, mine)
        out += _loss_gap(t, mine, items, state)
        out += _black_box_gap(t, mine, items, state)
    out += _rising(checks)
    return out


def _single_step_gap(t: ThreatModel, entry: ThreatEntry, mine: list[Check]) -> list[Flag]:
    if t.norm != "linf":  # catastrophic overfitting and sign-gradient masking are L∞ effects;
        return []  # a single L2 step is weak on any model
    worst = entry.robust_accuracy
    multi = [c for c in mine if c.attack != "FGSM" and c.attack not in BLACK_BOX]
    for c in mine:
        acc = entry.attacks[c.id].robust_accuracy
        if c.attack == "FGSM" and multi and acc is not None and acc - worst > SINGLE_STEP_GAP:
            return [
                flag(
                    "single_step_much_weaker",
                    f"at {t} FGSM leaves {acc:.1%} robust but the multi-step attacks leave "
                    f"{worst:.1%}: the loss surface is masked or the model overfits to "
                    "single-step attacks (catastrophic overfitting of FGSM training); only the "
                    "multi-step figure is meaningful",
                )
            ]
    return []


def _loss_gap(t: ThreatModel, mine: list[Check], items: list[Item], state: RunState) -> list[Flag]:
    ce = [c for c in mine if _uses_ce(c)]
    dlr = [c for c in mine if _uses_dlr(c)]
    if not ce or not dlr or not state.n:
        return []
    n = state.n
    by_ce = _union(items, ce, t, n)
    by_dlr = _union(items, dlr, t, n)
    extra = float((state.correct & by_dlr & ~by_ce).double().mean())
    if extra <= LOSS_GAP:
        return []
    return [
        flag(
            "ce_dlr_disagree",
            f"at {t} the DLR loss broke {extra:.1%} of the points cross-entropy attacks left: "
            "the logits are likely scaled or saturated (e.g. distillation, a temperature), "
            "so cross-entropy gradients vanish; trust the worst case, and suspect CE-only "
            "evaluations of this model",
        )
    ]


def _black_box_gap(
    t: ThreatModel, mine: list[Check], items: list[Item], state: RunState
) -> list[Flag]:
    box = [c for c in mine if c.attack in BLACK_BOX]
    grad = [c for c in mine if c.attack not in BLACK_BOX]
    if not box or not grad or not state.n:
        return []
    n = state.n
    extra = int((state.correct & _union(items, box, t, n) & ~_union(items, grad, t, n)).sum())
    if extra == 0 or extra <= 0.002 * n:
        return []
    names = ", ".join(sorted({c.attack for c in box}))
    return [
        flag(
            "black_box_stronger",
            f"at {t} {names} broke {extra} point(s) that every gradient attack left: the "
            "gradients are obstructed (masking, non-differentiable or randomised parts), so "
            "gradient-only evaluations overstate robustness; run the autoattack suite and "
            "consider an adaptive attack",
        )
    ]


def _union(items: list[Item], checks: list[Check], t: ThreatModel, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    for c in checks:
        out |= breaks(items, c.id, t.eps, n)
    return out


def _rising(checks: list[CheckEntry]) -> list[Flag]:
    """Robust accuracy of a multi-step attack's curve rising with eps by more than noise.

    FGSM is left out: one linear step is known to overshoot at large eps (on resnet_2b,
    CIFAR-10, it leaves 0 % robust at eps 0.1 and 5 % at 0.2), which says nothing about
    the evaluation; a weak single step has its own flag, `single_step_much_weaker`.
    """
    for c in checks:
        if c.attack == "FGSM":
            continue
        rows = [r for r in c.results if isinstance(r, AttackResult)]
        if len(rows) < 2:
            continue
        m = max(c.n or 1, 1)
        for a, b in zip(rows, rows[1:], strict=False):
            rise = b.robust_accuracy - a.robust_accuracy
            if rise > max(0.01, 1.5 / m):
                return [
                    flag(
                        "robust_accuracy_rises_with_eps",
                        f"{c.id} leaves {b.robust_accuracy:.1%} robust at eps "
                        f"{b.eps:g} but {a.robust_accuracy:.1%} at the smaller "
                        f"{a.eps:g}: a larger budget cannot make a model more robust, so "
                        "the attack is failing (masked gradients or too few steps)",
                    )
                ]
    return []
