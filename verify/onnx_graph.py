"""ONNX models (VNN-COMP networks) read into the verifier's `Network`.

    >>> net = read_onnx("mnist-net_256x2.onnx")   # input [1,784,1] → input_shape (784, 1)
    >>> net.layers                                # Flatten, Dense, ReLU, Dense, ReLU, Dense

The graph is read node by node into the same `Chain` as the torch readers: Gemm (any
alpha/beta/transB), MatMul by a constant (with the following Add folded into its bias),
Add/Sub/Mul/Div by constants, Flatten, Reshape to a flat vector (also from the
Shape-Gather-Unsqueeze-Concat pattern PyTorch exports for `x.view(x.size(0), -1)`), Relu,
Conv, BatchNormalization (its own layer, as `Chain` keeps it), AveragePool, MaxPool,
Identity, Dropout and Constant. Constants and Identity nodes on them (as the legacy
exporter shares equal parameters) are folded first (`bastion.onnx_io.fold_constants`), so
the exports of `torch.onnx.export`, legacy and dynamo, opsets 13–20, read as written.
Residual graphs (an Add of two activations) are refused with one line naming the node.
Old-opset files (ACAS Xu) list their weights among the graph inputs; those are skipped. The
network's input shape is the ONNX input's shape without its batch axis, so VNN-LIB's `X_i`
is the i-th value of that input in row-major order. The result is checked against
onnxruntime (or onnx's reference evaluator when onnxruntime is missing).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bastion.errors import ModelLoadError
from bastion.onnx_io import ONNX_HINT, fold_constants, runtime

from .chain import BATCH, Chain, Data
from .extract import check_network
from .network import Network

__all__ = ["read_onnx"]

_ELEMENTWISE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelLoadError(f"reading ONNX models needs the onnx package; {ONNX_HINT}") from None
    return onnx


def read_onnx(
    model: str | os.PathLike[str] | Any, *, check: bool = True, tol: float = 1e-5
) -> Network:
    """An ONNX file (or loaded `onnx.ModelProto`) as a `Network`; see the module docstring.

    Raises `UnsupportedLayerError` for an operator outside the list, `ModelLoadError` for
    an unreadable file or a network that disagrees with onnxruntime on random inputs.
    """
    onnx = _onnx()
    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds
            raise ModelLoadError(
                f"{model} is not a readable ONNX file ({exc}); check the path"
            ) from None
    graph = fold_constants(model).graph
    consts: dict[str, Any] = {
        t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in graph.initializer
    }
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelLoadError(
            f"the ONNX graph has {len(inputs)} inputs and {len(graph.output)} outputs; "
            "the verifier needs exactly one of each"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in _dims(inputs[0])]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        raise ModelLoadError(
            f"the ONNX input has shape {dims}; the verifier needs a batch axis followed by "
            "fixed dimensions"
        )
    chain = Chain(tuple(d for d in dims[1:] if d is not None), batch=dims[0])
    env: dict[str, Any] = {**consts, inputs[0].name: chain.current}
    for k, node in enumerate(graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        where = node.name or f"{node.op_type} node {k}"
        args = [env.get(name) if name else None for name in node.input]
        result = _node(chain, onnx, node.op_type, args, attrs, where)
        outs = result if isinstance(result, tuple) else (result,)
        env.update(zip(node.output, outs, strict=False))
    chain.expect_current(env.get(graph.output[0].name), "the ONNX graph's output")
    network = chain.network()
    if check:
        check_network(network, runtime(model), tol=tol)
    return network


def _dims(value_info: Any) -> Any:
    return value_info.type.tensor_type.shape.dim


def _node(
    chain: Chain, onnx: Any, op: str, args: list[Any], attrs: dict[str, Any], where: str
) -> Any:
    """One ONNX node: a layer on the activation, or a small computation on shapes."""
    if op == "Constant":
        return _constant(onnx, attrs)
    if op == "Shape":
        return list(chain.size(args[0], None))
    if not chain.touches_data(args):
        return _shape_arith(chain, op, args, attrs, where)
    if op == "Gemm":
        if attrs.get("transA", 0) or not isinstance(args[0], Data):
            raise chain.unsupported("Gemm with a transposed or constant first input", where)
        w = args[1] if attrs.get("transB", 0) else args[1].T
        c = args[2] if len(args) > 2 else None
        bias = None if c is None else attrs.get("beta", 1.0) * c
        return chain.apply("linear", {"input": args[0], "weight": attrs.get("alpha", 1.0) * w,
                                      "bias": bias}, where)  # fmt: skip
    if op == "MatMul":
        if not isinstance(args[0], Data) or getattr(args[1], "dim", lambda: 0)() != 2:
            raise chain.unsupported("MatMul other than activation × constant matrix", where)
        return chain.apply("linear", {"input": args[0], "weight": args[1].T}, where)
    if op in _ELEMENTWISE:
        return chain.apply(_ELEMENTWISE[op], {"input": args[0], "other": args[1]}, where)
    if op == "Flatten":
        if attrs.get("axis", 1) != 1:
            raise chain.unsupported(f"Flatten with axis={attrs['axis']}", where)
        return chain.apply("flatten", {"input": args[0], "start_dim": 1}, where)
    if op == "Reshape":
        shape = args[1].tolist() if isinstance(args[1], torch.Tensor) else list(args[1])
        if shape and shape[0] == 0:
            shape[0] = BATCH  # ONNX: 0 copies the input's dimension
        return chain.apply("reshape", {"input": args[0], "shape": shape}, where)
    if op in ("Relu", "Identity", "Dropout"):
        return chain.apply("relu" if op == "Relu" else "identity", {"input": args[0]}, where)
    if op == "BatchNormalization":
        if attrs.get("training_mode", 0):
            raise chain.unsupported("BatchNormalization in training mode", where)
        keys = ("weight", "bias", "running_mean", "running_var")
        params = dict(zip(keys, args[1:5], strict=True))
        return chain.apply("batch_norm", {"input": args[0], **params,
                                          "eps": attrs.get("epsilon", 1e-5)}, where)  # fmt: skip
    if op in ("Conv", "AveragePool", "MaxPool"):
        return _windowed(chain, op, args, attrs, where)
    raise chain.unsupported(op, where)


def _windowed(chain: Chain, op: str, args: list[Any], attrs: dict[str, Any], where: str) -> Any:
    """Conv, AveragePool and MaxPool: ONNX pads are (top, left, bottom, right)."""
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise chain.unsupported(f"{op} with auto_pad={attrs['auto_pad']!r}", where)
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise chain.unsupported(f"{op} with asymmetric or non-2-D pads {pads}", where)
    common = {"input": args[0], "stride": attrs.get("strides", [1, 1]), "padding": pads[:2]}
    if op == "Conv":
        bias = args[2] if len(args) > 2 else None
        extra = {"dilation": attrs.get("dilations", [1, 1]), "groups": attrs.get("group", 1)}
        return chain.apply("conv2d", {**common, "weight": args[1], "bias": bias, **extra}, where)
    window = {"kernel_size": attrs["kernel_shape"], "ceil_mode": attrs.get("ceil_mode", 0)}
    if op == "MaxPool":
        window["dilation"] = attrs.get("dilations", [1, 1])
        return (chain.apply("max_pool2d", {**common, **window}, where), None)
    include = bool(attrs.get("count_include_pad", 0))
    return chain.apply("avg_pool2d", {**common, **window, "count_include_pad": include}, where)


def _constant(onnx: Any, attrs: dict[str, Any]) -> Any:
    value = attrs.get("value")
    if value is not None:
        return torch.from_numpy(onnx.numpy_helper.to_array(value).copy())
    for key in ("value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            return torch.tensor(attrs[key])
    raise ModelLoadError(f"unsupported ONNX Constant with attributes {sorted(attrs)}")


def _shape_arith(chain: Chain, op: str, args: list[Any], attrs: dict[str, Any], where: str) -> Any:
    """Gather/Unsqueeze/Concat/Cast on shape lists (the batch size kept symbolic)."""
    if op == "Gather" and isinstance(args[0], list) and attrs.get("axis", 0) == 0:
        return args[0][int(args[1])]
    if (
        op == "Unsqueeze"
        and not isinstance(args[0], (list, torch.Tensor))
        or (op == "Unsqueeze" and isinstance(args[0], torch.Tensor) and args[0].dim() == 0)
    ):
        return [args[0] if args[0] is BATCH else int(args[0])]
    if op == "Concat" and attrs.get("axis", 0) == 0:
        return [v for a in args for v in (a.tolist() if isinstance(a, torch.Tensor) else a)]
    if op == "Cast":
        return args[0]
    raise chain.unsupported(f"{op} on constants", where)
