"""ONNX files: the standard exporters' graphs rewritten for the readers, and onnxruntime.

`torch.onnx.export` (the TorchScript-based `dynamo=False` exporter and the dynamo one, opsets
13–20) writes a few patterns that are plain data flow, not computation:

* `Constant` nodes, and `Identity` nodes on initializers (the legacy exporter shares one
  tensor between identical parameters, e.g. the BatchNorm weights of a fresh model or the
  zero biases of a torchvision ResNet, through Identity);
* `Identity` on activations;
* `Reshape` with `allowzero=1` (the dynamo exporter) whose target shape is a constant
  without a 0, where the flag changes nothing.

`fold_constants` rewrites those exactly (values are copied bit for bit, never recomputed):
constants become initializers, an Identity becomes a second name for its input. `for_onnx2torch`
does that and then lowers the opset to 17, the newest whose operator versions onnx2torch
converts (opset 18 moved ReduceMean's axes into an input, 19 and 21 gave Identity, Reshape,
Shape, Cast, Constant new versions without changing them on float tensors), or raises an
opset below 13 to 13, with onnx's own version converter. `load_onnx` converts the result to
an `nn.Module` with onnx2torch and checks it against onnxruntime (`runtime`) on random
inputs, so a rewrite or conversion that went wrong is an error, never a silently different
model; the verifier's reader (`bastion.verify.onnx_graph`) checks its network the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.errors import ModelLoadError
from bastion.model_formats import _corrupt, _reason

__all__ = [
    "ONNX2TORCH_OPSET",
    "ONNX_HINT",
    "fold_constants",
    "for_onnx2torch",
    "load_onnx",
    "opset",
    "runtime",
]

ONNX_HINT = 'install the optional ONNX support with pip install "bastion[onnx]"'

ONNX2TORCH_OPSET = 17


def opset(model: Any) -> int:
    """The model's version of the default ("" or "ai.onnx") operator set; 0 when absent."""
    return max(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
    )


def _constant_tensor(onnx: Any, node: Any, name: str) -> Any | None:
    """The value of a Constant node as a named TensorProto; None for sparse/string values."""
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
            return tensor
        if attr.name in ("value_float", "value_floats"):
            return onnx.numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        if attr.name in ("value_int", "value_ints"):
            return onnx.numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)
    return None


