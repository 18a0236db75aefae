"""Suites: named lists of checks (an attack, its parameters, an eps sweep, a pass criterion).

A check with an eps-bounded attack (FGSM, PGD, BIM) runs once per eps. A minimum-norm
attack (CarliniWagnerL2) runs once; its `eps` list gives the L2 radii at which robust
accuracy is read off the distances it found. `cascade` attacks only the points no earlier
check of the same norm has broken (AutoAttack's scheme); points it skips count as broken.
Suites load from TOML:

    name = "mine"
    [[check]]
    id = "pgd"
    attack = "PGD"
    norm = "linf"
    eps = [0.1, 0.3]
    params = { steps = 40 }
    cascade = true
    criterion = "robust_accuracy >= 0.4"   # optional; `criterion_eps = 0.1` to read one eps

A `kind = "verify"` check runs the verifier (bastion.verify) instead of an attack: per
image and L∞ eps SAFE / UNSAFE / UNKNOWN, verified accuracy, and with `interval = true`
the robustness interval of each image (the largest eps proved SAFE, by bisection, and
the smallest adversarial distance found by the verifier or the suite's attacks):

    [[check]]
    id = "verified"
    kind = "verify"
    eps = [0.01, 0.03]
    n = 20
    params = { timeout = 10, engine = "auto", interval = true }

A `kind = "fooling"` check evolves one fooling image per class (`FoolingEvolution`, no
source image) and reports the fraction of classes labelled with >= 99 % confidence; a
`kind = "scaling"` check audits image-scaling attacks (`scaling_audit`) per resizer on its
first n images (default 32; at least 4). Neither takes eps or norm:

    [[check]]
    id = "fooling"
    kind = "fooling"
    params = { encoding = "direct", generations = 100, population = 100 }
    criterion = "fooled_fraction <= 0.5"

    [[check]]
    id = "scaling"
    kind = "scaling"
    n = 16
    params = { scalers = ["cv2.linear", "cv2.area"], ratio = 4, pairs = 8 }

Threat models drive the headline. A check with `threats = true` also runs at every threat
model of the run (`--threat linf:8/255`, the suite's `threats = [...]`, or the data set's
defaults) in each norm its attack supports: its own `eps` sweep (a curve) gains the threat
radii of its norm, and it gets a twin `ID-NORM` per further norm; `threat_fractions =
[0.25, 0.5, 0.75]` puts it at those fractions of each threat radius instead (a curve that
follows the threat model: 2/255, 4/255, 6/255 under 8/255). A suite-level
`fail_under = "linf:8/255=0.4"` (or a list, or a bare fraction for every threat model) is
its pass criterion on the headline. Radii may be written as fractions (`"8/255"`).

A suite-level `defense = "raw_isp"` runs every check against `RawISP().wrap(model)`;
with `adaptive = true` each gradient attack check also runs with BPDA gradients (a twin
check `ID-bpda`), so the suite's worst case covers both. `defense = "raw_isp:random"`
randomises the ISP per call. A defended run adds the checks that adapt to its defense
(defense_plan.py): `kind = "adaptive"` runs an eps-bounded gradient attack on an attacker's
view, `params = { view = "temperature" | "eot" | "eot-bpda", samples = 20, temperature =
T, … }` (logits / T of a distilled model; expectation over the randomised ISP's draws,
with exact or BPDA gradients); `kind = "transfer"` runs DVERGE's transfer attacks from an
independently trained surrogate (`params = { members, epochs, steps, restarts,
surrogate_seed, baseline_seed }`, L∞ eps).
"""

from __future__ import annotations

