"""VNN-LIB 1.0 (the VNN-COMP subset of SMT-LIB): read and write properties, write witnesses.

A file declares inputs `X_i` and outputs `Y_j` (`(declare-const X_0 Real)`) and asserts
constraints whose conjunction describes the *unsafe* set: a box on the inputs and linear
constraints on the outputs, nested as `(or (and …) …)`. `X_i` is the i-th input of the
network's input flattened in row-major order (as ONNX and torch flatten it).

    >>> props = read_vnnlib("prop_0_0.03.vnnlib", input_shape=(784,), num_outputs=10)
    >>> text = write_vnnlib(props)              # parses back to the same properties
    >>> write_counterexample(x, y)               # 'sat\\n((X_0 0.1)\\n (X_1 …) … (Y_9 …))\\n'

Reading turns the assertions into disjunctive normal form; disjuncts that share an input
box become one `Property` whose `unsafe` set lists their output constraints, so an ACAS Xu
property with two input boxes gives two properties. Contradictory constraints give no
property at all (the unsafe set is empty: `decide_file` answers unsat).

Numbers are read exactly (`Fraction`: `0.1` is 1/10) and the arithmetic of a constraint is
exact, so `(<= (+ X_0 0.1) 0.3)` is X_0 ≤ 1/5. Each bound is then rounded once, outward,
to float64: input lower bounds down, upper bounds up, and the constant b of each output row
`a·y ≤ b` up; the box and the unsafe set read contain the file's, so SAFE proved for them
holds for the file. Output coefficients that are not float64 numbers (VNN-COMP's are ±1)
are read as the nearest float64. Strict `<`/`>` are proved as `<=`/`>=`, again supersets.
Witnesses are held to the file: strict input faces are open (`Property.open_lower`/
`open_upper`: a point on one is not in the box), and each output constant rounded down is
kept as `Halfspaces.inner`, against which `Property.violation` measures a witness. A
witness may still lie up to one float64 step outside a decimal input bound (on the face as
rounded): VNN-COMP files write float32 bounds as short decimals a hair inside them, and
exact engines' witnesses sit on box vertices.
Writing picks, per bound, the shortest decimal that this rounding reads back to the same
float64.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from bastion.errors import InvalidInputError

from .spec import Halfspaces, Property

__all__ = ["VnnlibError", "parse_vnnlib", "read_vnnlib", "write_counterexample", "write_vnnlib"]

_MAX_DISJUNCTS = 100_000
_VAR = re.compile(r"([XY])_(\d+)$")
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_GZIP_MAGIC = b"\x1f\x8b"
_ZERO, _ONE = Fraction(0), Fraction(1)
_MAX = sys.float_info.max
_IGNORED = {"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"}


class VnnlibError(InvalidInputError):
    """A VNN-LIB file that cannot be read: malformed, or outside the supported subset."""


class _List(list):  # type: ignore[type-arg]
    """A parenthesised expression, with the line it starts on (tokens are plain str)."""

    line: int


_Expr = str | _List


@dataclass
class _Linear:
    """Σ coef·var + const; vars are ("X", i) or ("Y", j)."""

    coefs: dict[tuple[str, int], Fraction]
    const: Fraction
    strict: bool = False  # as an atom: `< 0` rather than `≤ 0`


_Atom = _Linear  # the constraint `lin ≤ 0` (`lin < 0` if strict)
_Box = tuple[tuple[float, ...], tuple[float, ...], tuple[bool, ...], tuple[bool, ...]]
"""lower, upper (float64, rounded outward), and which lower/upper faces are open."""
_Dnf = list[list[_Atom]]


def _error(line: int, what: str) -> VnnlibError:
    return VnnlibError(f"VNN-LIB line {line}: {what}")


def _parse_sexprs(text: str) -> list[_Expr]:
    stack: list[_List] = []
    top: list[_Expr] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        for word in _TOKEN.findall(raw.split(";", 1)[0]):
            if word == "(":
                node = _List()
                node.line = lineno
                stack.append(node)
            elif word == ")":
                if not stack:
                    raise _error(lineno, "unbalanced ')'; check the parentheses")
                done = stack.pop()
                (stack[-1] if stack else top).append(done)
            elif stack:
                stack[-1].append(word)
            else:
                raise _error(lineno, f"{word!r} outside parentheses; every command is (…)")
    if stack:
        raise _error(stack[-1].line, "unclosed '('; the file ends inside this expression")
    return top


class _Reader:
    def __init__(self) -> None:
        self.declared: dict[str, set[int]] = {"X": set(), "Y": set()}

    def declare(self, cmd: _List) -> None:
        if len(cmd) != 3 or not isinstance(cmd[1], str) or cmd[2] != "Real":
            raise _error(cmd.line, "expected (declare-const NAME Real)")
        match = _VAR.match(cmd[1])
        if match is None:
            raise _error(cmd.line, f"variable {cmd[1]!r} is not X_i or Y_j")
        self.declared[match[1]].add(int(match[2]))

    def term(self, e: _Expr, line: int) -> _Linear:
        if isinstance(e, str):
            match = _VAR.match(e)
            if match is not None:
                if int(match[2]) not in self.declared[match[1]]:
                    raise _error(line, f"{e} is used before its declare-const")
                return _Linear({(match[1], int(match[2])): _ONE}, _ZERO)
            try:
                return _Linear({}, Fraction(e))  # the decimal exactly, not its float64
            except (ValueError, ZeroDivisionError):
                raise _error(line, f"{e!r} is neither a number nor X_i/Y_j") from None
        if not e or not isinstance(e[0], str):
            raise _error(e.line, "empty or malformed term")
        op, args = e[0], [self.term(a, e.line) for a in e[1:]]
        if op == "+" and args:
            return _sum(args, [_ONE] * len(args))
        if op == "-" and args:
            return _sum(args, [-_ONE] if len(args) == 1 else [_ONE] + [-_ONE] * (len(args) - 1))
        if op == "*" and args:
            out = args[0]
            for a in args[1:]:
                if out.coefs and a.coefs:
                    raise _error(e.line, "product of two variables; VNN-LIB 1.0 is linear")
                out, a = (out, a) if out.coefs else (a, out)
                out = _sum([out], [a.const])
            return out
        if op == "/" and len(args) == 2 and not args[1].coefs and args[1].const != 0:
            return _sum([args[0]], [1 / args[1].const])
        raise _error(e.line, f"unsupported term ({op} …); use +, -, * by constants, /")

    def formula(self, e: _Expr, line: int) -> _Dnf:
        if not isinstance(e, _List) or not e or not isinstance(e[0], str):
            raise _error(line, "expected a constraint (<=, >=, and, or)")
        op = e[0]
        if op == "and":
            out: _Dnf = [[]]
            for part in e[1:]:
                out = _product(out, self.formula(part, e.line), e.line)
            return out
        if op == "or":
            if len(e) < 2:
                raise _error(e.line, "(or) needs at least one operand")
            return [conj for part in e[1:] for conj in self.formula(part, e.line)]
        if op in ("<=", ">=", "<", ">", "=") and len(e) == 3:
            lhs, rhs = self.term(e[1], e.line), self.term(e[2], e.line)
            le = _sum([lhs, rhs], [_ONE, -_ONE])  # lhs - rhs ≤ 0
            ge = _sum([lhs, rhs], [-_ONE, _ONE])
            lt, gt = replace(le, strict=True), replace(ge, strict=True)
            atoms = {"<=": [le], "<": [lt], ">=": [ge], ">": [gt], "=": [le, ge]}[op]
            if len({k for k, _ in le.coefs}) > 1:
                raise _error(e.line, "a constraint mixes X and Y; inputs must form a box")
            return [atoms]
        raise _error(e.line, f"unsupported constraint ({op} …); use <=, >=, and, or")

    def count(self, kind: str, given: int | None) -> int:
        ids = self.declared[kind]
        n = len(ids)
        if ids != set(range(n)):
            raise VnnlibError(f"the declared {kind} variables are not {kind}_0 … {kind}_{n - 1}")
        if given is not None and given != n:
            what = "inputs" if kind == "X" else "outputs"
            raise VnnlibError(
                f"the file declares {n} {what} but the network has {given}; "
                "check that the property belongs to this network"
            )
        return n


def _sum(terms: list[_Linear], weights: list[Fraction]) -> _Linear:
    coefs: dict[tuple[str, int], Fraction] = {}
    const = _ZERO
    for t, w in zip(terms, weights, strict=True):
        if t.const:
            const += _times(w, t.const)
        for k, c in t.coefs.items():
            c = _times(w, c)
            coefs[k] = coefs[k] + c if k in coefs else c
    return _Linear({k: c for k, c in coefs.items() if c != 0}, const)


def _times(w: Fraction, c: Fraction) -> Fraction:
    """w·c, without new rationals for the usual weights ±1 (a 784-input box reads faster)."""
    return c if w == 1 else -c if w == -1 else w * c


def _tighten(
    bounds: list[Fraction | float], strict: list[bool], i: int, v: Fraction, s: bool, side: int
) -> None:
    """Bound i becomes v (strict if s) where v is tighter (side 1: a lower bound, larger is
    tighter; −1: an upper bound); at an equal value a strict bound wins."""
    if (v > bounds[i]) if side > 0 else (v < bounds[i]):
        bounds[i], strict[i] = v, s
    elif v == bounds[i]:
        strict[i] = strict[i] or s


def _down(v: Fraction) -> float:
    """The largest float64 ≤ v (−inf below the float64 range)."""
    try:
        f = float(v)
    except OverflowError:
        return -math.inf if v < 0 else _MAX
    return math.nextafter(f, -math.inf) if Fraction(f) > v else f


def _up(v: Fraction) -> float:
    """The smallest float64 ≥ v (+inf above the float64 range)."""
    return -_down(-v)


def _product(a: _Dnf, b: _Dnf, line: int) -> _Dnf:
    if len(a) * len(b) > _MAX_DISJUNCTS:
        raise _error(line, f"more than {_MAX_DISJUNCTS} disjuncts after expanding and/or")
    if len(a) == 1 and len(b) == 1:  # the common case, a conjunction of atoms
        a[0].extend(b[0])
        return a
    return [x + y for x, y in itertools.product(a, b)]


class _Disjunct:
    """Box bounds and output rows of one conjunction of atoms (None once contradictory)."""

    def __init__(self, n: int) -> None:
        self.lower: list[Fraction | float] = [-math.inf] * n
        self.upper: list[Fraction | float] = [math.inf] * n
        self.strict_lower, self.strict_upper = [False] * n, [False] * n
        self.rows: list[_Linear] = []
        self.empty = False
        self._box: _Box | None = None

    def copy(self) -> _Disjunct:
        out = _Disjunct(0)
        out.lower, out.upper, out.rows = self.lower[:], self.upper[:], self.rows[:]
        out.strict_lower, out.strict_upper = self.strict_lower[:], self.strict_upper[:]
        out.empty, out._box = self.empty, self._box  # the rounded box, until a bound changes
        return out

    def add(self, atoms: list[_Atom]) -> _Disjunct:
        for atom in atoms:
            if not atom.coefs:  # a constant constraint c ≤ 0 (c < 0 if strict)
                self.empty |= atom.const > 0 or (atom.strict and atom.const == 0)
                continue
            ((kind, i), c), *more = atom.coefs.items()
            if kind == "Y":
                self.rows.append(atom)
            elif more:
                raise VnnlibError("a constraint involves several X variables; give a box")
            elif c > 0:  # c·x + k ≤ 0: x ≤ −k/c
                _tighten(self.upper, self.strict_upper, i, -atom.const / c, atom.strict, -1)
                self._box = None
            else:
                _tighten(self.lower, self.strict_lower, i, -atom.const / c, atom.strict, 1)
                self._box = None
        return self

    def halfspaces(self, k: int) -> Halfspaces:
        """The rows `a·y ≤ b`: coefficients as the nearest float64 (exact for the usual
        integers and halves), b rounded up, so the unsafe set read contains the file's;
        where that rounding was inexact, `inner` holds b rounded down, for witnesses."""
        rows = self.rows or [_Linear({}, _ZERO)]  # no output constraint: every output is unsafe
        a = torch.zeros(len(rows), k, dtype=torch.float64)
        b = torch.zeros(len(rows), dtype=torch.float64)
        inner = torch.zeros(len(rows), dtype=torch.float64)
        for r, atom in enumerate(rows):
            for (_, j), c in atom.coefs.items():
                a[r, j] = float(c)
            b[r], inner[r] = _up(-atom.const), _down(-atom.const)
        return Halfspaces(a, b, None if torch.equal(inner, b) else inner)

    def box(self) -> _Box | None:
        """The input box rounded outward to float64 (lower down, upper up): it contains the
        file's box, so SAFE proved for it holds for the file's. Then which faces are open
        (strict in the file). None if the bounds contradict each other;
        an input without both bounds is a `VnnlibError`."""
        if self._box is not None:
            return self._box
        ends = zip(self.lower, self.upper, self.strict_lower, self.strict_upper, strict=True)
        if any(lo > hi or (lo == hi and (sl or su)) for lo, hi, sl, su in ends):
            return None
        n = len(self.lower)
        unbounded = [i for i in range(n) if self.lower[i] == -math.inf or self.upper[i] == math.inf]
        if unbounded:
            raise VnnlibError(
                f"X_{unbounded[0]} lacks a lower or upper bound; give every input a box"
            )
        lower = tuple(_down(Fraction(v)) for v in self.lower)
        upper = tuple(_up(Fraction(v)) for v in self.upper)
        huge = [
            i
            for i, (lo, hi) in enumerate(zip(lower, upper, strict=True))
            if not (math.isfinite(lo) and math.isfinite(hi))
        ]
        if huge:
            raise VnnlibError(f"X_{huge[0]}'s bounds exceed the float64 range; give a finite box")
        # only strict faces are open: a face rounded outward stays closed, since exact
        # engines' witnesses sit on box vertices, and VNN-COMP files write float32 bounds
        # as short decimals a hair inside them (0.029999999329447746 for float32(0.03))
        self._box = (lower, upper, tuple(self.strict_lower), tuple(self.strict_upper))
        return self._box


def parse_vnnlib(
    text: str,
    input_shape: int | Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> list[Property]:
    """The properties in VNN-LIB 1.0 text; see `read_vnnlib`."""
    reader = _Reader()
    common: list[_Atom] = []
    choices: list[tuple[int, _Dnf]] = []  # asserts with a disjunction, and their line
    for cmd in _parse_sexprs(text):
        if not isinstance(cmd, _List) or not cmd or not isinstance(cmd[0], str):
            raise VnnlibError("expected a command such as (assert …)")
        if cmd[0] == "declare-const":
            reader.declare(cmd)
        elif cmd[0] == "assert" and len(cmd) == 2:
            dnf = reader.formula(cmd[1], cmd.line)
            if len(dnf) == 1:
                common.extend(dnf[0])
            else:
                choices.append((cmd.line, dnf))
        elif cmd[0] not in _IGNORED:
            raise _error(cmd.line, f"unsupported command ({cmd[0]} …)")
    shape = (input_shape,) if isinstance(input_shape, int) else input_shape
    n = reader.count("X", None if shape is None else math.prod(shape))
    k = reader.count("Y", num_outputs)
    shape = tuple(shape) if shape is not None else (n,)
    base = _Disjunct(n).add(common)
    bounded = -math.inf not in base.lower and math.inf not in base.upper
    if bounded and base.box() is None:  # rounded once, for the disjuncts that keep it
        return []  # contradictory whatever the disjunctions add
    extras: _Dnf = [[]]
    for line, dnf in choices:
        extras = _product(extras, dnf, line)
    groups: dict[_Box, list[Halfspaces]] = {}
    for extra in extras:
        d = base.copy().add(extra)
        box = None if d.empty else d.box()
        if box is not None:
            groups.setdefault(box, []).append(d.halfspaces(k))
    if not groups:  # contradictory constraints: the unsafe set is empty, the property holds
        return []
    return [
        Property(
            torch.tensor(lo, dtype=torch.float64).reshape(shape),
            torch.tensor(hi, dtype=torch.float64).reshape(shape),
            tuple(unsafe),
            _mask(open_lo, shape),
            _mask(open_hi, shape),
        )
        for (lo, hi, open_lo, open_hi), unsafe in groups.items()
    ]


def _mask(flags: tuple[bool, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
    return torch.tensor(flags, dtype=torch.bool).reshape(shape) if any(flags) else None


def _read_text(path: Path) -> str:
    """The file's text, gunzipped when its bytes start with gzip's magic number (whatever
    its name); a damaged gzip stream or bytes that are not UTF-8 text are a `VnnlibError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VnnlibError(
            f"cannot read VNN-LIB file {path} ({exc.strerror}); check the path"
        ) from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise VnnlibError(
                f"VNN-LIB file {path} is a damaged gzip file ({exc}); download or compress it again"
            ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise VnnlibError(
            f"VNN-LIB file {path} is not text (nor gzip-compressed text); give the "
            ".vnnlib or .vnnlib.gz property file"
        ) from None


def read_vnnlib(
    path: str | os.PathLike[str],
    input_shape: int | Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> list[Property]:
    """The properties of a VNN-LIB 1.0 file, one per distinct input box. A gzip-compressed
    file (VNN-COMP ships `.vnnlib.gz`) is recognised by its magic bytes and read as well.

    `input_shape` (or the number of inputs) and `num_outputs` are checked against the
    declarations when given; the box is reshaped to `input_shape` (flat by default).
    Raises `VnnlibError` (an `InvalidInputError`) with the line number on malformed files.
    """
    p = Path(path)
    text = _read_text(p)
    try:
        return parse_vnnlib(text, input_shape, num_outputs)
    except VnnlibError as exc:
        raise VnnlibError(f"{p}: {exc}") from None


def _num(v: float) -> str:
    if not math.isfinite(v):
        raise InvalidInputError(f"VNN-LIB cannot express the non-finite bound {v}")
    return np.format_float_positional(v, unique=True, trim="0")


def _directed(v: float, *, upper: bool) -> str:
    """The shortest decimal that the reader's outward rounding takes back to v exactly: for
    an `upper` number (an upper bound or a row's b, read rounded up) one in (prev(v), v],
    for a lower bound (read rounded down) one in [v, next(v)). 17 digits always suffice."""
    if not math.isfinite(v):
        raise InvalidInputError(f"VNN-LIB cannot express the non-finite bound {v}")
    exact = Decimal(v)
    beyond = Fraction(math.nextafter(v, -math.inf if upper else math.inf))
    rounding = ROUND_FLOOR if upper else ROUND_CEILING
    for digits in range(1, 18):
        d = Context(prec=digits, rounding=rounding).plus(exact)
        if (Fraction(d) > beyond) if upper else (Fraction(d) < beyond):
            break
    else:  # pragma: no cover - 17 significant digits separate neighbouring float64s
        d = exact
    text = format(d, "f")
    return text if "." in text else text + ".0"


def _row(a: torch.Tensor, b: float) -> str:
    nz = [(j, float(a[j])) for j in torch.nonzero(a).flatten().tolist()]
    if len(nz) == 2 and b == 0 and sorted(c for _, c in nz) == [-1.0, 1.0]:
        (i, ci), (j, _) = nz if nz[0][1] == 1.0 else nz[::-1]
        return f"(<= Y_{i} Y_{j})"
    if len(nz) == 1 and abs(nz[0][1]) == 1.0:
        j, c = nz[0]
        if c > 0:
            return f"(<= Y_{j} {_directed(b, upper=True)})"
        return f"(>= Y_{j} {_directed(-b, upper=False)})"  # read as b = up(−(−b))
    terms = [f"Y_{j}" if c == 1.0 else f"(* {_num(c)} Y_{j})" for j, c in nz] or ["0.0"]
    lhs = terms[0] if len(terms) == 1 else f"(+ {' '.join(terms)})"
    return f"(<= {lhs} {_directed(b, upper=True)})"


def _box_atoms(prop: Property) -> list[tuple[str, str]]:
    """Per input, its (upper, lower) bound atoms, each reading back as the same float64."""
    lo, hi = prop.lower.flatten().tolist(), prop.upper.flatten().tolist()
    return [
        (f"(<= X_{i} {_directed(high, upper=True)})", f"(>= X_{i} {_directed(low, upper=False)})")
        for i, (low, high) in enumerate(zip(lo, hi, strict=True))
    ]


def write_vnnlib(
    properties: Property | Sequence[Property],
    path: str | os.PathLike[str] | None = None,
    *,
    comment: str | None = None,
) -> str:
    """VNN-LIB 1.0 text for one or more properties (their disjunction); written to `path`
    when given. One property gives the usual layout (box asserts, then one `or` of `and`s
    on Y); several give a single `or` with one `(and box output)` per box and disjunct."""
    props = [properties] if isinstance(properties, Property) else list(properties)
    if not props:
        raise InvalidInputError("no property to write; give at least one")
    n, k = props[0].lower.numel(), props[0].unsafe[0].a.shape[1]
    if any(p.lower.numel() != n or p.unsafe[0].a.shape[1] != k for p in props):
        raise InvalidInputError("the properties differ in their number of inputs or outputs")
    lines = [f"; {c}" for c in (comment or "").splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(k)]

    def conj(h: Halfspaces) -> str:
        return " ".join(_row(h.a[r], float(h.b[r])) for r in range(len(h.b)))

    if len(props) == 1:
        lines += [f"(assert {atom})" for pair in _box_atoms(props[0]) for atom in pair]
        lines.append("(assert (or")
        lines += [f"    (and {conj(h)})" for h in props[0].unsafe]
    else:
        lines.append("(assert (or")
        for p in props:
            box = " ".join(atom for pair in _box_atoms(p) for atom in pair)
            lines += [f"    (and {box} {conj(h)})" for h in p.unsafe]
    lines.append("))")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def write_counterexample(
    x: torch.Tensor,
    y: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    verdict: str = "sat",
) -> str:
    """A VNN-COMP result with witness: `sat` on the first line, then `((X_0 v) … (Y_0 v) …)`.

    `x` is one input (any shape, flattened row-major), `y` its outputs; values are written
    in the shortest decimal that reads back as the same float64.
    """
    xs = x.detach().to(torch.float64).flatten().tolist()
    ys = y.detach().to(torch.float64).flatten().tolist()
    pairs = [f"(X_{i} {_num(v)})" for i, v in enumerate(xs)]
    pairs += [f"(Y_{j} {_num(v)})" for j, v in enumerate(ys)]
    text = f"{verdict}\n(" + "\n ".join(pairs) + ")\n"
    if path is not None:
        Path(path).write_text(text)
    return text
