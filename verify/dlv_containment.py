"""DLV's refinement by layer, checked: a layer-k region contains the image of the region below.

Huang et al. (CAV 2017) carry a hidden layer's verdict back to the input only when the
layer-k region η_k over-approximates the image φ_k(η_{k'}) of the region of the layer
analysed before it (spec §1.2, "covering + refinement by layer"). DLV's code assumes this;
here it is shown by sound bounds:

* `image_delta` bounds, per neuron of activation k, how far the image of a region of
  activation k' moves from the original activation α_k: Δ ∈ [dlo, dhi]. Bounds are
  propagated as differences from α (Δ_out = M·Δ_in through linear layers, relu(α + Δ) −
  relu(α) through ReLUs, the window maximum's change through max-pooling), so a neuron that
  no manipulated dim reaches has Δ = [0, 0] exactly, and the others get an outward-rounded
  float64 interval (error term 2γₙ·|M|·|Δ| of `rounding.py`, a folded layer's `err` radius
  added).
* `covering_region` is DLV's regionSynth made to cover those bounds: the `feature_dims`
  neurons that move most, each with span ⌈max(−dlo, dhi)/m⌉ (outward), so the grid's
  extreme points c_p = ±m enclose the image on those neurons.
* `extend_chain` builds the regions of the activations between two analysed layers this way
  (the free variables of the z3 back-propagation).
* `contains` checks the inclusion: every neuron that moves is a manipulated dim of the
  region and its spans reach the bounds. When more neurons move than `feature_dims`, the
  region is still searched for counterexamples but cannot carry a SAFE.

The activations α are the float64 activations of the image (as the grid points are).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bastion.verify.dlv_regions import Region, _box, _matrix
from bastion.verify.linear_maps import layer_matrix
from bastion.verify.network import Conv2d, Dense, Elementwise, MaxPool2d, Network, ReLU
from bastion.verify.rounding import down, slack, up

__all__ = ["contains", "covering_region", "extend_chain", "image_delta"]


def image_delta(
    network: Network, acts: list[np.ndarray], region: Region, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (dlo, dhi) on activation k − α_k over the box of `region` (activation k' < k:
    its dims within α ± span·m, clipped to [0, 1] at the input and ≥ 0 after a ReLU; every
    other dim fixed). Flat float64 arrays; exactly 0 where nothing can move."""
    j0 = region.layer
    size = len(acts[j0])
    dlo, dhi = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    lo, hi = _box(network, acts[j0], region, j0)
    a = torch.from_numpy(acts[j0][region.dims])
    dims = torch.from_numpy(np.asarray(region.dims, dtype=np.int64))
    dlo[dims] = torch.minimum(down(torch.from_numpy(lo) - a), torch.zeros(len(dims)))
    dhi[dims] = torch.maximum(up(torch.from_numpy(hi) - a), torch.zeros(len(dims)))
    for j in range(j0, k):
        layer, shape = network.layers[j], network.shapes[j]
        alpha = torch.from_numpy(acts[j])
        if isinstance(layer, ReLU):
            dlo, dhi = _relu(alpha, dlo), _relu(alpha, dhi)
        elif isinstance(layer, MaxPool2d):
            dlo, dhi = _maxpool(layer, shape, alpha, dlo, dhi)
        else:
            dlo, dhi = _linear(layer, shape, dlo, dhi)
    return dlo.numpy(), dhi.numpy()


