"""Bastion vs Marabou on MLPs trained here: local robustness, n images × an eps grid.

Two models, trained in seconds and cached by recipe: a digits MLP 64-32-32-10 (sklearn
digits, 8×8) and an MNIST MLP 784-32-32-10. For the first `--n` correctly classified test
images and each eps, the property "class stays the label in the L∞ ball" is written as a
VNN-LIB file (`bastion.verify.write_vnnlib`) next to the model exported to ONNX
(`torch.onnx.export(..., dynamo=False)`). Bastion (`verify` on the extracted torch model, in
a forked child) and Marabou (`marabou_runner.py`, own subprocess) get the same timeout.
Both witnesses are replayed in onnxruntime. Any instance where both decide and disagree is
a soundness bug in one of them: it is listed under "disagreements" with its files kept.

    python benchmarks/verify_mlp.py [--n 10] [--timeout 30] [--models digits,mnist] [--resume]
    python benchmarks/verify_mlp.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from _harness import machine, mnist_spec, update_json
from torch import nn
from verify_vnncomp import (  # benchmarks/ is on sys.path
    check_witness,
    read_json_key,
    run_forked,
    verdict_row,
)

from bastion.data import load_data
from bastion.verify import extract, robustness_property, verify, write_vnnlib
from bastion.zoo import cache_dir, cached_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "verify_mlp.json"
WORK = cache_dir() / "verify_mlp"  # the ONNX and VNN-LIB files, kept as reproducers
MODELS: dict[str, dict[str, Any]] = {
    "digits-64-32-32-10": {
        "data": "digits",
        "sizes": (64, 32, 32, 10),
        "eps": (0.02, 0.05, 0.08),
        "recipe": {"name": "verify-digits-mlp", "version": 1, "data": "digits train",
                   "arch": "64-32-32-10", "epochs": 40, "batch_size": 32, "lr": 3e-3,
                   "seed": 0},
    },
    "mnist-784-32-32-10": {
        "data": mnist_spec(),
        "sizes": (784, 32, 32, 10),
        "eps": (0.01, 0.02, 0.03),
        "recipe": {"name": "verify-mnist-mlp", "version": 1, "data": "mnist train (60k)",
                   "arch": "784-32-32-10", "epochs": 2, "batch_size": 128, "lr": 3e-3,
                   "seed": 0},
    },
}  # fmt: skip


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Flatten, then Linear-ReLU pairs, a final Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per tool and the cross-check: both decided, agreed, disagreed."""
    out: dict[str, Any] = {"instances": len(rows)}
    for tool in ("bastion", "marabou"):
        got = [r[tool] for r in rows]
        solved = [g for g in got if g["result"] in ("sat", "unsat")]
        times = [g.get("seconds") or g["wall_s"] for g in solved]
        out[tool] = {
            "solved": len(solved),
            "unsat": sum(g["result"] == "unsat" for g in got),
            "sat": sum(g["result"] == "sat" for g in got),
            "invalid_witnesses": sum(
                not g.get("witness", {}).get("valid", True) for g in got if g["result"] == "sat"
            ),
            "median_s_solved": round(statistics.median(times), 3) if times else None,
            "median_wall_s_all": round(statistics.median(g["wall_s"] for g in got), 3)
            if got
            else None,
        }
    both = [r for r in rows if {r["bastion"]["result"], r["marabou"]["result"]} <= {"sat", "unsat"}]
    out["both_decided"] = len(both)
    out["agree"] = sum(r["bastion"]["result"] == r["marabou"]["result"] for r in both)
    out["disagreements"] = [
        r["name"] for r in both if r["bastion"]["result"] != r["marabou"]["result"]
    ]
    out["only_bastion"] = sum(
        r["bastion"]["result"] != "unknown" and r["marabou"]["result"] == "unknown" for r in rows
    )
    out["only_marabou"] = sum(
        r["marabou"]["result"] != "unknown" and r["bastion"]["result"] == "unknown" for r in rows
    )
    return out


