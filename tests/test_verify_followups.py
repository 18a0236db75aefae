"""Follow-ups of the alpha/beta-CROWN engines: selectable from the command line, worded in
the guarantee, reference rows found for nested benchmark folders, DLV's refusal of residual
networks, and a deadline already past stopping every engine before its work."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA
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


CIFAR_RESNET = SHARED_DATA / "vnncomp2021" / "cifar10_resnet"


@pytest.mark.skipif(not CIFAR_RESNET.is_dir(), reason="VNN-COMP files not found in ../shared/data")
def test_cifar10_resnet_instances_find_their_reference_rows() -> None:
    """The csv names `onnx/resnet_2b.onnx`, the reference `resnet_2b.onnx`."""
    from bastion.verify.instances import read_instances

    insts = read_instances(CIFAR_RESNET / "cifar10_resnet_instances.csv")
    with (CIFAR_RESNET / "reference_results.csv").open(newline="") as f:
        ref = list(csv.DictReader(f))
    assert len(insts) == 72 and all(i.reference for i in insts)
    for inst in insts:
        row = inst.reference
        assert row["onnx"] == inst.onnx.name and inst.vnnlib.as_posix().endswith(row["vnnlib"])
    decided = {"holds": "unsat", "violated": "sat"}
    want = sorted(decided[r["consensus"]] for r in ref if r["consensus"] in decided)
    assert sorted(i.expected for i in insts if i.expected) == want and want


def test_reference_by_file_name_only_when_unambiguous(tmp_path: Path) -> None:
    from bastion.verify.instances import read_instances

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "net.onnx").write_bytes(b"")
        (tmp_path / d / "p.vnnlib").write_text("")
    (tmp_path / "x.onnx").write_bytes(b"")
    (tmp_path / "q.vnnlib").write_text("")
    (tmp_path / "i.csv").write_text("a/net.onnx,a/p.vnnlib,9\nb/net.onnx,b/p.vnnlib,9\n")
    (tmp_path / "reference_results.csv").write_text(
        "onnx,vnnlib,consensus\nnet.onnx,p.vnnlib,holds\nnet.onnx,p.vnnlib,violated\n"
        "other/x.onnx,q.vnnlib,violated\n./b/net.onnx,b/p.vnnlib,violated\n"
    )
    a, b = read_instances(tmp_path / "i.csv")
    assert a.expected is None and not a.reference  # two rows named net.onnx,p.vnnlib
    assert b.expected == "sat"  # by its path as written, "./" dropped
    (tmp_path / "j.csv").write_text("x.onnx,q.vnnlib,9\n")
    (c,) = read_instances(tmp_path / "j.csv")
    assert c.expected == "sat"  # the one row with these file names
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "k.csv").write_text("../b/net.onnx,../b/p.vnnlib,9\n")
    (d,) = read_instances(tmp_path / "sub" / "k.csv", reference=tmp_path / "reference_results.csv")
    assert d.expected == "sat"  # by its path relative to the reference file's folder


class _Residual(nn.Module):
    """conv, ReLU, conv, plus the input (identity shortcut), ReLU, then a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.fc(out.flatten(1))


def test_cli_dlv_refuses_hidden_layers_of_a_residual_net_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    path = tmp_path / "residual.pt"
    torch.save(_Residual().eval(), path)
    base = ["verify", str(path), "--trust-pickle", "--region", "dlv", "--features", "3"]
    base += ["--span", "0.001", "--timeout", "20", "--quiet"]  # the input grid keeps the class
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "residual" in err and "--dlv-layer 0" in err, err
    assert "Traceback" not in err and "TypeError" not in err
    assert main([*base, "--dlv-layer", "0"]) == 0  # the input grid alone reads it
    assert "layer 0 (input grid)" in capsys.readouterr().out


def _tiny_problem() -> tuple[Any, Any]:
    from bastion.verify import extract
    from bastion.verify.spec import Halfspaces, Property

    net, low = _tiny_net()
    one = torch.ones(2, dtype=torch.float64)
    row = Halfspaces(torch.ones(1, 1, dtype=torch.float64), torch.tensor([low - _GAP]).double())
    return extract(net, (2,)), Property(-one, one, [row])


def _count(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls = [0]
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_past_deadline_alpha_crown_keeps_crowns_bound_without_optimising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bastion.verify import alpha_crown
    from bastion.verify.back_substitution import back_substitute
    from bastion.verify.bounds import compute_bounds

    network, prop = _tiny_problem()
    bounds = compute_bounds(network, prop)
    a = prop.unsafe[0].a.double()
    n = len(network.layers)
    steps = _count(monkeypatch, alpha_crown, "optimise")
    low, _ = alpha_crown.optimised_rows(
        network, bounds.lower, bounds.upper, a, n, deadline=time.perf_counter() - 1
    )
    assert steps[0] == 0
    assert torch.equal(low, back_substitute(network, bounds.lower, bounds.upper, a, n))
    alpha_crown.optimised_rows(network, bounds.lower, bounds.upper, a, n, deadline=None)
    assert steps[0] == 1  # the counter sees the optimiser when there is time


@pytest.mark.parametrize("engine", ["beta-crown", "z3", "milp"])
def test_past_deadline_every_exact_engine_is_unknown_without_work(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.verify import beta_crown, input_split, milp, smt, verifier
    from bastion.verify.bounds import compute_bounds
    from bastion.verify.outcome import Answer

    network, prop = _tiny_problem()
    work = [
        _count(monkeypatch, *where)
        for where in [
            (milp, "encode"), (milp, "solve_disjunct"), (smt, "solve_smt"),
            (verifier, "branch_and_bound"), (input_split.InputSplit, "run"),
            (beta_crown, "optimise"), (beta_crown.BetaCrown, "bound"),
        ]
    ]  # fmt: skip
    exact = verifier._Exact(network, prop, compute_bounds(network, prop), 12)
    out = exact.decide(prop.unsafe[0], engine, time.perf_counter() - 1)
    assert out.status == Answer.UNKNOWN and "deadline" in out.reason
    direct = beta_crown.BetaCrown(network, prop, prop.unsafe[0], compute_bounds(network, prop))
    assert direct.run(time.perf_counter() - 1).status == Answer.UNKNOWN
    assert [c[0] for c in work] == [0] * len(work)


def test_no_engine_starts_once_an_earlier_one_spent_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """beta-CROWN (here: input splitting, two free inputs) overruns the whole deadline:
    z3 and the MILP are not started after it, nothing is encoded."""
    from bastion.verify import input_split, milp, smt, verifier
    from bastion.verify.outcome import Answer, Outcome

    network, prop = _tiny_problem()
    timeout, t0 = 1.0, time.perf_counter()
    ran = [0]

    def overrun(self: Any, deadline: float) -> Outcome:
        ran[0] += 1
        time.sleep(max(0.0, t0 + timeout + 0.2 - time.perf_counter()))
        return Outcome(Answer.UNKNOWN, reason="overran")

    monkeypatch.setattr(input_split.InputSplit, "run", overrun)
    later = [_count(monkeypatch, milp, "encode"), _count(monkeypatch, smt, "solve_smt")]
    later.append(_count(monkeypatch, verifier, "branch_and_bound"))
    v = verifier.verify(network, prop, engine="auto", timeout=timeout)
    assert ran[0] == 1 and [c[0] for c in later] == [0, 0, 0], v.summary()
    assert v.status == verifier.UNKNOWN and "deadline" in v.reason
