"""Follow-ups of the alpha/beta-CROWN engines: selectable from the command line, worded in
the guarantee, reference rows found for nested benchmark folders, DLV's refusal of residual
networks, and a deadline already past stopping every engine before its work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.cli import main

# seed 22: a 2-8-8-1 ReLU net whose minimum over [-1, 1]² (grid of 401², float64) is m;
# alpha-CROWN alone leaves "y <= m - 0.05" open, branch and bound proves it unreachable
_SEED, _GAP = 22, 0.05


def _tiny_net() -> tuple[nn.Module, float]:
    torch.manual_seed(_SEED)
    net = nn.Sequential(
        nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
    ).eval()
    g = torch.linspace(-1, 1, 401, dtype=torch.float64)
    with torch.no_grad():
        low = float(net.double()(torch.cartesian_prod(g, g)).min())
    return net.float(), low


def _tiny_instance(tmp: Path) -> tuple[Path, Path]:
    net, low = _tiny_net()
    onnx = tmp / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 2),), str(onnx), dynamo=False)
    prop = tmp / "tiny.vnnlib"
    prop.write_text(
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
        "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"
        f"(assert (<= Y_0 {low - _GAP!r}))\n"
    )
    return onnx, prop


def test_cli_selects_beta_crown_which_proves_what_the_bounds_leave_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, prop = _tiny_instance(tmp_path)
    base = ["verify", str(onnx), "--vnnlib", str(prop), "--timeout", "30"]
    assert main([*base, "--engine", "bounds"]) == 0
    assert capsys.readouterr().out.split()[0] == "unknown"
    assert main([*base, "--engine", "beta-crown"]) == 0
    out = capsys.readouterr().out
    assert out.split()[0] == "unsat" and "engine=beta-crown" in out


def test_cli_engine_choices_are_the_verifiers() -> None:
    from bastion.commands.verify import _ENGINES
    from bastion.verify.verifier import ENGINES

    assert set(_ENGINES) == set(ENGINES)


@pytest.mark.parametrize(
    ("engine", "words"),
    [
        ("alpha-crown", ["alpha-CROWN", "outward rounding"]),
        ("beta-crown", ["beta-CROWN", "branch and bound", "Lagrange", "outward rounding"]),
        ("bounds+beta-crown+milp", ["CROWN/interval", "beta-CROWN", "HiGHS"]),
    ],
)
def test_guarantee_words_each_engine_not_its_bare_name(engine: str, words: list[str]) -> None:
    from bastion.verify.verdict import guarantee_text

    text = guarantee_text(engine)
    assert all(w in text for w in words), text
    assert f" {engine.split('+')[-1]}:" not in text and "SAFE alpha-crown" not in text


def test_cli_prints_beta_crowns_guarantee(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, prop = _tiny_instance(tmp_path)
    args = ["verify", str(onnx), "--vnnlib", str(prop), "--engine", "beta-crown", "--json"]
    assert main(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["result"] == "unsat" and "Lagrange" in out["guarantee"], out["guarantee"]
