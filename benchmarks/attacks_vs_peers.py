"""Bastion's FGSM, PGD and CW-L2 side by side with torchattacks, ART, Foolbox, advertorch
and cleverhans: same model, same batch, same seeds, same budgets, one shared evaluator.

Models: the embedded demo CNN (digits, 1×8×8) and a small MNIST CNN trained once (one
epoch on the 60k training split) and cached under $BASTION_CACHE or ~/.cache/bastion,
keyed by a hash of its recipe. The batch is the first test images the model classifies
correctly, so every library attacks the same points and none gets free successes.

Attacks (one eps per model, stated in the output): FGSM L∞ (batch 256); PGD L∞, 40 steps
of 2.5·eps/40 from a uniform random start (batch 256); CW-L2 100 iterations × 1 binary
step at one fixed c per model (1 on digits, 10 on MNIST) without abort-early (batch 64);
CW-L2 9 binary steps × 1,000 iterations from c₀ = 1e-3 with abort-early (16 images, at
most `--repeat-long` repetitions; a library whose warm-up extrapolates past
`--max-run-seconds` per run is reported as skipped, with the estimate).

Every library's output is re-checked by the same evaluator: success is a re-prediction
(and the image must be finite, inside [0, 1] and, for FGSM/PGD, inside the eps-ball);
it counts NaNs, out-of-box images, over-budget images, failed samples returned as zeros
and unchanged inputs. Forward and backward passes are counted (per image) by one
counting wrapper around the model, for every library. Times are medians of `--repeat`
runs after a warm-up, interleaved (rep 1: every library, rep 2: every library, …, the
order rotating) so that drift on a shared machine hits all alike. "Time to a verified
result" is a library's attack time plus the shared check (one forward of its output) —
except for Bastion, whose attack already ends with that one forward (its `success` is a
re-prediction of `x_adv`): charging it the shared check too would count its check twice.
The shared evaluator still re-checks Bastion's output, and the run records whether its own
`success` equals the shared one (`self_check_agrees`); both times are in the JSON.

    python benchmarks/attacks_vs_peers.py [--repeat 5] [--models demo,mnist]
        [--attacks fgsm,pgd,cw100,cw9x1000] [--libraries bastion,torchattacks,...]
        [--repeat-long 3] [--max-run-seconds 300] [--device cpu|cuda] [--threads N]
        [--data-root ../shared/data] [--quick] [--out FILE]

Installs nothing: the peers come with `pip install -e ".[bench]"` plus
`pip install --no-deps cleverhans` (cleverhans 4 otherwise pulls in TensorFlow).
`--quick` is a smoke run (1 repetition, small batches, CW 9 × 100) that writes nothing
unless `--out` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _harness import correctly_classified, git_commit, write_json
from _harness import machine as harness_machine
from docs_tables import PEER_COLUMNS
from docs_tables import peer_row as table_row
from docs_tables import peer_title as section_title
from peers import ADAPTERS, INSTALL_HINT, Adapter, AttackSpec, CountingModel, Entry, Unsupported
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "attacks_vs_peers.json"
ATTACKS = ("fgsm", "pgd", "cw100", "cw9x1000")
MODELS = ("demo", "mnist")
EPS = {"demo": 0.1, "mnist": 0.1}
# CW 100 × 1 uses one fixed c per model: on MNIST, 100 Adam steps of 0.01 at c = 1 break
# about 9 % of the images; c = 10 reaches about 40 %, what 100 steps can (c = 100: 42 %).
CW_CONST = {"demo": 1.0, "mnist": 10.0}
SEED = 0

MNIST_RECIPE: dict[str, Any] = {
    "name": "bench-mnist-cnn",
    "version": 1,
    "data": "mnist train (60k)",
    "arch": "conv8s2-conv16s2-fc64-10",
    "epochs": 1,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 3e-3,
    "seed": 0,
}


class MnistCNN(nn.Module):
    """conv3×3/2(8) → ReLU → conv3×3/2(16) → ReLU → fc64 → ReLU → fc10, on 1×28×28."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mnist_model(root: Path) -> nn.Module:
    """The benchmark's MNIST CNN: trained once (a few seconds), then loaded from the cache."""
    from bastion.zoo import cached_model

    return cached_model(MNIST_RECIPE, MnistCNN, f"mnist:{root}")


