"""The verifier's attack-first step: the old sign-step loop against APGD on the attacks'
shared gradient loop (`bastion.verify.falsify`), on the VNN-COMP 2021 instances known sat.

Instances: every mnistfc 256×2 instance whose reference consensus is `sat` (12), and the
`sat` ones of the ACAS Xu subset that `verify_vnncomp.py` runs (indices 0:186:15 plus 182
and 185). Per instance, property box and seed, each search gets the same deadline and is
run in one process, side by side, on the network `bastion verify` extracts (float32
inputs, as the verifier calls it); every returned point is replayed alone in onnxruntime
(in the box, strictly unsafe), as the verifier does, and the first confirmed one counts.

- `single`: one call with the default budget (32 samples × 100 iterations), seeds 0…4:
  how often a counterexample is found, the time to it, the model rows evaluated.
- `persistent`: calls with seeds 0, 1, 2, … until a counterexample is confirmed or the
  wall budget (`--budget`, default 30 s) is spent: the time to the first counterexample.

The old loop is kept here, verbatim, as the baseline (`sign_step_falsify`); it was
`verify/falsify.py` before the switch.

    python benchmarks/falsify_loop.py [--budget 30] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _harness import RESULTS, data_root, machine, write_json

from bastion.verify import Property, load_network, read_instances, read_vnnlib
from bastion.verify.decide import onnx_replay
from bastion.verify.falsify import falsify

Forward = Callable[[torch.Tensor], torch.Tensor]
Search = Callable[..., list[torch.Tensor]]
DATA = data_root() / "vnncomp2021"
OUT = RESULTS / "falsify_loop.json"
ACAS_SUBSET = [*range(0, 186, 15), 182, 185]


def sign_step_falsify(
    forward: Forward,
    prop: Property,
    *,
    restarts: int = 32,
    steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    deadline: float | None = None,
) -> list[torch.Tensor]:
    """The verifier's former loop: sign steps of a shrinking fraction of each input's range,
    from the box centre and seeded uniform restarts, all in one batch."""
    lo = prop.lower.to(device=device, dtype=torch.float32)
    hi = prop.upper.to(device=device, dtype=torch.float32)
    lo = torch.where(lo.double() < prop.lower.to(lo.device), lo.nextafter(hi), lo)
    hi = torch.where(hi.double() > prop.upper.to(hi.device), hi.nextafter(lo), hi)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((restarts - 1, *lo.shape), generator=gen).to(device)
    x = torch.cat([((lo + hi) / 2)[None], lo + noise * (hi - lo)])
    span = hi - lo
    for step in range(steps + 1):
        x.requires_grad_(True)
        value = prop.violation(forward(x).flatten(1)).cpu()
        hits = (value > 0).nonzero().flatten()
        late = deadline is not None and time.perf_counter() >= deadline
        if len(hits) or step == steps or late:
            order = hits[value[hits].detach().argsort(descending=True)]
            return [x[k].detach().clone() for k in order.tolist()]
        (grad,) = torch.autograd.grad(value.sum(), x)
        size = 0.5 * (1 - step / steps) + 0.01
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + size * span * grad.sign(), lo), hi)
    return []


SEARCHES: dict[str, Search] = {"sign_step_old": sign_step_falsify, "apgd_new": falsify}


class Counted:
    """The float32 network, counting the rows it evaluates."""

    def __init__(self, forward: Forward) -> None:
        self.forward, self.rows = forward, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.forward(x.to(torch.float32))


def confirmed(replay: Forward, prop: Property, x: torch.Tensor) -> bool:
    """Alone, in onnxruntime: inside the box and strictly inside the unsafe set."""
    x32 = x.detach().cpu().to(torch.float32)
    if not bool(prop.contains(x32[None].double())[0]):
        return False
    with torch.no_grad():
        y = replay(x32[None]).detach().flatten(1).cpu()
    return bool(prop.violation(y)[0] > 0)


def one_call(
    search: Search, net: Any, props: list[Property], replay: Forward, seed: int, deadline: float
) -> dict[str, Any]:
    """One search per property box (the file's boxes in turn, as `decide_file`)."""
    start = time.perf_counter()
    counted = Counted(net.forward)
    for prop in props:
        for x in search(counted, prop, seed=seed, deadline=deadline):
            if confirmed(replay, prop, x):
                s = time.perf_counter() - start
                return {"found": True, "seconds": s, "rows": counted.rows}
    return {"found": False, "seconds": time.perf_counter() - start, "rows": counted.rows}


def persistent(
    search: Search, net: Any, props: list[Property], replay: Forward, budget: float
) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + budget
    seed = calls = 0
    while time.perf_counter() < deadline:
        out = one_call(search, net, props, replay, seed, deadline)
        calls += 1
        if out["found"]:
            return {"found": True, "seconds": time.perf_counter() - start, "calls": calls}
        seed += 1
    return {"found": False, "seconds": time.perf_counter() - start, "calls": calls}


def summary(rows: list[dict[str, Any]], name: str, seeds: int) -> dict[str, Any]:
    single = [c for r in rows for c in r["single"][name]]
    hit = [c["seconds"] for c in single if c["found"]]
    per = [r["persistent"][name] for r in rows]
    first = [p["seconds"] for p in per if p["found"]]
    return {
        "instances": len(rows),
        "found_by_some_single_call": sum(any(c["found"] for c in r["single"][name]) for r in rows),
        "single_calls_found": f"{len(hit)}/{len(single)}",
        "single_median_s_to_cex": round(statistics.median(hit), 4) if hit else None,
        "single_median_rows_all": statistics.median(c["rows"] for c in single) if single else None,
        "persistent_found": sum(p["found"] for p in per),
        "persistent_median_s_to_cex": round(statistics.median(first), 4) if first else None,
        "persistent_max_s_to_cex": round(max(first), 4) if first else None,
        "seeds": seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="persistent wall budget, s")
    parser.add_argument("--seeds", type=int, default=5, help="single calls per instance")
    parser.add_argument("--quick", action="store_true", help="2 instances, 1 seed, 3 s")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mnist = [
        i for i in read_instances(DATA / "mnistfc" / "mnistfc_instances.csv")
        if i.expected == "sat"
    ]  # fmt: skip
    acas_all = read_instances(DATA / "acasxu" / "acasxu_instances.csv")
    acas = [acas_all[k] for k in ACAS_SUBSET if acas_all[k].expected == "sat"]
    chosen = [("mnistfc", i) for i in mnist] + [("acasxu", i) for i in acas]
    if args.quick:
        chosen, args.seeds, args.budget = chosen[:1] + chosen[-1:], 1, 3.0
    rows: list[dict[str, Any]] = []
    for suite, inst in chosen:
        loaded = time.perf_counter()
        net = load_network(inst.onnx)
        props = read_vnnlib(inst.vnnlib, net.input_shape, net.num_outputs)
        replay = onnx_replay(inst.onnx)
        row: dict[str, Any] = {
            "suite": suite, "name": inst.name, "timeout_s": inst.timeout,
            "load_s": round(time.perf_counter() - loaded, 3), "single": {}, "persistent": {},
        }  # fmt: skip
        for name, search in SEARCHES.items():  # same seeds, same deadline, one process
            row["single"][name] = [
                one_call(search, net, props, replay, s, time.perf_counter() + inst.timeout)
                for s in range(args.seeds)
            ]
        for name, search in SEARCHES.items():
            row["persistent"][name] = persistent(search, net, props, replay, args.budget)
        row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        line = " ".join(
            f"{n}: {sum(c['found'] for c in row['single'][n])}/{args.seeds} "
            f"persistent {row['persistent'][n]['found']} "
            f"{row['persistent'][n]['seconds']:.2f}s"
            for n in SEARCHES
        )
        print(f"{inst.name:50s} {line} load={row['loadavg'][0]}", flush=True)
        doc = {
            "what": "verifier attack-first: old sign-step loop vs APGD through the attacks' loop",
            "budget_s": args.budget,
            "machine": machine(),
            "summary": {n: summary(rows, n, args.seeds) for n in SEARCHES},
            "rows": rows,
        }
        write_json(args.out, doc)


if __name__ == "__main__":
    main()
