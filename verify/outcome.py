"""The one outcome type of the verifier: verdict statuses and an engine's per-disjunct answer.

`Status` is what `verify` (and DLV) answers for a whole property: SAFE (proved), UNSAFE
(a counterexample the model itself confirms) or UNKNOWN. `Answer` is what one engine says
about one disjunct of the unsafe set: UNSAT (no input of the box reaches it), SAT (a
candidate witness, still to be replayed on the model) or UNKNOWN. Both are `StrEnum`s, so
they compare equal to their words and print as them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

__all__ = ["Answer", "Outcome", "Status"]


class Status(StrEnum):
    """A verdict: SAFE, UNSAFE or UNKNOWN (VNN-COMP words: unsat, sat, unknown)."""

    SAFE = "SAFE"
    UNSAFE = "UNSAFE"
    UNKNOWN = "UNKNOWN"

    @property
    def vnncomp(self) -> str:
        """The word VNN-COMP prints: unsat (holds), sat (violated) or unknown."""
        return {Status.SAFE: "unsat", Status.UNSAFE: "sat"}.get(self, "unknown")


class Answer(StrEnum):
    """One engine's answer for one disjunct: unsat, sat (with a witness) or unknown."""

    UNSAT = "unsat"
    SAT = "sat"
    UNKNOWN = "unknown"


@dataclass
class Outcome:
    """What an engine (z3, MILP, branch and bound, a DLV query) found for one disjunct.

    `witness` (SAT only) is the input as float64, not yet replayed on the model; `reason`
    says why UNKNOWN; `domains` counts branch-and-bound sub-problems.
    """

    status: Answer
    witness: np.ndarray | None = None
    seconds: float = 0.0
    reason: str = ""
    domains: int = 0

    def __post_init__(self) -> None:
        self.status = Answer(self.status)
