"""`bastion verify` reads gzip-compressed VNN-LIB properties (VNN-COMP ships `.vnnlib.gz`),
recognised by their bytes, in `--vnnlib` and `--instances` mode; a damaged one is one
clear line and exit 2."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from bastion.cli import main
from bastion.verify.vnnlib import VnnlibError, read_vnnlib

MNISTFC = SHARED_DATA / "vnncomp2021" / "mnistfc"

_HEADER = (
    "(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
    "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n"
    "(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
)
# the net computes y = (x0 + x1, 0): y0 ≥ 1.5 is reachable (sat), y0 ≥ 2.5 is not (unsat)
SAT = _HEADER + "(assert (>= Y_0 1.5))\n"
UNSAT = _HEADER + "(assert (>= Y_0 2.5))\n"


@pytest.fixture
def onnx_net(tmp_path: Path) -> Path:
    model = nn.Linear(2, 2).eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        model.bias.zero_()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, (torch.zeros(1, 2),), str(path), dynamo=False)
    return path


def _gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode()))
    return path


def _verdict(capsys, *args: str) -> str:  # type: ignore[no-untyped-def]
    assert main(["verify", *args, "--timeout", "20"]) == 0
    return capsys.readouterr().out.split()[0]


def test_vnnlib_gz_gives_the_plain_files_verdicts(capsys, onnx_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sat, unsat = _gz(tmp_path / "sat.vnnlib.gz", SAT), _gz(tmp_path / "unsat.vnnlib.gz", UNSAT)
    assert _verdict(capsys, str(onnx_net), "--vnnlib", str(sat)) == "sat"
    assert _verdict(capsys, str(onnx_net), "--vnnlib", str(unsat)) == "unsat"
    out = tmp_path / "result.txt"
    assert _verdict(capsys, str(onnx_net), "--vnnlib", str(sat), "--out", str(out)) == "sat"
    assert out.read_text().startswith("sat\n((X_0 ")


def test_compression_is_recognised_by_the_bytes_not_the_name(capsys, onnx_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hidden = _gz(tmp_path / "prop.vnnlib", SAT)  # gzip under a plain name
    plain = tmp_path / "plain.vnnlib.gz"  # plain text under a .gz name
    plain.write_text(UNSAT)
    assert _verdict(capsys, str(onnx_net), "--vnnlib", str(hidden)) == "sat"
    assert _verdict(capsys, str(onnx_net), "--vnnlib", str(plain)) == "unsat"


def test_instances_csv_naming_vnnlib_gz(capsys, onnx_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _gz(tmp_path / "sat.vnnlib.gz", SAT)
    _gz(tmp_path / "unsat.vnnlib.gz", UNSAT)
    csv = tmp_path / "instances.csv"
    csv.write_text("net.onnx,sat.vnnlib.gz,20\nnet.onnx,unsat.vnnlib.gz,20\n")
    out = tmp_path / "results.csv"
    assert main(["verify", "--instances", str(csv), "--out", str(out), "--quiet"]) == 0
    assert "summary: 2/2 solved (1 unsat, 1 sat)" in capsys.readouterr().out
    rows = out.read_text().splitlines()[1:]
    assert sorted(r.split(",")[1:3] for r in rows) == [
        ["sat.vnnlib.gz", "sat"],
        ["unsat.vnnlib.gz", "unsat"],
    ]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated download
        lambda b: b[:12] + bytes(x ^ 0xFF for x in b[12:20]) + b[20:],  # flipped bytes
        lambda b: b[:-8] + b"\0" * 8,  # wrong CRC and length
    ],
    ids=["truncated", "flipped", "bad-crc"],
)
def test_a_damaged_gz_is_one_line_and_exit_2(capsys, onnx_net, tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.vnnlib.gz"
    bad.write_bytes(damage(gzip.compress(SAT.encode())))
    assert main(["verify", str(onnx_net), "--vnnlib", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "bad.vnnlib.gz" in err and "gzip" in err
    with pytest.raises(VnnlibError):
        read_vnnlib(bad)


def test_binary_garbage_is_refused_as_not_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.vnnlib"
    junk.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(VnnlibError, match="not text"):
        read_vnnlib(junk)


@pytest.mark.skipif(not MNISTFC.is_dir(), reason="VNN-COMP files not found in ../shared/data")
def test_a_vnncomp_property_reads_the_same_compressed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = MNISTFC / "prop_1_0.05.vnnlib"
    (plain,) = read_vnnlib(src, (784, 1), 10)
    (packed,) = read_vnnlib(_gz(tmp_path / "p.vnnlib.gz", src.read_text()), (784, 1), 10)
    assert torch.equal(plain.lower, packed.lower) and torch.equal(plain.upper, packed.upper)
    assert all(
        torch.equal(h.a, g.a) and torch.equal(h.b, g.b)
        for h, g in zip(plain.unsafe, packed.unsafe, strict=True)
    )


CIFAR = SHARED_DATA / "vnncomp2021" / "cifar10_resnet"


@pytest.mark.skipif(not CIFAR.is_dir(), reason="VNN-COMP cifar10_resnet files not found")
def test_the_cifar10_resnet_instances_read_their_gz_properties() -> None:
    """The competition's cifar10_resnet list names .vnnlib.gz files: each reads as one
    3×32×32 box (in the normalised input space of those nets) and 9 disjuncts."""
    from bastion.verify.instances import read_instances

    instances = read_instances(CIFAR / "cifar10_resnet_instances.csv")
    assert len(instances) == 72 and all(i.vnnlib.name.endswith(".vnnlib.gz") for i in instances)
    for inst in instances[::12]:
        (prop,) = read_vnnlib(inst.vnnlib, (3, 32, 32), 10)
        assert len(prop.unsafe) == 9
        width = prop.upper - prop.lower
        assert (
            bool(torch.isfinite(width).all()) and 0 < float(width.min()) <= float(width.max()) < 0.2
        )
