"""`bastion scale-attack` (hide a target in a source image) and `bastion detect` (Decamouflage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bastion.commands.common import EXIT_OK, add_threads_option, set_threads
from bastion.errors import ConfigError, DataError

_SCORE_FORMAT = {
    "rescale_mse": ".1f",
    "rescale_ssim": ".3f",
    "filter_mse": ".1f",
    "filter_ssim": ".3f",
    "csp": ".0f",
}


def size_arg(text: str) -> tuple[int, int]:
    """argparse type: `224` or `224x160` (rows x cols)."""
    try:
        parts = [int(v) for v in text.lower().replace("×", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x160, got {text!r}")
    return (parts[0], parts[-1])


def _scaler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scaler",
        default="cv2.linear",
        help="the deployment's resize: cv2.{nearest,linear,cubic,area,lanczos4}, "
        "pil.{nearest,bilinear,bicubic,lanczos,box}, torch.{nearest,bilinear,bicubic,area}, "
        "torch.{bilinear,bicubic}-aa (default cv2.linear)",
    )
    p.add_argument(
        "--size", type=size_arg, default=(224, 224), help="model input size, rows[xcols] (224)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of plain lines")


def register(sub: Any) -> None:
    """Add `scale-attack` and `detect` to the subparsers `sub`."""
    att = sub.add_parser(
        "scale-attack",
        help="hide TARGET in SOURCE so that the resize shows the model TARGET",
        description="Xiao et al.'s image-scaling attack (box-constrained QP, or the "
        "penalty/Adam variant). TARGET is resized to --size with OpenCV area scaling first "
        "when it has another size; SOURCE must be larger than --size.",
    )
    att.add_argument("source", help="the image people see (PNG, JPEG, …)")
    att.add_argument("target", help="the image the model should see")
    _scaler_options(att)
    att.add_argument("--out", default="attack.png", help="where to write the attack image")
    att.add_argument("--eps", type=float, default=1.0, help="allowed error in grey levels (1)")
    att.add_argument("--method", choices=["qp", "penalty"], default="qp")
    att.add_argument("--model", default=None, help="also classify the scaled attack image")
    att.add_argument("--trust-pickle", action="store_true", help="allow a pickled model file")
    add_threads_option(att)
    att.set_defaults(handler=run_attack)
    det = sub.add_parser(
        "detect",
        help="flag image-scaling attack images (Decamouflage)",
        description="Score images with Decamouflage's rescaling, filtering and steganalysis "
        "detectors and print 'PATH attack|benign scores…' per image, then a summary. "
        "Directories are expanded to the images inside.",
    )
    det.add_argument("images", nargs="*", help="image files or directories")
    _scaler_options(det)
    det.add_argument("--thresholds", default=None, help="threshold file from --calibrate --save")
    det.add_argument("--calibrate", default=None, help="benign images (dir) to calibrate on")
    det.add_argument("--attacks", default=None, help="attack images (dir): white-box calibration")
    det.add_argument("--percentile", type=float, default=99.0, help="black-box percentile (99)")
    det.add_argument("--save", default=None, help="write the calibrated thresholds here")
    det.set_defaults(handler=run_detect)


def _read(path: str | Path) -> Any:
    from bastion.data import read_image

    return read_image(Path(path))


def run_attack(args: argparse.Namespace) -> int:
    """Attack, write the attack image, print the metrics."""
    import cv2
    from PIL import Image

    from bastion.attacks.scaling import PenaltyScalingAttack, ScalingAttack
    from bastion.fileio import require_writable_dir

    set_threads(args.threads)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the image file to write, e.g. attack.png")
    require_writable_dir(out.parent, "the folder of --out")
    source, target = _read(args.source), _read(args.target)
    resized = target.shape[:2] != args.size
    if resized:
        target = cv2.resize(target, args.size[::-1], interpolation=cv2.INTER_AREA)
    model = None
    if args.model is not None:
        from bastion.model_io import load_model

        model = load_model(args.model, trust_pickle=args.trust_pickle)
    if args.method == "qp":
        attack: Any = ScalingAttack(args.scaler, eps=args.eps)
    else:
        attack = PenaltyScalingAttack(args.scaler)
    res = attack(source, target, model=model)
    Image.fromarray(res.attack).save(out)
    metrics = {"out": str(out), "target_resized": resized, **res.metrics()}
    if args.json:  # an exact hit has PSNR inf, which JSON cannot hold: null
        print(json.dumps({k: None if v == float("inf") else v for k, v in metrics.items()}))
    else:
        shown = {k: v for k, v in metrics.items() if k != "out" and v is not None}
        text = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
        )
        print(f"{out} {text}")
    return EXIT_OK


def _expand(paths: list[str]) -> list[Path]:
    from bastion.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; give image files or directories")
    return files


def run_detect(args: argparse.Namespace) -> int:
    """Calibrate (optionally) and score every image."""
    from bastion.defenses.decamouflage import SCORES, Decamouflage

    if args.calibrate is not None:
        if args.save is None:
            raise ConfigError("--calibrate needs --save FILE to write the thresholds to")
        benign = [_read(f) for f in _expand([args.calibrate])]
        attacks = None if args.attacks is None else [_read(f) for f in _expand([args.attacks])]
        if not benign or attacks == []:
            raise DataError("no images found to calibrate on; check the directories")
        det = Decamouflage(args.scaler, args.size).calibrate(
            benign, attacks, percentile=args.percentile
        )
        det.save(args.save)
        if not args.json:
            values = " ".join(f"{k}={v:{_SCORE_FORMAT[k]}}" for k, v in det.thresholds.items())
            print(f"{args.save} {det.mode} {det.scaler} {det.size[0]}x{det.size[1]} {values}")
    elif args.thresholds is not None:
        det = Decamouflage.load(args.thresholds, args.scaler, args.size)
    else:
        det = Decamouflage(args.scaler, args.size)
    files = _expand(args.images)
    if not files and args.calibrate is None:
        raise DataError("no images given; pass image files or directories")
    scores = det.score([_read(f) for f in files])
    flags = det.decide(scores)
    rows = [
        {
            "path": str(f),
            "verdict": "attack" if flags["ensemble"][i] else "benign",
            **{k: float(scores[k][i]) for k in SCORES},
            "detectors": {d: bool(flags[d][i]) for d in ("rescaling", "filtering", "steganalysis")},
        }
        for i, f in enumerate(files)
    ]
    n_attack = sum(r["verdict"] == "attack" for r in rows)
    if args.json:
        print(
            json.dumps(
                {
                    "scaler": det.scaler,
                    "size": list(det.size),
                    "mode": det.mode,
                    "thresholds": det.thresholds,
                    "images": rows,
                }
            )
        )
        return EXIT_OK
    for r in rows:
        values = " ".join(f"{k}={r[k]:{_SCORE_FORMAT[k]}}" for k in SCORES)
        print(f"{r['path']} {r['verdict']} {values}")
    if files:
        print(
            f"{len(rows)} images: {n_attack} attack, {len(rows) - n_attack} benign "
            f"({det.mode} thresholds for {det.scaler} at {det.size[0]}x{det.size[1]})"
        )
    return EXIT_OK