def _relu(alpha: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """relu(α + d) − relu(α), rounded outward (away from 0, the side d lies on)."""
    moved = torch.clamp(torch.where(d < 0, down(alpha + d), up(alpha + d)), min=0)
    change = moved - torch.clamp(alpha, min=0)
    change = torch.where(d < 0, torch.minimum(down(change), torch.zeros_like(d)), change)
    change = torch.where(d > 0, torch.maximum(up(change), torch.zeros_like(d)), change)
    return torch.where(d == 0, torch.zeros_like(d), change)


def _maxpool(
    layer: MaxPool2d,
    shape: tuple[int, ...],
    alpha: torch.Tensor,
    dlo: torch.Tensor,
    dhi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window maximum's change: max(α + dlo) − max α ≤ Δ ≤ max(α + dhi) − max α."""

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t.view(1, *shape), layer.kernel, layer.stride).flatten()

    base = pool(alpha)
    moving = pool(((dlo != 0) | (dhi != 0)).double()) > 0
    lo = torch.minimum(down(pool(down(alpha + dlo)) - base), torch.zeros_like(base))
    hi = torch.maximum(up(pool(up(alpha + dhi)) - base), torch.zeros_like(base))
    zero = torch.zeros_like(base)
    return torch.where(moving, lo, zero), torch.where(moving, hi, zero)


def _linear(
    layer: object, shape: tuple[int, ...], dlo: torch.Tensor, dhi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """M·Δ over the interval [dlo, dhi] (the bias cancels), widened by the float64 error
    of the sums and by a folded layer's weight radius."""
    matrix, _ = _matrix(layer, shape)  # type: ignore[arg-type]
    pos, neg = matrix.maximum(0), matrix.minimum(0)
    lo_np, hi_np = dlo.numpy(), dhi.numpy()
    lo = torch.from_numpy(pos @ lo_np + neg @ hi_np)
    hi = torch.from_numpy(pos @ hi_np + neg @ lo_np)
    size = torch.from_numpy(abs(matrix) @ np.maximum(-lo_np, hi_np))
    terms = int(np.diff(matrix.indptr).max()) if matrix.nnz else 1
    widen = torch.where(size > 0, slack(terms + 1, size), torch.zeros_like(size))
    radius = _weight_radius(layer, shape)
    if radius is not None:
        widen = widen + torch.from_numpy(radius @ np.maximum(-lo_np, hi_np))
    return torch.where(size > 0, down(lo - widen), lo), torch.where(size > 0, up(hi + widen), hi)


def _weight_radius(layer: object, shape: tuple[int, ...]) -> object | None:
    """A folded layer's weight radius as a sparse matrix like its weights, else None."""
    err = getattr(layer, "err", None)
    if err is None:
        return None
    w_err = err[0].double()
    if isinstance(layer, Dense):
        radius_layer: object = Dense(w_err, torch.zeros(w_err.shape[0], dtype=torch.float64))
    elif isinstance(layer, Conv2d):
        zero = torch.zeros(w_err.shape[0], dtype=torch.float64)
        radius_layer = Conv2d(w_err, zero, layer.stride, layer.padding)
    elif isinstance(layer, Elementwise):
        radius_layer = Elementwise(w_err, torch.zeros_like(w_err))
    else:
        return None
    matrix, _ = layer_matrix(radius_layer, shape)  # type: ignore[arg-type]
    return abs(matrix)


def covering_region(
    k: int, dlo: np.ndarray, dhi: np.ndarray, feature_dims: int, num_span: int
) -> tuple[Region, int]:
    """The `feature_dims` neurons of activation k that move most, with spans whose ±m
    reach the bounds, and how many neurons move in all."""
    reach = np.maximum(-dlo, dhi)
    moving = np.flatnonzero(reach > 0)
    order = moving[np.lexsort((moving, -reach[moving]))][:feature_dims]
    dims = np.sort(order)
    span = up(torch.from_numpy(reach[dims] / num_span)).numpy()
    span = np.where(span * num_span < reach[dims], np.nextafter(span, np.inf), span)
    return Region(k, dims, span, num_span), len(moving)


def contains(region: Region, dlo: np.ndarray, dhi: np.ndarray) -> bool:
    """Whether the region's box {α + Σ c_p·span_p·e_p : |c_p| ≤ m} holds every Δ in
    [dlo, dhi]: each neuron that moves is a manipulated dim reaching its bounds."""
    reach = np.maximum(-dlo, dhi)
    covered = np.zeros(len(reach), dtype=bool)
    covered[region.dims] = region.span * region.num_span >= reach[region.dims]
    return bool(np.all(covered | (reach == 0)))


def extend_chain(
    network: Network, acts: list[np.ndarray], chain: list[Region], k: int, feature_dims: int
) -> tuple[int, bool]:
    """Append the regions of activations after the chain's last one up to k, each covering
    the bounds of the image of that last region (with its numSpan); return how many
    neurons of layer k move and whether the layer-k region contains the image."""
    below = chain[-1]
    moving, held = 0, True
    for j in range(below.layer + 1, k + 1):
        dlo, dhi = image_delta(network, acts, below, j)
        region, moving = covering_region(j, dlo, dhi, feature_dims, below.num_span)
        chain.append(region)
        held = contains(region, dlo, dhi)
    return moving, held