import inspect
import math
import operator
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bastion.attacks import (
    APGD,
    APGDT,
    BIM,
    FAB,
    FGSM,
    PGD,
    Attack,
    CarliniWagnerL2,
    FeatureGameMCTS,
    SafeCV,
    Square,
)
from bastion.errors import ConfigError
from bastion.suites.kinds import get_kind, kind_names
from bastion.threats import FailUnder, ThreatModel, parse_eps, parse_fail_under, parse_threats

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_METRICS = (
    "robust_accuracy", "success_rate", "mean_l2", "median_l2", "verified_accuracy",
    "fooled_fraction", "detection_rate",
)  # fmt: skip
DEFENSES = ("raw_isp", "raw_isp:random")
# attacks that follow gradients: the ones an adaptive (BPDA) twin check is worth running for
GRADIENT_ATTACKS = ("FGSM", "PGD", "BIM", "APGD", "APGDT", "FAB", "CarliniWagnerL2")
# attacks that stop a sample stuck at a zero gradient, which assumes a deterministic model
STUCK_STOPPERS = ("APGD", "APGDT")
_CRITERION = re.compile(r"^\s*(\w+)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class AttackSpec:
    """How the harness builds an attack: bounded by eps, or minimum-norm."""

    cls: type[Attack]
    bounded: bool
    norms: tuple[str, ...]

    def build(self, *, eps: float | None, norm: str, params: dict[str, Any], seed: int) -> Attack:
        kwargs = dict(params)
        if self.bounded:
            kwargs.update(eps=eps, norm=norm)
        if "seed" in inspect.signature(self.cls).parameters:
            kwargs.setdefault("seed", seed)
        try:
            return self.cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad parameters for {self.cls.__name__}: {exc}") from None


ATTACKS: dict[str, AttackSpec] = {
    "FGSM": AttackSpec(FGSM, True, ("linf", "l2")),
    "PGD": AttackSpec(PGD, True, ("linf", "l2")),
    "BIM": AttackSpec(BIM, True, ("linf", "l2")),
    "APGD": AttackSpec(APGD, True, ("linf", "l2")),
    "APGDT": AttackSpec(APGDT, True, ("linf", "l2")),
    "FAB": AttackSpec(FAB, True, ("linf", "l2")),
    "Square": AttackSpec(Square, True, ("linf", "l2")),
    "CarliniWagnerL2": AttackSpec(CarliniWagnerL2, False, ("l2",)),
    # black-box minimum-norm searches: robust accuracy is read at L2 radii, like CW's
    "FeatureGameMCTS": AttackSpec(FeatureGameMCTS, False, ("l2",)),
    "SafeCV": AttackSpec(SafeCV, False, ("l2",)),
}
_ALIASES = {
    "fgsm": "FGSM",
    "pgd": "PGD",
    "bim": "BIM",
    "apgd": "APGD",
    "apgd-ce": "APGD",
    "apgdt": "APGDT",
    "apgd-t": "APGDT",
    "square": "Square",
    "fab": "FAB",
    "fab-t": "FAB",
    "cw": "CarliniWagnerL2",
    "cw-l2": "CarliniWagnerL2",
    "carliniwagnerl2": "CarliniWagnerL2",
    "mcts": "FeatureGameMCTS",
    "deepgame": "FeatureGameMCTS",
    "featuregamemcts": "FeatureGameMCTS",
    "safecv": "SafeCV",
}


def attack_name(name: str) -> str:
    """The class name of an attack given by class name or alias (`pgd`, `cw`)."""
    if name in ATTACKS:
        return name
    key = _ALIASES.get(name.lower())
    if key is None:
        raise ConfigError(
            f"unknown attack {name!r}; choose one of "
            f"{', '.join(sorted(ATTACKS))} (aliases: {', '.join(sorted(_ALIASES))})"
        )
    return key


@dataclass(frozen=True)
class Criterion:
    """`metric op value`, read at one eps or (eps=None) required at every eps."""

    metric: str
    op: str
    value: float
    eps: float | None = None

    @classmethod
    def parse(cls, text: str, eps: float | None = None) -> Criterion:
        m = _CRITERION.match(text)
        if not m or m.group(1) not in _METRICS:
            raise ConfigError(
                f"cannot read criterion {text!r}; write 'METRIC OP VALUE' with "
                f"METRIC one of {', '.join(_METRICS)}, e.g. 'robust_accuracy >= 0.4'"
            )
        return cls(m.group(1), m.group(2), float(m.group(3)), eps)

    def __str__(self) -> str:
        at = f" at eps {self.eps:g}" if self.eps is not None else ""
        return f"{self.metric} {self.op} {self.value:g}{at}"

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.value)


