"""The report model: typed dataclasses of everything report.json holds.

One model, several writers: the runner builds a `ReportData`; report.json is its
`to_json()`, and the terminal, HTML, JUnit and pytest-session writers read its fields (none
re-derives a number). `ReportData.from_json` reads a report.json back (the check cache, the
session report). The key names are report.json's since before the model existed;
`schema_version` says which layout a file has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bastion.errors import ConfigError
from bastion.suites.json_codec import JsonObject, JsonValue, decode, encode, field

SCHEMA_VERSION = 2  # 1: the untyped report before the model (no schema_version key)


@dataclass
class AttackResult:
    """One eps of an attack check: robust accuracy over its n samples and the sizes of
    the perturbations that broke them (eps-bounded attacks add time and passes)."""

    eps: float
    robust_accuracy: float
    success_rate: float | None
    attacked: int
    mean_l2: float | None
    median_l2: float | None
    mean_linf: float | None
    seconds: float | None
    forward: int | None
    backward: int | None


@dataclass
class VerifyResult:
    """One eps of a verify check: verified accuracy (SAFE over n), robust accuracy as an
    upper bound (not UNSAFE), counts of UNSAFE / UNKNOWN / misclassified images."""

    eps: float
    verified_accuracy: float
    robust_accuracy: float
    unsafe: int
    unknown: int
    misclassified: int
    verified: int


@dataclass
class MinimumNorm:
    """A minimum-norm attack's own figures over every sample it attacked."""

    attacked: int
    success_rate: float | None
    mean_l2: float | None
    median_l2: float | None


@dataclass
class Interval:
    """One image's robustness interval: proved SAFE up to, adversarial at (L∞)."""

    index: int
    label: int
    safe_up_to: float | None
    adversarial_at: float | None
    seconds: float
    layers: list[JsonObject]  # the verifier's per-layer bound statistics


@dataclass
class FoolingClass:
    """One class's evolved fooling image: the model's confidence and label."""

    klass: int = field(key="class")
    name: str = field()
    confidence: float = field()
    predicted: int = field()
    generation: int = field()
    first_generation: int | None = field(key="first_generation_0.99", default=None)


@dataclass
class FoolingSummary:
    """A fooling check: the fraction of classes fooled at 0.99 (and 0.9999) confidence."""

    fooled_fraction: float | None = field()
    fooled_fraction_strict: float | None = field(key="fooled_fraction_0.9999")
    median_confidence: float | None = field()
    generations: int | None = field()
    queries: int | None = field()
    classes: list[FoolingClass] = field()


@dataclass
class ScalingRow:
    """A scaling check's audit of one resizer."""

    scaler: str
    input_size: list[int]
    source_size: list[int]
    pairs: int
    attack_success_rate: float | None
    psnr_source: float | None
    ssim_source: float | None
    psnr_target: float | None
    success_after_median: float | None
    median_benign_agreement: float | None
    detection_rate: float | None
    false_positive_rate: float | None
    vulnerable: bool
    advice: str


@dataclass
class TransferRow:
    """One eps of a transfer check: robust accuracy of the model under attack and of an
    independently trained baseline (undefended) ensemble, on examples crafted on a third,
    surrogate model; overall ("all": a sample survives every attack) and per attack."""

    eps: float
    robust_accuracy: float
    baseline_robust_accuracy: float | None
    attacks: dict[str, float]
    baseline_attacks: dict[str, float]


@dataclass
class CheckEntry:
    """One check of the suite as run: its definition, per-eps results and kind's parts."""

    id: str = field()
    kind: str = field()
    attack: str = field()
    norm: str | None = field()
    eps: list[float] = field()
    params: JsonObject = field()
    n: int | None = field()
    cascade: bool = field()
    criterion: str | None = field()
    bpda: bool = field(omit=True, default=False)
    threats: list[str] | bool | None = field(omit=True, default=None)
    results: list[AttackResult | VerifyResult] = field(default=[])
    minimum_norm: MinimumNorm | None = field(omit=True, default=None)
    intervals: list[Interval] | None = field(omit=True, default=None)
    fooling: FoolingSummary | None = field(omit=True, default=None)
    scaling: list[ScalingRow] | None = field(omit=True, default=None)
    transfer: list[TransferRow] | None = field(omit=True, default=None)
    vulnerable: bool | None = field(omit=True, default=None)
    seconds: float = field(default=0.0)
    forward: int = field(default=0)
    backward: int = field(default=0)
    passed: bool | None = field(default=None)

    @property
    def robustness(self) -> bool:
        """Whether the check's kind counts towards robust accuracy."""
        from bastion.suites.kinds import get_kind

        return get_kind(self.kind).robustness

    def result_at(self, eps: float) -> AttackResult | VerifyResult | None:
        """The result row at radius `eps` (relative tolerance 1e-6), if evaluated."""
        from math import isclose

        return next((r for r in self.results if isclose(r.eps, eps, rel_tol=1e-6)), None)


@dataclass
class ThreatAttack:
    """One check's own robust accuracy at a threat model."""

    attack: str
    robust_accuracy: float | None
    n: int | None


@dataclass
class ThreatEntry:
    """The headline at one threat model: worst case per sample over every check."""

    threat: str
    norm: str
    eps: float
    robust_accuracy: float
    n: int
    attacks: dict[str, ThreatAttack]
    fail_under: float | None
    passed: bool | None


