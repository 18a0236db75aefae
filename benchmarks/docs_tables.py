"""Rewrite the benchmark tables in docs/*.md from the committed result JSON.

A table in a doc is a marked block; everything between the markers is generated:

    <!-- table: attacks_demo -->
    | attack | batch | … |
    <!-- /table -->

`python benchmarks/docs_tables.py` rewrites every block of every page under docs/ from
benchmarks/results/*.json; `--check` writes nothing and exits 1 naming each page whose
tables differ from what the JSON gives (tests/test_docs_tables.py runs that check, so a
doc cannot drift from its results). A renderer is a function `(results dir) -> markdown`
registered in `TABLES` under the block's name; it reads whatever entries the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

BLOCK = re.compile(
    r"(?P<open><!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)",
    re.DOTALL,
)
Renderer = Callable[[Path], str]
TABLES: dict[str, Renderer] = {}


class UnknownTable(KeyError):
    """A doc names a table block no renderer is registered for."""


def table(name: str) -> Callable[[Renderer], Renderer]:
    """Register a renderer under the block name docs use."""

    def register(fn: Renderer) -> Renderer:
        TABLES[name] = fn
        return fn

    return register


def _load(results: Path, name: str) -> Any:
    return json.loads((results / f"{name}.json").read_text())


def _md(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A markdown table; `align` has one character per column (`r` right-aligns)."""
    rules = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _sig(v: float | None, digits: int = 3) -> str:
    """`digits` significant figures, thousands separated, `–` for a missing value."""
    if v is None:
        return "–"
    if abs(v) >= 10 ** (digits - 1):
        return f"{round(v):,}"
    return format(v, f".{digits}g")


def _eps(norm: str, eps: float) -> str:
    """`L∞ 8/255` where eps is a small fraction of 255, else the number."""
    frac = Fraction(eps).limit_denominator(255)
    label = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}.get(norm, norm)
    if frac.denominator == 255 and abs(float(frac) - eps) < 1e-6:
        return f"{label} {frac.numerator}/255"
    return f"{label} {eps:g}"


# ---------------------------------------------------------------- docs/attacks.md


@table("attacks_demo")
def attacks_demo(results: Path) -> str:
    """Bastion's attacks on the demo CNN (`benchmarks/attacks_demo.py`)."""
    data = _load(results, "attacks_demo")
    rows = [
        [
            r["attack"],
            str(r["batch"]),
            _sig(r["median_seconds"]),
            f"{r['success_rate']:.3f}",
            "–" if r["mean_l2"] is None else f"{r['mean_l2']:.3f}",
            f"{r['forward']:,}",
            f"{r['backward']:,}",
        ]
        for r in data["results"]
    ]
    header = ["attack", "batch", "seconds", "success", "mean L2 of successes", "forward"]
    return _md([*header, "backward"], rows, "lrrrrrr")


AA_MODELS = {
    "resnet18": "pyautoattack ResNet-18",
    "mnist-standard": "MNIST CNN, standard",
    "mnist-fgsm-at": "MNIST CNN, FGSM-trained",
    "mnist-pgd-at": "MNIST CNN, PGD-trained",
}


def _aa_model(name: str) -> str:
    if name in AA_MODELS:
        return AA_MODELS[name]
    if name.startswith("mnist-distill-"):
        return f"MNIST CNN, distilled T = {name.removeprefix('mnist-distill-')}"
    return name


def _samples(fraction: float, n: int) -> int:
    """A robust-accuracy fraction of n images as a count (float32 fractions included)."""
    return round(fraction * n)


def _optional_ratio(entry: dict[str, Any], key: str) -> str:
    return "–" if entry.get(key) is None else f"{entry[key]:.2f}"


def _time_goal(entry: dict[str, Any], wall_key: str, cpu_key: str, goal: float) -> str:
    """Wall / CPU ratio against AutoAttack, marked where it misses `goal` (judged on CPU
    seconds where the entry has them, the load-robust figure)."""
    cpu = entry.get(cpu_key)
    judged = cpu if cpu is not None else entry[wall_key]
    text = f"{entry[wall_key]:.2f} / {_optional_ratio(entry, cpu_key)}"
    return text + ("" if judged <= goal else f" **(> {goal:g})**")


