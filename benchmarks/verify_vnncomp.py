"""`bastion verify` on VNN-COMP 2021 mnistfc (256×2), ACAS Xu and cifar10_resnet, next to
Marabou.

Per instance: Bastion's verdict (the same per-file decision as `bastion verify --instances`,
run in a forked child with a hard kill at timeout + 30 s), checked against the consensus of
`reference_results.csv`; a `sat` counterexample is replayed independently in onnxruntime
(in the box within 1e-6, violation within VNN-COMP's 1e-4). Marabou (`maraboupy`, default
options) runs on the same instances through `marabou_runner.py` with `--marabou`; for mnistfc
the default is the per-instance table `mnistfc/marabou_on_this_machine.md` (measured on the
same kind of machine, idle). The published VNN-COMP 2021 results (Marabou, α,β-CROWN, nnenum
on AWS) come from the reference file. The JSON is rewritten atomically after every instance
(each suite under its own key, so two suites may run at once); `--resume` skips done rows.

    python benchmarks/verify_vnncomp.py --suite mnistfc [--timeout 120] [--resume]
    python benchmarks/verify_vnncomp.py --suite acasxu --instances 0:186:12 --marabou
    python benchmarks/verify_vnncomp.py --suite cifar10_resnet --instances 0:72:6
    python benchmarks/verify_vnncomp.py --suite mnistfc --quick        # smoke run
    python benchmarks/verify_vnncomp.py --suite mnistfc --profile prop_1_0.03.vnnlib
    python benchmarks/verify_vnncomp.py --suite mnistfc --instances 1,3,5 --deadlines 0.01,2,5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _harness import RESULTS, data_root, machine, update_json

# the CLI's decision, imported before any fork: a long run uses the engine read at its start
from bastion.verify import Property, load_network, read_instances, read_vnnlib
from bastion.verify.decide import decide_file, onnx_replay

DATA = data_root() / "vnncomp2021"
OUT = RESULTS / "verify_vnncomp.json"
SUITES = {
    "mnistfc": DATA / "mnistfc" / "mnistfc_instances.csv",
    "acasxu": DATA / "acasxu" / "acasxu_instances.csv",
    "cifar10_resnet": DATA / "cifar10_resnet" / "cifar10_resnet_instances.csv",
}
# the tools whose 2021 results the reference file lists (column prefixes)
PUBLISHED = {
    "mnistfc": ("marabou", "abcrown", "nnenum"),
    "acasxu": ("marabou", "abcrown", "nnenum"),
    "cifar10_resnet": ("a-b-CROWN", "VeriNet", "ERAN", "Marabou"),
}
MARABOU_TABLE = DATA / "mnistfc" / "marabou_on_this_machine.md"
GRACE = 30.0  # seconds past the timeout before a child is killed


def read_json_key(path: Path, key: str) -> Any:
    return json.loads(path.read_text()).get(key) if path.exists() else None


def verdict_row(v: Any) -> dict[str, Any]:
    """The JSON fields of a Verdict (counterexample as a flat list `x`)."""
    return {
        "result": v.vnncomp,
        "seconds": v.seconds,
        "engine": v.engine,
        "reason": v.reason,
        "unstable": [int(s.get("unstable", 0)) for s in v.layers],
        "open_after_bounds": v.details.get("open_after_bounds"),
        "domains": v.details.get("domains"),
        "stage_seconds": v.details.get("stage_seconds"),  # the deciding box's stages
        "x": None if v.counterexample is None else v.counterexample.flatten().tolist(),
    }


def _child(conn: Any, job: Callable[[], dict[str, Any]]) -> None:
    conn.send(job())


def run_forked(job: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """`job()` in a forked child, killed at timeout + GRACE (then result "unknown");
    `wall_s` is the child's wall time."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    child = ctx.Process(target=_child, args=(send, job))
    child.start()
    send.close()
    out: dict[str, Any]
    if recv.poll(timeout + GRACE):
        try:
            out = recv.recv()
        except EOFError:
            out = {"result": "unknown", "reason": "child died", "seconds": None}
    else:
        child.kill()
        out = {"result": "unknown", "reason": "hard kill", "seconds": None}
    child.join()
    out["wall_s"] = time.perf_counter() - start
    return out


