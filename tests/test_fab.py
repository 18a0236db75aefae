"""FAB / FAB-T: the exact minimum-norm projection, the exact boundary distance of a linear
model, smaller examples than FGSM's, AutoAttack's success check at eps, and agreement
with the authors' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bastion.attacks import FAB, FGSM
from bastion.attacks.boundary_projection import project_onto_hyperplane
from bastion.errors import ConfigError


def _problems(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = w * (torch.rand(n, dim, generator=g, dtype=torch.float64) > 0.2)  # some zero weights
    b = (w * t).sum(1) + 2 * torch.randn(n, generator=g, dtype=torch.float64)
    return t, w, b


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied-pixels"])
def test_linf_projection_is_the_linear_programs_optimum(ties) -> None:
    """min ‖d‖∞ s.t. w·(t+d) = b, 0 ≤ t+d ≤ 1, solved by scipy's LP solver as the oracle;
    also with pixels on a coarse grid (as images are), so that breakpoints tie."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    t, w, b = _problems(40, 12, 0)
    if ties:
        t = (t * 4).round() / 4
    d = project_onto_hyperplane(t, w, b, "linf")
    for i in range(len(t)):
        ti, wi, ci = t[i].numpy(), w[i].numpy(), float(b[i] - w[i] @ t[i])
        dim = len(ti)
        eye = np.eye(dim)  # variables (d, s): minimise s with −s ≤ d_i ≤ s
        lp = linprog(
            c=np.r_[np.zeros(dim), 1.0],
            A_ub=np.block([[eye, -np.ones((dim, 1))], [-eye, -np.ones((dim, 1))]]),
            b_ub=np.zeros(2 * dim),
            A_eq=np.r_[wi, 0.0][None],
            b_eq=[ci],
            bounds=[(-x, 1 - x) for x in ti] + [(0, None)],
        )
        if lp.status == 0:  # the plane meets the box
            assert float((w[i] * (t[i] + d[i])).sum()) == pytest.approx(float(b[i]), abs=1e-9)
            assert float(d[i].abs().max()) == pytest.approx(lp.fun, abs=1e-9)
        else:  # it does not: every coordinate goes to the face that approaches it most
            gain = float(d[i] @ w[i]) * np.sign(ci)
            assert gain == pytest.approx(float(np.abs(wi) @ np.where(wi * ci > 0, 1 - ti, ti)))
        assert bool(((t[i] + d[i] >= -1e-12) & (t[i] + d[i] <= 1 + 1e-12)).all())


def test_l2_projection_is_the_closed_form_inside_the_box_and_the_authors_at_its_faces() -> None:
    t = torch.full((5, 30), 0.5, dtype=torch.float64)
    w = torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = (w * t).sum(1) + 0.01
    d = project_onto_hyperplane(t, w, b, "l2")
    closed = 0.01 * w / (w * w).sum(1, keepdim=True)  # the orthogonal projection
    assert torch.allclose(d, closed, atol=1e-12)
    proj = pytest.importorskip("pyautoattack.fab_projections")
    t, w, b = _problems(100, 50, 2)
    for far in (1.0, 20.0):  # planes that meet the box, and planes that it cannot reach
        mine = project_onto_hyperplane(t.float(), w.float(), far * b.float(), "l2")
        theirs = proj.projection_l2(t.float(), w.float().clone(), far * b.float())
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5)


class _Linear(nn.Module):
    """Two classes, z = (0, w·x + c): the boundary is the plane w·x + c = 0."""

    def __init__(self, w: torch.Tensor, c: float) -> None:
        super().__init__()
        self.w, self.c = w, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w.flatten() + self.c
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_exact_boundary_distance_of_a_linear_model(norm) -> None:
    w = torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(3)) * 0.1
    model = _Linear(w, -0.5 * float(w.sum()) - 0.02)  # x = 0.5 is class 0, 0.02 away
    x = torch.full((4, 1, 6, 6), 0.5) + torch.linspace(-0.05, 0.05, 4).reshape(-1, 1, 1, 1)
    y = torch.zeros(4, dtype=torch.long)
    keep = model(x).argmax(1) == 0
    x, y = x[keep], y[keep]
    margin = -(model(x)[:, 1])
    exact = margin / (w.abs().sum() if norm == "linf" else w.norm())  # dual norm of w
    result = FAB(None, norm=norm)(model, x, y)
    assert result.success.all()
    found = result.distances[norm].float()
    assert bool((found >= exact * (1 - 1e-4)).all())  # nothing beats the minimum
    assert bool((found <= exact * 1.01).all())  # and FAB gets within 1 % of it


def test_fab_t_finds_smaller_examples_than_fgsm(demo, digits) -> None:
    x, y = digits.x[:100], digits.y[:100]
    fab = FAB(None, n_iter=30, n_target_classes=3)(demo, x, y)
    smallest_fgsm = torch.full((100,), float("inf"))  # FGSM's smallest working eps (0.02 grid)
    for eps in [0.02 * i for i in range(15, 0, -1)]:
        res = FGSM(eps)(demo, x, y)
        smallest_fgsm[res.success & (res.pred_clean == y)] = eps
    both = fab.success & smallest_fgsm.isfinite()
    assert both.sum() > 80
    ours = fab.distances["linf"].float()[both]
    assert float((ours <= smallest_fgsm[both] + 1e-6).float().mean()) >= 0.9
    assert float(ours.median()) <= 0.95 * float(smallest_fgsm[both].median())


def test_at_eps_fab_counts_only_examples_within_eps(demo, digits) -> None:
    x, y = digits.x[:100], digits.y[:100]
    free = FAB(None, n_iter=30, n_target_classes=3)(demo, x, y)
    bounded = FAB(0.08, n_iter=30, n_target_classes=3)(demo, x, y)
    assert float(bounded.distances["linf"].max()) <= 0.08 + 1e-6
    within = free.success & (free.distances["linf"] <= 0.08)
    assert bounded.success.sum() >= within.sum() > 0  # restarts on what is left can only add
    assert bounded.success.sum() < free.success.sum()


def test_targeted_fab_reaches_the_given_target(demo, digits) -> None:
    x, y = digits.x[:40], digits.y[:40]
    target = (y + 1) % 10
    result = FAB(None, n_iter=50)(demo, x, y, target=target)
    assert result.success_rate > 0.9
    assert torch.equal(result.pred_adv[result.success], target[result.success])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_robust_accuracy_agrees_with_the_authors_code(demo, digits, norm, eps) -> None:
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = digits.x[:80], digits.y[:80]
    mine = FAB(eps, norm=norm, n_iter=30, n_target_classes=3, final_search=0)(demo, x, y)
    name = {"linf": "Linf", "l2": "L2"}[norm]
    ref = fab_pt.FABAttack_PT(demo, norm=name, eps=eps, n_iter=30, n_target_classes=3, device="cpu")
    ref.targeted = True
    with torch.no_grad():
        ref_robust = int((demo(ref.perturb(x, y)).argmax(1) == y).sum())
    assert abs(int((~mine.success).sum()) - ref_robust) <= 1


def test_bad_configurations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="norm"):
        FAB(0.1, norm="l1")
    with pytest.raises(ConfigError, match="beta"):
        FAB(0.1, beta=1.0)
    with pytest.raises(ConfigError, match="n_iter"):
        FAB(0.1, n_iter=0)