@dataclass(frozen=True)
class Check:
    """One attack, its parameters and eps sweep, on the first `n` samples (all if None)."""

    id: str
    attack: str
    eps: tuple[float, ...]
    norm: str = "linf"
    params: dict[str, Any] = field(default_factory=dict)
    n: int | None = None
    cascade: bool = False
    criterion: Criterion | None = None
    kind: str = "attack"
    bpda: bool = False  # attack through the suite's defense with an identity backward pass
    threats: bool = False  # also run at the run's threat models (see `Suite.at_threats`)
    threat_norms: tuple[str, ...] = ()  # only at threat models of these norms (all if empty)
    threat_fractions: tuple[float, ...] = (1.0,)  # at these fractions of each threat radius

    @property
    def spec(self) -> AttackSpec:
        return ATTACKS[self.attack]

    @property
    def bounded(self) -> bool:
        """Run once per eps (eps-bounded attacks and the verifier)."""
        return get_kind(self.kind).bounded(self)

    @property
    def robustness(self) -> bool:
        """Counts towards robust accuracy (attack and verify checks; not fooling, scaling)."""
        return get_kind(self.kind).robustness

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "attack": self.attack,
            "norm": self.norm or None,
            "eps": list(self.eps),
            "params": dict(self.params),
            "n": self.n,
            "cascade": self.cascade,
            "criterion": str(self.criterion) if self.criterion else None,
        }
        if self.bpda:
            out["bpda"] = True
        if self.threats:
            out["threats"] = [*self.threat_norms] or True
        if self.threat_fractions != (1.0,):
            out["threat_fractions"] = list(self.threat_fractions)
        return out

    def at_threats(self, threats: tuple[ThreatModel, ...]) -> list[Check]:
        """This check at the threat models: its own norm with the threat radii (times each of
        its `threat_fractions`) added to its sweep, and a twin `ID-NORM` for each further
        norm its attack supports. A check limited to threat models of some norms
        (`threats = ["linf"]`) without eps of its own drops out of a run with none of them."""
        if not self.threats or not get_kind(self.kind).threat_twins:
            return [self]
        norms = [self.norm, *(n for n in self.spec.norms if n != self.norm)]
        if self.threat_norms:
            norms = [n for n in norms if n == self.norm or n in self.threat_norms]
        out = []
        for norm in norms:
            radii = [f * t.eps for t in threats if t.norm == norm for f in self.threat_fractions]
            eps = (self.eps if norm == self.norm else ()) + tuple(radii)
            if not eps:
                continue
            unique = tuple(sorted({round(e, 12): e for e in eps}.values()))
            ident = self.id if norm == self.norm else f"{self.id}-{norm}"
            out.append(replace(self, id=ident, norm=norm, eps=unique, threats=False))
        if not out and self.threat_norms:  # a check for threat models of another norm
            return []
        if not out:
            have = ", ".join(str(t) for t in threats) or "none"
            raise ConfigError(
                f"check {self.id!r} ({self.attack}, norms {', '.join(self.spec.norms)}) runs at "
                f"none of the threat models ({have}); give it eps or add a --threat in its norm"
            )
        return out


@dataclass(frozen=True)
class Suite:
    name: str
    checks: tuple[Check, ...]
    defense: str | None = None
    adaptive: bool = False
    threats: tuple[ThreatModel, ...] = ()  # the suite file's own threat models, if any
    fail_under: tuple[FailUnder, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "checks": [c.to_dict() for c in self.checks]}
        if self.defense is not None:
            out.update(defense=self.defense, adaptive=self.adaptive)
        if self.threats:
            out["threats"] = [str(t) for t in self.threats]
        if self.fail_under:
            out["fail_under"] = [str(f) for f in self.fail_under]
        return out

    def at_threats(self, threats: tuple[ThreatModel, ...]) -> Suite:
        """The suite with every `threats = true` check expanded at `threats` (see Check)."""
        checks = tuple(e for c in self.checks for e in c.at_threats(threats))
        ids = [c.id for c in checks]
        clash = sorted({i for i in ids if ids.count(i) > 1})
        if clash:
            raise ConfigError(
                f"suite {self.name!r}: check id(s) {', '.join(clash)} clash with a threat-model "
                "twin (ID-NORM); rename the check"
            )
        for c in checks:
            validate_check(c)
        return replace(self, checks=checks)

    def norms(self) -> set[str]:
        """The norms the suite's robustness checks attack in."""
        return {c.norm for c in self.checks if c.robustness}

    def with_defense(self, defense: str | None, adaptive: bool = False) -> Suite:
        """The suite run behind `defense`; `adaptive` adds a BPDA twin (`ID-bpda`) after each
        gradient attack check, so the worst case covers exact and BPDA gradients."""
        if defense is not None and defense not in DEFENSES:
            raise ConfigError(f"unknown defense {defense!r}; use one of {', '.join(DEFENSES)}")
        if defense is None and adaptive:
            raise ConfigError('adaptive evaluation needs a defense; set defense = "raw_isp"')
        if defense is not None and not all(get_kind(c.kind).sees_defense for c in self.checks):
            raise ConfigError(
                "verify checks cannot see through a preprocessing defense; "
                "drop the defense or the verify checks"
            )
        checks: list[Check] = []
        for c in (c for c in self.checks if not c.bpda):  # twins are rebuilt, never doubled
            if defense == "raw_isp:random" and c.attack in STUCK_STOPPERS:
                # a zero gradient at one draw says nothing of the next (see attacks/apgd.py)
                c = replace(c, params={"stop_when_stuck": False, **c.params})
            checks.append(c)
            if adaptive and c.attack in GRADIENT_ATTACKS:
                checks.append(replace(c, id=f"{c.id}-bpda", bpda=True))
        return replace(self, checks=tuple(checks), defense=defense, adaptive=adaptive)

    def with_eps(self, eps: tuple[float, ...]) -> Suite:
        """The suite with the eps sweep of its L∞ eps-bounded checks replaced (a sweep
        below the threat radii, `threat_fractions`, included: the threat radii stay)."""
        checks = tuple(
            replace(c, eps=eps, threat_fractions=(1.0,)) if c.bounded and c.norm == "linf" else c
            for c in self.checks
        )
        for c in checks:
            validate_check(c)
        return replace(self, checks=checks)


