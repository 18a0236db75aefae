"""What every attack shares: validation, mode handling, query counting and the final check.

An attack subclass implements `_perturb`, which sees only the samples that are not already
adversarial, and returns candidate images. The base re-predicts every candidate in one
forward pass: `success` is that re-prediction, and where it fails the clean image is
returned. Models are put in eval mode for the attack and left as they were found.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bastion.errors import ConfigError, InvalidInputError
from bastion.modes import eval_mode
from bastion.results import AttackResult, distances
from bastion.validation import check_images, check_labels, check_logits

Model = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
"""A callback `progress(done, total)` the harness passes to long attacks."""


def is_adversarial(
    pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    """Predicted other than `y` (untargeted) or predicted as `target` (targeted)."""
    return pred == target if target is not None else pred != y


class Queries:
    """A model wrapper that counts forward and backward passes per sample."""

    def __init__(self, model: Model, n: int, device: torch.device) -> None:
        self.model = model
        self.forward = torch.zeros(n, dtype=torch.long, device=device)
        self.backward = torch.zeros(n, dtype=torch.long, device=device)
        self.num_classes = 0

    def logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits of `x`, the images of samples `idx`, with autograd as the caller has it."""
        out = self.model(x)
        check_logits(out, x.shape[0])
        self.num_classes = out.shape[1]
        self.forward[idx] += 1
        return out

    def count_backward(self, idx: torch.Tensor) -> None:
        self.backward[idx] += 1

    def count(self, idx: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor) -> None:
        """Add passes counted in bulk by a hot loop that calls `self.model` directly."""
        self.forward[idx] += forward
        self.backward[idx] += backward


@dataclass
class Batch:
    """What `_perturb` works on: the samples of the call that are not yet adversarial."""

    queries: Queries
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    indices: torch.Tensor  # dataset indices: the per-sample random streams
    rows: torch.Tensor  # positions in the caller's batch, for per-sample counters
    progress: Progress | None
    reusable: torch.Tensor | None  # what `_clean_pass` kept for these samples

    @property
    def goal(self) -> torch.Tensor:
        """The class to move towards (target) or away from (true label)."""
        return self.target if self.target is not None else self.y

    def adversarial(
        self, pred: torch.Tensor, keep: torch.Tensor | slice = slice(None)
    ) -> torch.Tensor:
        """`is_adversarial` for the samples `keep` of this batch."""
        return is_adversarial(
            pred, self.y[keep], self.target[keep] if self.target is not None else None
        )


@dataclass
class Candidates:
    """What `_perturb` returns for the samples it was given."""

    x_adv: torch.Tensor
    iterations: torch.Tensor


class Attack(ABC):
    """Base of all attacks: `attack(model, x, y, *, target=None) -> AttackResult`.

    Attack objects hold only hyper-parameters and can be reused on any model.
    `indices` (default 0..N-1) names the samples for per-sample seeding, so a sample
    attacked alone with its dataset index gets exactly what it gets in a batch.
    """

    bounds: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def __call__(
        self,
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> AttackResult:
        start = time.perf_counter()
        check_images(x, self.bounds)
        n = x.shape[0]
        check_labels(y, n)
        if target is not None:
            check_labels(target, n)
        y = y.to(x.device).long()
        target = target.to(x.device).long() if target is not None else None
        indices = (
            torch.arange(n, device=x.device) if indices is None else indices.to(x.device).long()
        )
        if indices.shape != (n,):
            raise InvalidInputError(f"indices must have shape ({n},), got {tuple(indices.shape)}")
        queries = Queries(model, n, x.device)
        x = x.detach()
        with eval_mode(model):
            clean, reusable = self._clean_pass(queries, x, target if target is not None else y)
            self._check_model(clean)
            pred_clean = clean.argmax(1)
            todo = (~is_adversarial(pred_clean, y, target)).nonzero().flatten()
            iterations = torch.zeros(n, dtype=torch.long, device=x.device)
            if not len(todo):
                x_adv, pred_adv = x.clone(), pred_clean.clone()
            else:
                every = len(todo) == n  # then the batch is the call's tensors, uncopied

                def pick(t: torch.Tensor) -> torch.Tensor:
                    return t if every else t[todo]

                batch = Batch(
                    queries,
                    pick(x),
                    pick(y),
                    pick(target) if target is not None else None,
                    pick(indices),
                    todo,
                    progress,
                    pick(reusable) if reusable is not None else None,
                )
                cand = self._perturb(batch)
                with torch.no_grad():
                    adv_logits = queries.logits(cand.x_adv, todo)
                pred = adv_logits.argmax(1)
                ok = batch.adversarial(pred)
                if every:
                    x_adv = torch.where(ok.reshape(-1, *([1] * (x.dim() - 1))), cand.x_adv, x)
                    pred_adv = torch.where(ok, pred, pred_clean)
                else:
                    x_adv, pred_adv = x.clone(), pred_clean.clone()
                    x_adv[todo[ok]] = cand.x_adv[ok]
                    pred_adv[todo[ok]] = pred[ok]
                iterations[todo] = cand.iterations
        success = is_adversarial(pred_adv, y, target)
        return AttackResult(
            x_adv=x_adv,
            success=success,
            pred_clean=pred_clean,
            pred_adv=pred_adv,
            distances=distances(x, x_adv),
            queries=queries.forward,
            iterations=iterations,
            seconds=time.perf_counter() - start,
            gradients=queries.backward,
        )

    def _clean_pass(
        self, queries: Queries, x: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean logits (one forward pass), and whatever of that pass `_perturb` can
        reuse (gradient attacks: the loss gradient at x), so no pass is spent twice."""
        with torch.no_grad():
            return queries.logits(x, torch.arange(len(x), device=x.device)), None

    def _check_model(self, clean_logits: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """Refuse models this attack cannot evaluate (override to add checks)."""

    @abstractmethod
    def _perturb(self, batch: Batch) -> Candidates:
        """Candidate adversarial images for the batch's samples (none yet adversarial)."""


def check_eps(eps: float | torch.Tensor, norm: str) -> None:
    """Refuse a negative, non-finite or (for L∞ on [0, 1]) larger-than-the-box budget."""
    values = eps if isinstance(eps, torch.Tensor) else torch.tensor([float(eps)])
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps}")
    if norm == "linf" and bool((values > 1).any()):
        raise ConfigError(
            f"L∞ eps must lie in [0, 1] for pixels in [0, 1], got {eps}; "
            "give eps on the [0, 1] scale (e.g. 8/255, not 8)"
        )


def per_sample(eps: float | torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps as an N×1×1×1 tensor for the samples `rows` of the caller's batch."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() == 0:
            e = eps.expand(len(rows))
        else:
            e = eps.to(x.device)[rows]
    else:
        e = torch.full((len(rows),), float(eps))
    return e.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
