"""What DLV answers: a verdict whose SAFE is the discretised guarantee, in its own words.

`DlvVerdict` is a `Verdict` whose `claim` (printed first by `summary` and by `bastion
verify`) is `SAFE (DLV, discretised region)` rather than the bare SAFE of an exact proof;
`guarantee` says what that SAFE covers, depending on the layer that carries it; `LayerStats`
are the per-layer statistics of the search (`verdict.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bastion.verify.verdict import SAFE, Verdict

__all__ = ["DISCRETISED_SAFE", "DlvVerdict", "LayerStats", "guarantee"]

DISCRETISED_SAFE = "SAFE (DLV, discretised region)"
_WHICH = {
    "line": "every point of",
    "convex": "the 2^d corners (c_p = ±numSpan) of",
    "point": "the single point c_p = −numSpan of",
}


@dataclass
class DlvVerdict(Verdict):
    """A DLV verdict: its SAFE is the discretised guarantee, named `claim` and printed
    first by `summary`, never as the bare SAFE of an exact proof."""

    @property
    def claim(self) -> str:
        """`SAFE (DLV, discretised region)`, or UNSAFE / UNKNOWN."""
        return DISCRETISED_SAFE if self.status == SAFE else str(self.status)

    def as_dict(self) -> dict[str, Any]:
        """`Verdict.as_dict` with the claim beside the status."""
        return {**super().as_dict(), "claim": self.claim}

    def summary(self) -> str:
        """One line: the claim first, then engine, time, margin, z3 queries and layers."""
        parts = [self.claim, f"engine={self.engine}", f"time={self.seconds:.2f}s"]
        if self.margin is not None:
            parts.append(f"margin={self.margin:.4g}")
        parts.append(f"z3_queries={self.details.get('z3_queries', 0)}")
        parts.append(f"layers={self.details.get('analysed_layers', [])}".replace(" ", ""))
        if self.reason:
            parts.append(f"reason={self.reason!r}")
        return " ".join(parts)


def guarantee(enumeration: str, layer: int, analysed: list[int] | None = None) -> str:
    """What a SAFE from DLV mode proves, in words, when `layer` carries it."""
    if layer == 0:
        text = (
            f"{DISCRETISED_SAFE}: {_WHICH[enumeration]} each examined feature's input grid "
            "{x + Σ c_p·span·e_p : |c_p| ≤ numSpan} ∩ [0,1] (other pixels fixed) keeps the "
            "class; minimality (no class change between neighbouring grid points) is "
            "assumed, not checked; nothing is proved for the continuous region"
        )
        hidden = [k for k in analysed or [] if k > 0]
        if hidden:
            names = ", ".join(map(str, hidden))
            which = f"layer {names} was" if len(hidden) == 1 else f"layers {names} were"
            verb = "does" if len(hidden) == 1 else "do"
            text += (
                f"; {which} searched for counterexamples but {verb} not carry the guarantee "
                "(see the per-layer statistics)"
            )
        return text
    return (
        f"{DISCRETISED_SAFE}: for each examined feature, sound bounds show that the region "
        f"of each analysed layer up to {layer} contains the image of the region below it "
        f"(down to the feature's input box), {_WHICH[enumeration]} the layer-{layer} grid "
        f"{{α_{layer} + Σ c_p·s_p·e_p : |c_p| ≤ numSpan}} keeps the class (evaluated in "
        "float64) and its points were mapped back to inputs with z3; under DLV's minimality "
        f"assumption at layer {layer} (not checked) this covers the feature's continuous "
        "input box; nothing is proved without it"
    )


@dataclass
class LayerStats:
    """What the search did at one analysed layer: features searched in full, grid points
    classified, features whose region contains the image of the region below (hidden
    layers), the most neurons the image moves, grid points that change the class, z3
    queries, back-propagation outcomes by status, seconds."""

    index: int
    kind: str
    neurons: int
    features: int = 0
    points: int = 0
    contained: int = 0
    moving: int = 0
    flips: int = 0
    spurious: int = 0
    unresolved: int = 0
    z3_queries: int = 0
    backprop: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def carries(self, features: int) -> bool:
        """Whether this hidden layer carries the discretised guarantee (see the module)."""
        return (
            self.contained == self.features == features
            and self.flips == 0
            and (self.z3_queries > 0)
        )

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__, seconds=round(self.seconds, 4))
        what = (
            "input grid"
            if self.index == 0
            else f"{self.kind} output, regions containing the image {self.contained}/"
            f"{self.features}, up to {self.moving} neurons move, z3 queries {self.z3_queries}"
        )
        out["text"] = (
            f"layer {self.index} ({what}): {self.features} features, {self.points} grid "
            f"points, {self.flips} change the class"
        )
        return out