def validate_check(check: Check) -> None:
    """Refuse a check that cannot run (ConfigError, one sentence), before any work."""
    if check.kind not in kind_names():
        raise ConfigError(
            f"check {check.id!r}: unknown kind {check.kind!r}; use one of {', '.join(kind_names())}"
        )
    kind = get_kind(check.kind)
    if check.criterion is not None and check.criterion.metric not in kind.metrics:
        raise ConfigError(
            f"check {check.id!r}: a {check.kind} check's criterion reads one of "
            f"{', '.join(kind.metrics)}, not {check.criterion.metric}"
        )
    kind.validate(check)


def check_eps(check: Check) -> None:
    """The eps sweep, n and criterion_eps of a check that runs at radii."""
    if not check.eps and not check.threats:
        raise ConfigError(
            f"check {check.id!r} needs at least one eps, or threats = true to run at the "
            "run's threat models"
        )
    for e in check.eps:
        if not (0 <= e < float("inf")) or (check.norm == "linf" and e > 1):
            raise ConfigError(
                f"check {check.id!r}: eps {e} is out of range; L∞ eps lie in "
                "[0, 1] on the [0, 1] pixel scale, L2 eps are >= 0"
            )
    if check.n is not None and check.n < 1:
        raise ConfigError(f"check {check.id!r}: n must be >= 1")
    if (
        check.criterion is not None
        and check.criterion.eps is not None
        and check.criterion.eps not in check.eps
    ):
        raise ConfigError(
            f"check {check.id!r}: criterion_eps {check.criterion.eps} is not in its eps list"
        )


def check_criterion(check: Check, results: list[Any]) -> bool | None:
    """Whether the check's criterion holds on its per-eps `results` (JSON rows): at its
    criterion_eps, or at every eps; None without a criterion."""
    crit = check.criterion
    if crit is None:
        return None
    rows = [r for r in results if crit.eps is None or math.isclose(r["eps"], crit.eps)]
    return all(crit.holds(r.get(crit.metric)) for r in rows)


def validate_generative(check: Check, min_n: int) -> None:
    """Fooling and scaling checks: no eps, norm or cascade; n of at least `min_n`."""
    if check.eps or check.norm or check.cascade or check.bpda:
        raise ConfigError(
            f"check {check.id!r}: a {check.kind} check takes no eps, norm or cascade; remove them"
        )
    if check.criterion is not None and check.criterion.eps is not None:
        raise ConfigError(f"check {check.id!r}: a {check.kind} check takes no criterion_eps")
    if check.n is not None and check.n < min_n:
        raise ConfigError(f"check {check.id!r}: a {check.kind} check needs n >= {min_n}")


def unknown_params(check: Check, allowed: tuple[str, ...]) -> None:
    """Refuse parameters of a check that its kind does not take."""
    unknown = set(check.params) - set(allowed)
    if unknown:
        raise ConfigError(
            f"check {check.id!r}: unknown {check.kind} parameter(s) "
            f"{', '.join(sorted(unknown))}; allowed: {', '.join(allowed)}"
        )


def _check_from_dict(raw: dict[str, Any], where: str) -> Check:
    known = {
        "id", "kind", "attack", "eps", "norm", "params", "n", "cascade", "criterion",
        "criterion_eps", "threats", "threat_fractions",
    }  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(known))}"
        )
    kind = str(raw.get("kind", "attack"))
    if kind not in kind_names():
        raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {', '.join(kind_names())}")
    attack = get_kind(kind).attack_name(raw, where)
    eps = raw.get("eps", [])
    eps = tuple(parse_eps(e) for e in (eps if isinstance(eps, list) else [eps]))
    crit = raw.get("criterion")
    crit_eps = raw.get("criterion_eps")
    criterion = (
        Criterion.parse(crit, None if crit_eps is None else parse_eps(crit_eps)) if crit else None
    )
    check = Check(
        id=str(raw.get("id", attack.lower())),
        attack=attack,
        eps=eps,
        norm=str(raw.get("norm", get_kind(kind).default_norm(attack))),
        params=dict(raw.get("params", {})),
        n=raw.get("n"),
        cascade=bool(raw.get("cascade", False)),
        criterion=criterion,
        kind=kind,
        threats=bool(raw.get("threats", False)),
        threat_norms=_threat_norms(raw.get("threats", False), where),
        threat_fractions=_threat_fractions(raw, where),
    )
    validate_check(check)
    return check


