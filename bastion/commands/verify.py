"""`bastion verify`: SAFE / UNSAFE / UNKNOWN for a region, a VNN-LIB property or a batch.

Three forms, one verifier:
  bastion verify [MODEL] [--data SPEC] [--index I | --image x.png] --eps E
  bastion verify NET.onnx --vnnlib PROP.vnnlib [--out result.txt]
  bastion verify --instances instances.csv [--out results.csv] [--resume] [--workers N]
The verdict is the first word on stdout (SAFE/UNSAFE/UNKNOWN; sat/unsat/unknown for a
VNN-LIB property); exit code 0 whatever the verdict, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bastion.commands.common import (
    EXIT_OK,
    add_model_and_data,
    add_ray_options,
    device,
    load_model_and_data,
    ray_executor,
    set_threads,
)
from bastion.errors import ConfigError, DataError

_ENGINES = ("auto", "beta-crown", "z3", "milp", "bounds")  # verify/verifier.py ENGINES


def register(sub: Any) -> None:
    """Add `verify` to the subparsers `sub`."""
    p = sub.add_parser(
        "verify",
        help="prove a region robust (SAFE), find a counterexample (UNSAFE), or say UNKNOWN",
        description="Verify local robustness around one image (L∞ ball of --eps, or a DLV "
        "feature region), a VNN-LIB property of an ONNX network (--vnnlib), or a "
        "VNN-COMP instances.csv (--instances). Bounds first (CROWN, alpha-CROWN), then "
        "PGD, then beta-CROWN branch and bound and an exact engine (z3 with branch and "
        "bound, or a HiGHS MILP).",
    )
    add_model_and_data(p)
    p.add_argument("--index", type=int, default=0, help="sample of --data to verify (default 0)")
    p.add_argument("--image", default=None, help="verify this image file instead of --data")
    p.add_argument("--label", type=int, default=None, help="class to prove (default: predicted)")
    p.add_argument("--eps", type=float, default=0.01, help="L∞ radius of the region (default 0.01)")
    p.add_argument("--vnnlib", default=None, help="VNN-LIB 1.0 property for MODEL (ONNX)")
    p.add_argument("--instances", default=None, help="VNN-COMP instances.csv to run in batch")
    p.add_argument(
        "--engine",
        default="auto",
        choices=_ENGINES,
        help="auto: beta-CROWN, then z3 (small regions) and the MILP; beta-crown: branch and "
        "bound with optimised bounds only; z3 / milp: that exact engine; bounds: "
        "interval, CROWN and alpha-CROWN bounds and the attack only (default auto)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per verdict (default 60; with --instances the csv's own timeouts)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write: the VNN-COMP result file (--vnnlib), results CSV "
        "(--instances), or a directory for verdict.json and the counterexample PNG",
    )
    p.add_argument("--resume", action="store_true", help="--instances: skip rows in --out")
    add_ray_options(p)  # --instances: the instances as Ray tasks (docs/scale-out.md)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    _add_dlv_options(p)
    p.set_defaults(handler=run)


def _add_dlv_options(p: Any) -> None:
    g = p.add_argument_group("DLV mode (--region dlv; Huang et al., CAV 2017)")
    g.add_argument("--region", default="linf", choices=("linf", "dlv"),
                   help="linf: the L∞ ball of --eps; dlv: DLV's feature-region grid")  # fmt: skip
    g.add_argument("--features", type=int, default=150, help="numOfFeatures (default 150)")
    g.add_argument("--feature-dims", type=int, default=5, help="featureDims (default 5)")
    g.add_argument("--span", type=float, default=1.0, help="span of one manipulation (1.0)")
    g.add_argument("--num-span", type=int, default=1, help="numSpan: spans per dim (1)")
    g.add_argument("--enumeration", default="convex", choices=("convex", "line", "point"))
    g.add_argument("--heuristic", default="sift", choices=("sift", "derivative", "activation"))
    g.add_argument("--dlv-layer", type=int, default=None,
                   help="analyse layers 0…K in turn (0: the input only; default: the input "
                   "and the first hidden dense/conv layer)")  # fmt: skip
    g.add_argument("--continuous", action="store_true",
                   help="also decide each feature's continuous box exactly")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Dispatch on the form of the command."""
    set_threads(args.threads)  # every form runs the model (the region form loads it too)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.instances is not None:
        return _instances(args)
    if args.workers is not None or args.ray is not None:
        raise ConfigError("--workers and --ray apply to --instances only; leave them out")
    if args.vnnlib is not None:
        return _vnnlib(args)
    return _region(args)