@table("autoattack_agreement")
def autoattack_agreement(results: Path) -> str:
    """Every entry of autoattack_agreement.json; an entry's note becomes a numbered footnote.

    The issue's goals are judged in samples: the `autoattack` suite's robust points at most
    AutoAttack's + 1; `quick` within 2 points (percentage points) of AutoAttack; and in time:
    the suite at most AutoAttack's, `quick` at most a fifth, on CPU seconds where the entry
    recorded them (load-robust), else wall. Misses are marked in bold.
    """
    data = _load(results, "autoattack_agreement")
    rows, notes = [], []
    # grouped by model and threat, then by sample count; repeated runs in the JSON's order
    order = sorted(data.values(), key=lambda e: (_aa_model(e["model"]), e["eps"], e["n"]))
    for entry in order:
        model = _aa_model(entry["model"])
        if entry.get("epochs"):
            model += f", {entry['epochs']} ep"
        if entry.get("note"):
            notes.append(entry["note"])
            model += f" ({len(notes)})"
        n, reference = entry["n"], entry["autoattack_robust_accuracy"]
        ours = _samples(entry["bastion_robust_accuracy"], n) <= _samples(reference, n) + 1
        quick = entry.get("quick_robust_accuracy")
        rows.append(
            [
                model,
                _eps(entry["norm"], entry["eps"]),
                str(n),
                f"{entry['clean_accuracy']:.2f}",
                f"{reference:.3f}",
                f"{entry['bastion_robust_accuracy']:.3f}" + ("" if ours else " **(> +1)**"),
                "–"
                if quick is None
                else f"{quick:.3f}"
                + (
                    ""
                    if _samples(quick, n) - _samples(reference, n) <= round(0.02 * n)
                    else " **(> +2 pts)**"
                ),
                _sig(entry["autoattack_seconds"], 2),
                _sig(entry["bastion_seconds"], 2),
                _time_goal(entry, "time_ratio", "bastion_cpu_ratio", 1.0),
                "–"
                if quick is None
                else _time_goal(entry, "quick_time_ratio", "quick_cpu_ratio", 0.2),
            ]
        )
    header = ["model", "threat", "n", "clean", "AutoAttack", "autoattack suite", "quick"]
    header += ["AutoAttack s", "autoattack suite s", "suite/AA wall / CPU"]
    text = _md([*header, "quick/AA wall / CPU"], rows, "llrrrrrrrrr")
    if notes:
        text += "\n\n" + "\n".join(f"({i}) {note}" for i, note in enumerate(notes, 1))
    return text


# ---------------------------------------------------------------- docs/performance.md

PEER_RUNS = ("attacks_vs_peers", "attacks_vs_peers_fgsm_pgd", "attacks_vs_peers_cw_mnist")
PEER_COLUMNS = (
    "library",
    "verified s",
    "attack s",
    "fwd",
    "bwd",
    "success",
    "L2 common",
    "L2 own",
    "×time",
    "×L2",
    "anomalies",
)


def _peer_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["attack"]), []).append(r)
    return list(groups.values())


def peer_row(r: dict[str, Any]) -> list[str]:
    if r["status"] != "ok":
        return [r["label"], f"{r['status']}: {r.get('reason', '')}"] + [""] * 9
    counts = r["counts"]
    shown = ("nan", "out_of_box", "over_budget", "zeros", "unchanged")
    anomalies = ", ".join(f"{k} {counts[k]}" for k in shown if counts[k]) or "–"
    if not r.get("deterministic", True):
        anomalies += " (varies across reps)"
    return [
        r["label"],
        _sig(r["median_verified_s"]),
        _sig(r["median_attack_s"]),
        f"{r['forward']:,}",
        f"{r['backward']:,}",
        f"{r['success_rate']:.3f}",
        "–" if r["mean_l2_common"] is None else f"{r['mean_l2_common']:.4f}",
        "–" if r["mean_l2_own"] is None else f"{r['mean_l2_own']:.4f}",
        "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}",
        "–" if r.get("l2_ratio") is None else f"{r['l2_ratio']:.3f}",
        anomalies,
    ]


