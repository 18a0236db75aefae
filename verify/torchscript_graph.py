"""TorchScript modules (scripted or traced) read from their inlined graph into a `Chain`.

The graph is interpreted node by node: module attributes and constants are looked up,
arithmetic on Python values (shape checks, `self.training`) is evaluated, an `if` takes the
branch its (constant) condition selects, and every aten operation on the activation goes to
`Chain.apply` with its arguments named by the operation's schema. A condition that depends
on the data, a loop, or a call the graph did not inline is an error.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch

from bastion.errors import ModelLoadError

from .chain import BATCH, Chain, Data

_PY_OPS: dict[str, Callable[..., Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "__not__": operator.not_,
    "__is__": operator.is_,
    "__isnot__": operator.is_not,
    "__getitem__": operator.getitem,
    "len": len,
    "Int": int,
    "Float": float,
    "Bool": bool,
}
_SKIPPED = ("aten::warn", "prim::Print")


class _Unknown:
    """A value that depends on the data or on something not evaluated."""


_UNKNOWN = _Unknown()


def example_shape(module: torch.jit.ScriptModule) -> tuple[int, ...] | None:
    """The input shape (batch axis first) recorded by `torch.jit.trace`; None otherwise
    (scripted modules, and traced ones after `torch.jit.save` / `load`)."""
    try:
        input_type: Any = list(module.graph.inputs())[1].type()
        sizes = input_type.sizes()
    except (IndexError, RuntimeError, AttributeError):
        return None
    return tuple(int(d) for d in sizes) if sizes and len(sizes) > 1 else None


def read(chain: Chain, module: torch.jit.ScriptModule) -> None:
    """Add the operations of a TorchScript module's forward to the chain."""
    graph = module.inlined_graph
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        raise ModelLoadError("the TorchScript model takes several inputs; the verifier needs one")
    env: dict[Any, Any] = {inputs[0]: module, inputs[1]: chain.current}
    _run(chain, graph.nodes(), env)
    outputs = list(graph.outputs())
    chain.expect_current(env.get(outputs[0]), "the model's output")


def _run(chain: Chain, nodes: Iterable[Any], env: dict[Any, Any]) -> None:
    for node in nodes:
        kind: str = node.kind()
        args = [env.get(v, _UNKNOWN) for v in node.inputs()]
        outs = list(node.outputs())
        if kind in _SKIPPED:
            continue
        if kind == "prim::If":
            _branch(chain, node, args[0], env)
            continue
        if kind == "prim::RaiseException":
            raise ModelLoadError(
                f"the TorchScript model raises an error for inputs of shape {chain.input_shape}"
                "; check input_shape"
            )
        values = _evaluate(chain, node, kind, args)
        if len(outs) == 1:
            env[outs[0]] = values
        else:
            for out, value in zip(outs, values, strict=True):
                env[out] = value


def _branch(chain: Chain, node: Any, cond: Any, env: dict[Any, Any]) -> None:
    if not isinstance(cond, bool):
        raise ModelLoadError(
            "the TorchScript model branches on a value that depends on its input; "
            "the verifier reads only a fixed chain of layers"
        )
    block = list(node.blocks())[0 if cond else 1]
    _run(chain, block.nodes(), env)
    for out, value in zip(node.outputs(), block.outputs(), strict=True):
        env[out] = env.get(value, _UNKNOWN)


def _evaluate(chain: Chain, node: Any, kind: str, args: list[Any]) -> Any:
    if kind == "prim::Constant":
        return node.output().toIValue()
    if kind == "prim::GetAttr":
        return getattr(args[0], node.s("name"))
    if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
        return list(args)
    if kind in ("prim::ListUnpack", "prim::TupleUnpack"):
        return list(args[0])
    if kind in ("prim::Uninitialized", "aten::format"):
        return _UNKNOWN
    if kind in ("prim::Loop", "prim::CallMethod", "prim::CallFunction"):
        raise ModelLoadError(
            f"the TorchScript model uses {kind}, which the verifier cannot follow; "
            "trace it with torch.jit.trace or export it with torch.export instead"
        )
    namespace, _, name = kind.partition("::")
    if kind in ("prim::NumToTensor", "aten::Int") and (args[0] is BATCH or kind[0] == "p"):
        return args[0]  # a size stays a Python value (the batch size stays symbolic)
    if kind in ("prim::dtype", "prim::device"):
        return _UNKNOWN
    if any(a is _UNKNOWN for a in args):
        return _UNKNOWN
    data = [a for a in args if isinstance(a, Data)]
    if data and name == "dim":
        return len(chain.shape) + 1
    if data and name == "size":
        return chain.size(args[0], args[1] if len(args) > 1 else None)
    if data:
        schema = torch._C.parse_schema(node.schema())
        params = {a.name: v for a, v in zip(schema.arguments, args, strict=False)}
        where = (node.scopeName() or kind).replace("__module.", "")
        return chain.apply(name, params, where or kind)
    if name in _PY_OPS and not any(isinstance(a, torch.Tensor) for a in args):
        if any(a is BATCH for a in args):
            return _UNKNOWN
        return _PY_OPS[name](*args)
    try:  # an operation on constants (e.g. on buffers): compute it
        return getattr(torch.ops.aten, name)(*args)
    except Exception:  # noqa: BLE001 - a value the chain may never need
        return _UNKNOWN
