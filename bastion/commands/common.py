"""What the `bastion` subcommands share: the parser class, exit codes, model and data options."""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from bastion.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a pointer to --help on a usage error."""

    commands: frozenset[str] = frozenset()  # the subcommand names, set by bastion.cli

    def error(self, message: str) -> NoReturn:  # argparse's own exit code is 2 as well
        self.exit(EXIT_BAD_INPUT, f"bastion: error: {message}; see --help\n")


def floats(text: str) -> list[float]:
    """argparse type: numbers separated by commas or spaces."""
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def eps_values(text: str) -> list[float]:
    """argparse type: radii separated by commas or spaces, fractions allowed (`2/255,8/255`)."""
    from bastion.threats import parse_eps_list

    try:
        return parse_eps_list(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def threat(text: str) -> Any:
    """argparse type: a threat model `NORM:EPS` (`linf:8/255`, `l2:0.5`)."""
    from bastion.threats import ThreatModel

    try:
        return ThreatModel.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fail_under(text: str) -> Any:
    """argparse type: `0.4` (every threat model) or `linf:8/255=0.4`."""
    from bastion.threats import parse_fail_under

    try:
        return parse_fail_under(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_and_data(p: argparse.ArgumentParser) -> None:
    """MODEL, --data and the options that load them (read by `load_model_and_data`)."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model file (TorchScript, torch.export .pt2, safetensors with --arch, "
        "ONNX); default: the embedded demo CNN on digits",
    )
    p.add_argument(
        "--data",
        default=None,
        help="data spec: digits, mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, "
        "folder:PATH, npz:PATH[#NAME] (default: digits)",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=["test", "train"],
        help="the split of digits, mnist, fashion-mnist and cifar10 (default test); npz: "
        "and folder: specs name their data themselves",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download MNIST/Fashion-MNIST/CIFAR-10 into ROOT",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="module:factory that builds the architecture for safetensors weights",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickled model file (it can run arbitrary code)",
    )
    p.add_argument(
        "--mean",
        type=floats,
        default=None,
        help="per-channel mean the model expects (wraps it in bastion.Normalized)",
    )
    p.add_argument("--std", type=floats, default=None, help="per-channel std (with --mean)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available, else cpu)"
    )
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads, read by `set_threads`."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads torch may use (default: half the available cores, at most 4, "
        "or what OMP_NUM_THREADS says)",
    )


def default_threads() -> int:
    """Half the cores this process may run on, at least 1 and at most 4.

    torch's own default (one thread per core) oversubscribes a shared machine: on a 2-core
    box at load 7–10, `bastion attack mcts --n 5` spent 68–171 s attacking with 2 threads
    and 2.2–3.6 s with 1 (README, --threads).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS's choice if it is set,
    else `default_threads()`. Returns the number in use."""
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive number, got {threads}")
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return int(torch.get_num_threads())  # the user's environment already chose
    torch.set_num_threads(threads or default_threads())
    return int(torch.get_num_threads())


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a suite run: sample count, batch size, output directory, resume, …"""
    p.add_argument("--n", type=int, default=500, help="number of samples (default 500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--out",
        default="bastion-report",
        help="output directory (default ./bastion-report); other files there stay",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out without redoing finished work",
    )
    p.add_argument("--junit", default=None, help="also write JUnit XML to this file")
    p.add_argument(
        "--threat",
        type=threat,
        action="append",
        default=None,
        metavar="NORM:EPS",
        help="a threat model to report on, e.g. linf:8/255 or l2:0.5 (repeatable; default "
        "by data set: CIFAR-10 linf:8/255 l2:0.5, MNIST linf:0.3 l2:2, Fashion-MNIST "
        "linf:0.1 l2:2, ImageNet-size linf:4/255, digits linf:0.1 l2:0.5)",
    )
    p.add_argument(
        "--fail-under",
        type=fail_under,
        action="append",
        default=None,
        metavar="[THREAT=]FRACTION",
        help="exit 1 when robust accuracy is below FRACTION: at every threat model (0.4) or "
        "at one (linf:8/255=0.4); repeatable",
    )
    p.add_argument("--gallery", type=int, default=8, help="images in the HTML gallery")
    add_ray_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout instead of tables"
    )
    p.set_defaults(out_is_folder=True)  # load_model_and_data checks it is writable first


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """--workers, --ray, --num-cpus, --num-gpus: run the items as Ray tasks (docs/scale-out.md)."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run the work items on a local Ray with N workers on this machine; with --ray, "
        "at most N tasks at a time on that cluster",
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="auto|ADDRESS",
        help="run the work items as Ray tasks: auto joins the cluster RAY_ADDRESS names (or "
        "one running here, else starts a local one); or a Ray address such as ray://host:10001",
    )
    p.add_argument(
        "--num-cpus", type=float, default=1, help="CPUs each Ray task asks for (default 1)"
    )
    p.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs each Ray task asks for (default 1 with --device cuda, else 0)",
    )


