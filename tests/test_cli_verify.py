"""`bastion verify`: the verdict first on stdout, files written, exit codes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from bastion.cli import main

MNISTFC = SHARED_DATA / "vnncomp2021" / "mnistfc"
needs_mnistfc = pytest.mark.skipif(
    not MNISTFC.is_dir(), reason="VNN-COMP files not found in ../shared/data"
)


def test_verify_with_no_arguments_proves_the_demo_region(capsys, demo) -> None:  # type: ignore[no-untyped-def]
    assert main(["verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.split()[0] == "SAFE" and "float32 rounding" in out


def test_verify_writes_a_counterexample_the_model_misclassifies(
    capsys, demo, digits, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    assert main(["verify", "--index", "3", "--eps", "0.2", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split()[0] == "UNSAFE"
    cex = torch.from_numpy(np.load(tmp_path / "counterexample.npy"))
    assert float((cex - digits.x[3]).abs().max()) <= 0.2 + 1e-6
    assert int(demo(cex[None]).argmax()) != int(digits.y[3])
    assert (tmp_path / "counterexample.png").is_file() and (tmp_path / "verdict.json").is_file()


@needs_mnistfc
def test_vnnlib_mode_prints_vnncomp_words(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net = str(MNISTFC / "mnist-net_256x2.onnx")
    assert main(["verify", net, "--vnnlib", str(MNISTFC / "prop_2_0.03.vnnlib")]) == 0
    assert capsys.readouterr().out.split()[0] == "unsat"
    out = tmp_path / "result.txt"
    args = ["verify", net, "--vnnlib", str(MNISTFC / "prop_1_0.05.vnnlib"), "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.split()[0] == "sat"
    text = out.read_text()
    assert text.startswith("sat\n((X_0 ") and "(Y_9 " in text


@needs_mnistfc
def test_instances_mode_runs_a_batch_and_resumes(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "instances.csv"
    net = MNISTFC / "mnist-net_256x2.onnx"
    csv.write_text(
        f"{net},{MNISTFC / 'prop_2_0.03.vnnlib'},120\n{net},{MNISTFC / 'prop_1_0.05.vnnlib'},120\n"
    )
    out = tmp_path / "results.csv"
    assert main(["verify", "--instances", str(csv), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "summary: 2/2 solved (1 unsat, 1 sat)" in text
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("onnx,vnnlib,result")
    assert main(["verify", "--instances", str(csv), "--out", str(out), "--resume"]) == 0
    assert "summary: 2/2 solved" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "--eps", "2"], "--eps must lie in [0, 1]"),
        (["verify", "missing.onnx", "--vnnlib", "p.vnnlib"], "missing.onnx"),
        (["verify", "--engine", "gurobi"], "invalid choice"),
        (["verify", "--timeout", "0"], "--timeout must be a positive"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) if "--engine" in args else contextlib.nullcontext():
        code = main(args)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@needs_mnistfc
def test_result_file_y_values_are_onnxruntimes_replay(tmp_path: Path) -> None:
    import re

    import onnx

    from bastion.onnx_io import runtime
    from bastion.verify.vnnlib import read_vnnlib

    net = MNISTFC / "mnist-net_256x2.onnx"
    prop_file = MNISTFC / "prop_1_0.05.vnnlib"
    out = tmp_path / "result.txt"
    assert main(["verify", str(net), "--vnnlib", str(prop_file), "--out", str(out)]) == 0
    values = dict(re.findall(r"\(([XY]_\d+) ([^()\s]+)\)", out.read_text()))
    x = torch.tensor([float(values[f"X_{i}"]) for i in range(784)], dtype=torch.float32)
    y_file = torch.tensor([float(values[f"Y_{j}"]) for j in range(10)], dtype=torch.float64)
    y = runtime(onnx.load(str(net)))(x.view(1, 784, 1)).double()[0]
    assert torch.equal(y_file, y)  # the file's Y are what onnxruntime computes at X
    (prop,) = read_vnnlib(prop_file, (784, 1), 10)
    assert bool(prop.contains(x.view(1, 784, 1).double())[0])
    assert float(prop.violation(y[None])[0]) > 0  # strictly inside the unsafe set


def test_contradictory_vnnlib_is_unsat(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2)).eval()
    onnx_path = tmp_path / "net.onnx"
    torch.onnx.export(model, (torch.zeros(1, 2),), str(onnx_path), dynamo=False)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
        "(declare-const Y_1 Real)\n(assert (>= X_0 0.5))\n(assert (<= X_0 0.2))\n"
        "(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n(assert (<= Y_0 Y_1))\n"
    )
    assert main(["verify", str(onnx_path), "--vnnlib", str(prop)]) == 0
    assert capsys.readouterr().out.split()[0] == "unsat"


@needs_mnistfc
def test_timeout_is_kept_and_loading_reported_apart(capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    net = str(MNISTFC / "mnist-net_256x2.onnx")
    prop = str(MNISTFC / "prop_1_0.03.vnnlib")  # hard: unknown at 120 s before this issue
    for timeout in (0.01, 2.0):
        assert main(["verify", net, "--vnnlib", prop, "--timeout", str(timeout), "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["result"] == "unknown" and d["engine"]  # an engine is named even so
        assert [layer["unstable"] for layer in d["layers"]]  # per-layer statistics too
        assert d["seconds"] <= timeout * 1.05 + 1.0, d
        assert d["load_seconds"] > 0
