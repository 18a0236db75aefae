"""`bastion fool`: evolve (or climb to) one fooling image per class and write them as PNGs."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.commands.common import EXIT_OK, add_model_and_data, load_model_and_data
from bastion.errors import ConfigError
from bastion.suites.gallery import png_bytes
from bastion.suites.progress import RichProgress, command_progress

_JSON = "fooling.json"
_DEFAULT_STEPS = {"evolution": 200, "ascent": 300}


def register(sub: Any) -> None:
    """Add `fool` to the subparsers `sub`."""
    p = sub.add_parser(
        "fool",
        help="generate fooling images (Nguyen et al. 2015), one per class",
        description="Evolve unrecognisable images that the model labels with high confidence "
        "(MAP-Elites, one bin per class; black-box) or climb to them by gradient ascent "
        "(white-box baseline). Writes fooling-<class>.png and fooling.json into --out and "
        "prints 'class confidence generation' per class.",
    )
    add_model_and_data(p)
    p.add_argument(
        "--method",
        choices=["evolution", "ascent"],
        default="evolution",
        help="evolution (MAP-Elites, black-box; default) or ascent (gradient ascent)",
    )
    p.add_argument(
        "--encoding",
        choices=["direct", "cppn"],
        default="direct",
        help="evolution's genome: direct (one gene per pixel) or cppn (regular patterns)",
    )
    p.add_argument(
        "--generations",
        type=int,
        default=None,
        help="generations (default 200, the paper's MNIST figures); for ascent the steps "
        "(default 300)",
    )
    p.add_argument("--population", type=int, default=200, help="children per generation")
    p.add_argument(
        "--classes", default=None, help="class indices to fool, e.g. '0,3,7' (default all)"
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="stop evolution once every class reaches this confidence, e.g. 0.9999",
    )
    p.add_argument("--time-budget", type=float, default=None, help="stop evolution after SECONDS")
    p.add_argument(
        "--out",
        default="bastion-fooling",
        help="output directory (default ./bastion-fooling); other files there stay",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print fooling.json on stdout instead")
    p.set_defaults(handler=run, out_is_folder=True)


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--classes takes class indices like '0,3,7', got {text!r}") from None


def _best_note(
    bars: RichProgress, label: str, total: int, classes: list[str]
) -> Callable[[int, int, Any], None]:
    """A FoolingEvolution progress callback: the bar, and the best confidence per class in
    % (floored, so 100 means exactly 1) as the note under it."""
    task_id = bars.add(label, max(total, 1))

    def update(done: int, _total: int, best: Any) -> None:
        shown = "  ".join(
            f"{name}:{math.floor(float(c) * 1e4) / 100:.2f}"
            for name, c in zip(classes, best.tolist(), strict=False)
        )
        bars.note(f"best confidence per class (%)  {shown}")
        bars.update(task_id, completed=done)

    return update


def run(args: argparse.Namespace) -> int:
    """Run the attack, write the PNGs and fooling.json, print one line per class."""
    from bastion.attacks.fooling import FoolingEvolution
    from bastion.attacks.fooling_ascent import FoolingGradientAscent
    from bastion.fileio import write_atomic

    steps = _DEFAULT_STEPS[args.method] if args.generations is None else args.generations
    if steps < 0 or args.population < 1:
        raise ConfigError(
            f"--generations must be >= 0 and --population >= 1, got {steps}, {args.population}"
        )
    if args.method == "ascent" and (args.target is not None or args.time_budget is not None):
        raise ConfigError("--target and --time-budget apply to --method evolution only")
    classes = _classes(args.classes)
    bars = command_progress(args.quiet)
    with bars:
        model, data, info = load_model_and_data(args, bars)
        shape = tuple(data.x.shape[1:])
        if shape[0] not in (1, 3):
            raise ConfigError(f"PNG output needs 1 or 3 channels, the data has {shape[0]}")
        if args.method == "ascent":
            attack: Any = FoolingGradientAscent(steps, seed=args.seed)
            extra = {"start": data.x.mean(0)}
            label = "gradient ascent"
        else:
            attack = FoolingEvolution(
                args.encoding,
                generations=steps,
                population=args.population,
                target_confidence=args.target,
                time_budget=args.time_budget,
                seed=args.seed,
            )
            extra, label = {}, f"MAP-Elites ({args.encoding})"
        shown = [str(c) for c in classes] if classes is not None else data.classes
        result = attack(
            model,
            input_shape=shape,
            classes=classes,
            progress=_best_note(bars, label, steps, shown),
            **extra,
        )
    names = data.classes if len(data.classes) == result.num_classes else None
    summary = _summary(args, result, names, info)
    out = Path(args.out)
    for row, image in zip(summary["classes"], result.images, strict=True):
        write_atomic(
            out / row["file"], png_bytes(image.detach().cpu().numpy(), channels_first=True)
        )
    write_atomic(out / _JSON, json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    for row in summary["classes"]:
        print(f"{row['name']} {row['confidence']:.6f} {row['generation']}")
    fooled = sum(r["fooled_0.99"] for r in summary["classes"])
    print(
        f"fooled {fooled}/{len(summary['classes'])} classes at >= 0.99 · "
        f"{result.generations} {'steps' if args.method == 'ascent' else 'generations'} · "
        f"{result.queries} queries · {result.seconds:.1f} s · {out / _JSON}"
    )
    return EXIT_OK


def _summary(
    args: argparse.Namespace, result: Any, names: list[str] | None, info: dict[str, Any]
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "method": args.method,
        "encoding": args.encoding if args.method == "evolution" else None,
        "model": info,
        "data": args.data or "digits",
        "seed": args.seed,
        **result.to_dict(names),
    }
    mask = result.fooled_mask(0.99).tolist()
    for row, fooled in zip(summary["classes"], mask, strict=True):
        row["fooled_0.99"] = bool(fooled)
        row["file"] = f"fooling-{row['class']}.png"
    return summary