def ray_executor(args: argparse.Namespace, dev: str) -> Any:
    """The RayExecutor that --workers/--ray ask for, or None for an in-process run."""
    if args.workers is None and args.ray is None:
        return None
    from bastion.suites.ray_executor import RayExecutor

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be a positive number, got {args.workers}")
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if dev.startswith("cuda") else 0.0)
    return RayExecutor(args.ray, workers=args.workers, num_cpus=args.num_cpus, num_gpus=gpus)


def device(name: str | None) -> str:
    """The torch device to run on: --device, or cuda when available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA device is available; use --device cpu"
        )
    return name


def load_model_and_data(args: argparse.Namespace, progress: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The model (or the demo model), the data (`args.n` samples if set) and provenance.

    Before any work: torch's threads are set (--threads), an output folder (--out of a
    command that sets `out_is_folder`) must be writable, and --split must apply to --data.
    After loading, the model runs once on two of the images, so a model that cannot take
    the data fails here with one line rather than inside an attack.
    """
    from bastion.data import load_data, takes_split
    from bastion.fileio import require_writable_dir
    from bastion.model_io import detect_format, file_sha256, load_model, module_fingerprint
    from bastion.normalized import Normalized
    from bastion.validation import check_model_accepts
    from bastion.zoo import demo_model

    if (args.mean is None) != (args.std is None):
        raise ConfigError("--mean and --std go together; give both or neither")
    set_threads(getattr(args, "threads", None))
    spec = args.data or "digits"
    if args.split is not None and not takes_split(spec):
        raise ConfigError(
            f"--split picks the split of digits, mnist, fashion-mnist and cifar10, but "
            f"--data {spec!r} names its data itself; drop --split (write npz:PATH#{args.split} "
            "to read the arrays x_NAME, y_NAME)"
        )
    dev = device(args.device)
    if getattr(args, "out_is_folder", False):
        require_writable_dir(args.out)
    if args.model is None:
        task = progress.task("training the demo model (first run only)", 1)
        model = demo_model(device=dev, progress=lambda k, m: task.update(k / m))
        task.close()
        info: dict[str, Any] = {
            "source": "demo",
            "format": "builtin",
            "sha256": module_fingerprint(model),
        }
        if args.mean is not None:
            model = Normalized(model, args.mean, args.std)
    else:
        model = load_model(
            args.model,
            arch=args.arch,
            trust_pickle=args.trust_pickle,
            device=dev,
            mean=args.mean,
            std=args.std,
        )
        info = {
            "source": str(args.model),
            "format": detect_format(args.model),
            "sha256": file_sha256(args.model),
        }
    n = getattr(args, "n", None)
    data = load_data(spec, split=args.split, n=n, download=args.download)
    check_model_accepts(model, data.x, repr(spec))
    info.update(num_classes=len(data.classes), input_shape=list(data.x.shape[1:]))
    return model, data, info
