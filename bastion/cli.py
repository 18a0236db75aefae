"""The `bastion` command line: `bastion report`, `bastion attack`.

Exit codes: 0 when the report is written (whatever the robustness), 1 when a pass
criterion the user asked for fails, 2 on bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

from bastion.errors import BastionError, ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own exit code is 2 as well
        self.exit(EXIT_BAD_INPUT, f"bastion: error: {message}; see --help\n")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--split", default="test", choices=["test", "train"])
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
        type=_floats,
        default=None,
        help="per-channel mean the model expects (wraps it in bastion.Normalized)",
    )
    p.add_argument("--std", type=_floats, default=None, help="per-channel std (with --mean)")
    p.add_argument("--n", type=int, default=500, help="number of samples (default 500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available, else cpu)"
    )
    p.add_argument("--seed", type=int, default=0)
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
        "--fail-under",
        type=float,
        default=None,
        help="exit 1 when the worst-case robust accuracy is below this fraction",
    )
    p.add_argument("--gallery", type=int, default=8, help="images in the HTML gallery")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout instead of tables"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bastion", description="Adversarial robustness testing for PyTorch image classifiers."
    )
    parser.add_argument(
        "--version", action="version", version=f"bastion {__import__('bastion').__version__}"
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    rep = sub.add_parser(
        "report",
        help="run a suite and write report.json/html",
        description="Run a suite of attacks and write report.json, "
        "report.html and results.jsonl into --out.",
    )
    _add_model_and_data(rep)
    rep.add_argument(
        "--suite", default="quick", help="quick, standard, or a suite .toml file (default quick)"
    )
    rep.add_argument(
        "--eps",
        type=_floats,
        default=None,
        help="replace the L∞ eps sweep of the suite's FGSM/PGD checks, e.g. '0.01,0.03,0.1'",
    )
    att = sub.add_parser(
        "attack",
        help="run one attack and write its report",
        description="Run one attack (fgsm, pgd, bim, cw) as a one-check "
        "suite and write its report into --out.",
    )
    att.add_argument("attack", help="fgsm, pgd, bim or cw")
    _add_model_and_data(att)
    att.add_argument(
        "--eps",
        type=_floats,
        default=None,
        help="eps values (default 8/255 in L∞; for cw the L2 radii at which "
        "robust accuracy is read, default 0.5,1,2); cw runs the fast "
        "profile, 5 binary steps × 1,000 iterations",
    )
    att.add_argument("--norm", default=None, help="linf or l2")
    return parser


def _device(name: str | None) -> str:
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


def _load(args: argparse.Namespace, progress: Any) -> tuple[Any, Any, dict[str, Any]]:
    from bastion.data import load_data
    from bastion.model_io import detect_format, file_sha256, load_model, module_fingerprint
    from bastion.normalized import Normalized
    from bastion.zoo import demo_model

    if (args.mean is None) != (args.std is None):
        raise ConfigError("--mean and --std go together; give both or neither")
    device = _device(args.device)
    if args.model is None:
        task = progress.task("training the demo model (first run only)", 1)
        model = demo_model(device=device, progress=lambda k, m: task.update(k / m))
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
            device=device,
            mean=args.mean,
            std=args.std,
        )
        info = {
            "source": str(args.model),
            "format": detect_format(args.model),
            "sha256": file_sha256(args.model),
        }
    data = load_data(args.data or "digits", split=args.split, n=args.n, download=args.download)
    info.update(num_classes=len(data.classes), input_shape=list(data.x.shape[1:]))
    return model, data, info


# `bastion attack` defaults: the paper's CW budget (9 × 10,000) takes minutes per batch on
# a CPU, so the command uses the suites' fast profile; a suite file can ask for more.
_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    "CarliniWagnerL2": {"binary_search_steps": 5, "max_iterations": 1000},
}
_ATTACK_EPS = {"linf": (8 / 255,), "l2": (0.5, 1.0, 2.0)}


def _one_check_suite(args: argparse.Namespace) -> Any:
    from bastion.suites.suite import ATTACKS, Check, Suite, attack_name, validate_check

    name = attack_name(args.attack)
    norm = args.norm or ATTACKS[name].norms[0]
    eps = tuple(args.eps) if args.eps else _ATTACK_EPS[norm]
    check = Check(
        id=args.attack.lower(), attack=name, eps=eps, norm=norm, params=_ATTACK_PARAMS.get(name, {})
    )
    validate_check(check)
    return Suite(name=f"attack-{check.id}", checks=(check,))


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bastion.suites.progress import NoProgress, RichProgress
    from bastion.suites.runner import run_suite
    from bastion.suites.terminal import print_summary

    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    if args.gallery < 0:
        raise ConfigError(f"--gallery must be >= 0, got {args.gallery}")
    interactive = sys.stderr.isatty() and not args.quiet
    progress: Any = RichProgress() if interactive else NoProgress()
    suite = _one_check_suite(args) if args.command == "attack" else args.suite
    eps = args.eps if args.command == "report" else None
    out = Path(args.out)
    with progress if interactive else nullcontext():
        model, data, info = _load(args, progress)
        report = run_suite(
            model,
            data,
            suite,
            eps=eps,
            batch_size=args.batch_size,
            device=_device(args.device),
            seed=args.seed,
            out=out,
            resume=args.resume,
            progress=progress,
            model_info=info,
            gallery=args.gallery,
            fail_under=args.fail_under,
            junit=args.junit,
        )
    if args.json:
        print(report.to_json())
    else:
        console = Console(soft_wrap=not sys.stdout.isatty())
        print_summary(report.data, console)
        console.print(f"report: {out / 'report.html'} · {out / 'report.json'}", highlight=False)
    return EXIT_FAILED if report.passed is False else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in ("report", "attack", "-h", "--help", "--version"):
        words = ["report", *words]  # `bastion [MODEL] [options]` is `bastion report …`
    args = build_parser().parse_args(words)
    try:
        return _run(args)
    except BastionError as exc:
        print(f"bastion: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            "bastion: interrupted; rerun the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
