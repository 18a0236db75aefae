"""Attack first: Auto-PGD on the property's violation inside its input box.

Most UNSAFE instances fall to a few hundred gradient steps, long before an exact engine
would finish. The search is the attacks' own APGD (Croce & Hein, ICML 2020; the authors'
defaults: step 2·eps, momentum 0.75, step halving at checkpoints) run on a two-class view
of the problem, so the verifier shares the attacks' gradient loop instead of keeping one:

- the input box [lower, upper] is mapped affinely onto [0, 1]ⁿ (u ↦ lower + u·(upper −
  lower); the box's fixed inputs stay fixed). APGD's samples are the box centre and
  `restarts − 1` seeded uniform points of the box (the "clean" points it checks first), each
  with the smallest L∞ ball around it that holds the whole box, so every sample may go
  anywhere in the box;
- the "model" it attacks returns the logits [0, v] with v = `Property.violation` of the
  user's float32 model at that point (max over the unsafe set's disjuncts of the min over
  their rows of b − A y), so class 1 wins, and the attack succeeds against label 0, exactly
  when the model puts the point strictly inside the unsafe set;
- the loss is the logit margin (`bastion.attacks.losses.margin`), which for these two
  logits is v itself: APGD ascends the depth inside the unsafe set.

The `restarts` samples (each from APGD's random start on its ball's sphere, seeded by
(seed, index)) run in one batch for `steps` iterations. The search stops after the first
iteration at which any point is strictly unsafe, or at the deadline. The points the float32
model put strictly inside the unsafe set, in the batch, are returned; a batched evaluation
can differ from a single one in the last bits, so the caller replays each point alone.

Against the former sign-step loop on the VNN-COMP 2021 sat instances
(`benchmarks/falsify_loop.py`): the same mnistfc instances found, more ACAS Xu hits per
call, and one forward pass more (APGD's start) before an easy instance's first hit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bastion import rng
from bastion.attacks.apgd import APGD
from bastion.attacks.losses import margin
from bastion.errors import ConfigError
from bastion.verify.spec import Halfspaces, Property

Forward = Callable[[torch.Tensor], torch.Tensor]

_CLEAN_STREAM = 1 << 20  # APGD's starts use streams 0, 1, …
_BIG = 1e300  # a finite stand-in for ±inf violations (the attack requires finite logits)


class _Stop(Exception):
    """Ends the attack early: a point is unsafe, or the deadline has passed."""


class _UnsafeLogits:
    """u ∈ [0, 1]ⁿ (a batch N × 1 × 1 × n) ↦ logits [0, violation] of the mapped point.

    Every evaluated point the model puts strictly inside the unsafe set is recorded, with
    its violation, whatever the attack then does with it.
    """

    def __init__(
        self, forward: Forward, prop: Property, device: torch.device | str, deadline: float | None
    ) -> None:
        lower, upper = prop.lower.to(device), prop.upper.to(device)
        lo, hi = lower.to(torch.float32), upper.to(torch.float32)
        # the float32 ends must lie in the box (`Property.contains`): one float32 step
        # inwards where rounding left it or landed on an open face
        out_lo = lo.double() < lower
        out_hi = hi.double() > upper
        if prop.open_lower is not None:
            out_lo |= prop.open_lower.to(device) & (lo.double() == lower)
        if prop.open_upper is not None:
            out_hi |= prop.open_upper.to(device) & (hi.double() == upper)
        lo = torch.where(out_lo, lo.nextafter(torch.full_like(lo, torch.inf)), lo)
        hi = torch.where(out_hi, hi.nextafter(torch.full_like(hi, -torch.inf)), hi)
        self.empty = bool((lo > hi).any())  # an input no float32 value satisfies
        self.lo, self.hi, self.span = lo, hi, (hi - lo).clamp(min=0)
        self.forward = forward
        unsafe = tuple(
            Halfspaces(
                h.a.to(device), h.b.to(device), None if h.inner is None else h.inner.to(device)
            )
            for h in prop.unsafe
        )
        self.prop = Property(prop.lower, prop.upper, unsafe)
        self.deadline = deadline
        self.hits: list[tuple[torch.Tensor, torch.Tensor]] = []

    def point(self, u: torch.Tensor) -> torch.Tensor:
        """The box point of u (float32; clamped where rounding would leave the box, which
        is rare enough that the common case skips the clamp's backward pass)."""
        x = self.lo + u.reshape(len(u), *self.lo.shape) * self.span
        if bool(((x < self.lo) | (x > self.hi)).any()):
            x = torch.clamp(x, self.lo, self.hi)
        return x

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            raise _Stop
        x = self.point(u)
        value = self.prop.violation(self.forward(x).flatten(1))
        hit = value.detach() > 0
        if bool(hit.any()):
            self.hits.append((x.detach()[hit].clone(), value.detach()[hit].cpu()))
        value = torch.nan_to_num(value, nan=-_BIG, posinf=_BIG, neginf=-_BIG)
        return torch.stack([torch.zeros_like(value), value], 1)

    def found(self) -> list[torch.Tensor]:
        """The distinct recorded points, deepest first."""
        if not self.hits:
            return []
        xs = torch.cat([x for x, _ in self.hits])
        values = torch.cat([v for _, v in self.hits])
        seen: set[bytes] = set()
        out = []
        for k in values.argsort(descending=True, stable=True).tolist():
            key = xs[k].cpu().numpy().tobytes()
            if key not in seen:
                seen.add(key)
                out.append(xs[k])
        return out


def falsify(
    forward: Forward,
    prop: Property,
    *,
    restarts: int = 32,
    steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    deadline: float | None = None,
) -> list[torch.Tensor]:
    """Points of the box that the model, in a batch, maps strictly into the unsafe set,
    deepest first (empty if none); the caller replays each alone before trusting it.

    `forward` maps a batch `N × input_shape` (float32) to outputs `N × K`. `restarts`
    APGD samples run `steps` iterations each, in one batch. The search stops at `deadline`
    (a `time.perf_counter()` value) if it is given.
    """
    if restarts < 1 or steps < 1:
        raise ConfigError(f"restarts and steps must be >= 1, got {restarts}, {steps}")
    view = _UnsafeLogits(forward, prop, device, deadline)
    if view.empty:
        return []

    def progress(done: int, total: int) -> None:
        if view.hits or (deadline is not None and time.perf_counter() >= deadline):
            raise _Stop

    index = torch.arange(restarts, device=device)
    # sample 0 attacks the box centre, the others seeded uniform points of the box, each
    # with the smallest L∞ ball around it that holds the whole box
    u = rng.uniform(seed, index, (1, 1, view.lo.numel()), stream=_CLEAN_STREAM).to(device)
    u[0] = 0.5
    eps = torch.maximum(u, 1 - u).flatten(1).amax(1)
    attack = APGD(eps, norm="linf", loss=margin, n_iter=steps, seed=seed)
    label = torch.zeros(restarts, dtype=torch.long, device=device)
    try:
        attack(view, u, label, indices=index, progress=progress)
    except _Stop:
        pass
    return view.found()
