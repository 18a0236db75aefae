"""VNN-LIB numbers are read exactly (as rationals) and rounded outward once: the input box
read contains the file's box and the unsafe set read contains the file's, so SAFE proved
for what was read holds for the file. Writing chooses decimals that read back to the
same float64s."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from bastion.verify.decide import decide_file
from bastion.verify.network import Dense, Network
from bastion.verify.spec import Halfspaces, Property
from bastion.verify.vnnlib import VnnlibError, parse_vnnlib, write_vnnlib

_DECL = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"


def _one(text: str) -> Property:
    (prop,) = parse_vnnlib(_DECL + text)
    return prop


def _tight_below(value: float, exact: Fraction) -> bool:
    """value is the largest float64 ≤ exact."""
    return Fraction(value) <= exact < Fraction(math.nextafter(value, math.inf))


def _tight_above(value: float, exact: Fraction) -> bool:
    """value is the smallest float64 ≥ exact."""
    return Fraction(math.nextafter(value, -math.inf)) < exact <= Fraction(value)


@pytest.mark.parametrize("low, high", [("0.1", "0.3"), ("-0.7", "1e-5"), ("0.25", "0.5")])
def test_box_bounds_are_rounded_outward(low: str, high: str) -> None:
    p = _one(f"(assert (>= X_0 {low}))\n(assert (<= X_0 {high}))\n(assert (>= Y_0 0))\n")
    assert _tight_below(p.lower.item(), Fraction(low))
    assert _tight_above(p.upper.item(), Fraction(high))


def test_bounds_are_computed_in_exact_arithmetic_before_rounding() -> None:
    """X_0 + 0.1 ≤ 0.3 is X_0 ≤ 1/5; in float64, 0.3 − 0.1 = 0.19999999999999998 < 1/5
    would cut the reals in (0.19999999999999998, 1/5] out of the box."""
    p = _one("(assert (>= X_0 0))\n(assert (<= (+ X_0 0.1) 0.3))\n(assert (>= Y_0 0))\n")
    assert _tight_above(p.upper.item(), Fraction(1, 5))
    assert p.upper.item() > 0.3 - 0.1
    q = _one("(assert (>= X_0 0))\n(assert (<= (* 3 X_0) 1))\n(assert (>= Y_0 0))\n")
    assert _tight_above(q.upper.item(), Fraction(1, 3))


@pytest.mark.parametrize("threshold", ["0.1", "-3.991125645861615", "2.5", "1e-30"])
def test_output_thresholds_are_rounded_so_the_unsafe_set_read_contains_the_files(
    threshold: str,
) -> None:
    """`Y_0 ≥ t` is the row −Y_0 ≤ −t and `Y_0 ≤ t` the row Y_0 ≤ t: b is rounded up."""
    box = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
    ge = _one(box + f"(assert (>= Y_0 {threshold}))\n").unsafe[0]
    le = _one(box + f"(assert (<= Y_0 {threshold}))\n").unsafe[0]
    assert ge.a.tolist() == [[-1.0]] and _tight_above(ge.b.item(), -Fraction(threshold))
    assert le.a.tolist() == [[1.0]] and _tight_above(le.b.item(), Fraction(threshold))


def test_cancellation_in_a_constraint_does_not_shrink_the_box() -> None:
    """X_0 + 1e16 ≤ 1e16 + 1 is X_0 ≤ 1; in float64 1e16 + 1 is 1e16, which would read
    the box as [0, 0] and prove y = x ≥ 0.5 unreachable. Read exactly, the verifier finds
    the counterexample, and it is one: inside the file's box, strictly unsafe."""
    text = "(assert (>= X_0 0))\n(assert (<= (+ X_0 1e16) (+ 1e16 1)))\n(assert (>= Y_0 0.5))\n"
    prop = _one(text)
    assert (prop.lower.item(), prop.upper.item()) == (0.0, 1.0)
    net = Network((Dense(torch.ones(1, 1), torch.zeros(1)),), (1,))
    verdict = decide_file(net, [prop], timeout=10)
    assert verdict.vnncomp == "sat", verdict.summary()
    assert verdict.counterexample is not None
    x = Fraction(verdict.counterexample.item())
    assert 0 <= x and x + Fraction("1e16") <= Fraction("1e16") + 1 and x >= Fraction("0.5")


