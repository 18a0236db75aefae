"""What is verified: an input box and the unsafe set of outputs (VNN-LIB's shape).

The unsafe set is a disjunction of conjunctions of linear constraints on the outputs y:
`∨_i (A_i y ≤ b_i)`, as VNN-LIB 1.0 writes it. The property holds (SAFE) when no input in
the box reaches any disjunct. Local robustness of class c is the disjunction over j ≠ c of
`y_c − y_j ≤ 0`: the non-strict form, so a tie counts as a violation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.errors import InvalidInputError


@dataclass(frozen=True, eq=False)
class Halfspaces:
    """A conjunction `A y ≤ b`; A (m, K), b (m,) in float64.

    Proofs use b. `inner` (m,), where given, is b for witnesses: a file's decimal bound
    rounded *down* where b holds it rounded up, so `A y < inner` puts y inside the file's
    set while `A y ≤ b` contains it (see `vnnlib.py`).
    """

    a: torch.Tensor
    b: torch.Tensor
    inner: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Property:
    """Inputs in [lower, upper] (the network's input shape, float64) must avoid `unsafe`.

    `open_lower`/`open_upper` (bool masks, optional) mark faces that belong to [lower,
    upper] but not to the box the property was written for (a strict `<` in a VNN-LIB
    file). Proofs cover the closed box; a witness on an open face is not inside
    (`contains`).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    unsafe: tuple[Halfspaces, ...]
    open_lower: torch.Tensor | None = None
    open_upper: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise InvalidInputError(
                f"input box bounds differ in shape: {tuple(self.lower.shape)} vs "
                f"{tuple(self.upper.shape)}; give lower and upper for every input"
            )
        if not bool((self.lower <= self.upper).all()):
            raise InvalidInputError("input box is empty (a lower bound exceeds its upper bound)")
        if not self.unsafe:
            raise InvalidInputError("the property has no unsafe set; nothing to verify")

    @property
    def free(self) -> torch.Tensor:
        """Mask of the inputs that may move (lower < upper)."""
        return self.lower < self.upper

    def contains(self, x: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
        """Per sample of a batch `N × input_shape`: is it inside the box (within tol)?
        Without a tolerance, a point on an open face is not."""
        lo, hi = self.lower.to(x), self.upper.to(x)
        inside = (x >= lo - tol) & (x <= hi + tol)
        if tol == 0 and self.open_lower is not None:
            inside &= ~(self.open_lower.to(x.device) & (x == lo))
        if tol == 0 and self.open_upper is not None:
            inside &= ~(self.open_upper.to(x.device) & (x == hi))
        return inside.flatten(1).all(1)

    def violation(self, y: torch.Tensor) -> torch.Tensor:
        """Per sample of outputs `N × K`: max over disjuncts of min over rows of b − A y
        (`inner` for b where a disjunct has it: the depth inside the set as written).

        ≥ 0 means y is in the unsafe set (the property is violated); the value is the margin
        by which the closest disjunct holds. A witness needs > 0.
        """
        y = y.to(torch.float64)
        per_disjunct = [
            ((h.b if h.inner is None else h.inner) - y @ h.a.T).min(1).values for h in self.unsafe
        ]
        return torch.stack(per_disjunct, 1).max(1).values


def robustness_property(
    x: torch.Tensor,
    label: int,
    num_classes: int,
    *,
    eps: float,
    bounds: tuple[float, float] = (0.0, 1.0),
    mask: torch.Tensor | None = None,
) -> Property:
    """Local robustness of `label` in the L∞ ball of radius eps around one image x.

    The box is clipped to `bounds`; where `mask` is given only the masked pixels move.
    """
    if not 0 <= label < num_classes:
        raise InvalidInputError(f"label {label} is not a class of a {num_classes}-class model")
    if not eps >= 0:
        raise InvalidInputError(f"eps must be a non-negative number, got {eps}")
    x = x.detach().to(torch.float64).cpu()
    lower = (x - eps).clamp(*bounds)
    upper = (x + eps).clamp(*bounds)
    if mask is not None:
        keep = ~mask.to(torch.bool).expand_as(x)
        lower = torch.where(keep, x, lower)
        upper = torch.where(keep, x, upper)
    return Property(lower, upper, class_unsafe_set(label, num_classes))


def class_unsafe_set(label: int, num_classes: int) -> tuple[Halfspaces, ...]:
    """∨_{j≠label} y_label − y_j ≤ 0: some other class scores at least as high."""
    out = []
    for j in range(num_classes):
        if j == label:
            continue
        a = torch.zeros(1, num_classes, dtype=torch.float64)
        a[0, label], a[0, j] = 1.0, -1.0
        out.append(Halfspaces(a, torch.zeros(1, dtype=torch.float64)))
    return tuple(out)