def run_bastion(onnx: Path, vnnlib: Path, timeout: float) -> dict[str, Any]:
    """Bastion's verdict on one VNN-COMP instance, as `bastion verify --instances` decides
    it; `seconds` is the verifier's own time (after reading the files)."""

    def job() -> dict[str, Any]:
        loaded = time.perf_counter()
        net = load_network(onnx)
        props = read_vnnlib(vnnlib, net.input_shape, net.num_outputs)
        replay = onnx_replay(onnx)
        load_s = time.perf_counter() - loaded
        row = verdict_row(decide_file(net, props, timeout=timeout, replay=replay))
        row["load_s"] = load_s
        row["overrun_s"] = row["seconds"] - timeout
        return row

    return run_forked(job, timeout)


def check_witness(onnx: Path, props: list[Property], x: list[float]) -> dict[str, Any]:
    """Replay a witness in onnxruntime: is it in some box, does it violate that box's
    property (VNN-COMP: within 1e-4)? Margin > 0 means strictly inside the unsafe set."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    xa = np.asarray(x, dtype=np.float64)
    y = sess.run(None, {inp.name: xa.astype(np.float32).reshape(shape)})[0]
    xt = torch.from_numpy(xa)
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(1, -1))
    best: dict[str, Any] = {"in_box": False, "margin": None, "valid": False}
    for p in props:
        inside = bool(p.contains(xt.view(1, *p.lower.shape), tol=1e-6)[0])
        margin = float(p.violation(yt)[0])
        if inside and (best["margin"] is None or margin > best["margin"]):
            best = {"in_box": True, "margin": margin, "valid": margin >= -1e-4}
    return best


def marabou_table() -> dict[str, dict[str, Any]]:
    """The idle-machine Marabou run on mnistfc, per vnnlib file (from the shared table)."""
    rows: dict[str, dict[str, Any]] = {}
    for line in MARABOU_TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0].endswith(".vnnlib"):
            word = cells[3].split()[0]
            result = word if word in ("sat", "unsat") else "unknown"
            rows[cells[0]] = {"result": result, "wall_s": float(cells[4]), "source": "table"}
    return rows


def _published(ref: dict[str, str], tool: str) -> dict[str, Any]:
    word = {"holds": "unsat", "violated": "sat"}.get(ref.get(f"{tool}_result", ""), "unknown")
    secs = ref.get(f"{tool}_s", "")
    return {"result": word, "seconds": float(secs) if secs else None}


def select(n: int, spec: str | None) -> list[int]:
    """Instance indices: "a:b[:step]" or a comma list of indices (default: all)."""
    if not spec:
        return list(range(n))
    if ":" in spec:
        parts = [int(p) if p else None for p in spec.split(":")]
        return list(range(n))[slice(*parts)]
    return [int(p) for p in spec.split(",")]


def summarise(rows: list[dict[str, Any]], tool: str) -> dict[str, Any]:
    """Solved / wrong / median time of solved for one tool's column."""
    got = [r[tool] for r in rows if tool in r]
    solved = [g for g in got if g["result"] in ("sat", "unsat")]
    wrong = [g for g in got if g.get("correct") is False]
    times = [g.get("seconds") or g.get("wall_s") for g in solved]
    return {
        "instances": len(got),
        "solved": len(solved),
        "unsat": sum(g["result"] == "unsat" for g in got),
        "sat": sum(g["result"] == "sat" for g in got),
        "wrong": len(wrong),
        "median_s_solved": round(statistics.median(times), 3) if times else None,
    }


def judge(out: dict[str, Any], expected: str | None) -> None:
    if out["result"] in ("sat", "unsat") and expected is not None:
        out["correct"] = out["result"] == expected


def with_reference(instances: list[Any], csv_path: Path) -> list[Any]:
    """Instances whose reference row `read_instances` did not find (cifar10_resnet's csv
    names `onnx/resnet_2b.onnx`, its reference file `resnet_2b.onnx`), matched by the
    network's file name and the property's path."""
    import csv
    import dataclasses

    ref_path = csv_path.parent / "reference_results.csv"
    if not ref_path.exists():
        return instances
    with ref_path.open(newline="") as f:
        refs = list(csv.DictReader(f))
    words = {"holds": "unsat", "violated": "sat"}
    out = []
    for inst in instances:
        if not inst.reference:
            match = next(
                (r for r in refs if Path(r["onnx"]).name == inst.onnx.name
                 and inst.vnnlib.as_posix().endswith(r["vnnlib"])),
                None,
            )  # fmt: skip
            if match is not None:
                expected = words.get(match.get("consensus", "").strip().lower())
                inst = dataclasses.replace(inst, expected=expected, reference=match)
        out.append(inst)
    return out