def run_model(name: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from marabou_runner import run_marabou

    model = cached_model(spec["recipe"], lambda: mlp(spec["sizes"]), spec["data"], prefix="bench-")
    test = load_data(spec["data"], split="test")
    shape = tuple(test.x.shape[1:])
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
        correct = (model(test.x[:200]).argmax(1) == test.y[:200]).nonzero().flatten()
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx = folder / "model.onnx"
    torch.onnx.export(model, (test.x[:1],), str(onnx), dynamo=False)
    network = extract(model, shape)
    eps_grid = spec["eps"][:2] if args.quick else spec["eps"]
    prev = read_json_key(args.out, name) if args.resume else None
    done = {r["name"]: r for r in (prev or {}).get("rows", [])}
    rows: list[dict[str, Any]] = []
    for idx in correct[: args.n].tolist():
        x, label = test.x[idx], int(test.y[idx])
        for eps in eps_grid:
            key = f"img{idx}_eps{eps:g}"
            if key in done:
                rows.append(done[key])
                continue
            prop = robustness_property(x, label, 10, eps=eps)
            vnnlib = folder / f"{key}.vnnlib"
            write_vnnlib(prop, vnnlib, comment=f"{name} test image {idx}, label {label}, eps {eps}")

            def job(prop: Any = prop) -> dict[str, Any]:
                return verdict_row(verify(network, prop, model=model, timeout=args.timeout))

            row: dict[str, Any] = {"name": key, "index": idx, "label": label, "eps": eps}
            row["bastion"] = run_forked(job, args.timeout)
            row["marabou"] = run_marabou(onnx, vnnlib, args.timeout)
            for tool in ("bastion", "marabou"):
                x_w = row[tool].pop("x", None)
                row[tool].pop("y", None)
                if x_w is not None:
                    row[tool]["witness"] = check_witness(onnx, [prop], x_w)
            row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
            b, m = row["bastion"], row["marabou"]
            flag = ""
            if {b["result"], m["result"]} == {"sat", "unsat"}:
                flag = f"  DISAGREEMENT: reproduce with {onnx} {vnnlib}"
            print(
                f"{name} {key:18s} bastion={b['result']:7s} "
                f"{b.get('seconds') or b['wall_s']:6.2f}s "
                f"{b.get('engine', ''):9s} marabou={m['result']:7s} {m['wall_s']:6.2f}s "
                f"load={row['loadavg'][0]}{flag}",
                flush=True,
            )
            rows.append(row)
            save(args, name, spec, acc, rows)
    return save(args, name, spec, acc, rows)


def save(
    args: argparse.Namespace, name: str, spec: dict[str, Any], acc: float, rows: list[Any]
) -> dict[str, Any]:
    doc = {
        "recipe": spec["recipe"],
        "test_accuracy": round(acc, 4),
        "eps": list(spec["eps"][:2] if args.quick else spec["eps"]),
        "n_images": args.n,
        "timeout_s": args.timeout,
        "quick": args.quick,
        "machine": machine(),
        "summary": agreement(rows),
        "rows": rows,
    }
    update_json(args.out, name, doc)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10, help="images per model")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per tool and instance")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--quick", action="store_true", help="2 images × 2 eps, 10 s: a smoke run")
    p.add_argument("--resume", action="store_true", help="skip instances already in the JSON")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.quick:
        args.n, args.timeout = 2, 10.0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    summaries = {name: run_model(name, MODELS[name], args)["summary"] for name in
                 args.models.split(",")}  # fmt: skip
    print("| model | instances | both decided | agree | disagree | Bastion solved (median s) "
          "| Marabou solved (median s) |")  # fmt: skip
    for name, s in summaries.items():
        b, m = s["bastion"], s["marabou"]
        print(
            f"| {name} | {s['instances']} | {s['both_decided']} | {s['agree']} "
            f"| {len(s['disagreements'])} | {b['solved']} ({b['median_s_solved']}) "
            f"| {m['solved']} ({m['median_s_solved']}) |"
        )


if __name__ == "__main__":
    main()
