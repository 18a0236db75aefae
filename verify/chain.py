"""A `Network` built one operation at a time: the part every model reader shares.

Readers (torch.fx, TorchScript, torch.export, ONNX) name each operation with its aten name
(`linear`, `conv2d`, `max_pool2d`, `add`, …) and its parameters by the aten argument names,
and call `Chain.apply`. Each operation consumes the previous one's output, except on a
residual shortcut: an operation on an earlier activation starts a shortcut branch (linear
layers only) that an `add` of two activations joins back as an `Add` layer. The chain
tracks the activation's shape and turns affine operations (BatchNorm, `+ - × ÷` by
constants) into a scale and shift that is folded into the preceding Dense or Conv2d layer
when there is one (per channel for Conv2d), else into an `Elementwise` layer.
A fold is computed in float64 and kept in float64 with a proven radius (`Layer.err`) that
bounds its distance from the exact real result (a BatchNorm scale w/√(var + ε) is
irrational): every rounding of the fold is counted, u = 2⁻⁵³ each, so nothing about the
model is lost without a bound. Weights that are not folded stay float32 and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bastion.errors import ModelLoadError
from bastion.verify.folds import compose, nonzero, parts, per_channel
from bastion.verify.rounding import U

from .network import (
    LINEAR_LAYERS,
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
    apply_layer,
)

SUPPORTED = (
    "Linear (Gemm, MatMul), Conv2d, ReLU, Flatten, view/reshape to (N, -1), BatchNorm, "
    "AvgPool2d, MaxPool2d (no padding), Identity, Dropout (eval), bastion.Normalized, "
    "+ - * / by constants, and residual joins (x + a linear shortcut of an earlier activation)"
)
_ALIASES = {"self": "input", "train": "training", "size": "shape", "A": "input"}
_IDENTITY = ("contiguous", "clone", "detach", "identity", "alpha_dropout", "feature_dropout")


class UnsupportedLayerError(ModelLoadError):
    """A layer the verifier cannot express; the message names it and its position."""


class Data:
    """The activation between two operations (a fresh object after each one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<activation>"


class _Batch:
    """The batch size, symbolic: `x.size(0)` in a model's `x.view(x.size(0), -1)`."""

    def __repr__(self) -> str:
        return "N"


BATCH = _Batch()


def _pair(value: Any, default: Any = None) -> tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        value = default
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return (value, value)
    a, b = value if len(value) == 2 else (value[0], value[0])
    return (int(a), int(b))


def _const(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to("cpu", torch.float64)


class Chain:
    """The layers read so far, the current activation and its shape (no batch axis).

    A reshape to `(B, -1)` flattens when B is the symbolic batch size, -1, 1 (the usual
    batch of ONNX files) or `batch`, the size a program was traced or exported with.
    """

    def __init__(self, input_shape: tuple[int, ...], batch: int | None = None) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch = batch  # the batch size a program was traced or exported with, if fixed
        self.shape = self.input_shape
        self.layers: list[Layer] = []
        self.current = Data()
        self.position = 0
        # residual joins: earlier activations by identity (activation index, shape), the
        # shortcut being read (source index, its layers, its current activation, its shape)
        self.known: dict[int, tuple[Data, int, tuple[int, ...]]] = {
            id(self.current): (self.current, 0, self.shape)
        }
        self.side: _Side | None = None
        self.sources: set[int] = set()  # activation indices a shortcut starts from

    def network(self) -> Network:
        return Network(tuple(self.layers), self.input_shape)

    def unsupported(self, name: str, where: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"unsupported layer {name} at position {self.position} ('{where}'); supported: "
            f"{SUPPORTED}"
        )

    def expect_current(self, value: Any, what: str) -> None:
        if value is not self.current:
            raise ModelLoadError(
                f"{what} does not take the previous layer's output; the verifier reads a "
                "chain of layers with residual joins (one linear shortcut at a time)"
            )

    def touches_data(self, *values: Any) -> bool:
        """Whether the activation appears anywhere in these (nested) arguments."""
        for v in values:
            if isinstance(v, Data):
                return True
            items = v.values() if isinstance(v, dict) else v
            if isinstance(v, (list, tuple, dict)) and self.touches_data(*items):
                return True
        return False

    def size(self, data: Any, dim: int | None) -> Any:
        """`x.size()` / `x.size(dim)` of the activation, the batch axis symbolic."""
        self.expect_current(data, "a size query")
        full = (BATCH, *self.shape)
        return full if dim is None else full[dim]

    def apply(self, op: str, params: dict[str, Any], where: str) -> Any:
        """Apply aten operation `op` to its input activation (the current one, or the
        shortcut branch of a residual join); returns the new activation."""
        params = {_ALIASES.get(k, k): v for k, v in params.items()}
        op = op.rstrip("_") if op.endswith("_") and not op.startswith("_") else op
        a, b = params.get("input"), params.get("other")
        if op == "add" and isinstance(a, Data) and isinstance(b, Data):
            self._join(a, b, params.get("alpha", 1), where)
            return self._advance(op, len(self.layers) - 1)
        data = params.get("input", self.current)
        if op in ("add", "sub", "rsub", "mul", "div") and not isinstance(data, Data):
            data = b
        side = self._enter(data, where)
        before = len(self.layers)
        try:
            if side and op not in _SIDE_OPS:
                raise self.unsupported(
                    f"{op} on the shortcut of a residual join (only linear layers)", where
                )
            if op in ("add", "sub", "rsub", "mul", "div"):
                self._binary(op, params, where)
            else:
                params.pop("input", None)
                handler = _HANDLERS.get(op)
                if handler is None and op not in _IDENTITY:
                    raise self.unsupported(op, where)
                if handler is not None:
                    handler(self, params, where)
        finally:
            if side:
                self._leave()
        if side:
            assert self.side is not None
            self.position += 1
            self.side.current = Data()
            return self.side.current
        return self._advance(op, before)

    def _advance(self, op: str, before: int) -> Any:
        """A new current activation after an operation on the main chain; it is known by
        its index (the previous one is forgotten when the operation folded into it)."""
        self.position += 1
        old = self.current
        self.current = Data()
        if len(self.layers) == before:
            self.known.pop(id(old), None)
        self.known[id(self.current)] = (self.current, len(self.layers), self.shape)
        if op == "_native_batch_norm_legit_no_training":
            return (self.current, None, None)
        return self.current

    # --- residual joins ---------------------------------------------------------------

    def _enter(self, data: Any, where: str) -> bool:
        """Route an operation: False for the main chain, True (and the shortcut's state
        swapped in) for a shortcut, started at an earlier activation if need be."""
        if data is self.current:
            return False
        if self.side is None and isinstance(data, Data) and id(data) in self.known:
            _, index, shape = self.known[id(data)]
            self.side = _Side(index, [], data, shape)
        if self.side is None or data is not self.side.current:
            self.expect_current(data, where)
        assert self.side is not None
        self.sources.add(self.side.skip)
        self._swap()
        return True

    def _leave(self) -> None:
        self._swap()

    def _swap(self) -> None:
        assert self.side is not None
        side = self.side
        self.layers, side.layers = side.layers, self.layers
        self.shape, side.shape = side.shape, self.shape
        self.current, side.current = side.current, self.current

    def _join(self, a: Data, b: Data, alpha: Any, where: str) -> None:
        """x + shortcut: an `Add` of the current activation and a shortcut branch (or an
        earlier activation, the identity shortcut)."""
        if float(alpha) != 1.0:
            raise self.unsupported("add of two activations with alpha ≠ 1", where)
        other = b if a is self.current else a if b is self.current else None
        if other is None:
            raise self.unsupported("add of two activations, neither the current one", where)
        if self.side is not None and other is self.side.current:
            skip, layers = self.side.skip, tuple(self.side.layers)
            self.side = None
        elif id(other) in self.known:
            skip, layers = self.known[id(other)][1], ()
        else:
            raise self.unsupported("add of an activation the verifier cannot place", where)
        if any(not isinstance(layer, LINEAR_LAYERS) for layer in layers):
            raise self.unsupported("a shortcut with a nonlinear layer", where)
        src = self._shape_at(skip)
        z = torch.zeros((1, *src))
        for layer in layers:
            z = apply_layer(layer, z)
        if tuple(z.shape[1:]) != self.shape:
            raise ModelLoadError(
                f"{where} adds activations of shapes {self.shape} and {tuple(z.shape[1:])}; "
                "a residual join needs equal shapes"
            )
        self.sources.add(skip)
        self.layers.append(Add(skip, layers))  # type: ignore[arg-type]

    def _shape_at(self, index: int) -> tuple[int, ...]:
        return next(shape for _, k, shape in self.known.values() if k == index)

    def _push(self, layer: Layer, where: str) -> None:
        try:
            out = apply_layer(layer, torch.zeros((1, *self.shape)))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{where} does not fit an activation of shape {self.shape} "
                f"({str(exc).splitlines()[0][:100]}); check input_shape"
            ) from None
        self.layers.append(layer)
        self.shape = tuple(out.shape[1:])

    # --- affine maps ------------------------------------------------------------------

    def _binary(self, op: str, p: dict[str, Any], where: str) -> None:
        a, b, alpha = p.get("input"), p.get("other"), p.get("alpha", 1)
        if p.get("rounding_mode") is not None:
            raise self.unsupported(f"{op} with rounding_mode", where)
        if isinstance(a, Data) and isinstance(b, Data):
            raise self.unsupported(f"{op} of two activations", where)
        data_first = isinstance(a, Data)
        self.expect_current(a if data_first else b, where)
        const = _const(b if data_first else a)
        one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        alpha = float(alpha)
        if op == "add":
            scale, shift = (one, alpha * const) if data_first else (one * alpha, const)
        elif op == "sub":
            scale, shift = (one, -alpha * const) if data_first else (-alpha * one, const)
        elif op == "rsub":  # other - alpha·input
            scale, shift = (-alpha * one, const) if data_first else (one, -alpha * const)
        elif op == "mul":
            scale, shift = const, zero
        elif data_first:
            scale, shift = 1.0 / const, zero
        else:
            raise self.unsupported("division by an activation", where)
        # alpha·c and 1/c round once at most; a negation, alpha = ±1 or 1/2ᵏ are exact
        exact_scale = op != "div" or bool((torch.frexp(const).mantissa.abs() == 0.5).all())
        exact_shift = alpha in (1.0, -1.0)
        radius = (
            torch.zeros_like(scale) if exact_scale else U * scale.abs(),
            torch.zeros_like(shift) if exact_shift else U * shift.abs(),
        )
        self._affine(scale, shift, where, radius)

    def _affine(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor,
        where: str,
        radius: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """x · scale + shift, the constants broadcast over (1, *shape) without growing it;
        `radius` bounds |exact − scale| and |exact − shift| (float64 roundings so far)."""
        full = (1, *self.shape)
        try:
            grown = torch.broadcast_shapes(scale.shape, shift.shape, full) != full
        except RuntimeError:
            grown = True
        if grown:
            raise ModelLoadError(
                f"{where} combines the activation of shape {self.shape} with a constant of "
                f"shape {tuple(scale.shape) or tuple(shift.shape)}; it must broadcast to it"
            )
        s, t = torch.broadcast_to(scale, full)[0], torch.broadcast_to(shift, full)[0]
        se, te = (torch.broadcast_to(r.abs(), full)[0] for r in radius)
        prev = self.layers[-1] if self.layers else None
        if self.side is None and len(self.layers) in self.sources:
            prev = None  # a shortcut reads this activation: folding would change it
        if isinstance(prev, Dense):
            w, b, (we, be) = parts(prev.weight, prev.bias, prev.err)
            scale4 = (s[:, None], se[:, None], s, se)
            w2, b2, err = compose(scale4, t, te, w, b, we, be)
            self.layers[-1] = Dense(w2, b2, nonzero(err))
        elif isinstance(prev, Conv2d) and all(per_channel(v) for v in (s, t, se, te)):
            sc, tc, sce, tce = (v[:, 0, 0] for v in (s, t, se, te))
            w, b, (we, be) = parts(prev.weight, prev.bias, prev.err)
            view = (-1, 1, 1, 1)
            w2, b2, err = compose((sc.view(view), sce.view(view), sc, sce), tc, tce, w, b, we, be)
            self.layers[-1] = Conv2d(w2, b2, prev.stride, prev.padding, nonzero(err))
        elif isinstance(prev, Elementwise):
            s0, t0, (s0e, t0e) = parts(prev.scale, prev.shift, prev.err)
            s0, t0, s0e, t0e = (v.expand(self.shape) for v in (s0, t0, s0e, t0e))
            w2, b2, err = compose((s, se, s, se), t, te, s0, t0, s0e, t0e)
            self.layers[-1] = Elementwise(w2, b2, nonzero(err))
        else:
            self._push(Elementwise(s.clone(), t.clone(), nonzero((se.clone(), te.clone()))), where)

    def _batch_norm(self, p: dict[str, Any], where: str) -> None:
        if p.get("training") or p.get("running_mean") is None:
            raise ModelLoadError(
                f"{where} is a BatchNorm in training mode (or without running statistics); "
                "put the model in eval mode"
            )
        mean, var = _const(p["running_mean"]), _const(p["running_var"])
        weight = _const(p["weight"]) if p.get("weight") is not None else torch.ones_like(mean)
        bias = _const(p["bias"]) if p.get("bias") is not None else torch.zeros_like(mean)
        scale = weight / torch.sqrt(var + float(p.get("eps", 1e-5)))
        shift = bias - mean * scale
        # var + ε, √, ÷: three roundings in scale; shift adds mean·scale's error and two more
        scale_err = 4 * U * scale.abs()
        shift_err = mean.abs() * scale_err + 3 * U * (mean * scale).abs() + 2 * U * shift.abs()
        view = (-1, *([1] * (len(self.shape) - 1)))
        radius = (scale_err.reshape(view), shift_err.reshape(view))
        self._affine(scale.reshape(view), shift.reshape(view), where, radius)

    # --- layers -----------------------------------------------------------------------

    def _linear(self, p: dict[str, Any], where: str) -> None:
        w = torch.as_tensor(p["weight"]).detach().cpu().float()
        bias = p.get("bias")
        b = torch.zeros(w.shape[0]) if bias is None else _const(bias).float().reshape(-1)
        if len(self.shape) != 1 or w.dim() != 2 or w.shape[1] != self.shape[0]:
            raise ModelLoadError(
                f"{where} expects {w.shape[-1]} inputs but receives shape {self.shape}; "
                "flatten first or check input_shape"
            )
        self._push(Dense(w.clone(), b.expand(w.shape[0]).clone()), where)

    def _conv2d(self, p: dict[str, Any], where: str) -> None:
        w = torch.as_tensor(p["weight"]).detach().cpu().float()
        if p.get("transposed") or w.dim() != 4:
            raise self.unsupported("transposed or non-2-D convolution", where)
        if int(p.get("groups", 1)) != 1 or _pair(p.get("dilation"), 1) != (1, 1):
            raise self.unsupported("Conv2d with groups or dilation", where)
        stride = _pair(p.get("stride"), 1)
        padding = p.get("padding", 0)
        if padding == "same" and stride == (1, 1) and w.shape[2] % 2 and w.shape[3] % 2:
            padding = (w.shape[2] // 2, w.shape[3] // 2)
        elif isinstance(padding, str) and padding != "valid":
            raise self.unsupported(f"Conv2d with padding={padding!r} (asymmetric)", where)
        pad = (0, 0) if padding == "valid" else _pair(padding, 0)
        bias = p.get("bias")
        b = torch.zeros(w.shape[0]) if bias is None else _const(bias).float()
        self._push(Conv2d(w.clone(), b.clone(), stride, pad), where)

    def _flatten(self, p: dict[str, Any], where: str) -> None:
        ndim = len(self.shape) + 1
        start, end = int(p.get("start_dim", 0)) % ndim, int(p.get("end_dim", -1)) % ndim
        if start != 1 or end != ndim - 1:
            raise self.unsupported(
                f"flatten({start}, {end}) (only flatten(1) keeps the batch)", where
            )
        if len(self.shape) > 1:
            self._push(Flatten(), where)

    def _reshape(self, p: dict[str, Any], where: str) -> None:
        sizes = [BATCH if s is BATCH else int(s) for s in p["shape"]]
        numel = math.prod(self.shape)
        batch_ok = bool(sizes) and (sizes[0] is BATCH or sizes[0] in (-1, 1, self.batch))
        if batch_ok and sizes[1:] == list(self.shape):
            return  # a reshape that changes nothing
        if batch_ok and len(sizes) == 2 and sizes[1] in (-1, numel) and sizes != [-1, -1]:
            self._flatten({"start_dim": 1}, where)
            return
        raise self.unsupported(f"reshape to {tuple(sizes)} (only to (N, -1))", where)

    def _pool_window(self, p: dict[str, Any], where: str) -> tuple[tuple[int, int], ...]:
        if len(self.shape) != 3:
            raise ModelLoadError(f"{where} needs a C×H×W activation, got shape {self.shape}")
        k = _pair(p["kernel_size"])
        s, pad = _pair(p.get("stride"), k), _pair(p.get("padding"), 0)
        if p.get("ceil_mode") and any(
            (n + 2 * q - kk) % ss for n, q, kk, ss in zip(self.shape[1:], pad, k, s, strict=True)
        ):
            raise self.unsupported("pooling with ceil_mode=True that rounds up", where)
        return k, s, pad

    def _max_pool2d(self, p: dict[str, Any], where: str) -> None:
        k, s, pad = self._pool_window(p, where)
        if pad != (0, 0) or _pair(p.get("dilation"), 1) != (1, 1) or p.get("return_indices"):
            raise self.unsupported("MaxPool2d with padding, dilation or indices", where)
        self._push(MaxPool2d(k, s), where)

    def _avg_pool2d(self, p: dict[str, Any], where: str) -> None:
        k, s, pad = self._pool_window(p, where)
        if p.get("divisor_override") is not None or (
            pad != (0, 0) and not p.get("count_include_pad", True)
        ):
            raise self.unsupported("AvgPool2d excluding padding or with a divisor", where)
        self._push(AvgPool2d(k, s, pad), where)

    def _relu(self, p: dict[str, Any], where: str) -> None:
        self._push(ReLU(), where)

    def _dropout(self, p: dict[str, Any], where: str) -> None:
        if p.get("training"):
            raise ModelLoadError(f"{where} is a dropout in training mode; use eval mode")


class _Side:
    """The shortcut branch being read: its source activation index, layers so far, its
    current activation and shape (swapped with the main chain's while an operation runs)."""

    def __init__(self, skip: int, layers: list[Layer], current: Data, shape: tuple[int, ...]):
        self.skip, self.layers, self.current, self.shape = skip, layers, current, shape


_SIDE_OPS = frozenset(
    {"add", "sub", "rsub", "mul", "div", "linear", "conv2d", "_convolution", "convolution",
     "batch_norm", "_native_batch_norm_legit_no_training", "flatten", "view", "reshape",
     "_unsafe_view", "avg_pool2d", "dropout", *_IDENTITY}
)  # fmt: skip


_HANDLERS: dict[str, Callable[[Chain, dict[str, Any], str], None]] = {
    "linear": Chain._linear,
    "conv2d": Chain._conv2d,
    "_convolution": Chain._conv2d,
    "convolution": Chain._conv2d,
    "relu": Chain._relu,
    "flatten": Chain._flatten,
    "view": Chain._reshape,
    "reshape": Chain._reshape,
    "_unsafe_view": Chain._reshape,
    "max_pool2d": Chain._max_pool2d,
    "avg_pool2d": Chain._avg_pool2d,
    "batch_norm": Chain._batch_norm,
    "_native_batch_norm_legit_no_training": Chain._batch_norm,
    "dropout": Chain._dropout,
}