def with_pending(rows: list[dict[str, Any]], done: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` and the resumed rows not run again (yet), by instance index: a resumed file
    loses no row (a full run over an every-6th subset keeps the subset's later rows)."""
    seen = {r["name"] for r in rows}
    return sorted(rows + [r for n, r in done.items() if n not in seen], key=lambda r: r["index"])


def run_suite(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    instances = with_reference(read_instances(SUITES[args.suite]), SUITES[args.suite])
    chosen = select(len(instances), args.instances)
    if args.quick:
        chosen = chosen[:3]
    timeout = args.timeout or (10.0 if args.quick else None)
    prev = read_json_key(args.out, args.suite) if args.resume else None
    done = {r["name"]: r for r in (prev or {}).get("rows", [])}
    table = marabou_table() if args.suite == "mnistfc" and not args.marabou else {}
    rows: list[dict[str, Any]] = []
    loads = list((prev or {}).get("loadavg_per_instance", []))
    commit = machine()["commit"]  # per row: a resumed file may span commits
    for k in chosen:
        inst = instances[k]
        if inst.name in done:  # the verdict kept; the reference read again
            row = done[inst.name]
            row["expected"] = inst.expected
            judge(row["bastion"], inst.expected)
            for tool in PUBLISHED[args.suite]:
                row[f"published_{tool}"] = _published(dict(inst.reference), tool)
            rows.append(row)
            continue
        t = timeout or inst.timeout
        row: dict[str, Any] = {"index": k, "name": inst.name, "expected": inst.expected}
        row["timeout_s"] = t
        row["commit"] = commit
        row["bastion"] = run_bastion(inst.onnx, inst.vnnlib, t)
        if args.marabou:
            row["marabou"] = run_marabou(inst.onnx, inst.vnnlib, t)
        elif inst.vnnlib.name in table:
            row["marabou"] = table[inst.vnnlib.name]
        net = load_network(inst.onnx)
        props = read_vnnlib(inst.vnnlib, net.input_shape, net.num_outputs)
        for tool in ("bastion", "marabou"):
            if tool in row:
                judge(row[tool], inst.expected)
                x = row[tool].pop("x", None)
                row[tool].pop("y", None)
                if x is not None:
                    row[tool]["witness"] = check_witness(inst.onnx, props, x)
        for tool in PUBLISHED[args.suite]:
            row[f"published_{tool}"] = _published(dict(inst.reference), tool)
        row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        loads.append(row["loadavg"][0])
        b = row["bastion"]
        m = row.get("marabou", {})
        log(
            f"{inst.name:55s} expected={inst.expected} bastion={b['result']} "
            f"{b.get('seconds') or b['wall_s']:.1f}s {b.get('engine', '')} "
            f"marabou={m.get('result', '-')} {m.get('wall_s', 0):.1f}s load={row['loadavg'][0]}"
        )
        save(args, with_pending(rows, done), loads, timeout)
    return save(args, with_pending(rows, done), loads, timeout)


def run_marabou(onnx: Path, vnnlib: Path, timeout: float) -> dict[str, Any]:
    from marabou_runner import run_marabou as run  # benchmarks/ is on sys.path

    out = run(onnx, vnnlib, timeout)
    out["source"] = "this run"
    return out


def save(
    args: argparse.Namespace, rows: list[dict[str, Any]], loads: list[float], timeout: Any
) -> dict[str, Any]:
    tools = ["bastion", "marabou"]
    for r in rows:
        for t in PUBLISHED[args.suite]:
            judge(r[f"published_{t}"], r["expected"])
    doc = {
        "csv": str(SUITES[args.suite]),
        "timeout_s": timeout or "per csv",
        "quick": args.quick,
        "marabou_source": "this run" if args.marabou else "marabou_on_this_machine.md (idle)",
        "machine": machine(),
        "loadavg_per_instance": loads,
        "summary": {t: summarise(rows, t) for t in tools},
        "published_2021": {
            t: summarise([{t: r[f"published_{t}"]} for r in rows], t) for t in PUBLISHED[args.suite]
        },
        "rows": rows,
    }
    update_json(args.out, args.suite, doc)
    return doc


def profile(args: argparse.Namespace) -> None:
    """cProfile one instance in-process; cumulative seconds per verifier stage into JSON."""
    import cProfile
    import pstats

    inst = next(i for i in read_instances(SUITES[args.suite]) if i.vnnlib.name == args.profile)
    net = load_network(inst.onnx)
    props = read_vnnlib(inst.vnnlib, net.input_shape, net.num_outputs)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    v = decide_file(net, props, timeout=args.timeout or inst.timeout)
    prof.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    stages = {
        "bounds (compute_bounds, CROWN)": ("bounds.py", "compute_bounds"),
        "of which CROWN back-substitution (_tighten)": ("bounds.py", "_tighten"),
        "PGD (falsify)": ("falsify.py", "falsify"),
        "MILP encode": ("milp.py", "encode"),
        "HiGHS solve (scipy milp)": ("_milp.py", "milp"),
        "z3 (solve_smt)": ("smt.py", "solve_smt"),
        "branch and bound": ("bab.py", "branch_and_bound"),
    }
    cum = {}
    for label, (file, func) in stages.items():
        cum[label] = round(
            sum(s[3] for (f, _, fn), s in stats.items() if f.endswith(file) and fn == func), 3
        )
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    doc = {
        "instance": inst.name,
        "expected": inst.expected,
        "result": v.vnncomp,
        "engine": v.engine,
        "reason": v.reason,
        "unstable": [int(s.get("unstable", 0)) for s in v.layers],
        "total_s": round(total, 3),
        "cumulative_s": cum,
        "top_self_s": [
            {"func": f"{Path(f).name}:{fn}", "self_s": round(s[2], 3), "calls": s[1]}
            for (f, _, fn), s in top
        ],
        "machine": machine(),
    }
    profiles = read_json_key(args.out, "profiles") or {}
    profiles[inst.vnnlib.name] = doc
    update_json(args.out, "profiles", profiles)
    print(json.dumps(doc, indent=1))


def table(doc: dict[str, Any]) -> str:
    lines = ["| tool | instances | solved | unsat | sat | wrong | median s (solved) |"]
    lines.append("|---|---|---|---|---|---|---|")
    named = {
        "bastion (this run)": doc["summary"]["bastion"],
        f"marabou ({doc['marabou_source']})": doc["summary"]["marabou"],
    }
    named.update({f"{k} (VNN-COMP 2021, AWS)": v for k, v in doc["published_2021"].items()})
    for name, s in named.items():
        if s["instances"]:
            lines.append(
                f"| {name} | {s['instances']} | {s['solved']} | {s['unsat']} | {s['sat']} "
                f"| {s['wrong']} | {s['median_s_solved']} |"
            )
    return "\n".join(lines)


def deadline_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Each chosen instance at each of `--deadlines` (seconds): how far the verification's
    own time (from the model loaded) runs past the timeout; the issue's bound is
    timeout × 1.05 + 1 s. Loading and the forked child's start are reported apart."""
    instances = read_instances(SUITES[args.suite])
    rows = []
    for k in select(len(instances), args.instances):
        inst = instances[k]
        for t in (float(v) for v in args.deadlines.split(",")):
            out = run_bastion(inst.onnx, inst.vnnlib, t)
            seconds = out.get("seconds")
            row = {
                "name": inst.name, "timeout_s": t, "result": out["result"],
                "seconds": seconds, "load_s": out.get("load_s"), "wall_s": out["wall_s"],
                "overrun_s": None if seconds is None else seconds - t,
                "within_bound": seconds is not None and seconds <= t * 1.05 + 1.0,
                "loadavg": round(os.getloadavg()[0], 2),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    overruns = [r["overrun_s"] for r in rows if r["overrun_s"] is not None]
    doc = {
        "rows": rows,
        "max_overrun_s": max(overruns) if overruns else None,
        "all_within_bound": all(r["within_bound"] for r in rows),
        "machine": machine(),
    }
    update_json(args.out, f"deadline_{args.suite}", doc)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="mnistfc")
    p.add_argument("--instances", default=None, help='subset: "a:b[:step]" or "i,j,k"')
    p.add_argument("--timeout", type=float, default=None, help="seconds (default: the csv's)")
    p.add_argument("--quick", action="store_true", help="3 instances, 10 s: a smoke run")
    p.add_argument("--marabou", action="store_true", help="run Marabou here too")
    p.add_argument("--resume", action="store_true", help="skip instances already in the JSON")
    p.add_argument("--profile", default=None, help="cProfile this vnnlib file's instance")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--deadlines", default=None, help='deadline sweep: timeouts "0.01,2,5"')
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.profile:
        profile(args)
        return
    if args.deadlines:
        deadline_sweep(args)
        return
    doc = run_suite(args, log=lambda s: print(s, flush=True))
    print(table(doc))


if __name__ == "__main__":
    main()
