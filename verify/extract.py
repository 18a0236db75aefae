"""From a PyTorch model to the verifier's `Network`: nn.Module, TorchScript, torch.export.

    >>> from bastion.zoo import demo_model
    >>> net = extract(demo_model(), input_shape=(1, 8, 8))
    >>> net.layers            # Conv2d, ReLU, Conv2d, ReLU, MaxPool2d, Flatten, Dense, ReLU, Dense

Every front end reads the model as a chain of operations and hands each one to `_Chain`,
which keeps the current activation shape and builds the layer list: BatchNorm and
`+ - × ÷` by constants become an affine map folded into the preceding Dense/Conv2d (or an
`Elementwise`), Dropout/Identity vanish (eval semantics). `nn.Module`s are traced with
torch.fx (`bastion.Normalized` is expanded without tracing its input check); TorchScript
modules are interpreted from their inlined graph, taking `if` branches on constants such as
`self.training`; an `ExportedProgram` (or the module `bastion.load_model` makes of one) is
read from its aten graph. The result is replayed against the model on random inputs and
must agree within 1e-5 (relative to the output scale), so a misread model is an error,
never a silently different network.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bastion.errors import ModelLoadError
from bastion.modes import eval_mode
from bastion.normalized import Normalized

from . import torchscript_graph
from .chain import SUPPORTED, Chain, Data, UnsupportedLayerError
from .network import Network

__all__ = ["SUPPORTED", "UnsupportedLayerError", "check_network", "extract", "load_network"]

Model = nn.Module | torch.export.ExportedProgram

# Python-level functions and tensor methods: (canonical op, positional parameter names).
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ("input",)),
    torch.relu: ("relu", ("input",)),
    torch.flatten: ("flatten", ("input", "start_dim", "end_dim")),
    F.linear: ("linear", ("input", "weight", "bias")),
    F.conv2d: ("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    F.max_pool2d: (
        "max_pool2d",
        ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    F.avg_pool2d: (
        "avg_pool2d",
        ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    ),
    F.batch_norm: (
        "batch_norm",
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    ),
    F.dropout: ("dropout", ("input", "p", "training")),
    operator.add: ("add", ("input", "other")),
    operator.sub: ("sub", ("input", "other")),
    operator.mul: ("mul", ("input", "other")),
    operator.truediv: ("div", ("input", "other")),
    torch.add: ("add", ("input", "other")),
    torch.sub: ("sub", ("input", "other")),
    torch.mul: ("mul", ("input", "other")),
    torch.div: ("div", ("input", "other")),
}
_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "relu": ("relu", ("input",)),
    "flatten": ("flatten", ("input", "start_dim", "end_dim")),
    "add": ("add", ("input", "other")),
    "sub": ("sub", ("input", "other")),
    "mul": ("mul", ("input", "other")),
    "div": ("div", ("input", "other")),
    "contiguous": ("contiguous", ("input",)),
}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


def _module_op(chain: Chain, mod: nn.Module, where: str, data: Any = None) -> Any:
    """One leaf module applied to `data` (default: the current activation); returns the
    activation it makes."""
    x = chain.current if data is None else data
    if isinstance(mod, Normalized):
        x = chain.apply("sub", {"input": x, "other": mod.mean}, where)
        x = chain.apply("div", {"input": x, "other": mod.std}, where)
        chain.expect_current(x, where)
        _trace(chain, mod.model, prefix=where)
        return chain.current
    elif isinstance(mod, nn.Linear):
        return chain.apply("linear", {"input": x, "weight": mod.weight, "bias": mod.bias}, where)
    elif isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros":
        params = {k: getattr(mod, k) for k in ("weight", "bias", "stride", "padding", "dilation")}
        return chain.apply("conv2d", {"input": x, **params, "groups": mod.groups}, where)
    elif isinstance(mod, nn.ReLU):
        return chain.apply("relu", {"input": x}, where)
    elif isinstance(mod, nn.Flatten):
        return chain.apply(
            "flatten", {"input": x, "start_dim": mod.start_dim, "end_dim": mod.end_dim}, where
        )
    elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and mod.running_var is not None:
        params = {k: getattr(mod, k) for k in ("weight", "bias", "running_mean", "running_var")}
        return chain.apply("batch_norm", {"input": x, **params, "eps": mod.eps}, where)
    elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
        keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return chain.apply("max_pool2d", {"input": x, **{k: getattr(mod, k) for k in keys}}, where)
    elif isinstance(mod, nn.AvgPool2d):
        keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        params = {k: getattr(mod, k) for k in keys}
        return chain.apply(
            "avg_pool2d", {"input": x, **params, "divisor_override": mod.divisor_override}, where
        )
    elif isinstance(mod, _DROPOUTS):
        return chain.apply("contiguous", {"input": x}, where)
    else:
        raise chain.unsupported(type(mod).__name__, where)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalized) or super().is_leaf_module(m, module_qualified_name)


def _bind(names: Sequence[str], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    params = dict(zip(names, args, strict=False))
    params.update(kwargs)
    return params


def _trace(chain: Chain, model: nn.Module, prefix: str = "") -> None:
    """Add the operations of an nn.Module (or an exported aten graph) to the chain."""
    graph: fx.Graph
    root: nn.Module
    if isinstance(model, fx.GraphModule):
        graph, root = model.graph, model
    elif type(model).__name__ == "_ExportedModule" and isinstance(model.program, nn.Module):
        return _trace(chain, model.program, prefix)  # what bastion.load_model makes of a .pt2
    elif isinstance(model, torch.jit.ScriptModule):
        return torchscript_graph.read(chain, model)
    elif _is_leaf(model):
        _module_op(chain, model, prefix or type(model).__name__)
        return None
    else:
        try:
            graph, root = _Tracer().trace(model), model
        except Exception as exc:  # noqa: BLE001 - any tracing failure has the same remedy
            raise ModelLoadError(
                f"cannot trace {type(model).__name__}.forward with torch.fx "
                f"({str(exc).splitlines()[0][:120]}); give a model whose forward is a plain "
                "chain of layers, or a TorchScript / torch.export version of it"
            ) from None
    env: dict[fx.Node, Any] = {}
    placeholders = 0
    for node in graph.nodes:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        name = str(node.target) if node.op == "call_module" else node.name
        where = f"{prefix}.{name}" if prefix else name
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise ModelLoadError("the model takes several inputs; the verifier needs one")
            env[node] = chain.current
        elif node.op == "get_attr":
            env[node] = _fetch(root, str(node.target))
        elif node.op == "output":
            out = args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            chain.expect_current(out, "the model's output")
        elif not node.users:
            continue  # dead code, e.g. torch.export's guard call
        elif node.op == "call_module":
            data = args[0] if args else None
            env[node] = _module_op(chain, root.get_submodule(str(node.target)), where, data)
        else:
            env[node] = _call(chain, node, args, kwargs, where)
    return None


def _is_leaf(model: nn.Module) -> bool:
    """A module read as one operation (as torch.fx would leave it), not traced into."""
    if isinstance(model, Normalized):
        return True
    return type(model).__module__.startswith("torch.nn") and not isinstance(model, nn.Sequential)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _call(chain: Chain, node: fx.Node, args: Any, kwargs: dict[str, Any], where: str) -> Any:
    """A call_function / call_method node: a layer on the data, or plain Python on constants."""
    target = node.target
    if target is operator.getitem and isinstance(args[0], Data):
        raise chain.unsupported("indexing or slicing", where)
    if target is operator.getitem or not chain.touches_data(args, kwargs):
        fn: Any = getattr(args[0], str(target)) if node.op == "call_method" else target
        return fn(*(args[1:] if node.op == "call_method" else args), **kwargs)
    if node.op == "call_method" and target in ("view", "reshape"):
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return chain.apply("reshape", {"input": args[0], "shape": list(sizes)}, where)
    if (node.op, target) in (
        ("call_method", "size"),
        ("call_function", torch.ops.aten.sym_size.int),
    ):
        return chain.size(args[0], args[1] if len(args) > 1 else None)
    if node.op == "call_function" and target is getattr and args[1] == "shape":
        return chain.size(args[0], None)
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        params = _bind([a.name for a in schema.arguments], args, kwargs)
        return chain.apply(schema.name.split("::")[-1], params, where)
    table: dict[Any, tuple[str, tuple[str, ...]]] = (
        _METHODS if node.op == "call_method" else _FUNCTIONS
    )
    if target not in table:
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        raise chain.unsupported(str(name), where)
    op, names = table[target]
    return chain.apply(op, _bind(names, args, kwargs), where)


def _example_shape(model: nn.Module) -> tuple[int | None, ...] | None:
    """The input shape with its batch axis (None where symbolic), when the model tells it."""
    if isinstance(model, fx.GraphModule) or type(model).__name__ == "_ExportedModule":
        gm: Any = getattr(model, "program", model)
        for node in gm.graph.nodes:
            val = node.meta.get("val") if node.op == "placeholder" else None
            if val is not None and all(isinstance(d, int) for d in val.shape[1:]):
                return tuple(d if isinstance(d, int) else None for d in val.shape)
    if isinstance(model, torch.jit.ScriptModule):
        return torchscript_graph.example_shape(model)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    return (None, first.in_features) if isinstance(first, nn.Linear) else None


def extract(
    model: Model,
    input_shape: Sequence[int] | None = None,
    *,
    check: bool = True,
    tol: float = 1e-5,
    seed: int = 0,
) -> Network:
    """The model as a `Network` of Dense/Conv2d/Elementwise/ReLU/Flatten/pooling layers.

    `model` is an `nn.Module` (plain or with a custom forward that torch.fx can trace), a
    TorchScript module or a `torch.export.ExportedProgram`. `input_shape` (no batch axis,
    e.g. `(1, 28, 28)`) is required unless the model fixes it (an exported or traced
    program, or a first layer that is Linear). The network is checked against the model on
    8 random inputs (`check_network`). Raises `UnsupportedLayerError` naming the first
    layer it cannot express, and `ModelLoadError` for anything else it cannot read.
    """
    if isinstance(model, torch.export.ExportedProgram):
        from bastion.model_io import _ExportedModule, _static_batch

        program: Any = model
        model = model.module()
        run: Callable[[torch.Tensor], torch.Tensor] = _ExportedModule(model, _static_batch(program))
    else:
        program, run = None, model
    example = _example_shape(model)
    shape = tuple(input_shape) if input_shape is not None else example and example[1:]
    if not shape or any(d is None for d in shape):
        raise ModelLoadError(
            f"cannot tell the input shape of {type(model).__name__}; pass "
            "input_shape=(C, H, W) (without the batch axis)"
        )
    batch = example[0] if example else None
    chain = Chain(tuple(int(d) for d in shape if d is not None), batch=batch)
    # an exported program is frozen in the mode it was exported in (and refuses .eval())
    mode = nullcontext() if program is not None else eval_mode(model)
    with mode, torch.no_grad():
        _trace(chain, model)
        network = chain.network()
        if check:
            check_network(network, run, tol=tol, seed=seed)
    return network


def check_network(
    network: Network,
    reference: Callable[[torch.Tensor], Any],
    *,
    tol: float = 1e-5,
    seed: int = 0,
    samples: int = 8,
) -> None:
    """Raise `ModelLoadError` unless `network.forward` matches `reference` on random inputs
    in [0, 1) within `tol × max(1, max |output|)` (float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((samples, *network.input_shape), generator=gen)
    with torch.no_grad():
        got = network.forward(x)
        try:
            want = _run(reference, x)
        except Exception as exc:  # noqa: BLE001 - a model that fails on this shape
            raise ModelLoadError(
                f"the model fails on inputs of shape {network.input_shape} "
                f"({str(exc).splitlines()[0][:120]}); pass the right input_shape"
            ) from None
    if want.numel() != got.numel():
        raise ModelLoadError(
            f"the model gives {want.shape[1:].numel()} outputs per input but the extracted "
            f"network {network.num_outputs}; the model's output is not its last layer"
        )
    err = float((got - want.reshape(got.shape)).abs().max())
    allowed = tol * max(1.0, float(want.abs().max()))
    if not err <= allowed:
        raise ModelLoadError(
            f"the extracted network differs from the model by {err:.3g} (allowed "
            f"{allowed:.3g}) on random inputs; some operation was misread, please report it"
        )


def _run(reference: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    """The reference's float32 outputs, one sample at a time if it rejects the batch."""
    device = next((p.device for p in getattr(reference, "parameters", list)()), x.device)
    try:
        out = reference(x.to(device))
    except Exception:  # noqa: BLE001 - e.g. a program exported with a fixed batch of 1
        out = torch.cat([reference(x[i : i + 1].to(device)) for i in range(len(x))])
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError("the model returns more than one tensor; the verifier needs logits")
    return out.detach().float().cpu().reshape(len(x), -1)


def load_network(path: str | os.PathLike[str], input_shape: Sequence[int] | None = None) -> Network:
    """A model file (ONNX, torch.export, TorchScript; any format `bastion.load_model` reads,
    detected from the bytes) as a `Network`. ONNX files fix their own input shape (the
    ONNX input without its batch axis); `input_shape` is for the others (see `extract`)."""
    from bastion.model_formats import detect_format
    from bastion.model_io import load_model

    if detect_format(path) == "onnx":
        from .onnx_graph import read_onnx

        network = read_onnx(path)
        if input_shape is not None and tuple(input_shape) != network.input_shape:
            raise ModelLoadError(
                f"{path} takes inputs of shape {network.input_shape}, not "
                f"{tuple(input_shape)}; leave input_shape out for ONNX files"
            )
        return network
    return extract(load_model(path), input_shape)
