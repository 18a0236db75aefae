"""Run Marabou (`maraboupy`, benchmarks only) on one ONNX + VNN-LIB instance, killably.

`run_marabou(onnx, vnnlib, timeout)` starts this file as a fresh subprocess in its own
process group, gives Marabou its own `timeoutInSeconds`, and SIGKILLs the group after
`timeout + grace` seconds if it has not answered. The child reads the network, solves
with default options (verbosity 0, one worker, DeepPoly tightening, no MILP: what the
PyPI build offers), replays a `sat` witness through onnxruntime and prints one JSON line.
Marabou is never imported by Bastion itself: only this script's child process loads it.

    python benchmarks/marabou_runner.py NET.onnx PROP.vnnlib --timeout 120   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MARABOU_WORDS = {"sat": "sat", "unsat": "unsat"}  # anything else (TIMEOUT, ERROR…) → unknown


def run_marabou(
    onnx: str | os.PathLike[str], vnnlib: str | os.PathLike[str], timeout: float, grace: float = 30
) -> dict[str, Any]:
    """Marabou's answer on one instance: result (sat/unsat/unknown), wall seconds, detail,
    and for `sat` the witness `x` and its onnxruntime outputs `y` (lists)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(onnx), str(vnnlib)]
    cmd += ["--timeout", str(int(max(1, round(timeout))))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout + grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        wall = time.perf_counter() - start
        return {"result": "unknown", "wall_s": wall, "detail": "hard kill"}
    wall = time.perf_counter() - start
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"result": "unknown", "wall_s": wall, "detail": f"error: {tail[0][:200]}"}
    return {**json.loads(lines[-1]), "wall_s": wall}


def _solve(onnx: str, vnnlib: str, timeout: int) -> dict[str, Any]:
    """In the child: Marabou on the instance, and the witness replayed in onnxruntime."""
    import contextlib
    import io

    import numpy as np

    with contextlib.redirect_stdout(io.StringIO()):  # maraboupy prints parser warnings
        from maraboupy import Marabou

        net = Marabou.read_onnx(onnx)
        options = Marabou.createOptions(verbosity=0, timeoutInSeconds=timeout)
        start = time.perf_counter()
        code, vals, stats = net.solve(propertyFilename=vnnlib, options=options, verbose=False)
        solve_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "result": _MARABOU_WORDS.get(code, "unknown"),
        "solve_s": solve_s,
        "detail": code if code not in _MARABOU_WORDS else "",
    }
    if code == "sat":
        import onnxruntime as ort

        x = np.array([vals[int(v)] for v in net.inputVars[0].flatten()], dtype=np.float64)
        sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        y = sess.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0]
        out["x"] = x.tolist()
        out["y"] = np.asarray(y, dtype=np.float64).flatten().tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx")
    p.add_argument("vnnlib")
    p.add_argument("--timeout", type=int, default=120)
    args = p.parse_args()
    print(json.dumps(_solve(args.onnx, args.vnnlib, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
