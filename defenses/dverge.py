"""DVERGE (Yang et al., NeurIPS 2020): an ensemble whose sub-models do not share
vulnerabilities.

Feature distillation (`distill`) makes an image that looks like a source image `x_s` but
has, at one layer of sub-model j, the features of a target image `x`: the non-robust
features sub-model j uses. Diversity training (`train`) teaches every other sub-model to
classify those images by what they *look* like (the source label), so an adversarial
example of one sub-model stops fooling the others. `Ensemble` averages the sub-models'
softmax probabilities. Defaults are those of the authors' code (spec §6.1–6.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks.gradient_descent import GradientDescentAttack
from bastion.defenses.model_families import FeaturePoint, LayerList, feature_layers, read_features
from bastion.defenses.training_check import accuracy, chance_accuracy, check_trained
from bastion.errors import ConfigError, InvalidInputError, ModelOutputError
from bastion.modes import eval_mode
from bastion.validation import check_images, check_labels

if TYPE_CHECKING:
    from bastion.attacks.base import Attack
    from bastion.data import Dataset

Progress = Callable[[int, int], None]
"""A callback `progress(done, total)`, here once per mini-batch."""

_FLOOR = 1e-40  # the DVERGE code's clamp before the log


class Ensemble(nn.Module):
    """The sub-models' softmax probabilities, averaged, returned as log-probabilities.

    Log-probabilities are logits up to a per-row constant (softmax of them gives back the
    averaged probabilities), so every attack and loss that takes logits works on the
    ensemble unchanged. Averaging probabilities, not logits, is what the paper evaluates.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) == 0:
            raise ConfigError("an Ensemble needs at least one sub-model; pass a list of models")
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]
        if any(o.dim() != 2 or o.shape != outs[0].shape for o in outs):
            shapes = ", ".join(str(tuple(o.shape)) for o in outs)
            raise ModelOutputError(
                f"the sub-models return outputs of shapes {shapes}; every sub-model must "
                "return N×K logits for the same K classes"
            )
        probs = torch.stack([F.softmax(o, dim=1) for o in outs]).mean(0)
        return probs.clamp_min(_FLOOR).log()


def distill(
    model: nn.Module,
    x: torch.Tensor,
    x_source: torch.Tensor,
    point: FeaturePoint,
    *,
    eps: float = 0.07,
    step_size: float = 0.007,
    steps: int = 10,
    momentum: float = 1.0,
) -> torch.Tensor:
    """Feature distillation (spec §6.1): argmin over the L∞ `eps`-ball around `x_source`
    (within [0, 1]) of ‖f(z) − f(x)‖² at `point`, by sign-PGD from `z = x_source` with the
    gradient L1-normalised per sample and accumulated with `momentum` (0: plain sign-PGD):
    the attacks' gradient loop (`GradientDescentAttack.ascend`) ascending −‖f(z) − f(x)‖².

    The model is used in the mode the caller leaves it in (the DVERGE code: train mode).
    The target features are read once and detached; the result is detached.
    """
    _check_pair(x, x_source)
    if eps <= 0 or step_size <= 0 or steps < 0 or momentum < 0:
        raise ConfigError(
            f"distillation needs eps > 0, step_size > 0, steps >= 0 and momentum >= 0, got "
            f"{eps}, {step_size}, {steps}, {momentum}"
        )
    with torch.no_grad():
        target = read_features(model, x, point).detach()
    if steps == 0:
        return x_source.detach().clone()
    loop = GradientDescentAttack(
        eps=eps,
        norm="linf",
        steps=steps,
        rel_stepsize=1.0,
        abs_stepsize=step_size,
        random_start=False,
        early_stop=False,
        loss=_feature_closeness,
        momentum=momentum,
    )
    return loop.ascend(lambda z: read_features(model, z, point), x_source.detach(), target)


def _feature_closeness(
    features: torch.Tensor, target: torch.Tensor, _: torch.Tensor | None
) -> torch.Tensor:
    """The loss the gradient loop ascends in `distill`: −‖f(z) − f(x)‖² per sample."""
    return -(features - target).pow(2).flatten(1).sum(1)


def feature_distance(
    model: nn.Module, x: torch.Tensor, z: torch.Tensor, point: FeaturePoint
) -> torch.Tensor:
    """Per-sample squared L2 distance between the features of `x` and `z` at `point`."""
    with torch.no_grad():
        fx = read_features(model, x, point)
        fz = read_features(model, z, point)
    return (fz - fx).pow(2).flatten(1).sum(1)


