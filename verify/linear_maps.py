"""Linear layers as explicit sparse matrices, for the engines that need constraint rows.

Consecutive linear layers (dense, conv, flatten, elementwise, average pooling) are composed
into one affine map `M z + c` between two nonlinear layers, so the exact encodings (MILP,
SMT) get one row per neuron of each ReLU or max-pool input and nothing in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from bastion.verify.network import (
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)


@dataclass(frozen=True)
class AffineBlock:
    """`out = matrix @ inp + bias` from activation `start` to activation `end` (flat)."""

    start: int
    end: int
    matrix: sp.csr_matrix
    bias: np.ndarray


def layer_matrix(layer: Layer, in_shape: tuple[int, ...]) -> tuple[sp.csr_matrix, np.ndarray]:
    """One linear layer as (sparse matrix, bias) on flattened vectors, in float64."""
    n_in = int(np.prod(in_shape))
    if isinstance(layer, Flatten):
        return sp.identity(n_in, format="csr"), np.zeros(n_in)
    if isinstance(layer, Dense):
        w = layer.weight.double().cpu().numpy()
        return sp.csr_matrix(w), layer.bias.double().cpu().numpy()
    if isinstance(layer, Elementwise):
        scale = np.broadcast_to(layer.scale.double().cpu().numpy(), in_shape).ravel()
        shift = np.broadcast_to(layer.shift.double().cpu().numpy(), in_shape).ravel()
        return sp.diags(scale, format="csr"), shift.copy()
    if isinstance(layer, Conv2d):
        w = layer.weight.double().cpu().numpy()
        m = _conv_matrix(w, layer.stride, layer.padding, in_shape, groups=1)
        out_hw = m.shape[0] // w.shape[0]
        return m, np.repeat(layer.bias.double().cpu().numpy(), out_hw)
    if isinstance(layer, AvgPool2d):
        c = in_shape[0]
        k = layer.kernel
        w = np.full((c, 1, *k), 1.0 / (k[0] * k[1]))
        m = _conv_matrix(w, layer.stride, layer.padding, in_shape, groups=c)
        return m, np.zeros(m.shape[0])
    raise TypeError(f"not a linear layer: {layer!r}")


def _conv_matrix(
    w: np.ndarray,
    stride: tuple[int, int],
    padding: tuple[int, int],
    in_shape: tuple[int, ...],
    groups: int,
) -> sp.csr_matrix:
    c_in, h, wd = in_shape
    c_out, c_per, kh, kw = w.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
    o, i, a, b, y, x = np.meshgrid(
        np.arange(c_out), np.arange(c_per), np.arange(kh), np.arange(kw),
        np.arange(oh), np.arange(ow), indexing="ij",
    )  # fmt: skip
    iy = y * stride[0] + a - padding[0]
    ix = x * stride[1] + b - padding[1]
    ch = (o // (c_out // groups)) * c_per + i
    keep = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd)
    rows = (o * oh + y) * ow + x
    cols = (ch * h + iy) * wd + ix
    vals = w[o, i, a, b]
    m = sp.coo_matrix(
        (vals[keep], (rows[keep], cols[keep])), shape=(c_out * oh * ow, c_in * h * wd)
    )
    return m.tocsr()


def affine_blocks(network: Network) -> list[AffineBlock]:
    """The network's linear stretches, each composed into one affine map.

    Block k maps the output of a nonlinear layer (or the input) to the input of the next
    nonlinear layer (or the output); nonlinear layers (ReLU, max-pool) sit between blocks.
    """
    blocks: list[AffineBlock] = []
    start = 0
    n_in = int(np.prod(network.input_shape))
    matrix: sp.csr_matrix = sp.identity(n_in, format="csr")
    bias = np.zeros(n_in)
    for j, layer in enumerate(network.layers):
        if isinstance(layer, ReLU | MaxPool2d):
            blocks.append(AffineBlock(start, j, matrix, bias))
            start = j + 1
            size = int(np.prod(network.shapes[j + 1]))
            matrix, bias = sp.identity(size, format="csr"), np.zeros(size)
            continue
        m, c = layer_matrix(layer, network.shapes[j])
        matrix = (m @ matrix).tocsr()
        bias = m @ bias + c
    blocks.append(AffineBlock(start, len(network.layers), matrix, bias))
    return blocks
