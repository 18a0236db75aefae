"""The verifier's answer: SAFE (proved), UNSAFE (a replayed counterexample) or UNKNOWN."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bastion.verify.outcome import Status

SAFE, UNSAFE, UNKNOWN = Status.SAFE, Status.UNSAFE, Status.UNKNOWN

EXACTNESS = (
    "proved for the network as given over the whole input box: weights read as the exact "
    "rationals their floats denote, real arithmetic, every float step of the proof covered "
    "by a proven error bound; float32 rounding inside the model's own evaluation is not "
    "modelled"
)

_HOW = {
    "bounds": "by CROWN/interval bounds with rigorous outward rounding",
    "alpha-crown": "by alpha-CROWN (linear bounds with optimised ReLU slopes, each bound "
    "re-evaluated through the sound linear relaxation with rigorous outward rounding)",
    "beta-crown": "by beta-CROWN branch and bound (ReLU splits enforced in each "
    "subdomain's bound through optimised Lagrange multipliers, or input-box splits for few "
    "free inputs; every closed subdomain bounded through the sound linear relaxation with "
    "rigorous outward rounding)",
    "z3": "by z3 over the rationals (with rigorous bounds fixing stable ReLUs)",
    "milp": "by the HiGHS MILP, its bound clearing zero by twice its tolerance scaled to "
    "the problem's magnitudes (a floating-point solver: not an exact certificate)",
}


def guarantee_text(engine: str) -> str:
    """What a SAFE from `engine` ("bounds", "alpha-crown", "beta-crown", "z3", "milp",
    "beta-crown+z3", …) proves, in words."""
    parts = [_HOW.get(e, e) for e in engine.split("+")]
    return f"SAFE {' and '.join(parts)}: {EXACTNESS}"


@dataclass
class Verdict:
    """What `verify` found.

    `counterexample` (UNSAFE only) is an input in the region that the float32 model itself
    maps into the unsafe set; `margin` is by how much (for robustness: the best other
    logit minus the true class's). `layers` holds the per-layer bound statistics, `engine`
    what decided (bounds, pgd, z3, milp, dlv), `reason` why UNKNOWN, `guarantee` what SAFE
    means here.
    """

    status: Status
    engine: str
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    counterexample: torch.Tensor | None = None
    output: torch.Tensor | None = None
    margin: float | None = None
    reason: str = ""
    guarantee: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        if not self.engine:
            raise ValueError("a verdict names the engine that decided it (or 'none')")

    @property
    def vnncomp(self) -> str:
        """The word VNN-COMP prints: unsat (holds), sat (violated) or unknown."""
        return self.status.vnncomp

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors as nested lists."""
        out: dict[str, Any] = {
            "status": str(self.status),
            "engine": self.engine,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
            "guarantee": self.guarantee,
            "margin": self.margin,
            "layers": self.layers,
            **self.details,
        }
        if self.counterexample is not None:
            out["counterexample"] = self.counterexample.tolist()
        if self.output is not None:
            out["output"] = self.output.tolist()
        return out

    def summary(self) -> str:
        """One line: the verdict first, then engine, time and the figure that matters."""
        parts = [self.status, f"engine={self.engine}", f"time={self.seconds:.2f}s"]
        if self.margin is not None:
            parts.append(f"margin={self.margin:.4g}")
        unstable = sum(int(s.get("unstable", 0)) for s in self.layers)
        if self.layers:
            parts.append(f"unstable={unstable}")
        if self.reason:
            parts.append(f"reason={self.reason!r}")
        return " ".join(parts)
