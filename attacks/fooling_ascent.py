"""Fooling images by gradient ascent: the white-box baseline of Nguyen et al. (CVPR 2015,
`ascent` branch, `find_fooling_image.py`).

Each class's image climbs the softmax probability of that class from a start image (the
data mean, or mid-grey) plus faint noise; all classes are optimised in one batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from bastion.attacks.base import Model
from bastion.attacks.fooling import (
    FoolingProgress,
    FoolingResult,
    check_input_shape,
    first_call,
    model_device,
    probabilities,
    resolve_classes,
)
from bastion.errors import ConfigError, InvalidInputError
from bastion.modes import eval_mode
from bastion.validation import check_images


class FoolingGradientAscent:
    """Maximise `F_j(x)` for every asked class j by gradient ascent on the pixels.

    As the authors' code: `x ← m + (x − m + lr·∇F_j)·(1 − decay)`, clipped to [0, 1], from
    `x₀ = m + noise·N(0, 1)` where m is the start (mean) image; the default step is the
    code's "progress" policy, `lr = min(1e12, p/‖∇F_j‖²)` with desired progress
    `p = min(0.03, 0.1·(1 − F_j))`, so each step aims to raise F_j by p to first order.
    Defaults: 300 steps, no L2 decay towards m, noise 1/255 (the code's N(0, 1) on the
    0–255 scale). A number `lr` gives a constant step size in [0, 1]-pixel units instead.
    Deviation: the code's default decay is 0.01 (its settings: 0, 0.01, 0.03); with it the
    pull towards m balances the progress policy's steps, which shrink as F_j nears 1, and
    the demo model's images stop below 99.99 % for 7 of its 10 classes. Decay 0 (the code's
    other setting) reaches 99.99 % for all 10; pass `decay=0.01` for the code's default.
    Per-sample: the images of different classes never interact. The optional Gaussian blur
    of the code is not implemented. The best image per class over all steps is returned.
    """

    def __init__(
        self,
        steps: int = 300,
        *,
        lr: float | None = None,
        decay: float = 0.0,
        noise: float = 1 / 255,
        max_lr: float = 1e12,
        seed: int = 0,
    ) -> None:
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        if lr is not None and lr <= 0:
            raise ConfigError(f"lr must be > 0 (or None for the progress policy), got {lr}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must lie in [0, 1), got {decay}")
        if noise < 0 or max_lr <= 0:
            raise ConfigError(f"noise must be >= 0 and max_lr > 0, got {noise} and {max_lr}")
        self.steps = steps
        self.lr = lr
        self.decay = decay
        self.noise = noise
        self.max_lr = max_lr
        self.seed = seed

    def __call__(
        self,
        model: Model,
        *,
        input_shape: Sequence[int],
        classes: Sequence[int] | torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        progress: FoolingProgress | None = None,
    ) -> FoolingResult:
        """The best image per class (all by default), starting from `start` (C × H × W in
        [0, 1], e.g. `data.x.mean(0)`; default mid-grey 0.5)."""
        begin = time.perf_counter()
        shape = check_input_shape(input_shape)
        device = model_device(model)
        mean = self._start(start, shape).to(device)
        with eval_mode(model):
            with torch.no_grad():
                k = first_call(model, mean[None]).shape[1]
            asked = resolve_classes(classes, k).to(device)
            n = len(asked)
            generator = torch.Generator().manual_seed(self.seed)
            jitter = torch.randn(n, *shape, generator=generator).to(device) * self.noise
            x = (mean + jitter).clamp(0.0, 1.0)
            best = torch.full((n,), -1.0, device=device)
            best_x, best_probs = x.clone(), torch.zeros(n, k, device=device)
            found = torch.zeros(n, dtype=torch.long, device=device)
            history = []
            rows = torch.arange(n, device=device)
            for step in range(self.steps + 1):
                x.requires_grad_(True)
                probs = probabilities(model(x))
                confidence = probs[rows, asked]
                (grad,) = torch.autograd.grad(confidence.sum(), x)
                x = x.detach()
                better = confidence.detach() > best
                best = torch.where(better, confidence.detach(), best)
                best_x[better], best_probs[better] = x[better], probs.detach()[better]
                found[better] = step
                history.append(best.cpu())
                if progress is not None:
                    progress(step, self.steps, best)
                if step < self.steps:
                    x = self._step(x, grad, confidence.detach(), mean)
        return FoolingResult(
            classes=asked,
            images=best_x,
            confidence=best,
            predicted=best_probs.argmax(1),
            generation=found,
            history=torch.stack(history),
            num_classes=k,
            generations=self.steps,
            queries=n * (self.steps + 1) + 1,
            gradients=n * (self.steps + 1),
            seconds=time.perf_counter() - begin,
        )

    def _start(self, start: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor:
        if start is None:
            return torch.full(shape, 0.5)
        if not isinstance(start, torch.Tensor) or tuple(start.shape) != shape:
            got = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
            raise InvalidInputError(f"start must be one image of shape {shape}, got {got}")
        check_images(start[None])
        return start.detach().float()

    def _step(
        self, x: torch.Tensor, grad: torch.Tensor, confidence: torch.Tensor, mean: torch.Tensor
    ) -> torch.Tensor:
        if self.lr is None:
            desired = torch.clamp(0.1 * (1 - confidence), max=0.03)
            squared = grad.flatten(1).pow(2).sum(1).clamp_min(1e-30)
            lr = torch.clamp(desired / squared, max=self.max_lr)
        else:
            lr = torch.full_like(confidence, self.lr)
        lr = lr.reshape(-1, 1, 1, 1)
        return (mean + (x - mean + lr * grad) * (1 - self.decay)).clamp(0.0, 1.0)
