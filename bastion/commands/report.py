"""`bastion report` and `bastion attack`: run a suite (or one attack) and write the report."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from bastion.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_model_and_data,
    add_run_options,
    device,
    eps_values,
    load_model_and_data,
    ray_executor,
)
from bastion.errors import ConfigError


def register(sub: Any) -> None:
    """Add `report` and `attack` to the subparsers `sub`."""
    rep = sub.add_parser(
        "report",
        help="run a suite and write report.json/html",
        description="Run a suite of attacks and write report.json, "
        "report.html and results.jsonl into --out.",
    )
    add_model_and_data(rep)
    add_run_options(rep)
    _add_defense(rep)
    rep.add_argument(
        "--suite",
        default="quick",
        help="quick, standard, autoattack, blackbox, or a suite .toml file (default quick)",
    )
    rep.add_argument(
        "--eps",
        type=eps_values,
        default=None,
        help="replace the L∞ eps sweep (the curves) of the suite's checks, e.g. "
        "'0.01,0.03,0.1' or '2/255,8/255'; the headline is set by --threat",
    )
    rep.set_defaults(handler=run)
    att = sub.add_parser(
        "attack",
        help="run one attack and write its report",
        description="Run one attack (fgsm, pgd, bim, apgd, apgd-t, square, cw, mcts, safecv) "
        "as a one-check suite, at the threat models unless --eps is given, and write its "
        "report into --out. mcts/safecv (black-box, SIFT-guided) "
        "spend at most 2,000 queries per image: about a minute for --n 10 on the demo "
        "model on 2 cores. `bastion attack fooling` is `bastion fool` (fooling images).",
    )
    att.add_argument("attack", help="fgsm, pgd, bim, apgd, apgd-t, square, cw, mcts or safecv")
    add_model_and_data(att)
    add_run_options(att)
    _add_defense(att)
    att.add_argument(
        "--eps",
        type=eps_values,
        default=None,
        help="eps values, fractions allowed (default: the threat models, --threat or the "
        "data set's defaults; for cw the L2 radii at which robust accuracy is read); cw "
        "runs 5 binary steps × 1,000 iterations",
    )
    att.add_argument("--norm", default=None, help="linf or l2")
    att.set_defaults(handler=run)


def _add_defense(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--defense",
        choices=["raw_isp", "raw_isp:random"],
        default=None,
        help="attack the model behind a preprocessing defense: raw_isp = RawISP().wrap(model), "
        "the RAW camera-ISP round trip (gradients flow through it exactly); raw_isp:random "
        "draws camera metadata and noise per call and adds EOT (20 draws) and EOT+BPDA "
        "twins of the gradient attacks. A distilled model or a DVERGE ensemble saved by "
        "`bastion defend` brings its own adaptive checks without this option",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="MODEL",
        help="the undefended model to compare a trained defense with (e.g. the undistilled "
        "twin of a distilled student: bastion defend distill --temperature 1): the suite "
        "also runs on it, for the undefended column of the defense table",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        default=None,
        help="with a defense: also run every gradient attack with BPDA gradients (identity "
        "backward through the defense) as a check ID-bpda; the worst case covers both",
    )


def _one_check_suite(args: argparse.Namespace) -> Any:
    """`bastion attack`'s suite: without --eps at the threat models (of --norm only, when
    given), with the CPU budget for attacks whose paper budget takes minutes per batch."""
    from bastion.suites.profiles import CPU_BUDGET
    from bastion.suites.suite import attack_name, one_check_suite

    params = CPU_BUDGET.get(attack_name(args.attack), {})
    return one_check_suite(args.attack, tuple(args.eps or ()), norm=args.norm, params=params)


def run(args: argparse.Namespace) -> int:
    """Run the suite (`report`) or the one-check suite (`attack`) and print the summary."""
    from rich.console import Console

    from bastion.suites.progress import command_progress
    from bastion.suites.runner import run_suite
    from bastion.suites.terminal import print_summary

    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    if args.gallery < 0:
        raise ConfigError(f"--gallery must be >= 0, got {args.gallery}")
    progress = command_progress(args.quiet)
    suite = _one_check_suite(args) if args.command == "attack" else args.suite
    eps = args.eps if args.command == "report" else None
    out = Path(args.out)
    dev = device(args.device)
    executor = ray_executor(args, dev)
    with progress, executor or contextlib.nullcontext():
        model, data, info = load_model_and_data(args, progress)
        baseline = _baseline(args, data, dev)
        if baseline is not None:
            info["baseline"] = str(args.baseline)
        report = run_suite(
            model,
            data,
            suite,
            eps=eps,
            batch_size=args.batch_size,
            device=dev,
            seed=args.seed,
            out=out,
            resume=args.resume,
            progress=progress,
            model_info=info,
            # `bastion attack` keeps every adversarial image (of its smallest eps) as a PNG
            gallery=max(args.gallery, args.n) if args.command == "attack" else args.gallery,
            fail_under=args.fail_under,
            junit=args.junit,
            defense=args.defense,
            adaptive=args.adaptive,
            threats=args.threat,
            executor=executor,
            baseline=baseline,
        )
    if args.json:
        print(report.to_json())
    else:
        console = Console(soft_wrap=not sys.stdout.isatty())
        print_summary(report.model, console)
        console.print(f"report: {out / 'report.html'} · {out / 'report.json'}", highlight=False)
    if args.command == "attack":
        written = _write_images(report, out)
        if not args.json:
            print(f"adversarial images: {written} PNG files in {out} (adv-INDEX.png)")
    return EXIT_FAILED if report.passed is False else EXIT_OK


def _baseline(args: argparse.Namespace, data: Any, dev: str) -> Any:
    """The --baseline model, loaded like MODEL and checked against the data, or None."""
    if args.baseline is None:
        return None
    from bastion.model_io import load_model
    from bastion.validation import check_model_accepts

    model = load_model(
        args.baseline,
        arch=args.arch,
        trust_pickle=args.trust_pickle,
        device=dev,
        mean=args.mean,
        std=args.std,
    )
    check_model_accepts(model, data.x, repr(data.spec))
    return model


def _write_images(report: Any, out: Path) -> int:
    """The gallery's adversarial images as `adv-INDEX.png` (8-bit) directly in `out`."""
    from bastion.fileio import write_atomic
    from bastion.suites.gallery import png_bytes

    for item in report.gallery:
        write_atomic(out / f"adv-{item.index}.png", png_bytes(item.adv))
    return len(report.gallery)