def test_strict_and_rounded_faces_are_closed_for_proofs_and_open_for_witnesses() -> None:
    """`X_0 > 0.25` and `X_0 < 0.75` give the closed box [0.25, 0.75] to prove on, with both
    faces open: a point on them is not inside. Non-strict faces stay closed, also where the
    decimal was rounded outward (0.1). Output rows read `Y_0 < 0.5` as `Y_0 ≤ 0.5`."""
    p = _one("(assert (> X_0 0.25))\n(assert (< X_0 0.75))\n(assert (< Y_0 0.5))\n")
    assert (p.lower.item(), p.upper.item()) == (0.25, 0.75)
    assert p.open_lower is not None and p.open_upper is not None
    assert bool(p.open_lower.all()) and bool(p.open_upper.all())
    x = torch.tensor([[0.25], [0.5], [0.75]], dtype=torch.float64)
    assert p.contains(x).tolist() == [False, True, False]
    assert p.unsafe[0].b.tolist() == [0.5] and p.unsafe[0].inner is None
    q = _one("(assert (>= X_0 0.1))\n(assert (<= X_0 0.5))\n(assert (< Y_0 0.5))\n")
    assert q.open_lower is None and q.open_upper is None
    assert q.contains(torch.tensor([[q.lower.item()], [0.5]], dtype=torch.float64)).all()


def test_strict_bounds_that_meet_are_contradictory() -> None:
    """X_0 > 0.5 ∧ X_0 < 0.5 is empty (no property: unsat), X_0 ≥ 0.5 ∧ X_0 ≤ 0.5 a point."""
    out = "(assert (>= Y_0 0))\n"
    assert parse_vnnlib(_DECL + "(assert (> X_0 0.5))\n(assert (< X_0 0.5))\n" + out) == []
    assert parse_vnnlib(_DECL + "(assert (>= X_0 0.5))\n(assert (< X_0 0.5))\n" + out) == []
    p = _one("(assert (>= X_0 0.5))\n(assert (<= X_0 0.5))\n" + out)
    assert (p.lower.item(), p.upper.item()) == (0.5, 0.5) and p.open_lower is None


def test_a_witness_is_inside_the_unsafe_set_as_written() -> None:
    """Unsafe Y_0 ≥ 0.1 reads b rounded up for proofs and `inner` rounded down for
    witnesses: the verifier's counterexample has y > 1/10 exactly, not just ≥ the float."""
    p = _one("(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= Y_0 0.1))\n")
    (h,) = p.unsafe
    assert h.inner is not None and _tight_below(h.inner.item(), -Fraction(1, 10))
    net = Network((Dense(torch.ones(1, 1), torch.zeros(1)),), (1,))
    verdict = decide_file(net, [p], timeout=10)
    assert verdict.vnncomp == "sat" and verdict.output is not None
    assert Fraction(verdict.output.item()) > Fraction(1, 10)


@pytest.mark.parametrize("word", ["inf", "nan", "-infinity", "1/0", "0x10"])
def test_non_numbers_are_refused(word: str) -> None:
    with pytest.raises(VnnlibError, match="neither a number"):
        _one(f"(assert (>= X_0 {word}))\n(assert (<= X_0 1))\n(assert (>= Y_0 0))\n")


def test_bounds_beyond_float64_are_refused() -> None:
    with pytest.raises(VnnlibError, match="float64 range"):
        _one("(assert (>= X_0 0))\n(assert (<= X_0 1e400))\n(assert (>= Y_0 0))\n")


def test_writing_and_reading_gives_back_every_float64() -> None:
    """Awkward values (not short decimals, tiny, huge, negative, zero) survive a write and
    an outward-rounding read bit for bit: the writer picks decimals on the right side."""
    g = torch.Generator().manual_seed(0)
    n = 64
    lower = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 10.0 ** torch.randint(
        -300, 300, (n,), generator=g
    ).double()
    lower[:4] = torch.tensor([0.0, -0.0, 5e-324, -1e-310], dtype=torch.float64)
    upper = lower + torch.rand(n, generator=g, dtype=torch.float64) * lower.abs()
    upper[:4] = torch.tensor([0.1, 0.0, 1e-300, 1.7976931348623157e308], dtype=torch.float64)
    b = torch.tensor([-3.991125645861615, 0.1, -1e-300, 123456789.125], dtype=torch.float64)
    unsafe = tuple(
        Halfspaces(torch.tensor([[sign, 0.0]], dtype=torch.float64), b[i : i + 1])
        for i, sign in enumerate([1.0, -1.0, 1.0, -1.0])
    )
    prop = Property(lower, upper, unsafe)
    (back,) = parse_vnnlib(write_vnnlib(prop))
    assert torch.equal(back.lower, prop.lower) and torch.equal(back.upper, prop.upper)
    assert all(
        torch.equal(h.a, g_.a) and torch.equal(h.b, g_.b)
        for h, g_ in zip(back.unsafe, prop.unsafe, strict=True)
    )
