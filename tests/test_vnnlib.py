"""VNN-LIB 1.0 reading and writing, checked against the VNN-COMP 2021 files' raw text."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from bastion.verify.spec import Halfspaces, Property, robustness_property
from bastion.verify.vnnlib import (
    VnnlibError,
    parse_vnnlib,
    read_vnnlib,
    write_counterexample,
    write_vnnlib,
)

VNN = SHARED_DATA / "vnncomp2021"
needs_vnncomp = pytest.mark.skipif(
    not VNN.is_dir(), reason=f"VNN-COMP 2021 files not found under {VNN}"
)
_BOUND = re.compile(r"\((<=|>=) X_(\d+) (\S+?)\)")


def _same(p: Property, q: Property) -> bool:
    if not (torch.equal(p.lower, q.lower) and torch.equal(p.upper, q.upper)):
        return False
    if len(p.unsafe) != len(q.unsafe):
        return False
    pairs = zip(p.unsafe, q.unsafe, strict=True)
    return all(torch.equal(h.a, g.a) and torch.equal(h.b, g.b) for h, g in pairs)


def _up(decimal: str) -> float:
    """The smallest float64 at or above the decimal (how the reader takes upper bounds)."""
    f = float(decimal)
    return f if Fraction(f) >= Fraction(decimal) else math.nextafter(f, math.inf)


def _files() -> list[Path]:
    return sorted(VNN.glob("*/*.vnnlib")) if VNN.is_dir() else []


@needs_vnncomp
def test_every_vnncomp2021_file_reads_with_the_boxes_of_its_raw_text() -> None:
    files = _files()
    assert len(files) == 40
    for path in files:
        text = path.read_text()
        n = len(re.findall(r"declare-const X_\d+ Real", text))
        k = len(re.findall(r"declare-const Y_\d+ Real", text))
        props = read_vnnlib(path, input_shape=n, num_outputs=k)
        assert all(p.lower.shape == (n,) and p.unsafe[0].a.shape[1] == k for p in props)
        if len(props) > 1:
            continue  # several input boxes (ACAS Xu 6): checked in a test below
        # every top-level bound in the text is the parsed bound rounded outward to the
        # nearest float64 on the far side (the box read contains the file's box)
        for op, i, value in _BOUND.findall(text):
            exact = Fraction(value)
            if op == "<=":
                bound = props[0].upper[int(i)].item()
                inner = math.nextafter(bound, -math.inf)
                assert Fraction(inner) < exact <= Fraction(bound), (path.name, op, i)
            else:
                bound = props[0].lower[int(i)].item()
                inner = math.nextafter(bound, math.inf)
                assert Fraction(bound) <= exact < Fraction(inner), (path.name, op, i)


@needs_vnncomp
def test_mnist_property_is_the_label_robustness_disjunction() -> None:
    path = VNN / "mnistfc" / "prop_0_0.03.vnnlib"
    label = int(re.search(r"label: (\d+)", path.read_text())[1])  # type: ignore[index]
    (prop,) = read_vnnlib(path, input_shape=(784, 1), num_outputs=10)
    assert prop.lower.shape == (784, 1)
    assert len(prop.unsafe) == 9
    for h, j in zip(prop.unsafe, [j for j in range(10) if j != label], strict=True):
        # (>= Y_j Y_label)  ⇔  Y_label − Y_j ≤ 0
        want = torch.zeros(1, 10, dtype=torch.float64)
        want[0, label], want[0, j] = 1.0, -1.0
        assert torch.equal(h.a, want) and h.b.tolist() == [0.0]
    assert prop.lower.dtype == torch.float64
    assert (prop.upper - prop.lower).max().item() == pytest.approx(0.06, abs=1e-7)


@needs_vnncomp
def test_acasxu_input_disjunction_gives_one_property_per_box() -> None:
    props = read_vnnlib(VNN / "acasxu" / "prop_6.vnnlib", input_shape=(1, 1, 5), num_outputs=5)
    assert len(props) == 2
    assert props[0].upper.flatten()[1].item() == _up("0.499999896")
    assert props[1].upper.flatten()[1].item() == _up("-0.11140846")
    assert props[0].lower.shape == (1, 1, 5)
    for p in props:  # unsafe if COC (Y_0) is not minimal: Y_j ≤ Y_0 for some j
        assert [h.a[0].tolist() for h in p.unsafe] == [
            [-1.0 if i == 0 else (1.0 if i == j else 0.0) for i in range(5)] for j in range(1, 5)
        ]


@needs_vnncomp
def test_acasxu_top_level_asserts_are_one_conjunction() -> None:
    (p1,) = read_vnnlib(VNN / "acasxu" / "prop_1.vnnlib")
    (h,) = p1.unsafe
    # (>= Y_0 3.991125645861615) is −Y_0 ≤ b with b the decimal −3.99… rounded up
    assert h.a.tolist() == [[-1.0, 0, 0, 0, 0]] and h.b.tolist() == [_up("-3.991125645861615")]
    assert h.b.item() != float("-3.991125645861615")  # here the nearest float64 lies below
    (p2,) = read_vnnlib(VNN / "acasxu" / "prop_2.vnnlib")
    assert len(p2.unsafe) == 1 and p2.unsafe[0].a.shape == (4, 5)  # four asserts, all must hold


@needs_vnncomp
def test_round_trip_of_vnncomp_files() -> None:
    paths = sorted((VNN / "acasxu").glob("*.vnnlib")) + [VNN / "mnistfc" / "prop_3_0.05.vnnlib"]
    for path in paths:
        props = read_vnnlib(path)
        again = parse_vnnlib(write_vnnlib(props))
        assert len(again) == len(props) and all(map(_same, props, again)), path.name


def test_round_trip_of_general_linear_constraints(tmp_path: Path) -> None:
    a1 = torch.tensor([[2.5, -1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    a2 = torch.tensor([[0.1, 0.2, -0.3]], dtype=torch.float64)
    unsafe = (
        Halfspaces(a1, torch.tensor([0.25, -7.0], dtype=torch.float64)),
        Halfspaces(a2, torch.tensor([1e-20], dtype=torch.float64)),
    )
    f64 = {"dtype": torch.float64}
    box1 = Property(torch.zeros(2, 2, **f64), torch.full((2, 2), 1 / 3.0, **f64), unsafe)
    box2 = Property(torch.full((2, 2), -2.0, **f64), torch.full((2, 2), 1e300, **f64), unsafe[:1])
    path = tmp_path / "p.vnnlib"
    write_vnnlib([box1, box2], path, comment="two boxes\nsecond line")
    again = read_vnnlib(path, input_shape=(2, 2), num_outputs=3)
    assert len(again) == 2 and _same(box1, again[0]) and _same(box2, again[1])
    assert path.read_text().startswith("; two boxes\n; second line\n")


def test_robustness_property_round_trips() -> None:
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    prop = robustness_property(x, 3, 10, eps=0.05)
    (again,) = parse_vnnlib(write_vnnlib(prop), input_shape=(1, 4, 4), num_outputs=10)
    assert _same(prop, again)


def test_terms_comments_and_operators() -> None:
    text = """; header comment
    (declare-const X_0 Real) (declare-const X_1 Real)
    (declare-const Y_0 Real) (declare-const Y_1 Real)  ; trailing comment
    (assert (and (>= X_0 (- 1.5)) (<= (* 2 X_0) 3) (= X_1 0.5)))
    (assert (or (and (< (+ Y_0 (* -2 Y_1) 1) (- Y_1 Y_0 0.5)))
                (and (> (/ Y_1 4) 2))))
    (check-sat)
    """
    (p,) = parse_vnnlib(text)
    assert p.lower.tolist() == [-1.5, 0.5] and p.upper.tolist() == [1.5, 0.5]
    h1, h2 = p.unsafe
    # y0 − 2 y1 + 1 − (y1 − y0 − 0.5) ≤ 0  ⇔  2 y0 − 3 y1 ≤ −1.5
    assert h1.a.tolist() == [[2.0, -3.0]] and h1.b.tolist() == [-1.5]
    assert h2.a.tolist() == [[0.0, -0.25]] and h2.b.tolist() == [-2.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(declare-const X_0 Real)\n(assert (<= X_0 1)", "line 2: unclosed"),
        ("(declare-const X_0 Real))", "line 1: unbalanced"),
        ("(declare-const X_0 Real)\n(assert (<= X_1 1))", "line 2: X_1 is used before"),
        ("(declare-const X_0 Real)\n\n(assert (<= (* X_0 X_0) 1))", "line 3: product"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 Y_0))", "mixes"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))", "X_0 lacks"),
        ("(declare-const Z Real)", "line 1: variable 'Z'"),
        ("(declare-const X_0 Real)\n(assert (foo X_0))", "line 2: unsupported constraint"),
        ("(declare-const X_1 Real)", "not X_0"),
    ],
)
def test_malformed_files_name_the_problem_and_line(text: str, message: str) -> None:
    with pytest.raises(VnnlibError, match=re.escape(message)):
        parse_vnnlib(text)


def test_sizes_are_checked_against_the_network(tmp_path: Path) -> None:
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= 0 X_0 ))\n"
    (tmp_path / "a.vnnlib").write_text(text + "(assert (<= X_0 1))\n")
    with pytest.raises(VnnlibError, match="declares 1 inputs but the network has 784"):
        read_vnnlib(tmp_path / "a.vnnlib", input_shape=(1, 28, 28))
    with pytest.raises(VnnlibError, match="declares 1 outputs but the network has 10"):
        read_vnnlib(tmp_path / "a.vnnlib", num_outputs=10)
    with pytest.raises(VnnlibError, match="cannot read"):
        read_vnnlib(tmp_path / "missing.vnnlib")


def test_counterexample_in_vnncomp_format(tmp_path: Path) -> None:
    x = torch.tensor([[0.1, 1 / 3.0], [0.0, -2.5]], dtype=torch.float32)
    y = torch.tensor([1e-7, 3.0], dtype=torch.float64)
    text = write_counterexample(x, y, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "sat" and lines[1].startswith("((X_0 ") and text.endswith("))\n")
    pairs = re.findall(r"\(([XY]_\d+) (\S+?)\)", text)
    assert [name for name, _ in pairs] == ["X_0", "X_1", "X_2", "X_3", "Y_0", "Y_1"]
    values = [float(v) for _, v in pairs]
    assert values == x.double().flatten().tolist() + y.tolist()  # exact round trip


@needs_vnncomp
def test_instances_csv_with_reference_verdicts() -> None:
    from bastion.verify.instances import read_instances

    mnist = read_instances(VNN / "mnistfc" / "mnistfc_instances.csv")
    assert len(mnist) == 30 and all(i.timeout == 120.0 for i in mnist)
    assert mnist[0].onnx == VNN / "mnistfc" / "mnist-net_256x2.onnx"
    assert mnist[0].name == "mnist-net_256x2.onnx:prop_0_0.03.vnnlib"
    first = {i.vnnlib.name: i.expected for i in mnist}
    assert first["prop_0_0.03.vnnlib"] == "unsat" and first["prop_0_0.05.vnnlib"] == "sat"
    acas = read_instances(VNN / "acasxu" / "acasxu_instances.csv")
    assert len(acas) == 186 and {i.expected for i in acas} == {"sat", "unsat"}
    assert acas[0].reference["nnenum_result"] == "holds"


def test_instances_csv_errors_name_the_line(tmp_path: Path) -> None:
    from bastion.errors import DataError
    from bastion.verify.instances import read_instances

    (tmp_path / "n.onnx").write_bytes(b"")
    (tmp_path / "p.vnnlib").write_text("")
    csv = tmp_path / "instances.csv"
    csv.write_text("onnx,vnnlib,timeout\nn.onnx,p.vnnlib,30\n")
    (inst,) = read_instances(csv)
    assert inst.onnx == tmp_path / "n.onnx" and inst.expected is None and inst.timeout == 30
    csv.write_text("n.onnx,p.vnnlib,30\nn.onnx,missing.vnnlib,30\n")
    with pytest.raises(DataError, match="line 2: .*missing.vnnlib does not exist"):
        read_instances(csv)
    csv.write_text("n.onnx,p.vnnlib,soon\n")
    with pytest.raises(DataError, match="line 1: timeout 'soon' is not a number"):
        read_instances(csv)