def _threat_norms(value: Any, where: str) -> tuple[str, ...]:
    """`threats = true` (every norm the attack supports) or a list of norms."""
    if isinstance(value, bool):
        return ()
    norms = value if isinstance(value, list) else [value]
    if not norms or any(n not in ("linf", "l2") for n in norms):
        raise ConfigError(f"{where}: threats is true or a list of norms (linf, l2), got {value!r}")
    return tuple(str(n) for n in norms)


def _threat_fractions(raw: dict[str, Any], where: str) -> tuple[float, ...]:
    """`threat_fractions = [0.25, 0.5, 1]`: radii as fractions of each threat radius (a curve
    up to the threat model), only with `threats`; (1.0,), the threat radius, by default."""
    if "threat_fractions" not in raw:
        return (1.0,)
    value = raw["threat_fractions"]
    fractions = value if isinstance(value, list) else [value]
    try:
        out = tuple(parse_eps(f) for f in fractions)
    except ConfigError:
        out = ()
    if not raw.get("threats") or not out or any(not 0 < f <= 1 for f in out):
        raise ConfigError(
            f"{where}: threat_fractions is a list of fractions in (0, 1] of each threat radius "
            f"(e.g. [0.25, 0.5, 1]) and needs threats = true; got {value!r}"
        )
    return out


def suite_from_dict(raw: dict[str, Any], name: str) -> Suite:
    checks = raw.get("check")
    if not isinstance(checks, list) or not checks:
        raise ConfigError(f"suite {name!r} has no [[check]] tables; add at least one")
    built = tuple(
        _check_from_dict(c, f"suite {name!r} check {i + 1}") for i, c in enumerate(checks)
    )
    ids = [c.id for c in built]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"suite {name!r} repeats a check id; give each check its own 'id'")
    threats = raw.get("threats", [])
    fail_under = raw.get("fail_under", [])
    suite = Suite(
        name=str(raw.get("name", name)),
        checks=built,
        threats=parse_threats(
            [str(t) for t in (threats if isinstance(threats, list) else [threats])]
        ),
        fail_under=tuple(
            parse_fail_under(str(f))
            for f in (fail_under if isinstance(fail_under, list) else [fail_under])
        ),
    )
    defense = raw.get("defense")
    if defense is None and not raw.get("adaptive", False):
        return suite
    return suite.with_defense(None if defense is None else str(defense), bool(raw.get("adaptive")))


def one_check_suite(
    attack: str,
    eps: tuple[float, ...] = (),
    *,
    norm: str | None = None,
    params: dict[str, Any] | None = None,
    name: str | None = None,
) -> Suite:
    """A suite of one attack check (`bastion attack`, `bastion.assert_robust`): `attack`
    (a class name or alias) at `eps`, or at the run's threat models when `eps` is empty
    (of `norm` only, when given); `norm` defaults to the attack's first."""
    cls = attack_name(attack)
    chosen = norm or ATTACKS[cls].norms[0]
    check = Check(
        id=attack.lower(),
        attack=cls,
        eps=tuple(float(e) for e in eps),
        norm=chosen,
        params=dict(params or {}),
        threats=not eps,
        threat_norms=(chosen,) if norm else (),
    )
    validate_check(check)
    return Suite(name or f"attack-{check.id}", (check,))


BUILTIN_DIR = Path(__file__).parent
BUILTIN = ("quick", "standard", "autoattack", "blackbox")


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite (`quick`, `standard`, `autoattack`, `blackbox`) or a suite TOML file."""
    if name_or_path in BUILTIN:
        path = BUILTIN_DIR / f"{name_or_path}.toml"
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix != ".toml" or not path.is_file():
            raise ConfigError(
                f"unknown suite {name_or_path!r}; use one of "
                f"{', '.join(BUILTIN)} or the path of a suite .toml file"
            )
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read suite file {path}: {exc}") from None
    return suite_from_dict(raw, path.stem)