def fold_constants(model: Any) -> Any:
    """A copy of `model` (an `onnx.ModelProto`) with Constant and Identity nodes folded.

    Constant nodes become initializers; an Identity on an initializer becomes an initializer
    holding the same tensor; an Identity on an activation disappears and its consumers read
    the activation itself (kept when its output is a graph output); a Reshape's
    `allowzero=1` is dropped where the target shape is a constant without a 0.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    tensors = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        if node.op_type == "Constant" and len(node.output) == 1:
            tensor = _constant_tensor(onnx, node, node.output[0])
            if tensor is not None:
                graph.initializer.append(tensor)
                tensors[tensor.name] = graph.initializer[-1]
                continue
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(tensors[node.input[0]])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            tensors[tensor.name] = graph.initializer[-1]
            continue
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in tensors:
            shape = onnx.numpy_helper.to_array(tensors[node.input[1]])
            if not (shape == 0).any():
                keep = [a for a in node.attribute if a.name != "allowzero"]
                del node.attribute[:]
                node.attribute.extend(keep)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return out


def for_onnx2torch(model: Any) -> Any:
    """`fold_constants`, then the opset moved into 13…`ONNX2TORCH_OPSET` when it is outside.

    Newer graphs are lowered to 17; older ones (opsets 7–12, e.g. VNN-COMP's ACAS Xu with
    Flatten version 1, which onnx2torch lacks) are raised to 13. When onnx's version
    converter cannot move the graph, the folded graph is returned as it is (onnx2torch then
    names the operator it lacks).
    """
    from onnx import version_converter

    folded = fold_constants(model)
    version = opset(folded)
    if 13 <= version <= ONNX2TORCH_OPSET:
        return folded
    try:
        moved = version_converter.convert_version(folded, min(max(version, 13), ONNX2TORCH_OPSET))
    except Exception:  # noqa: BLE001 - the converter raises RuntimeError, ValueError, ...
        return folded
    return fold_constants(moved)  # the converter may add Constant nodes (e.g. axes)


def runtime(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX model itself as a function of one float32 input batch (first output, N×K
    flattened), run by onnxruntime on one thread, or onnx's reference evaluator without it.
    Samples are run one at a time when the model takes a fixed batch of 1."""
    name = next(i.name for i in model.graph.input if i.name not in _initializers(model))
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options)
        run: Callable[[np.ndarray], Any] = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        run = lambda x: evaluator.run(None, {name: x})[0]  # type: ignore[index]  # noqa: E731
    single = _dims(model)[:1] == [1]

    def reference(x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().cpu().float().numpy()
        parts = [batch[i : i + 1] for i in range(len(batch))] if single else [batch]
        outs = [np.asarray(run(p)).reshape(len(p), -1) for p in parts]
        return torch.from_numpy(np.concatenate(outs))

    return reference


def _initializers(model: Any) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _dims(model: Any) -> list[int | None]:
    """The (first non-weight) input's dimensions, None where symbolic."""
    value = next(i for i in model.graph.input if i.name not in _initializers(model))
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def load_onnx(path: Path, *, tol: float = 1e-4) -> nn.Module:
    """An ONNX file as an `nn.Module` (onnx2torch after `for_onnx2torch`), in eval mode.

    When the input's dimensions after the batch axis are fixed, the module is run beside
    onnxruntime on 4 random inputs in [0, 1) and must agree within
    `tol × max(1, max |output|)`. Raises `ModelLoadError` (one sentence) otherwise, or when
    onnx2torch lacks an operator.
    """
    try:
        import onnx
        from onnx2torch import convert
    except ImportError:
        raise ModelLoadError(f"{path} is an ONNX model; {ONNX_HINT}") from None
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds
        raise _corrupt(path, "onnx", exc) from None
    try:
        module: nn.Module = convert(for_onnx2torch(proto)).eval()
    except Exception as exc:  # noqa: BLE001 - onnx2torch raises KeyError, NotImplementedError, ...
        raise ModelLoadError(
            f"onnx2torch cannot convert the ONNX model {path} (opset {opset(proto)}: "
            f"{_reason(exc)}); export the network with torch.export instead"
        ) from None
    _check(module, proto, path, tol)
    return module


def _check(module: nn.Module, proto: Any, path: Path, tol: float) -> None:
    dims = _dims(proto)
    fixed = [d for d in dims[1:] if d is not None]
    if len(dims) < 1 or len(fixed) < len(dims) - 1:
        return  # symbolic image size: no input to try it on
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4 if dims[0] is None else dims[0], *fixed), generator=gen)
    try:
        with torch.no_grad():
            got = module(x)
        want = runtime(proto)(x)
    except Exception as exc:  # noqa: BLE001 - a model that fails on its own declared shape
        raise ModelLoadError(
            f"the ONNX model {path} fails on an input of its declared shape {tuple(x.shape)} "
            f"({_reason(exc)}); check the file"
        ) from None
    got = (got[0] if isinstance(got, (tuple, list)) else got).detach().float().reshape(len(x), -1)
    if got.shape != want.shape:
        raise ModelLoadError(
            f"the ONNX model {path} converted to torch gives outputs of shape "
            f"{tuple(got.shape)}, onnxruntime {tuple(want.shape)}; export it with torch.export"
        )
    err = float((got - want).abs().max())
    allowed = tol * max(1.0, float(want.abs().max()))
    if not err <= allowed:
        raise ModelLoadError(
            f"the ONNX model {path} converted to torch differs from onnxruntime by {err:.3g} "
            f"(allowed {allowed:.3g}); export the network with torch.export instead"
        )