def _region(args: argparse.Namespace) -> int:
    import torch

    from bastion.suites.progress import NoProgress
    from bastion.verify.region import verify_region

    if args.region == "linf" and not 0 <= args.eps <= 1:
        raise ConfigError(f"--eps must lie in [0, 1] on the [0, 1] pixel scale, got {args.eps}")
    loaded = time.perf_counter()
    model, data, _ = load_model_and_data(args, NoProgress())
    load_seconds = time.perf_counter() - loaded
    if args.image is not None:
        x, name = _read_image(Path(args.image), data.x.shape[1:]), args.image
    else:
        if not 0 <= args.index < len(data):
            raise ConfigError(f"--index {args.index} is outside the data (0..{len(data) - 1})")
        x, name = data.x[args.index], f"{args.data or 'digits'}[{args.index}]"
    x = x.to(device(args.device))
    if args.region == "dlv":
        verdict, region = _dlv(args, model, x)
    else:
        verdict = verify_region(
            model,
            x,
            eps=args.eps,
            label=args.label,
            engine=args.engine,
            timeout=args.timeout or 60.0,
            seed=args.seed,
        )
        region = f"eps={args.eps:g}"
    verdict.details["load_seconds"] = round(load_seconds, 4)
    if args.out is not None:
        _write_region(Path(args.out), verdict, x.cpu())
    if args.json:
        print(json.dumps({"name": name, **verdict.as_dict()}))
        return EXIT_OK
    d = verdict.details
    claim = getattr(verdict, "claim", str(verdict.status))  # DLV: its discretised SAFE
    rest = verdict.summary()[len(claim) + 1 :]
    print(f"{claim} {name} label={d['label']} {region} {rest}")
    for s in verdict.layers:
        if "text" in s:  # DLV's per-layer statistics
            print(f"  {s['text']}")
            continue
        print(
            f"  layer {s['index']} {s['kind']}: {s['unstable']}/{s['neurons']} "
            f"{'unstable' if s['kind'] == 'relu' else 'undecided windows'} "
            f"(intervals: {s['unstable_ibp']}), mean width {s['mean_width']:.4g}"
        )
    if verdict.guarantee:
        print(f"  {verdict.guarantee}")
    if "continuous" in d:
        c = d["continuous"]
        print(f"  continuous boxes: {c['status']} in {c['seconds']:.2f}s {c['reason']}".rstrip())
        if c["guarantee"]:
            print(f"  {c['guarantee']}")
    if verdict.counterexample is not None:
        pred = int(torch.as_tensor(verdict.output).argmax())
        print(f"  counterexample classified {pred}; L∞ distance "
              f"{float((verdict.counterexample - x.cpu()).abs().max()):.4g}")  # fmt: skip
    return EXIT_OK


def _dlv(args: argparse.Namespace, model: Any, x: Any) -> tuple[Any, str]:
    from bastion.verify.dlv import verify_dlv

    verdict = verify_dlv(
        model, x, label=args.label, features=args.features, feature_dims=args.feature_dims,
        span=args.span, num_span=args.num_span, enumeration=args.enumeration,
        heuristic=args.heuristic, layer=args.dlv_layer, timeout=args.timeout or 60.0,
        continuous=args.continuous, seed=args.seed,
    )  # fmt: skip
    d = verdict.details
    region = (f"dlv features={d['features_examined']}/{args.features} span={args.span:g} "
              f"numSpan={args.num_span} points={d['points']}")  # fmt: skip
    return verdict, region