def attack_specs(eps: float, const: float, quick: bool) -> dict[str, AttackSpec]:
    big, cw, cw9, it9 = (64, 16, 4, 100) if quick else (256, 64, 16, 1000)
    return {
        "fgsm": AttackSpec("fgsm", f"FGSM L∞ {eps:g}", "fgsm", big, eps=eps, steps=1, step=eps),
        "pgd": AttackSpec(
            "pgd", f"PGD L∞ {eps:g} × 40", "pgd", big, eps=eps, steps=40, step=2.5 * eps / 40
        ),
        "cw100": AttackSpec(
            "cw100",
            f"CW-L2 100 × 1, c = {const:g}",
            "cw",
            cw,
            cw_binary_steps=1,
            cw_iterations=100,
            cw_const=const,
            cw_abort_early=False,
        ),
        "cw9x1000": AttackSpec(
            "cw9x1000",
            f"CW-L2 9 × {it9:,}, c₀ = 1e-3, abort early",
            "cw",
            cw9,
            cw_binary_steps=9,
            cw_iterations=it9,
            cw_const=1e-3,
            cw_abort_early=True,
        ),
    }


def warmup_spec(spec: AttackSpec) -> AttackSpec:
    """The same attack on the same batch with at most 1 binary step × 100 iterations: it
    wakes the same code paths (allocator, kernels, lazy imports) at a fraction of the cost."""
    return dataclasses.replace(spec, cw_binary_steps=1, cw_iterations=min(spec.cw_iterations, 100))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: Any, spec: AttackSpec
) -> dict[str, Any]:
    """The shared evaluator: re-predict, measure and sanity-check one library's output."""
    x_adv = torch.as_tensor(np.asarray(x_adv) if not isinstance(x_adv, torch.Tensor) else x_adv)
    x_adv = x_adv.detach().to(device=x.device, dtype=x.dtype)
    if x_adv.shape != x.shape:
        raise ValueError(f"returned shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    sync(x.device)
    start = time.perf_counter()
    with torch.no_grad():
        pred = model(torch.nan_to_num(x_adv)).argmax(1)
    sync(x.device)
    check_s = time.perf_counter() - start
    d = (x_adv - x).flatten(1).double()
    finite = torch.isfinite(d).all(1)
    flat = x_adv.flatten(1)
    in_box = ((flat >= 0) & (flat <= 1)).all(1)
    linf = d.abs().amax(1)
    within = linf <= spec.eps + 1e-6 if spec.bounded else torch.ones_like(finite)
    zeros = (flat == 0).all(1) & (x.flatten(1) != 0).any(1)
    unchanged = (d == 0).all(1)
    # an all-zero image for a non-zero input is Foolbox's failure sentinel, not an attack
    success = finite & in_box & within & ~zeros & (pred != y)
    return {
        "check_s": check_s,
        "success": success.cpu(),
        "l2": d.norm(dim=1).cpu(),
        "linf": linf.cpu(),
        "counts": {
            "nan": int((~finite).sum()),
            "out_of_box": int((finite & ~in_box).sum()),
            "over_budget": int((finite & ~within).sum()),
            "zeros": int(zeros.sum()),
            "unchanged": int(unchanged.sum()),
            "misclassified_but_invalid": int(((pred != y) & ~success).sum()),
        },
    }


def run_attack(
    model: nn.Module,
    model_name: str,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    spec: AttackSpec,
    adapters: list[Adapter],
    repeat: int,
    max_run_seconds: float,
) -> list[dict[str, Any]]:
    """All libraries on one (model, attack): warm-up, then `repeat` interleaved rounds.

    A row whose warm-up, scaled up to the full iteration budget, would take longer than
    `max_run_seconds` per run is not measured; the row says so and gives the estimate.
    """
    x, y = x_all[: spec.batch], y_all[: spec.batch]
    counting = CountingModel(model).eval()
    rows: list[dict[str, Any]] = []
    live: list[tuple[Entry, dict[str, Any]]] = []
    for adapter in adapters:
        base = {"model": model_name, "attack": spec.key, "attack_label": spec.label}
        base |= {"library": adapter.name, "batch": int(len(x))}
        if adapter.error is not None:
            rows.append(base | {"label": adapter.name, "status": "import failed"})
            rows[-1]["reason"] = adapter.error
            continue
        try:
            entries = adapter.entries(spec)
        except Unsupported as exc:
            rows.append(base | {"label": adapter.name, "status": "unsupported", "reason": str(exc)})
            continue
        for entry in entries:
            row = base | {"label": entry.label, "status": "ok", "note": entry.note}
            row |= {"attack_s": [], "check_s": []}
            rows.append(row)
            live.append((entry, row))

    def once(entry: Entry, row: dict[str, Any], s: AttackSpec) -> dict[str, Any] | None:
        seed_all(SEED)
        counting.reset()
        model.eval()
        try:
            sync(x.device)
            start = time.perf_counter()
            x_adv = entry.run(counting, x, y, s)
            sync(x.device)
            seconds = time.perf_counter() - start
            result = evaluate(model, x, y, x_adv, s)
        except Exception as exc:  # a crashing library is a row, not a crashed benchmark
            row["status"] = "error"
            row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return None
        result["attack_s"] = seconds
        result["forward"] = counting.forward_count
        result["backward"] = counting.backward_count
        return result

    warm = warmup_spec(spec)
    scale = (spec.cw_binary_steps * spec.cw_iterations) / (
        warm.cw_binary_steps * warm.cw_iterations
    )
    for entry, row in live:
        result = once(entry, row, warm)
        if result is None:
            continue
        estimate = result["attack_s"] * scale
        if estimate > max_run_seconds:
            row["status"] = "skipped"
            row["reason"] = (
                f"warm-up ({warm.cw_binary_steps} × {warm.cw_iterations}) took "
                f"{result['attack_s']:.1f} s, so {spec.cw_binary_steps} × {spec.cw_iterations:,} "
                f"would take about {estimate:.0f} s per run without abort-early, over "
                f"--max-run-seconds {max_run_seconds:g}"
            )
            row["estimated_s"] = estimate
    for rep in range(repeat):
        k = rep % max(len(live), 1)
        for entry, row in live[k:] + live[:k]:
            if row["status"] != "ok":
                continue
            result = once(entry, row, spec)
            if result is None:
                continue
            row["attack_s"].append(result["attack_s"])
            row["check_s"].append(result["check_s"])
            if entry.library == "bastion":
                adapter = next(a for a in adapters if a.name == "bastion")
                agrees = torch.equal(adapter.last_success, result["success"])
                row["self_check_agrees"] = row.get("self_check_agrees", True) and agrees
            if "first" not in row:
                row["first"] = result
                if entry.library == "bastion":
                    row["bastion_reported"] = dict(
                        zip(("forward", "backward"), adapter.last_counts, strict=True)
                    )
            elif not torch.equal(row["first"]["success"], result["success"]):
                row["deterministic"] = False
    summarise(rows, spec)
    return rows


def summarise(rows: list[dict[str, Any]], spec: AttackSpec) -> None:
    """Medians, success, the common-success L2 and Bastion's ratios for one (model, attack)."""
    done = [r for r in rows if r["status"] == "ok" and "first" in r]
    common = None
    for r in done:
        s = r["first"]["success"]
        common = s.clone() if common is None else common & s
    for r in done:
        first = r.pop("first")
        succ = first["success"]
        r["repetitions"] = len(r["attack_s"])
        r["median_attack_s"] = statistics.median(r["attack_s"])
        r["median_check_s"] = statistics.median(r["check_s"])
        r["median_attack_plus_check_s"] = statistics.median(
            a + c for a, c in zip(r["attack_s"], r["check_s"], strict=True)
        )
        # Bastion's attack ends with its own success check (one forward), confirmed equal to
        # the shared one (`self_check_agrees`): its result is verified when it returns
        self_verified = r["library"] == "bastion" and r.get("self_check_agrees", False)
        r["median_verified_s"] = (
            r["median_attack_s"] if self_verified else r["median_attack_plus_check_s"]
        )
        r["forward"] = first["forward"]
        r["backward"] = first["backward"]
        r["n"] = int(len(succ))
        r["n_success"] = int(succ.sum())
        r["success_rate"] = float(succ.float().mean())
        r["counts"] = first["counts"]
        r["mean_l2_own"] = float(first["l2"][succ].mean()) if succ.any() else None
        r["mean_linf_own"] = float(first["linf"][succ].mean()) if succ.any() else None
        r["n_common"] = int(common.sum()) if common is not None else 0
        r["mean_l2_common"] = (
            float(first["l2"][common].mean()) if common is not None and common.any() else None
        )
        r.setdefault("deterministic", True)
    for r in rows:
        r.pop("first", None)
    peers = [r for r in done if r["library"] != "bastion"]
    fastest = min(peers, key=lambda r: r["median_verified_s"], default=None)
    with_l2 = [r for r in peers if r["mean_l2_common"] is not None]
    best_l2 = min(with_l2, key=lambda r: r["mean_l2_common"], default=None)
    for r in done:
        if r["library"] != "bastion":
            continue
        if fastest is not None:
            r["fastest_peer"] = fastest["label"]
            r["time_ratio"] = r["median_verified_s"] / fastest["median_verified_s"]
        if best_l2 is not None and r["mean_l2_common"] is not None:
            r["best_l2_peer"] = best_l2["label"]
            r["l2_ratio"] = r["mean_l2_common"] / best_l2["mean_l2_common"]


# ---- output -------------------------------------------------------------------------------

COLUMNS = PEER_COLUMNS


def print_table(groups: list[list[dict[str, Any]]]) -> None:
    for rows in groups:
        print(f"\n{section_title(rows)}")
        body = [table_row(r) for r in rows]
        widths = [len(c) for c in COLUMNS]
        for line in body:
            if len(line[1]) > 40 and not line[2]:
                continue  # status lines do not widen the columns
            widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]
        print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
        for line in body:
            if not line[2]:
                print(f"{line[0].ljust(widths[0])}  {line[1]}")
            else:
                print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def _load(machine: dict[str, Any], when: str) -> str:
    values = machine.get(f"load_average_at_{when}")
    return f"{values[0]:.2f}" if values else "unknown"


