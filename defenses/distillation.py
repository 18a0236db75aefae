"""Defensive distillation (Papernot, McDaniel, Wu, Jha, Swami, IEEE S&P 2016), as in
Carlini's reproduction (`nn_robust_attacks/train_models.py`); spec §7.2–7.4.

1. An initial model is trained for one epoch with softmax at temperature T; teacher and
   student both start from it.
2. The teacher is trained at temperature T on the hard labels.
3. Its soft labels `softmax(Z(x)/T)` are computed for every training image.
4. The student (same architecture) is trained at temperature T on the soft labels.
5. The student is deployed at T = 1: its logits Z are returned unchanged, so they are about
   T times larger than a normally trained model's and softmax(Z) saturates.

The student carries its temperature: `save_model` writes it into the saved file's metadata
and `temperature_of(model_or_path)` reads it back, so that an evaluation can attack Z/T.

Defaults: T = 100, 50 epochs, batch 128 as Carlini, but Adam at lr 3e-3 (`cpu_adam`) instead
of his SGD (`carlini_sgd`, lr 0.01, Nesterov momentum 0.9): at T = 100 the gradient of the
loss reaches the logits divided by T, and SGD at lr 0.01 needs his ~23,000 MNIST steps
(469 per epoch × 50) to get going; on scikit-learn's digits (11 steps per epoch) it stays
at chance. Adam's steps do not shrink with the gradient's scale. The recipe refuses a
teacher or student that ends near chance (`TrainingFailedError`, see `training_check`).

This is gradient masking, not robustness (Carlini & Wagner 2016, 2017): the cross-entropy
gradient is (often exactly) zero, so FGSM "fails", while FGSM on Z/T (`TemperatureScaled`)
and CW-L2 on the logits succeed as on the undistilled model.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import Dataset
from bastion.defenses.training_check import accuracy, chance_accuracy, check_trained
from bastion.errors import ConfigError, InvalidInputError
from bastion.model_io import METADATA_ATTR
from bastion.modes import eval_mode
from bastion.normalized import Normalized
from bastion.validation import check_images, check_labels, check_logits

Progress = Callable[[int, int], None]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


_HINT = (
    "train longer (more epochs), raise the learning rate or use Adam (the default); plain SGD "
    "at a high temperature needs many steps"
)


class Distilled(NamedTuple):
    """What `distill` returns: the student (deploy it), the teacher, the temperature and
    both models' accuracy on the training data."""

    student: nn.Module
    teacher: nn.Module
    temperature: float
    student_accuracy: float = math.nan
    teacher_accuracy: float = math.nan


class TemperatureScaled(nn.Module):
    """`model(x) / temperature`: a distilled model's logits brought back to the scale it
    was trained at, where its gradients are no longer masked (an attacker's tool)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


class DistillationCNN(nn.Module):
    """The MNIST network of Papernot et al. and Carlini: conv32-conv32-pool-conv64-conv64-
    pool-fc200-dropout(0.5)-fc200-K, with 3×3 'same' convolutions (the originals are
    'valid') so that any image of at least 4×4 pixels fits. `width` scales the channels
    and `hidden` the fully connected layers, for CPU-sized experiments."""

    def __init__(
        self,
        in_channels: int,
        size: tuple[int, int],
        num_classes: int,
        *,
        width: int = 32,
        hidden: int = 200,
    ) -> None:
        super().__init__()

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]

        w2 = 2 * width
        self.features = nn.Sequential(
            *conv(in_channels, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, w2), *conv(w2, w2), nn.MaxPool2d(2),
        )  # fmt: skip
        flat = w2 * (size[0] // 4) * (size[1] // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def carlini_sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Carlini's optimiser: SGD, lr 0.01, Nesterov momentum 0.9 (his decay of 1e-6 per step
    changes the learning rate by under 3 % in 50 MNIST epochs and is left out)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)


def cpu_adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The default optimiser: Adam at lr 3e-3, which trains at T = 100 in few steps."""
    return torch.optim.Adam(params, lr=3e-3)


def temperature_of(model_or_path: nn.Module | str | os.PathLike[str]) -> float | None:
    """The distillation temperature a student carries (a model from `distill` or
    `load_model`, or a saved file), or None for a model that was not distilled."""
    from bastion.model_io import read_metadata

    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        while isinstance(model, (Normalized, TemperatureScaled)):
            model = model.model
        meta = getattr(model, METADATA_ATTR, None) or {}
    else:
        meta = read_metadata(model_or_path)
    if meta.get("defense") != "distillation" or "temperature" not in meta:
        return None
    return float(meta["temperature"])