def _read_image(path: Path, shape: Any) -> Any:
    """An image file as C×H×W in [0, 1], checked against the model's input shape."""
    import torch

    from bastion.data import read_image as read

    if not path.is_file():
        raise DataError(f"image {path} does not exist; check the path")
    a = read(path)
    x = torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())
    x = x.to(torch.float32) / 255.0
    if tuple(x.shape) != tuple(shape):
        raise DataError(
            f"image {path} is {tuple(x.shape)} (C×H×W) but the model takes "
            f"{tuple(shape)}; resize or convert it first"
        )
    return x


def _write_region(out: Path, verdict: Any, x: Any) -> None:
    from bastion.fileio import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "verdict.json", json.dumps(verdict.as_dict(), indent=1).encode())
    if verdict.counterexample is not None:
        import numpy as np

        from bastion.suites.gallery import png_bytes

        cex = verdict.counterexample.numpy()
        write_atomic(out / "counterexample.png", png_bytes(cex, channels_first=True))
        np.save(out / "counterexample.npy", cex)


def _vnnlib(args: argparse.Namespace) -> int:
    from bastion.verify.decide import decide_file
    from bastion.verify.extract import load_network
    from bastion.verify.instances import replay_for
    from bastion.verify.vnnlib import read_vnnlib, write_counterexample

    if args.model is None:
        raise ConfigError("--vnnlib needs the network file: bastion verify NET.onnx --vnnlib P")
    loaded = time.perf_counter()
    network = load_network(args.model)
    props = read_vnnlib(args.vnnlib, network.input_shape, network.num_outputs)
    replay = replay_for(args.model)
    load_seconds = time.perf_counter() - loaded
    timeout = args.timeout or 60.0
    verdict = decide_file(
        network, props, timeout=timeout, engine=args.engine, seed=args.seed, replay=replay
    )
    verdict.details["load_seconds"] = round(load_seconds, 4)
    if args.out is not None:
        from bastion.fileio import write_atomic

        text = (
            write_counterexample(verdict.counterexample, verdict.output)
            if verdict.counterexample is not None and verdict.output is not None
            else f"{verdict.vnncomp}\n"
        )
        write_atomic(Path(args.out), text.encode())
    if args.json:
        print(json.dumps({"result": verdict.vnncomp, **verdict.as_dict()}))
    else:
        print(f"{verdict.vnncomp} {verdict.summary()}")
    return EXIT_OK


def _instances(args: argparse.Namespace) -> int:
    import contextlib

    from rich.console import Console

    from bastion.suites.instance_runner import run_instances
    from bastion.suites.progress import command_progress
    from bastion.verify.instances import Instance, read_instances

    instances = read_instances(args.instances)
    executor = ray_executor(args, "cpu")  # --workers / --ray: the instances as Ray tasks
    progress = command_progress(args.quiet)
    console = Console(soft_wrap=True)
    with progress, executor or contextlib.nullcontext():
        task = progress.task("verifying instances", len(instances))
        known = 0

        def show(inst: Instance, row: dict[str, str], resumed: bool) -> None:
            nonlocal known
            known += 1
            task.update(known)
            if not resumed:
                console.print(
                    f"{inst.name} {row['result']} {float(row['seconds']):.2f}s "
                    f"engine={row['engine']}"
                    + (f" expected={inst.expected}" if inst.expected else ""),
                    highlight=False,
                )

        rows = run_instances(
            instances,
            out=Path(args.out) if args.out else None,
            resume=args.resume,
            executor=executor,
            timeout=args.timeout,
            engine=args.engine,
            seed=args.seed,
            on_row=show,
        )
        task.close()
    solved = [r for r in rows if r["result"] in ("sat", "unsat")]
    wrong = [r for r in rows if r["correct"] == "False"]
    median = statistics.median(float(r["seconds"]) for r in solved) if solved else float("nan")
    print(
        f"summary: {len(solved)}/{len(rows)} solved "
        f"({sum(r['result'] == 'unsat' for r in rows)} unsat, "
        f"{sum(r['result'] == 'sat' for r in rows)} sat), {len(wrong)} wrong, "
        f"median time of solved {median:.2f}s"
    )
    return EXIT_OK
