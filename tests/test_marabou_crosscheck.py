"""Cross-check against Marabou (a test-only oracle) on generated small instances.

Random ReLU nets are exported to ONNX, each property written as VNN-LIB; Marabou reads
both. Wherever both tools decide, the verdicts must agree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.verify import extract, robustness_property, verify, write_vnnlib

Marabou = pytest.importorskip("maraboupy.Marabou", reason="maraboupy (test extra) not installed")
pytest.importorskip("onnx", reason="onnx (onnx extra) not installed")


def _net(seed: int, sizes: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _marabou(onnx: Path, vnnlib: Path) -> str:
    net = Marabou.read_onnx(str(onnx))
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=20)
    with contextlib.chdir(onnx.parent):  # Marabou writes failedMarabouQuery.ipq into the cwd
        code, _, _ = net.solve(propertyFilename=str(vnnlib), options=options, verbose=False)
    return {"unsat": "unsat", "sat": "sat"}.get(code, "unknown")


def test_verdicts_agree_with_marabou(tmp_path: Path) -> None:
    both = 0
    for seed in range(4):
        model = _net(seed, (5, 8, 8, 3))
        onnx = tmp_path / f"net{seed}.onnx"
        torch.onnx.export(model, (torch.zeros(1, 5),), str(onnx), dynamo=False)
        network = extract(model, (5,))
        x = torch.rand(5, generator=torch.Generator().manual_seed(seed))
        label = int(model(x[None]).argmax())
        for eps in (0.02, 0.1, 0.3):
            prop = robustness_property(x, label, 3, eps=eps)
            vnnlib = tmp_path / f"p{seed}_{eps}.vnnlib"
            write_vnnlib([prop], vnnlib)
            ours = verify(network, prop, model=model, timeout=20).vnncomp
            theirs = _marabou(onnx, vnnlib)
            if "unknown" not in (ours, theirs):
                assert ours == theirs, (seed, eps, ours, theirs)
                both += 1
    assert both >= 10
