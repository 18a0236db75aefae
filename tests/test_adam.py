"""CW's optimiser: Adam as torch.optim.Adam computes it, on per-sample rows."""

from __future__ import annotations

import pytest
import torch

from bastion.attacks.adam import Adam


def _gradients(shape: tuple[int, ...], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # scales from 1e-6 to 1e2 per row: the ε term and saturated coordinates both matter
    scale = torch.logspace(-6, 2, shape[0], dtype=dtype).reshape(-1, *[1] * (len(shape) - 1))
    return [torch.randn(shape, generator=g, dtype=dtype) * scale for _ in range(steps)]


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, {"rtol": 1e-12, "atol": 1e-14}), (torch.float32, {})]
)
def test_adam_makes_torch_optim_adams_updates(dtype: torch.dtype, tol: dict[str, float]) -> None:
    start = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours, theirs = start.clone(), start.clone().requires_grad_(True)
    adam = Adam(ours, lr=0.01)
    reference = torch.optim.Adam([theirs], lr=0.01, foreach=False)
    for grad in _gradients(tuple(start.shape), 300, dtype):
        before = ours.clone()
        adam.step(ours, grad)
        theirs.grad = grad.clone()
        reference.step()
        # the same update at every step, not only the same end point
        torch.testing.assert_close(ours - before, theirs.detach() - before, **tol)
        torch.testing.assert_close(ours, theirs.detach(), **tol)


def test_the_first_step_moves_every_coordinate_by_the_learning_rate() -> None:
    # m̂ = g and v̂ = g² at t = 1: the step is lr·g/(|g| + ε), i.e. lr·sign(g) where |g| ≫ ε
    w = torch.zeros(4)
    Adam(w, lr=0.5).step(w, torch.tensor([3.0, -2.0, 1e-3, -7.0]))
    torch.testing.assert_close(w, torch.tensor([-0.5, 0.5, -0.5, 0.5]), rtol=1e-4, atol=0)


def test_dropping_rows_leaves_the_others_exactly_as_alone() -> None:
    grads = _gradients((6, 5), 40, torch.float32)
    start = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    batch = start.clone()
    adam = Adam(batch, lr=0.01)
    keep = torch.tensor([True, False, True, True, False, True])
    for i, grad in enumerate(grads):
        if i == 10:
            adam.keep(keep)
            batch = batch[keep]
        adam.step(batch, grad if i < 10 else grad[keep])
    for row, original in zip(keep.nonzero().flatten().tolist(), batch, strict=True):
        alone = start[row : row + 1].clone()
        solo = Adam(alone, lr=0.01)
        for grad in grads:
            solo.step(alone, grad[row : row + 1])
        assert torch.equal(alone[0], original)
