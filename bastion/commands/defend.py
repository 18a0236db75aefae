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

from bastion.commands.common import EXIT_OK, Parser, add_threads_option, device, set_threads
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
    add_threads_option(p)
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
        "outputs, train a student on them at T and save the student (deployed at T = 1) with "
        "T in the file's metadata. Masks gradients rather than adding robustness: test it with "
        "CW. Defaults: Carlini's T = 100, 50 epochs, batch 128, with Adam (lr 3e-3) for his "
        "SGD, which at T = 100 needs far more steps than a CPU run gives.",
    )
    add_training_options(p, epochs=50, batch_size=128)
    p.add_argument(
        "--temperature", type=float, default=100.0, help="distillation temperature (default 100)"
    )
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["sgd", "adam"],
        help="adam (lr 3e-3; default) or sgd: Carlini's (lr 0.01, Nesterov momentum 0.9), "
        "which needs many steps at a high temperature (his 50 MNIST epochs)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (overrides the default)")
    p.set_defaults(handler=run_distill)


def _add_dverge(defenses: Any) -> None:
    p = defenses.add_parser(
        "dverge",
        help="DVERGE diversity-trained ensemble (Yang et al. 2020)",
        description="Train --members sub-models normally (Adam), fine-tune them by DVERGE "
        "diversity training (each learns the others' distilled non-robust features by their "
        "visual label; SGD) and save the ensemble as .pt2. The paper (ResNet-20 on CIFAR-10, "
        "a GPU's work): --arch bastion.defenses.model_families:resnet20 --baseline-epochs 200 "
        "--epochs 200 --lr 0.1; the defaults are a CPU-sized schedule for the small CNN.",
    )
    add_training_options(p, epochs=20, batch_size=128)
    p.add_argument("--members", type=int, default=3, help="sub-models (default 3)")
    p.add_argument("--baseline-epochs", type=int, default=20, help="normal training first")
    p.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="SGD lr of DVERGE (default 0.01; the paper's 0.1 is for ResNet-20 with batch norm)",
    )
    p.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=None,
        help="epochs after which lr ×0.1 (default: 1/2 and 3/4 of --epochs, as the paper's "
        "100 and 150 of 200)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CIFAR's random crop (4-pixel padding) and flip of DVERGE's batches (default: on "
        "for colour images of 32×32 or more, off for digits and MNIST)",
    )
    p.add_argument("--eps", type=float, default=0.07, help="distillation L∞ eps (0.07)")
    p.add_argument("--step-size", type=float, default=0.007, help="distillation step (0.007)")
    p.add_argument("--steps", type=int, default=10, help="distillation steps (default 10)")
    p.add_argument("--layer", type=int, default=None, help="fixed layer (default: random)")
    p.set_defaults(handler=run_dverge)


_DEFENSES: tuple[Callable[[Any], None], ...] = (_add_distill, _add_dverge)


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
    from bastion.model_io import resolve_arch

    if args.arch is not None:
        return lambda: resolve_arch(args.arch)
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
    set_threads(args.threads)
    import torch

    from bastion.defenses.distillation import distill
    from bastion.suites.progress import NoProgress, RichProgress

    data = load_training_data(args)
    build = architecture(args, data)
    dev = device(args.device)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 3e-3)
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
    held_out = held_out_accuracy(args, {"student": result.student, "teacher": result.teacher}, dev)
    save(result.student, args, x[:2])
    print(
        f"{args.out} student of defensive distillation at T = {args.temperature:g}: "
        f"train accuracy {result.student_accuracy:.3f} (teacher {result.teacher_accuracy:.3f})"
        f"{held_out}, {len(data)} samples, {args.epochs} epochs"
    )
    return EXIT_OK


def run_dverge(args: argparse.Namespace) -> int:
    """Train baseline sub-models on --data, diversify them with DVERGE, save the ensemble."""
    set_threads(args.threads)
    import dataclasses

    from bastion.defenses import dverge
    from bastion.defenses.model_families import SmallCNN
    from bastion.defenses.training_check import accuracy, chance_accuracy, check_trained
    from bastion.model_io import METADATA_ATTR
    from bastion.suites.progress import NoProgress, RichProgress
    from bastion.zoo import train_classifier

    if args.members < 2:
        raise ConfigError(f"DVERGE needs --members 2 or more, got {args.members}")
    if Path(args.out).suffix == ".safetensors":
        raise ConfigError("a DVERGE ensemble is saved as a torch.export program; name --out *.pt2")
    data = load_training_data(args)
    c = data.x.shape[1]
    build = architecture(args, data) if args.arch else lambda: SmallCNN(c, data.num_classes)
    dev = device(args.device)
    data = dataclasses.replace(data, x=data.x.to(dev), y=data.y.to(dev))
    interactive = sys.stderr.isatty() and not args.quiet
    progress: Any = RichProgress() if interactive else NoProgress()
    recipe = {"epochs": args.baseline_epochs, "batch_size": args.batch_size, "lr": 1e-3}
    with progress if interactive else nullcontext():
        members = [build().to(dev) for _ in range(args.members)]
        task = progress.task(f"training {args.members} baseline sub-models", 1)
        for k, model in enumerate(members):

            def step(done: int, total: int, k: int = k) -> None:
                task.update((k + done / total) / args.members)

            train_classifier(model, data, {**recipe, "seed": args.seed * 1000 + k}, progress=step)
            check_trained(
                f"baseline sub-model {k + 1}",
                accuracy(model, data.x, data.y),
                chance_accuracy(data.y),
                hint="train it longer (--baseline-epochs) or check the data and --arch",
            )
        task.close()
        task = progress.task("DVERGE diversity training", 1)
        ensemble = dverge.train(
            members,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            milestones=args.milestones,
            augment=args.augment,
            eps=args.eps,
            step_size=args.step_size,
            steps=args.steps,
            layer=args.layer,
            seed=args.seed,
            progress=lambda done, total: task.update(done / total),
        )
        task.close()
    # the report recognises the ensemble by this and adds the paper's transfer evaluation
    setattr(ensemble, METADATA_ATTR, {"defense": "dverge", "members": str(args.members)})
    baseline = dverge.Ensemble(members)
    train_acc = [accuracy(model, data.x, data.y) for model in (ensemble, baseline)]
    held_out = held_out_accuracy(args, {"ensemble": ensemble, "baseline ensemble": baseline}, dev)
    save(ensemble, args, data.x[:2])
    print(
        f"{args.out} DVERGE ensemble of {args.members} sub-models: train accuracy "
        f"{train_acc[0]:.3f} (baseline ensemble {train_acc[1]:.3f}){held_out}, "
        f"{len(data)} samples, {args.baseline_epochs} + {args.epochs} epochs"
    )
    return EXIT_OK


def held_out_accuracy(args: argparse.Namespace, models: dict[str, Any], dev: Any) -> str:
    """ ", test accuracy A (B of the second model, …)" on the test split of --data when the
    models were trained on its train split and the data has one; "" otherwise."""
    from bastion.data import load_data
    from bastion.defenses.training_check import accuracy
    from bastion.errors import BastionError

    if args.split != "train":
        return ""
    try:
        test = load_data(args.data, split="test", download=args.download)
    except BastionError:
        return ""
    x, y = test.x.to(dev), test.y.to(dev)
    acc = {name: accuracy(model, x, y) for name, model in models.items()}
    (_, a), *rest = acc.items()
    others = ", ".join(f"{name} {v:.3f}" for name, v in rest)
    return f", test accuracy {a:.3f}" + (f" ({others})" if others else "")