def train(
    models: Sequence[nn.Module],
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    eps: float = 0.07,
    step_size: float = 0.007,
    steps: int = 10,
    distill_momentum: float = 1.0,
    layer: int | None = None,
    layers: LayerList = feature_layers,
    augment: bool | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    check: bool = True,
) -> Ensemble:
    """DVERGE diversity training (spec §6.2) of copies of `models` (the inputs are not
    changed); returns the trained `Ensemble` in eval mode.

    Start from normally trained sub-models of one architecture (the paper: ResNet-20, 200
    epochs). Each epoch draws one layer (1-based in the layer list `layers(model)`) shared by
    all sub-models, unless `layer` fixes it. Each mini-batch pairs a source batch (x_s, y_s)
    with an independently shuffled target batch x (random crop with 4-pixel zero padding and
    horizontal flip when `augment`); every sub-model j distills X_j = distill(f_j, x, x_s) in
    train mode, and every sub-model i takes one SGD step on Σ_{j≠i} CE(f_i(X_j), y_s).
    Defaults are the paper's full schedule (SGD 0.1, momentum 0.9, wd 1e-4, 200 epochs,
    batch 128; ε 0.07, step 0.007, 10 steps). `milestones` None: ×`gamma` at 1/2 and 3/4 of
    `epochs` (the paper's 100 and 150 of 200), so a shortened schedule still decays.
    `augment` None: CIFAR's crop and flip only for colour images of at least 32×32 pixels
    (a flipped or shifted 8×8 or 28×28 digit is another digit or none). A small network
    without batch normalisation needs a lower `lr` (0.01: `bastion defend dverge`'s CPU
    default). With `check`, an ensemble within 1.5× of chance accuracy on `data`, or far
    below the ensemble of the given sub-models, raises `TrainingFailedError`.
    Deterministic given `seed` (layers, shuffles, crops).
    """
    x, y = (data.x, data.y) if not isinstance(data, tuple) else data
    check_images(x)
    check_labels(y, x.shape[0])
    if len(models) < 2:
        raise ConfigError(f"DVERGE needs at least 2 sub-models, got {len(models)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(
            f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}"
        )
    subs = [copy.deepcopy(m) for m in models]
    points = [layers(m) for m in subs]
    depth = len(points[0])
    if depth == 0 or any(len(p) != depth for p in points):
        raise ConfigError(
            f"the sub-models have layer lists of lengths {[len(p) for p in points]}; "
            "use sub-models of one architecture"
        )
    if layer is not None and not 1 <= layer <= depth:
        raise ConfigError(f"layer must be in 1..{depth} (the layer list), got {layer}")
    dev = next(subs[0].parameters()).device
    if augment is None:
        augment = default_augment(x)
    if milestones is None:
        milestones = scaled_milestones(epochs)
    before = accuracy(Ensemble(subs), x.to(dev), y) if check else 0.0
    opts = [
        torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for m in subs
    ]
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, list(milestones), gamma) for o in opts]
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    per_epoch = -(-n // batch_size)
    for m in subs:
        m.train()
    for epoch in range(epochs):
        pick = layer if layer is not None else int(torch.randint(1, depth + 1, (1,), generator=gen))
        order_s, order_t = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            xs, xt = x[order_s[sl]], x[order_t[sl]]
            if augment:
                xs, xt = _augment(xs, gen), _augment(xt, gen)
            xs, xt, ys = xs.to(dev), xt.to(dev), y[order_s[sl]].to(dev)
            distilled = [
                distill(
                    m,
                    xt,
                    xs,
                    p[pick - 1],
                    eps=eps,
                    step_size=step_size,
                    steps=steps,
                    momentum=distill_momentum,
                )
                for m, p in zip(subs, points, strict=True)
            ]
            for i, (m, opt) in enumerate(zip(subs, opts, strict=True)):
                loss = sum(F.cross_entropy(m(xd), ys) for j, xd in enumerate(distilled) if j != i)
                opt.zero_grad()
                loss.backward()  # type: ignore[union-attr]
                opt.step()
            if progress is not None:
                progress(epoch * per_epoch + b + 1, epochs * per_epoch)
        for s in scheds:
            s.step()
    ensemble = Ensemble(subs).eval()
    if check:
        check_trained(
            "the DVERGE ensemble",
            accuracy(ensemble, x.to(dev), y),
            chance_accuracy(y),
            reference=("the baseline ensemble it started from", before),
            hint="lower the learning rate (--lr; 0.01 for a network without batch norm), "
            "or turn augmentation off for small images (--no-augment)",
        )
    return ensemble


def default_augment(x: torch.Tensor) -> bool:
    """Whether CIFAR's crop-and-flip suits the images `x` (N×C×H×W): colour, at least 32²."""
    return x.shape[1] == 3 and min(x.shape[2], x.shape[3]) >= 32


def scaled_milestones(epochs: int) -> list[int]:
    """The paper's lr milestones (100 and 150 of 200 epochs) scaled to `epochs`."""
    return sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)})


def transfer_matrix(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, attack: Attack
) -> torch.Tensor:
    """M[i, j]: the fraction of samples whose adversarial example crafted on `models[i]`
    by `attack` is misclassified by `models[j]` (the diagonal: white-box success)."""
    out = torch.zeros(len(models), len(models))
    for i, source in enumerate(models):
        x_adv = attack(source, x, y).x_adv
        for j, target in enumerate(models):
            with eval_mode(target), torch.no_grad():
                out[i, j] = (target(x_adv).argmax(1) != y.to(x_adv.device)).float().mean()
    return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop back to the input size from a 4-pixel zero-padded image, and a random
    horizontal flip, per sample (torchvision's RandomCrop(pad 4) + RandomHorizontalFlip)."""
    n, c, h, w = x.shape
    dy, dx = torch.randint(0, 9, (2, n), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    crops = padded[batch, channel, rows, cols]
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def _check_pair(x: torch.Tensor, x_source: torch.Tensor) -> None:
    check_images(x)
    check_images(x_source)
    if x.shape != x_source.shape:
        raise InvalidInputError(
            f"target and source images must have one shape, got {tuple(x.shape)} and "
            f"{tuple(x_source.shape)}; pair each target with one source image"
        )
