"""`bastion defend DEFENSE …`: train a defended model and save it.

Each training-recipe defense is one sub-subcommand of `defend`, added by a function
`_add_<name>(defenses)` listed in `_DEFENSES`; it sets `handler` like any subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bastion.commands.common import EXIT_OK, Parser, device
from bastion.errors import ConfigError


def register(sub: Any) -> None:
    """Add `defend` and its defenses to the subparsers `sub`."""
    defend = sub.add_parser(
        "defend",
        help="train a defended model and save it",
        description="Train a model with a defense and save it (torch.export .pt2, or "
        "safetensors weights with --arch).",
    )
    defenses = defend.add_subparsers(
        dest="defense", metavar="DEFENSE", parser_class=Parser, required=True
    )
    for add in _DEFENSES:
        add(defenses)


def add_training_options(p: argparse.ArgumentParser, *, epochs: int, batch_size: int) -> None:
    """The options every training defense shares: data, architecture, budget, output."""
    p.add_argument(
        "--data",
        default="digits",
        help="training data spec: digits, mnist:ROOT, cifar10:ROOT, npz:PATH[#NAME], … "
        "(default digits)",
    )
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--n", type=int, default=None, help="train on the first n samples only")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument(
        "--arch",
        default=None,
        help="module:factory building the architecture with no arguments "
        "(default: a CNN sized to the data)",
    )
    p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    p.add_argument(
        "--out",
        required=True,
        help="where to save the model: FILE.pt2 (torch.export) or FILE.safetensors "
        "(weights; needs --arch to load back)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distill(defenses: Any) -> None:
    p = defenses.add_parser(
        "distill",
        help="defensive distillation (Papernot et al. 2016)",
        description="Train a teacher at temperature T, label the data with its softened "
        "outputs, train a student on them at T and save the student (deployed at T = 1). "
        "Masks gradients rather than adding robustness: test it with CW.",
    )
    add_training_options(p, epochs=50, batch_size=128)
    p.add_argument(
        "--temperature", type=float, default=100.0, help="distillation temperature (default 100)"
    )
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adam"],
        help="sgd: Carlini's (lr 0.01, Nesterov momentum 0.9; default); adam (lr 1e-3)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (overrides the default)")
    p.set_defaults(handler=run_distill)


_DEFENSES: tuple[Callable[[Any], None], ...] = (_add_distill,)


def load_training_data(args: argparse.Namespace) -> Any:
    """The training data named by --data/--split/--n, validated."""
    from bastion.data import load_data

    if args.epochs < 1 or args.batch_size < 1:
        raise ConfigError(
            f"--epochs and --batch-size must be positive, got {args.epochs} and {args.batch_size}"
        )
    return load_data(args.data, split=args.split, n=args.n, download=args.download)


def architecture(args: argparse.Namespace, data: Any) -> Callable[[], Any]:
    """A factory for the model to train: --arch, or a `DistillationCNN` sized to the data."""
    from bastion.defenses.distillation import DistillationCNN
    from bastion.model_io import _resolve_arch

    if args.arch is not None:
        return lambda: _resolve_arch(args.arch)
    if Path(args.out).suffix == ".safetensors":
        raise ConfigError(
            "saving weights only (.safetensors) needs --arch to rebuild the model later; "
            "pass --arch module:factory or save as .pt2"
        )
    c, h, w = data.x.shape[1:]
    return lambda: DistillationCNN(c, (h, w), data.num_classes)


def save(model: Any, args: argparse.Namespace, example: Any) -> None:
    """Save to --out: safetensors weights for `.safetensors`, else a torch.export program."""
    from bastion.model_io import save_model

    fmt = "safetensors" if Path(args.out).suffix == ".safetensors" else "export"
    save_model(model.cpu(), args.out, example.cpu(), format=fmt)


def run_distill(args: argparse.Namespace) -> int:
    """Distil a model on --data and save the student."""
    import torch

    from bastion.defenses.distillation import distill, soft_labels
    from bastion.suites.progress import NoProgress, RichProgress

    data = load_training_data(args)
    build = architecture(args, data)
    dev = device(args.device)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 1e-3)
    if not lr > 0:
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")

    def optimizer(params: Any) -> torch.optim.Optimizer:
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)

    interactive = sys.stderr.isatty() and not args.quiet
    progress: Any = RichProgress() if interactive else NoProgress()
    x, y = data.x.to(dev), data.y.to(dev)
    with progress if interactive else nullcontext():
        task = progress.task(f"distilling at T = {args.temperature:g}", 1)
        result = distill(
            build,
            (x, y),
            temperature=args.temperature,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=optimizer,
            seed=args.seed,
            progress=lambda done, total: task.update(done / total),
        )
        task.close()
    accuracy = {
        name: float((soft_labels(model, x, 1.0).argmax(1) == y).float().mean())
        for name, model in (("student", result.student), ("teacher", result.teacher))
    }
    save(result.student, args, x[:2])
    print(
        f"{args.out} student of defensive distillation at T = {args.temperature:g}: "
        f"train accuracy {accuracy['student']:.3f} (teacher {accuracy['teacher']:.3f}), "
        f"{len(data)} samples, {args.epochs} epochs"
    )
    return EXIT_OK