def peer_title(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    ok = [x for x in rows if x["status"] == "ok" and "n_common" in x]
    common = f", {ok[0]['n_common']} succeeded for every row" if ok else ""
    reps = f", median of {ok[0]['repetitions']}" if ok else ""
    return f"{r['model']} · {r['attack_label']} · batch {r['batch']}{common}{reps}"


@table("peers_full")
def peers_full(results: Path) -> str:
    """Every (model, attack) group of the full attacks_vs_peers run, with the rows' notes."""
    parts = []
    for rows in _peer_groups(_load(results, "attacks_vs_peers")["rows"]):
        body = [peer_row(r) for r in rows]
        text = f"### {peer_title(rows)}\n\n" + _md(PEER_COLUMNS, body)
        notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
        if notes:
            text += "\n\n" + "\n".join(notes)
        parts.append(text)
    return "\n\n".join(parts)


def _ratio(v: float | None) -> str:
    """A ratio near 1 with enough decimals to show how far from 1 it is."""
    if v is None:
        return "–"
    gap = abs(v - 1)
    places = 3 if gap == 0 else min(7, max(3, 1 - math.floor(math.log10(gap))))
    return f"{v:.{places}f}"


def _bold_if_over(text: str, value: float | None) -> str:
    return f"**{text}**" if value is not None and value > 1 else text


@table("peers_summary")
def peers_summary(results: Path) -> str:
    """Bastion's rows against the fastest peer, each from the run with most repetitions.

    Where another run measured the same row, its ×time follows in brackets; a ×time or
    ×L2 above 1 (Bastion slower, or larger perturbations) is in bold.
    """
    runs = {name: _load(results, name) for name in PEER_RUNS if (results / f"{name}.json").exists()}
    found: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for data in runs.values():
        for r in data["rows"]:
            if r["library"] == "bastion" and r["status"] == "ok":
                found.setdefault((r["model"], r["attack"], r["label"]), []).append(r)
    rows = []
    for versions in found.values():
        best = max(versions, key=lambda r: r["repetitions"])
        others = [r for r in versions if r is not best]
        ratio = best.get("time_ratio")
        time_text = _bold_if_over("–" if ratio is None else f"{ratio:.2f}", ratio)
        if others:
            time_text += " (" + ", ".join(f"{r['time_ratio']:.2f}" for r in others) + ")"
        label = best["attack_label"]
        if best["label"] != "bastion":
            label += ", " + best["label"].removeprefix("bastion").strip(" ()")
        peer = best.get("fastest_peer")
        peer_rows = [
            r
            for data in runs.values()
            for r in data["rows"]
            if r["library"] == peer
            and r["model"] == best["model"]
            and r["attack"] == best["attack"]
            and r["repetitions"] == best["repetitions"]
        ]
        peer_s = f"{peer} ({_sig(peer_rows[0]['median_verified_s'])})" if peer_rows else "–"
        l2 = best.get("l2_ratio")
        rows.append(
            [
                best["model"],
                label,
                _sig(best["median_verified_s"]),
                peer_s,
                time_text,
                str(best["repetitions"]),
                f"{best['success_rate']:.3f}",
                _bold_if_over(_ratio(l2), l2),
            ]
        )
    header = ["model", "attack", "Bastion verified s", "fastest peer (s)", "×time", "reps"]
    return _md([*header, "Bastion success", "×L2"], rows, "llrlrrrr")


# ---------------------------------------------------------------- docs/blackbox.md


@table("blackbox_mnist")
def blackbox_mnist(results: Path) -> str:
    """The black-box attacks (and CW for scale) on MNIST and the demo CNN."""
    data = _load(results, "blackbox_mnist")
    rows = [
        [
            r["model"],
            r["attack"],
            str(r["images"]),
            f"{r['success_rate']:.2f}",
            f"{r['mean_l0']:.1f}",
            f"{r['mean_l2']:.2f}",
            f"{r['median_l2']:.2f}",
            f"{r['mean_queries']:,.0f}",
            _sig(r["seconds_per_image"], 2),
        ]
        for r in data["rows"]
    ]
    header = ["model", "attack", "images", "success", "mean L0", "mean L2", "median L2"]
    return _md([*header, "queries/img", "s/img"], rows, "llrrrrrrr")


@table("fooling_mnist")
def fooling_mnist(results: Path) -> str:
    """Fooling images on MNIST: the share of classes fooled at two confidences."""
    data = _load(results, "fooling_mnist")
    rows = []
    for r in data["rows"]:
        budget = (
            f"{r['generations']:,} generations"
            if r["gradients"] == 0 and r["generations"]
            else f"{r['generations']} steps"
            if r["gradients"]
            else "no generations"
        )
        rows.append(
            [
                r["method"],
                f"{budget} ({r['queries']:,} queries)",
                f"{round(10 * r['fooled_0.99'])}/10",
                f"{round(10 * r['fooled_0.9999'])}/10",
                f"{r['median_confidence']:.6g}",
                _sig(r["seconds"], 2),
            ]
        )
    header = ["method", "budget", "classes ≥ 99 %", "classes ≥ 99.99 %", "median confidence"]
    return _md([*header, "seconds"], rows, "llrrrr")


# ---------------------------------------------------------------- docs/scaling.md


@table("scaling_attack")
def scaling_attack(results: Path) -> str:
    """The scaling attack against every scaler (896² photo → 224²)."""
    data = _load(results, "scaling")
    rows = [
        [
            f"`{name}`",
            "yes" if r["vulnerable"] else "no",
            f"{r['psnr_source']:.1f}",
            f"{r['ssim_source']:.2f}",
            f"{r['psnr_target']:.1f}",
            f"{r['max_error_target']:g}",
            "yes" if r["converged"] else "no",
            _sig(r["seconds"], 2),
        ]
        for name, r in data["attack_cost"].items()
    ]
    header = ["scaler", "vulnerable", "PSNR(A,S)", "SSIM(A,S)", "PSNR(f(A),T)", "max error"]
    return _md([*header, "converged", "s/attack"], rows, "llrrrrlr")


@table("scaling_detection")
def scaling_detection(results: Path) -> str:
    """Decamouflage's ensemble (TPR / FPR on held-out images) per scaler and thresholds."""
    data = _load(results, "scaling")["detection"]
    scalers = list(data)
    modes = [
        ("white-box", "ensemble", "white-box"),
        ("black-box", "ensemble", "black-box (p99)"),
        ("black-box", "ensemble_any", 'black-box, `combine="any"`'),
        ("built-in", "ensemble", "built-in"),
    ]
    rows = []
    for mode, key, label in modes:
        cells = []
        for s in scalers:
            m = data[s][mode][key]
            cells.append(f"{m['tpr']:.2f} / {m['fpr']:.2f}")
        rows.append([label, *cells])
    return _md(["thresholds", *scalers], rows)


@table("scaling_median")
def scaling_median(results: Path) -> str:
    """The median-filter defense: attack success before/after and what benign images lose."""
    data = _load(results, "scaling")["median_defense"]
    rows = [
        [
            f"`{name}`",
            f"{r['success_before']:.2f} → {r['success_after_median']:.2f}",
            f"{r['benign_psnr_image']:.1f}",
            f"{r['benign_psnr_scaled']:.1f}",
        ]
        for name, r in data.items()
    ]
    header = ["scaler", "success before → after", "benign PSNR(S_def, S)"]
    return _md([*header, "benign PSNR(f(S_def), f(S))"], rows, "lrrr")


@table("scaling_detection_ms")
def scaling_detection_ms(results: Path) -> str:
    """Detection time per 896² image, wall clock and process CPU."""
    data = _load(results, "scaling")["detection_ms_896"]
    names = list(data["wall_ms"])
    rows = [
        ["wall clock, ms", *(f"{data['wall_ms'][n]:.1f}" for n in names)],
        ["process CPU time, ms", *(f"{data['cpu_ms'][n]:.1f}" for n in names)],
    ]
    return _md(["", *names], rows, "l" + "r" * len(names))


# ---------------------------------------------------------------- docs/defenses.md

DEFENSE_NAMES = {
    "distillation": "distillation, T = 100",
    "raw_isp_random": "RAW-ISP, randomised",
    "dverge": "DVERGE, 3 members",
}


def _seconds(step: dict[str, Any]) -> str:
    """`96 s (28 s)`: a command's wall seconds and, in brackets, its CPU seconds."""
    return f"{step['wall_seconds']:.0f} s ({step['cpu_seconds']:.0f} s)"


def _threat(spec: str) -> str:
    """`linf:0.1` as `L∞ 0.1`, `linf:8/255` as `L∞ 8/255`."""
    norm, _, eps = spec.partition(":")
    return _eps(norm, float(Fraction(eps)))


def _acc(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


@table("defense_table")
def defense_table(results: Path) -> str:
    """Per defense, undefended | defended | adaptive robust accuracy at each threat model,
    from one run of the commands (`benchmarks/defense_table.py`), with the commands' wall
    and CPU seconds and the load they ran at."""
    data = _load(results, "defense_table")
    rows = []
    loads: list[float] = []
    commits: list[str] = []
    for key, d in data["defenses"].items():
        clean = f"{_acc(d['clean_undefended'])} → {_acc(d['clean_defended'])}"
        training = " + ".join(_seconds(s) for s in d["training"].values()) or "–"
        for k, t in enumerate(d["threats"]):
            first = k == 0
            rows.append(
                [
                    DEFENSE_NAMES.get(key, d["defense"]) if first else "",
                    str(d["n"]) if first else "",
                    clean if first else "",
                    _threat(t["threat"]),
                    _acc(t["undefended"]),
                    _acc(t["defended"]),
                    f"**{_acc(t['adaptive'])}**",
                    training if first else "",
                    _seconds(d["report"]) if first else "",
                ]
            )
        steps = [*d["training"].values(), d["report"]]
        loads += [v for s in steps for v in (s["load_before"][0], s["load_after"][0])]
        for step in steps:
            if step["commit"] not in commits:
                commits.append(step["commit"])
    header = ["defense", "n", "clean accuracy (undefended → defended)", "threat", "undefended"]
    header += ["defended", "adaptive", "training wall (CPU)", "report wall (CPU)"]
    text = _md(header, rows, "lrllrrrrr")
    cores = data["machine"]["usable_cores"] or data["machine"]["cores"]
    text += (
        f"\n\nOne run, {data['machine']['time_utc'][:10]}, at commits {', '.join(commits)} "
        f"(HEAD as each command ended; +dirty: other files of the tree had changes): {cores} "
        "cores shared with other jobs, one torch thread per command; 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} before and after the commands."
    )
    return text


# ---------------------------------------------------------------- docs/scale-out.md


@table("ray_scaling")
def ray_scaling(results: Path) -> str:
    """One process against Ray with 1 and 2 workers, the quick suite."""
    data = _load(results, "ray_scaling")
    rows = []
    for run in data["runs"].values():
        name = "one process" if run["workers"] is None else f"Ray, {run['workers']} worker"
        overhead = run.get("task_overhead") or {}
        rows.append(
            [
                name + ("s" if (run["workers"] or 1) > 1 else ""),
                f"{run['wall_seconds']:.1f}",
                f"{run['ray_startup_seconds']:.1f}",
                f"{run['item_seconds_mean']:.3f}",
                f"{overhead['round_trip_ms']:.1f}" if overhead else "–",
                f"{run['load'][0]:.1f}",
                run["report_sha256"][:12],
            ]
        )
    items = next(iter(data["runs"].values()))["items"]
    header = [
        f"run (n = {data['n']}, batch {data['batch_size']}: {items} items)",
        "wall (s)",
        "Ray start (s)",
        "item mean (s)",
        "task round trip (ms)",
        "load (1-min)",
        "report sha256",
    ]
    return _md(header, rows, "lrrrrrl")


# ---------------------------------------------------------------- the rewriting


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every marked block replaced by its renderer's output."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise UnknownTable(f"no renderer for table {name!r}; known: {', '.join(TABLES)}")
        return f"{match['open']}{TABLES[name](results).rstrip()}\n{match['close']}"

    return BLOCK.sub(replace, text)


def stale(docs: Path = DOCS, results: Path = RESULTS) -> list[Path]:
    """The pages whose marked tables differ from what `results` gives."""
    return [p for p in sorted(docs.glob("*.md")) if render(p.read_text(), results) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    pages = stale()
    if args.check:
        for page in pages:
            print(
                f"{page.relative_to(ROOT)}: tables differ from benchmarks/results (run "
                "`python benchmarks/docs_tables.py`)"
            )
        return 1 if pages else 0
    for page in pages:
        page.write_text(render(page.read_text()))
        print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
