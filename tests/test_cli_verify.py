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