@dataclass
class NormPoint:
    """Worst-case robust accuracy over the checks of one norm at one eps."""

    eps: float
    n: int
    robust_accuracy: float


@dataclass
class Flag:
    """A sign that the run's numbers cannot be trusted as they stand."""

    name: str
    severity: str
    message: str


@dataclass
class Environment:
    python: str
    torch: str
    bastion: str
    platform: str
    device: str
    threads: int
    cpu_count: int | None
    cuda: str | None


@dataclass
class DataInfo:
    spec: str
    split: str | None
    n: int
    classes: list[str]
    shape: list[int]


@dataclass
class Normalization:
    mean: list[float]
    std: list[float]


@dataclass
class Timings:
    total_seconds: float
    clean_seconds: float
    attack_seconds: float


@dataclass
class Passes:
    forward: int
    backward: int


@dataclass
class GalleryRef:
    """A gallery image as report.json records it (the pixels live in the HTML only)."""

    check: str
    attack: str
    eps: float
    index: int
    label: str
    clean_pred: str
    clean_conf: float
    adv_pred: str
    adv_conf: float
    l2: float
    linf: float


@dataclass
class EpsAccuracy:
    eps: float
    robust_accuracy: float


@dataclass
class ThreatAccuracy:
    threat: str
    robust_accuracy: float
    n: int


@dataclass
class Undefended:
    """The same suite on the model without its defense: the "before" column."""

    clean_accuracy: float
    robust_accuracy: float
    threat_models: list[ThreatAccuracy]
    checks: dict[str, list[EpsAccuracy]]

    @classmethod
    def of(cls, report: ReportData) -> Undefended:
        return cls(
            clean_accuracy=report.clean_accuracy,
            robust_accuracy=report.robust_accuracy,
            threat_models=[
                ThreatAccuracy(t.threat, t.robust_accuracy, t.n) for t in report.threat_models
            ],
            checks={
                c.id: [EpsAccuracy(r.eps, r.robust_accuracy) for r in c.results]
                for c in report.checks
            },
        )

    def robust_at(self, check: str, eps: float) -> float | None:
        return next((b.robust_accuracy for b in self.checks.get(check, []) if b.eps == eps), None)


@dataclass
class DefenseRow:
    """One threat model of a defended run: robust accuracy without the defense, with it
    against the attacks it was designed for, and against attacks adapted to it."""

    threat: str
    n: int
    undefended: float | None
    defended: float | None
    adaptive: float | None


@dataclass
class DefenseComparison:
    """The defense table: undefended | defended (non-adaptive) | adaptive per threat model,
    and how each column was measured (check ids, a sentence)."""

    defense: str
    undefended_by: str | None
    defended_by: list[str]
    adaptive_by: list[str]
    note: str
    rows: list[DefenseRow]


@dataclass
class ReportData:
    """Everything report.json holds, typed (see the module docstring)."""

    bastion_version: str = field()
    created: str = field()
    environment: Environment = field()
    model: JsonObject = field()  # sha256, source, format, defense, … as the caller gave them
    data: DataInfo = field()
    suite: JsonObject = field()  # the suite as run (`Suite.to_dict`)
    seed: int = field()
    normalization: Normalization | None = field()
    clean_accuracy: float = field()
    threat_models: list[ThreatEntry] = field()
    robust_accuracy: float = field()
    robust_accuracy_n: int = field()
    robust_accuracy_by_norm: dict[str, list[NormPoint]] = field()
    checks: list[CheckEntry] = field()
    flags: list[Flag] = field()
    sanity: dict[str, int | float] = field()
    timings: Timings = field()
    passes: Passes = field()
    passed: bool | None = field()
    gallery: list[GalleryRef] = field(default=[])
    fail_under: list[str] | None = field(omit=True, default=None)
    undefended: Undefended | None = field(omit=True, default=None)
    # added in schema 2 without a version change (optional; absent in undefended runs)
    defense: DefenseComparison | None = field(omit=True, default=None)
    profile: str | None = field(omit=True, default=None)  # the pytest check's profile
    schema_version: int = field(default=SCHEMA_VERSION)

    @property
    def suite_name(self) -> str:
        return str(self.suite.get("name", "?"))

    def check(self, check_id: str) -> CheckEntry | None:
        return next((c for c in self.checks if c.id == check_id), None)

    def to_dict(self) -> JsonObject:
        out = encode(self)
        assert isinstance(out, dict)
        return out

    def to_json(self) -> str:
        """report.json's text (strict JSON: no NaN or infinity)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, raw: JsonValue) -> ReportData:
        if not isinstance(raw, dict):
            raise ConfigError("a report.json holds one JSON object; the file is damaged")
        version = raw.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"report schema version {version} is not {SCHEMA_VERSION}; re-run the suite "
                "with this Bastion version"
            )
        return decode(cls, raw)

    @classmethod
    def from_json(cls, text: str) -> ReportData:
        """A report.json read back into the model."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"a report.json is not JSON ({exc}); the file is damaged") from None
        return cls.from_dict(raw)


# keys whose values change from run to run (wall clock, the machine); any "*_seconds" too
VOLATILE_KEYS = frozenset({"created", "environment", "timings", "seconds", "time", "load_seconds"})


def without_timings(value: JsonValue) -> JsonValue:
    """A report.json value (at any depth) without its volatile keys, so that two runs of the
    same seed compare equal number for number."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if k not in VOLATILE_KEYS and not k.endswith("_seconds")
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value
