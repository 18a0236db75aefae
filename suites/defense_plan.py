"""The defense of a run, and the checks that evaluate it honestly (Athalye, Carlini &
Wagner 2018; Carlini et al., "On Evaluating Adversarial Robustness", 2019).

A defense comes from the run (`defense = "raw_isp"` / `"raw_isp:random"`, `--defense`) or
from the model itself: a distilled student carries its temperature and a DVERGE ensemble
its recipe in the saved file's metadata (`bastion defend`). For each, `with_defense_checks`
adds what an attacker who knows the defense would run:

* **distillation** (temperature T): every cross-entropy gradient attack (FGSM, PGD, BIM,
  APGD-CE) again on the logits divided by T (`ID-T`, kind `adaptive`, view `temperature`),
  where the softmax no longer saturates (Carlini & Wagner 2016);
* **raw_isp:random** (fresh camera metadata and noise per call): every gradient attack
  again with expectation over transformation (EOT, `EOT_SAMPLES` draws per step) through
  the exact torch ISP (`ID-eot`) and with BPDA (identity backward) through it
  (`ID-eot-bpda`), judged by one fresh draw of the defense as deployed;
* **dverge**: a `transfer` check with the paper's transfer attacks (M-PGD, M-DI²-FGSM, SGM
  where the surrogate has residual blocks; CE and CW losses) crafted on an independently
  trained baseline ensemble, at every L∞ threat model; the suite's own white-box checks are
  the adaptive column.

`defense_report.py` turns the finished run into the table undefended | defended | adaptive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.suites.json_codec import JsonObject
from bastion.suites.suite import Check, Suite, validate_check
from bastion.threats import ThreatModel

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]

PREPROCESSING = ("raw_isp", "raw_isp:random")
# attacks whose loss is the cross-entropy: the ones the softmax saturation of a distilled
# model masks (APGD-T's DLR loss is invariant to the scale of the logits)
CE_ATTACKS = ("FGSM", "PGD", "BIM", "APGD")
EOT_ATTACKS = ("FGSM", "PGD", "BIM", "APGD", "APGDT")
TRANSFER_ID = "transfer"


@dataclass(frozen=True)
class ModelDefense:
    """A defense a model carries in its metadata (`bastion_metadata`)."""

    name: str  # "distillation" or "dverge"
    temperature: float | None = None
    members: int | None = None

    @property
    def label(self) -> str:
        if self.temperature is not None:
            return f"{self.name} (T = {self.temperature:g})"
        return self.name


def model_defense(model: Model) -> ModelDefense | None:
    """The defense `model` carries (a distilled student, a DVERGE ensemble), if any."""
    from bastion.defenses.distillation import temperature_of
    from bastion.model_io import METADATA_ATTR
    from bastion.normalized import Normalized

    if not isinstance(model, nn.Module):
        return None
    t = temperature_of(model)
    if t is not None:
        return ModelDefense("distillation", temperature=t)
    inner = model
    while isinstance(inner, Normalized):
        inner = inner.model
    meta = getattr(inner, METADATA_ATTR, None) or {}
    if meta.get("defense") == "dverge":
        return ModelDefense("dverge", members=int(meta.get("members", 3)))
    return None


def defended_model(model: Model, defense: str, *, bpda: bool = False, seed: int = 0) -> nn.Module:
    """`model` behind the preprocessing `defense`: exact gradients through the torch ISP,
    or with `bpda` the same outputs with an identity backward pass (Athalye et al. 2018).
    `raw_isp:random` draws camera metadata and noise per image and call, seeded by `seed`
    (and per work item by the run's seed and the item: `raw_isp.item_draws`)."""
    from bastion.defenses.raw_isp import RawISP

    if defense not in PREPROCESSING:
        raise ConfigError(f"unknown defense {defense!r}; use one of {', '.join(PREPROCESSING)}")
    randomize = defense == "raw_isp:random"
    return RawISP(randomize=randomize, seed=seed, bpda=bpda).wrap(model)


def with_defense_checks(
    suite: Suite,
    model: Model,
    threats: tuple[ThreatModel, ...],
    model_info: JsonObject | None,
) -> tuple[Suite, JsonObject | None]:
    """The suite (expanded at its threat models) with the adaptive and transfer checks of
    its defense and the model's; `model_info` with the model-carried defense recorded."""
    carried = model_defense(model)
    checks = list(suite.checks)  # first, untouched: cascades see only the suite's checks
    for c in suite.checks:
        if c.kind != "attack" or not c.spec.bounded or c.bpda:
            continue
        t = carried.temperature if carried is not None else None
        if t is not None and t > 1 and _ce_attack(c):  # T = 1 is no distillation
            checks.append(_twin(c, "T", {"view": "temperature", "temperature": t}))
        if suite.defense == "raw_isp:random" and c.attack in EOT_ATTACKS:
            checks.append(_twin(c, "eot", {"view": "eot"}))
            checks.append(_twin(c, "eot-bpda", {"view": "eot-bpda"}))
    if carried is not None and carried.name == "dverge":
        radii = tuple(sorted({t.eps for t in threats if t.norm == "linf"}))
        if radii and not any(c.kind == "transfer" for c in checks):
            check = Check(
                id=TRANSFER_ID,
                attack="TransferAttacks",
                eps=radii,
                norm="linf",
                params={"members": carried.members or 3},
                kind="transfer",
            )
            validate_check(check)
            checks.append(check)
    info = model_info
    if carried is not None:
        info = {**(model_info or {}), "defense": carried.label}
        if suite.defense is not None:  # a preprocessing in front of a carried defense
            info["defense"] = f"{suite.defense} + {carried.label}"
    return replace(suite, checks=tuple(checks)), info


def without_defense_checks(suite: Suite) -> Suite:
    """The suite without the checks that evaluate a defense (for the undefended run)."""
    return replace(suite, checks=tuple(c for c in suite.checks if not is_defense_check(c)))


def is_defense_check(check: Check) -> bool:
    """An adaptive twin or a transfer check: it only makes sense against the defense."""
    return check.kind in ("adaptive", "transfer")


def _ce_attack(check: Check) -> bool:
    if check.attack == "APGD":
        return str(check.params.get("loss", "ce")).lower() == "ce"
    return check.attack in CE_ATTACKS


def _twin(check: Check, suffix: str, view: dict[str, object]) -> Check:
    """`check` as an adaptive check `ID-suffix` with the view parameters added; it attacks
    every point (no cascade) so that its own figures compare with the original's."""
    twin = replace(
        check,
        id=f"{check.id}-{suffix}",
        kind="adaptive",
        params={**check.params, **view},
        cascade=False,
        criterion=None,
        threats=False,
        threat_norms=(),
    )
    validate_check(twin)
    return twin
