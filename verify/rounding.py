"""Rigorous error bounds for the float64 arithmetic of the bound computations.

Every bound the verifier computes is a float64 sum of products. With unit roundoff
u = 2⁻⁵³, any float64 evaluation of Σᵢ aᵢbᵢ (any order of summation, with or without
fused multiply-adds) differs from the exact sum by at most γₙ·Σ|aᵢ||bᵢ|, γₙ = n·u/(1 − n·u)
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1; underflow adds at most
n·2⁻¹⁰⁷⁴, covered by `TINY`). The error term grows with the magnitudes summed, never with
the result, so cancellation cannot defeat it. The error terms themselves are float sums of
non-negative numbers; `slack` doubles γ to cover their own rounding, and `down`/`up` step
one float outward after the last operation, which covers a round-to-nearest result.
"""

from __future__ import annotations

import torch

U = 2.0**-53
TINY = 2.0**-960  # far above n·2⁻¹⁰⁷⁴ (underflow) for any n a network can have


def gamma(n: int) -> float:
    """γₙ = n·u / (1 − n·u): the relative error bound of an n-term float64 dot product."""
    nu = (n + 2) * U
    if nu >= 0.01:
        raise ValueError(f"{n} terms is beyond the float64 error analysis used here")
    return nu / (1 - nu)


def slack(n: int, magnitude: torch.Tensor) -> torch.Tensor:
    """An upper bound of the float64 error of n-term sums whose Σ|terms| is `magnitude`."""
    return 2 * gamma(n) * magnitude + TINY


def down(x: torch.Tensor) -> torch.Tensor:
    """The next float below x: a lower bound of the exact value x was rounded from."""
    return torch.nextafter(x, torch.full_like(x, float("-inf")))


def up(x: torch.Tensor) -> torch.Tensor:
    """The next float above x: an upper bound of the exact value x was rounded from."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def magnitude(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max(|lo|, |hi|): a bound of |x| for x in [lo, hi]."""
    return torch.maximum(lo.abs(), hi.abs())


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s = fl(a + b) and the exact error e: a + b = s + e (Knuth's TwoSum)."""
    s = a + b
    bp = s - a
    ap = s - bp
    return s, (a - ap) + (b - bp)


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = fl(a·b) and the error e: a·b = p + e exactly (Dekker's TwoProduct with
    Veltkamp's split), barring underflow: where |p| < 2⁻⁹⁶⁰ e also carries `TINY`."""

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = 134217729.0 * x  # 2²⁷ + 1
        high = c - (c - x)
        return high, x - high

    p = a * b
    ah, al = split(a)
    bh, bl = split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    tiny = (p.abs() < 2.0**-960) & (a != 0) & (b != 0)  # underflow, to zero included
    return p, torch.where(tiny, e.abs() + TINY, e)
