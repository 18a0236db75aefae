"""A torch.export program's module made to run like an ordinary eval-mode `nn.Module`.

`load_model` wraps every .pt2 in `_ExportedModule`: batches of any size (a program exported
with a fixed batch size runs in chunks), the training flag without retracing, and a shape the
program was not exported for as one `InvalidInputError` instead of torch's guard assertion.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from bastion.errors import InvalidInputError
from bastion.model_formats import _reason, _shape

METADATA_ATTR = "bastion_metadata"
"""A module's attribute holding string metadata (a dict) that `save_model` writes beside the
weights and `load_model` puts back on a loaded .pt2 program (e.g. a distillation temperature)."""


class _ExportedModule(nn.Module):
    """An ExportedProgram's module made to behave like an ordinary eval-mode nn.Module.

    `.eval()`/`.train()` only set the flag: the graph is frozen in the mode it was exported
    in, and the program's own module refuses those calls. A program exported with a fixed batch
    size runs other batch sizes in chunks of that size, padding the last chunk with zeros (a
    tuple or dict output is joined per element, as a dynamic-batch program returns it). An
    input whose shape the program was not exported for is an `InvalidInputError` naming both
    shapes, not torch's guard assertion.
    """

    def __init__(
        self,
        program: nn.Module,
        static_batch: int | None,
        metadata: dict[str, str] | None = None,
        *,
        input_shape: tuple[int | None, ...] | None = None,
        name: str = "the model",
    ) -> None:
        super().__init__()
        self.program = program
        self.static_batch = static_batch
        self.input_shape = input_shape  # None for a dimension the program keeps dynamic
        self.name = name
        if metadata:
            setattr(self, METADATA_ATTR, metadata)

    def train(self, mode: bool = True) -> _ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        self._check_shape(x)
        b = self.static_batch
        if b is None or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == b:
            return self._run(x)
        n = x.shape[0]
        outputs = []
        for start in range(0, max(n, 1), b):
            chunk = x[start : start + b]
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - k, *chunk.shape[1:]))])
            outputs.append(tree_map(partial(_first_rows, k=k, batch=b), self._run(chunk)))
        return tree_map(lambda *ts: torch.cat(ts) if _batched(ts[0], b) else ts[0], *outputs)

    def _expected(self) -> str:
        """The input shape without the batch: `1×8×8` (`?` for a dynamic dimension)."""
        shape = self.input_shape or ()
        return "×".join("?" if d is None else str(d) for d in shape[1:]) or "scalar"

    def _check_shape(self, x: Any) -> None:
        shape = self.input_shape
        if shape is None or not isinstance(x, torch.Tensor):
            return
        fits = x.dim() == len(shape) and all(
            d is None or i == 0 or d == x.shape[i] for i, d in enumerate(shape)
        )
        if not fits:
            raise self._wrong_shape(x)

    def _wrong_shape(self, x: torch.Tensor, why: str = "") -> InvalidInputError:
        got = _shape(x.shape[1:]) if x.dim() else "a scalar"
        return InvalidInputError(
            f"{self.name} takes {self._expected()} inputs (batches N×{self._expected()}), got "
            f"{got}{why}; give data of the size and channel count the model was exported for"
        )

    def _run(self, x: torch.Tensor) -> Any:
        try:
            return self.program(x)
        except AssertionError as exc:  # torch.export's input guards (shapes, dtypes, ranks)
            raise self._wrong_shape(x, f" ({_reason(exc)})") from None


def _batched(t: Any, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch


def _first_rows(t: Any, k: int, batch: int) -> Any:
    """The first k rows of a per-image output (of `batch` rows); anything else as it is."""
    return t[:k] if _batched(t, batch) else t


def _input_shape(program: torch.export.ExportedProgram) -> tuple[int | None, ...] | None:
    """The shape of the program's one user input, None for each dynamic dimension."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            shape = getattr(node.meta.get("val"), "shape", None)
            if shape is not None:
                return tuple(int(d) if isinstance(d, int) else None for d in shape)
    return None


def _static_batch(program: torch.export.ExportedProgram) -> int | None:
    shape = _input_shape(program)
    return shape[0] if shape and shape[0] is not None else None
