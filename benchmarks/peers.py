"""One adapter per library for `attacks_vs_peers.py`: Bastion and its peers, same budgets.

Each adapter turns an `AttackSpec` into the library's own call on the same (counting)
model and returns the adversarial batch as a tensor, nothing else: checking the output is
the benchmark's shared evaluator's job. A library that is not installed, or fails to
import, becomes an adapter whose `error` says so; an attack a library does not offer
raises `Unsupported` with the reason. Where a library cannot be configured exactly like
the spec, `notes` says how it differs.

The advertorch shim lives here: advertorch 0.2.3 imports `zero_gradients` from
`torch.autograd.gradcheck`, which torch removed in 1.9; we put an equivalent back before
importing it. Nothing else of advertorch needs patching for FGSM, PGD and CW-L2.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

INSTALL_HINT = (
    'pip install -e ".[bench]" && pip install --no-deps cleverhans  '
    "(cleverhans without its TensorFlow dependencies)"
)


@dataclass(frozen=True)
class AttackSpec:
    """One benchmarked attack with the budgets every library gets.

    `kind` is "fgsm", "pgd" (L∞, uniform random start) or "cw" (CW-L2). `eps` and
    `step` apply to FGSM/PGD; the `cw_*` fields to CW-L2.
    """

    key: str
    label: str
    kind: str
    batch: int
    eps: float = 0.0
    steps: int = 1
    step: float = 0.0
    cw_binary_steps: int = 1
    cw_iterations: int = 100
    cw_const: float = 1.0
    cw_lr: float = 0.01
    cw_abort_early: bool = False
    num_classes: int = 10

    @property
    def bounded(self) -> bool:
        """Whether the attack has an L∞ budget the evaluator must check."""
        return self.kind in ("fgsm", "pgd")


class Unsupported(Exception):
    """The library does not offer this attack (the message says why)."""


class CountingModel(nn.Module):
    """Wraps a model and counts forward and backward passes per sample (images, not calls).

    A backward pass is counted when a gradient reaches the model's output, so it counts
    `torch.autograd.grad` and `.backward()` alike, whoever calls them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_count = 0
        self.backward_count = 0

    def reset(self) -> None:
        self.forward_count = 0
        self.backward_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        n = int(x.shape[0])
        self.forward_count += n
        if out.requires_grad:
            out.register_hook(self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.backward_count += n

        return hook


Run = Callable[[CountingModel, torch.Tensor, torch.Tensor, AttackSpec], torch.Tensor]


@dataclass
class Entry:
    """One row of the benchmark: a library (or a variant of one) running one attack."""

    library: str
    label: str
    run: Run
    note: str = ""


class Adapter:
    """A library: its name, version, import error (if any) and its entries per attack."""

    name = ""
    distribution = ""

    def __init__(self) -> None:
        self.error: str | None = None
        self.version: str | None = None
        self.device = torch.device("cpu")
        try:
            self._import()
            self.version = _version(self.distribution)
        except Exception as exc:  # an import failure is reported, never dropped
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def _import(self) -> None:
        raise NotImplementedError

    def entries(self, spec: AttackSpec) -> list[Entry]:
        """The rows this library contributes for `spec` (raises `Unsupported`)."""
        return [Entry(self.name, self.name, self._runner(spec), self.notes(spec))]

    def _runner(self, spec: AttackSpec) -> Run:
        raise NotImplementedError

    def notes(self, spec: AttackSpec) -> str:
        return ""


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class BastionAdapter(Adapter):
    name = "bastion"
    distribution = "bastion"

    def _import(self) -> None:
        from bastion.attacks import FGSM, PGD, CarliniWagnerL2

        self.FGSM, self.PGD, self.CW = FGSM, PGD, CarliniWagnerL2
        self.last_counts: tuple[int, int] = (0, 0)
        self.last_success: torch.Tensor | None = None

    def _attack(self, spec: AttackSpec, early_stop: bool = True) -> Any:
        if spec.kind == "fgsm":
            return self.FGSM(spec.eps)
        if spec.kind == "pgd":
            return self.PGD(
                spec.eps, steps=spec.steps, abs_stepsize=spec.step, early_stop=early_stop
            )
        return self.CW(
            binary_search_steps=spec.cw_binary_steps,
            max_iterations=spec.cw_iterations,
            initial_const=spec.cw_const,
            learning_rate=spec.cw_lr,
            abort_early=spec.cw_abort_early,
        )

    def entries(self, spec: AttackSpec) -> list[Entry]:
        rows = [Entry(self.name, self.name, self._run_with(early_stop=True), self.notes(spec))]
        if spec.kind == "pgd":
            rows.append(
                Entry(
                    self.name,
                    "bastion (no early stop)",
                    self._run_with(early_stop=False),
                    "early_stop=False: all 40 steps for every sample, like the peers",
                )
            )
        return rows

    def _run_with(self, early_stop: bool) -> Run:
        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            result = self._attack(spec, early_stop)(model, x, y)
            self.last_counts = (int(result.queries.sum()), int(result.gradients.sum()))
            self.last_success = result.success.cpu()
            return result.x_adv

        return run

    def notes(self, spec: AttackSpec) -> str:
        own = "its time includes its own clean pass and final re-prediction (`success`)"
        if spec.kind == "pgd":
            return (
                "default early_stop=True: a sample stops at its first adversarial iterate; "
                "random start keyed by (seed, index); " + own
            )
        if spec.kind == "cw" and spec.cw_abort_early:
            return (
                "abort-early per sample: stops when neither its loss nor its best distance "
                "improved (the reference decides on the batch's summed loss); Adam as "
                "Kingma & Ba's Algorithm 1, like torch.optim.Adam; " + own
            )
        return own


class TorchattacksAdapter(Adapter):
    name = "torchattacks"
    distribution = "torchattacks"

    def _import(self) -> None:
        self.ta = importlib.import_module("torchattacks")

    def _runner(self, spec: AttackSpec) -> Run:
        ta = self.ta
        if spec.kind == "cw" and spec.cw_binary_steps > 1:
            raise Unsupported("torchattacks CW has no binary search over c (one fixed c)")

        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            if spec.kind == "fgsm":
                attack = ta.FGSM(model, eps=spec.eps)
            elif spec.kind == "pgd":
                attack = ta.PGD(
                    model, eps=spec.eps, alpha=spec.step, steps=spec.steps, random_start=True
                )
            else:
                attack = ta.CW(
                    model, c=spec.cw_const, kappa=0, steps=spec.cw_iterations, lr=spec.cw_lr
                )
            return attack(x, y)

        return run

    def notes(self, spec: AttackSpec) -> str:
        if spec.kind == "cw":
            return (
                "no way to turn off its batch-level early stop (returns when the summed "
                "cost rises at a tenth-of-steps check); f uses max((1-onehot)·Z), not Z-1e4·onehot"
            )
        return ""


class ArtAdapter(Adapter):
    name = "art"
    distribution = "adversarial-robustness-toolbox"

    def _import(self) -> None:
        self.evasion = importlib.import_module("art.attacks.evasion")
        self.classification = importlib.import_module("art.estimators.classification")

    def _classifier(self, model: CountingModel, x: torch.Tensor, spec: AttackSpec) -> Any:
        return self.classification.PyTorchClassifier(
            model=model,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=spec.num_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if self.device.type == "cuda" else "cpu",
        )

    def _runner(self, spec: AttackSpec) -> Run:
        ev = self.evasion

        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            clf = self._classifier(model, x, spec)
            if spec.kind == "fgsm":
                attack = ev.FastGradientMethod(
                    clf, norm=np.inf, eps=spec.eps, eps_step=spec.eps, batch_size=spec.batch
                )
            elif spec.kind == "pgd":
                attack = ev.ProjectedGradientDescentPyTorch(
                    clf,
                    norm=np.inf,
                    eps=spec.eps,
                    eps_step=spec.step,
                    max_iter=spec.steps,
                    num_random_init=1,
                    batch_size=spec.batch,
                    verbose=False,
                )
            else:
                attack = ev.CarliniL2Method(
                    clf,
                    confidence=0.0,
                    learning_rate=spec.cw_lr,
                    binary_search_steps=spec.cw_binary_steps,
                    max_iter=spec.cw_iterations,
                    initial_const=spec.cw_const,
                    batch_size=spec.batch,
                    verbose=False,
                )
            x_np = x.detach().cpu().numpy()
            out = attack.generate(x_np, y.detach().cpu().numpy())
            return torch.from_numpy(np.asarray(out)).to(x.device)

        return run

    def notes(self, spec: AttackSpec) -> str:
        if spec.kind == "cw":
            return (
                "ART's CW is gradient descent with a per-iteration line search (≤5 halvings, "
                "≤5 doublings; learning_rate is its initial step), in NumPy, no abort-early"
            )
        if spec.kind == "pgd":
            return "also re-predicts its output once to log a success rate (inside its timing)"
        return ""


class FoolboxAdapter(Adapter):
    name = "foolbox"
    distribution = "foolbox"

    def _import(self) -> None:
        self.fb = importlib.import_module("foolbox")

    def _runner(self, spec: AttackSpec) -> Run:
        fb = self.fb

        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
            criterion = fb.criteria.Misclassification(y)
            if spec.kind == "fgsm":
                return fb.attacks.FGSM().run(fmodel, x, criterion, epsilon=spec.eps)
            if spec.kind == "pgd":
                attack = fb.attacks.LinfPGD(
                    abs_stepsize=spec.step, steps=spec.steps, random_start=True
                )
                return attack.run(fmodel, x, criterion, epsilon=spec.eps)
            attack = fb.attacks.L2CarliniWagnerAttack(
                binary_search_steps=spec.cw_binary_steps,
                steps=spec.cw_iterations,
                stepsize=spec.cw_lr,
                confidence=0,
                initial_const=spec.cw_const,
                abort_early=spec.cw_abort_early,
            )
            return attack.run(fmodel, x, criterion)

        return run

    def notes(self, spec: AttackSpec) -> str:
        base = "called through `attack.run` (its `__call__` would add its own success check)"
        if spec.kind == "cw":
            return base + "; failed samples come back as zeros; abort-early on the batch's loss"
        return base


class AdvertorchAdapter(Adapter):
    name = "advertorch"
    distribution = "advertorch"

    def _import(self) -> None:
        install_advertorch_shim()
        self.attacks = importlib.import_module("advertorch.attacks")

    def _runner(self, spec: AttackSpec) -> Run:
        at = self.attacks

        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            if spec.kind == "fgsm":
                attack = at.GradientSignAttack(model, eps=spec.eps, clip_min=0.0, clip_max=1.0)
            elif spec.kind == "pgd":
                attack = at.LinfPGDAttack(
                    model,
                    eps=spec.eps,
                    nb_iter=spec.steps,
                    eps_iter=spec.step,
                    rand_init=True,
                    clip_min=0.0,
                    clip_max=1.0,
                )
            else:
                attack = at.CarliniWagnerL2Attack(
                    model,
                    num_classes=spec.num_classes,
                    confidence=0,
                    learning_rate=spec.cw_lr,
                    binary_search_steps=spec.cw_binary_steps,
                    max_iterations=spec.cw_iterations,
                    abort_early=spec.cw_abort_early,
                    initial_const=spec.cw_const,
                    clip_min=0.0,
                    clip_max=1.0,
                )
            return attack.perturb(x, y)

        return run

    def notes(self, spec: AttackSpec) -> str:
        if spec.kind == "cw" and spec.cw_abort_early:
            return "abort-early on the batch's summed loss (as the reference)"
        return ""


class CleverhansAdapter(Adapter):
    name = "cleverhans"
    distribution = "cleverhans"

    def _import(self) -> None:
        base = "cleverhans.torch.attacks."
        self.fgm = importlib.import_module(base + "fast_gradient_method").fast_gradient_method
        self.pgd = importlib.import_module(
            base + "projected_gradient_descent"
        ).projected_gradient_descent
        self.cw = importlib.import_module(base + "carlini_wagner_l2").carlini_wagner_l2

    def _runner(self, spec: AttackSpec) -> Run:
        def run(model: CountingModel, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec):
            if spec.kind == "fgsm":
                return self.fgm(model, x, spec.eps, np.inf, clip_min=0.0, clip_max=1.0, y=y)
            if spec.kind == "pgd":
                return self.pgd(
                    model,
                    x,
                    spec.eps,
                    spec.step,
                    spec.steps,
                    np.inf,
                    clip_min=0.0,
                    clip_max=1.0,
                    y=y,
                    rand_init=True,
                )
            return self.cw(
                model,
                x,
                spec.num_classes,
                y=y,
                lr=spec.cw_lr,
                confidence=0,
                clip_min=0.0,
                clip_max=1.0,
                initial_const=spec.cw_const,
                binary_search_steps=spec.cw_binary_steps,
                max_iterations=spec.cw_iterations,
            )

        return run

    def notes(self, spec: AttackSpec) -> str:
        if spec.kind == "cw":
            note = "per-sample Python loop over the batch at every iteration"
            if spec.cw_abort_early:
                note = (
                    "no abort-early (runs every iteration); keeps w and Adam across binary steps; "
                    + note
                )
            return note
        return ""


def install_advertorch_shim() -> None:
    """Give torch back `torch.autograd.gradcheck.zero_gradients` (removed in torch 1.9),
    which advertorch 0.2.3 imports at module level. Only FAB uses it; FGSM, PGD and CW
    never call it."""
    importlib.import_module("torch.autograd.gradcheck")
    gradcheck = sys.modules["torch.autograd.gradcheck"]  # the module, not the function
    if hasattr(gradcheck, "zero_gradients"):
        return

    def zero_gradients(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.grad is not None:
                x.grad.detach_()
                x.grad.zero_()
        else:
            for elem in x:
                zero_gradients(elem)

    gradcheck.zero_gradients = zero_gradients  # type: ignore[attr-defined]


ADAPTERS: dict[str, type[Adapter]] = {
    "bastion": BastionAdapter,
    "torchattacks": TorchattacksAdapter,
    "art": ArtAdapter,
    "foolbox": FoolboxAdapter,
    "advertorch": AdvertorchAdapter,
    "cleverhans": CleverhansAdapter,
}
