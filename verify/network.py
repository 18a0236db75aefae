"""A ReLU network as the verifier sees it: a flat list of simple layers with float32 weights.

Every engine (bounds, SMT, MILP, DLV) reads this one representation; `extract.py` builds it
from an `nn.Module`, TorchScript or ONNX. Weights stay float32 exactly as the model has
them; `exact()` turns a float32 value into the rational it denotes, so z3 sees the
weights as given (float32 rounding of the model's own arithmetic is not modelled).

A layer that folds several of the model's operations (BatchNorm or `× ÷` by constants into
the preceding Dense/Conv2d) cannot always hold the exact real result (a BatchNorm scale
involves a square root): it holds the float64 rounding and `err`, a proven radius of the
difference (weight radius, bias radius). Bounds add it to their error terms; the exact
engines decide the rounded network with the unsafe set widened by its effect (`slack.py`).

Residual networks are still one list: an `Add` layer adds an earlier activation, through a
linear shortcut, to its input. Only the bound engines (CROWN, alpha- and beta-CROWN) read
them; z3, the MILP and DLV take chains without `Add`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F

Radius = tuple[torch.Tensor, torch.Tensor]
"""(weight radius, bias radius), float64, shaped like the weight and bias they bound."""


@dataclass(frozen=True, eq=False)
class Dense:
    """y = W x + b on a flat vector; weight (out, in), bias (out,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    err: Radius | None = None


@dataclass(frozen=True, eq=False)
class Conv2d:
    """2-D convolution on C×H×W; weight (out, in, kh, kw), bias (out,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    err: Radius | None = None


@dataclass(frozen=True, eq=False)
class Elementwise:
    """y = x · scale + shift, broadcast over the input (normalisation, Sub/Div constants)."""

    scale: torch.Tensor
    shift: torch.Tensor
    err: Radius | None = None


@dataclass(frozen=True)
class ReLU:
    """max(x, 0)."""


@dataclass(frozen=True)
class Flatten:
    """C×H×W → a flat vector (row-major, as torch and ONNX flatten)."""


@dataclass(frozen=True)
class AvgPool2d:
    """Average pooling (zero padding counted, as torch's default count_include_pad)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class MaxPool2d:
    """Max pooling without padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Add:
    """A residual join: y = x + S(z_skip), the input plus the earlier activation `skip`
    (index as in `Network.activations`) through `shortcut`, a chain of linear layers
    (empty: the identity)."""

    skip: int
    shortcut: tuple[Dense | Conv2d | Elementwise | Flatten | AvgPool2d, ...] = ()


Layer = Dense | Conv2d | Elementwise | ReLU | Flatten | AvgPool2d | MaxPool2d | Add
LINEAR_LAYERS = (Dense, Conv2d, Elementwise, Flatten, AvgPool2d)


@dataclass(frozen=True, eq=False)
class Network:
    """Layers applied in order to one input of `input_shape` (no batch axis)."""

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        acts = self.activations(torch.zeros((1, *self.input_shape)))
        object.__setattr__(self, "shapes", tuple(tuple(x.shape[1:]) for x in acts))

    @property
    def folded(self) -> bool:
        """Whether some layer holds a rounded fold (a non-zero `err`)."""
        every = [
            *self.layers,
            *(s for la in self.layers if isinstance(la, Add) for s in la.shortcut),
        ]
        return any(getattr(layer, "err", None) is not None for layer in every)

    @property
    def residual(self) -> bool:
        """Whether the network joins branches (an `Add`): only the bound engines read it."""
        return any(isinstance(layer, Add) for layer in self.layers)

    @property
    def num_outputs(self) -> int:
        """Number of outputs (classes)."""
        return int(torch.Size(self.shapes[-1]).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a batch `N × input_shape`, in x's dtype (float32 replays the model)."""
        if not self.residual:
            for layer in self.layers:
                x = apply_layer(layer, x)
            return x.flatten(1)
        return self.activations(x)[-1].flatten(1)

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input and every layer's output for a batch (index k = after layer k-1)."""
        out = [x]
        for layer in self.layers:
            if isinstance(layer, Add):
                out.append(out[-1] + shortcut(layer, out[layer.skip]))
            else:
                out.append(apply_layer(layer, out[-1]))
        return out


def shortcut(layer: Add, z: torch.Tensor) -> torch.Tensor:
    """The shortcut branch of a residual join on a batch of its source activation."""
    for step in layer.shortcut:
        z = apply_layer(step, z)
    return z


def apply_layer(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """One layer on a batch, computed in x's dtype."""
    if isinstance(layer, Dense):
        return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
    if isinstance(layer, Conv2d):
        w, b = layer.weight.to(x.dtype), layer.bias.to(x.dtype)
        return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, Elementwise):
        return x * layer.scale.to(x.dtype) + layer.shift.to(x.dtype)
    if isinstance(layer, ReLU):
        return torch.relu(x)
    if isinstance(layer, Flatten):
        return x.flatten(1)
    if isinstance(layer, AvgPool2d):
        return F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding)
    if isinstance(layer, MaxPool2d):
        return F.max_pool2d(x, layer.kernel, layer.stride)
    if isinstance(layer, Add):
        raise TypeError("a residual Add needs its source activation: use Network.activations")
    raise TypeError(f"not a verifier layer: {layer!r}")


def exact(value: float) -> Fraction:
    """The rational a float32 (or float64) value denotes, exactly."""
    return Fraction(float(value))