def distill(
    model: nn.Module | Callable[[], nn.Module],
    train: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 100.0,
    epochs: int = 50,
    init_epochs: int = 1,
    batch_size: int = 128,
    optimizer: OptimizerFactory = cpu_adam,
    seed: int = 0,
    progress: Progress | None = None,
    check: bool = True,
) -> Distilled:
    """Train a teacher and a distilled student at `temperature` on `train` (images in
    [0, 1], labels) and return both, in eval mode, on the images' device.

    `model` is the architecture: a factory called once (under `seed`) or a module whose
    current weights are the starting point (it is copied, never modified). Defaults are
    Carlini's (T = 100, 50 epochs, batch 128) with `cpu_adam` for his `carlini_sgd` (module
    docstring). `progress(done, total)` is called after each epoch of the three trainings
    (`init_epochs + 2·epochs` in all). With `check`, a teacher or student within 1.5× of
    chance accuracy on `train`, or a student far below its teacher, raises
    `TrainingFailedError`. The student's `bastion_metadata` names the temperature (saved by
    `save_model`, read by `temperature_of`). Deterministic given `seed` on a given device.
    """
    if not math.isfinite(temperature) or temperature < 1:
        raise ConfigError(f"temperature must be a finite number >= 1, got {temperature}")
    if epochs < 1 or init_epochs < 0 or batch_size < 1:
        raise ConfigError(
            f"epochs and batch_size must be >= 1 and init_epochs >= 0, got "
            f"epochs={epochs}, init_epochs={init_epochs}, batch_size={batch_size}"
        )
    x, y = (train.x, train.y) if isinstance(train, Dataset) else train
    check_images(x)
    check_labels(y, x.shape[0])
    y = y.to(x.device).long()
    total = init_epochs + 2 * epochs
    done = [0]

    def epoch_done() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    with _seeded(seed, x.device):
        init = _architecture(model).to(x.device)
        _check_outputs(init, x, y)
        order = torch.Generator().manual_seed(seed)

        def fit(net: nn.Module, targets: torch.Tensor, n_epochs: int) -> None:
            _train(net, x, targets, temperature, n_epochs, batch_size, optimizer, order, epoch_done)

        fit(init, y, init_epochs)
        teacher = copy.deepcopy(init)
        fit(teacher, y, epochs)
        soft = soft_labels(teacher, x, temperature, batch_size=batch_size)
        student = copy.deepcopy(init)
        fit(student, soft, epochs)
    acc = {name: accuracy(net, x, y) for name, net in (("student", student), ("teacher", teacher))}
    if check:
        chance = chance_accuracy(y)
        check_trained("the teacher", acc["teacher"], chance, hint=_HINT)
        reference = ("its teacher", acc["teacher"])
        check_trained("the student", acc["student"], chance, hint=_HINT, reference=reference)
    setattr(
        student, METADATA_ATTR, {"defense": "distillation", "temperature": repr(float(temperature))}
    )
    return Distilled(
        student.eval(), teacher.eval(), float(temperature), acc["student"], acc["teacher"]
    )


def undo_temperature(model: nn.Module) -> nn.Module:
    """`TemperatureScaled(model, T)` for a model that carries its distillation temperature
    T (`temperature_of`), the model itself otherwise: what an adaptive attack should target."""
    t = temperature_of(model)
    return (
        model if t is None or isinstance(model, TemperatureScaled) else TemperatureScaled(model, t)
    )


def soft_labels(
    model: nn.Module, x: torch.Tensor, temperature: float, *, batch_size: int = 512
) -> torch.Tensor:
    """`softmax(Z(x)/T)` for every image, in eval mode (restored after) and in batches."""
    with eval_mode(model), torch.no_grad():
        parts = [model(x[i : i + batch_size]) / temperature for i in range(0, len(x), batch_size)]
    return torch.cat(parts).softmax(1)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators (weight init, dropout) and restore them afterwards."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _architecture(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    built = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    if not isinstance(built, nn.Module):
        raise ConfigError(
            f"distill needs an nn.Module or a function returning one, got {type(built).__name__}"
        )
    return built


def _check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        out = model.eval()(x[:2])
    check_logits(out, len(x[:2]))
    if int(y.max()) >= out.shape[1]:
        raise InvalidInputError(
            f"labels go up to {int(y.max())} but the model has {out.shape[1]} outputs; "
            "give a model with one logit per class"
        )


def _train(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    epochs: int,
    batch_size: int,
    optimizer: OptimizerFactory,
    order: torch.Generator,
    on_epoch: Callable[[], None],
) -> None:
    """Cross-entropy of softmax(Z/T) against `targets` (class indices or probabilities)."""
    opt = optimizer(model.parameters())
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]) / temperature, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        on_epoch()
    model.eval()