def markdown(result: dict[str, Any], groups: list[list[dict[str, Any]]]) -> str:
    m = result["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    lines = [
        "# Bastion vs peers: FGSM, PGD, CW-L2",
        "",
        f"Generated by `{result['command']}` on {result['date']} (commit {result['commit']}).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"torch {m['torch']} on {m['device']} with {m['torch_threads']} thread(s), "
        f"Python {m['python']}, NumPy {m['numpy']}; 1-minute load average "
        f"{_load(m, 'start')} at the start and {_load(m, 'end')} at the end "
        f"(the machine may be shared; {result['total_seconds']:.0f} s in all).",
        "",
        f"Libraries: {libs}.",
        "",
        f"Median of {result['repeat']} interleaved repetitions "
        f"({result['repeat_long']} for CW 9 × 1,000) after a warm-up. "
        "*verified s* = attack time + the shared re-prediction (one forward); for Bastion, "
        "whose attack ends with that forward (its `success` is a re-prediction, checked equal "
        "to the shared one), the attack time alone; *fwd*/*bwd* = "
        "images through the model forward/backward, counted by one wrapper for every "
        "library; *success* = re-predicted misclassified, finite, in [0, 1] and (FGSM/PGD) "
        "within eps; *L2 common* = mean L2 over the samples every row succeeded on; "
        "*×time* = Bastion's verified time / the fastest peer's; *×L2* = Bastion's L2 "
        "common / the best peer's (below 1: Bastion finds smaller perturbations).",
        "",
    ]
    for name, info in result["models"].items():
        if "skipped" in info:
            lines.append(f"- **{name}**: skipped — {info['skipped']}")
        else:
            lines.append(
                f"- **{name}**: {info['description']}; clean accuracy "
                f"{info['clean_accuracy']:.3f} on the test split; FGSM/PGD eps {info['eps']:g} "
                f"(L∞); CW 100 × 1 at c = {CW_CONST[name]:g}."
            )
    lines += [
        "",
        "Same budgets for every library: FGSM one step of eps; PGD 40 steps of 2.5·eps/40 "
        "from a uniform random start in the eps-ball (every library's own RNG, seeded with "
        "0); CW-L2 Adam with learning rate 0.01, κ = 0, 100 × 1 at the fixed c above without "
        "abort-early, and 9 binary steps × 1,000 from c₀ = 1e-3 with abort-early. The batch "
        "is the first test images the model classifies correctly. An all-zero image "
        "returned for a non-zero input (Foolbox's failure value) counts as a failure. "
        "Where a library cannot be configured like that, the note under its table says how "
        "it differs.",
        "",
    ]
    for rows in groups:
        lines += [f"## {section_title(rows)}", ""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for line in (table_row(r) for r in rows):
            if not line[2]:
                line = [line[0], line[1]] + [""] * (len(COLUMNS) - 2)
            lines.append("| " + " | ".join(line) + " |")
        notes = [(r["label"], r.get("note", "")) for r in rows if r.get("note")]
        if notes:
            lines.append("")
            lines += [f"- {label}: {note}" for label, note in notes]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--libraries", default=",".join(ADAPTERS))
    parser.add_argument(
        "--repeat-long",
        type=int,
        default=3,
        help="repetitions for CW 9 × 1,000, at most --repeat (default 3: 20-60 s per run "
        "and library on 2 cores; 5 makes the whole run ~35 min)",
    )
    parser.add_argument(
        "--max-run-seconds",
        type=float,
        default=300,
        help="skip a row whose warm-up extrapolates past this many seconds per run",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--data-root",
        default="../shared/data",
        help="folder holding MNIST/raw/*.gz; relative paths are from the repository root",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, small batches")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT})")
    args = parser.parse_args()
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    out = Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)
    models = _choices(args.models, MODELS, "--models")
    attacks = _choices(args.attacks, ATTACKS, "--attacks")
    libraries = _choices(args.libraries, tuple(ADAPTERS), "--libraries")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    adapters = [ADAPTERS[name]() for name in libraries]
    for a in adapters:
        a.device = device
    missing = [a for a in adapters if a.error is not None]
    if missing:
        print("peer libraries that failed to import (reported as such in the results):")
        for a in missing:
            print(f"  {a.name}: {a.error}")
        print(f"install them with: {INSTALL_HINT}\n")

    import bastion

    root = Path(args.data_root)
    root = root if root.is_absolute() else (REPO / root).resolve()
    model_info: dict[str, Any] = {}
    groups: list[list[dict[str, Any]]] = []
    libraries = {a.name: a.version if a.error is None else f"import failed: {a.error}"
                 for a in adapters}  # fmt: skip
    commit, machine = (
        git_commit(),
        harness_machine(device, numpy=np.__version__, libraries=libraries),
    )
    started = time.perf_counter()
    for name in models:
        if name == "demo":
            model = bastion.zoo.demo_model()
            data = bastion.load_data("digits", split="test")
            description = "embedded demo CNN (scikit-learn digits, 1×8×8)"
        else:
            if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
                reason = (
                    f"MNIST not found under {root} (expected MNIST/raw/*.gz); "
                    "pass --data-root DIR to include the MNIST model"
                )
                print(f"skipping the MNIST model: {reason}")
                model_info[name] = {"skipped": reason}
                continue
            model = mnist_model(root)
            data = bastion.load_data(f"mnist:{root}", split="test")
            description = (
                f"small MNIST CNN ({MNIST_RECIPE['arch']}, 1 epoch on the 60k training split, "
                f"recipe hash {bastion.zoo.recipe_hash(MNIST_RECIPE)}), 1×28×28"
            )
        model = model.to(device).eval()
        specs = attack_specs(EPS[name], CW_CONST[name], args.quick)
        need = max(specs[a].batch for a in attacks)
        x, y, acc = correctly_classified(model, data.x.to(device), data.y.to(device), need)
        model_info[name] = {"description": description, "clean_accuracy": acc, "eps": EPS[name]}
        model_info[name]["attacks"] = {k: dataclasses.asdict(specs[k]) for k in attacks}
        for key in attacks:
            spec = specs[key]
            t0 = time.perf_counter()
            print(
                f"[{time.perf_counter() - started:6.0f} s] {name} · {spec.label} …", file=sys.stderr
            )
            reps = min(repeat, args.repeat_long) if key == "cw9x1000" else repeat
            rows = run_attack(model, name, x, y, spec, adapters, reps, args.max_run_seconds)
            groups.append(rows)
            print(f"         done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    result = {
        "benchmark": "attacks_vs_peers",
        "command": "python benchmarks/attacks_vs_peers.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "repeat": repeat,
        "repeat_long": min(repeat, args.repeat_long),
        "quick": args.quick,
        "seed": SEED,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": machine
        | {"load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "models": model_info,
        "rows": [r for rows in groups for r in rows],
    }
    print_table(groups)
    if out is not None:
        write_json(out, result)
        out.with_suffix(".md").write_text(markdown(result, groups))
        print(f"\nwrote {out} and {out.with_suffix('.md')}")


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in allowed]
    if unknown or not picked:
        raise SystemExit(
            f"{flag}: unknown {', '.join(unknown) or 'empty'}; pick from {', '.join(allowed)}"
        )
    return picked


if __name__ == "__main__":
    main()
