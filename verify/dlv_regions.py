"""DLV's regions, features and manipulations (Huang et al., CAV 2017, §1.2 of the spec).

* **Features** of the input layer: groups of `feature_dims` input coordinates, manipulated
  one group at a time. Three heuristics: "sift" (the SIFT partition of
  `bastion.attacks.saliency`: keypoints by response, each keypoint's pixels by saliency, cut
  into groups of `feature_dims`; the first group of every keypoint comes before any second
  group), "derivative" (largest |∂(y_c − y_runner-up)/∂x|, DLV's `regionByDerivative`) and
  "activation" (largest |x − mean x|, DLV's `regionByActivation` on the input layer).
* **Regions and manipulations**: a dim p moves by ±span up to `num_span` times, so the
  discretised region is {a + Σ c_p s_p e_p : c_p ∈ {−m…m}}; input coordinates are clipped to
  [0, 1] and points made equal by clipping are counted once.
* **Enumeration** of the grid, DLV's three modes: "convex" (the 2^d corners c_p = ±m),
  "line" (all (2m+1)^d points) and "point" (one point, DLV's starting counter c_p = −m).
  Points come in ladder order: fewest span steps Σ|c_p| first, so the first adversarial
  point found needs the fewest manipulations.
* **Back-propagation** of a layer-k target to the input with z3, one layer at a time
  (`back_propagate`, spec §1.4).
* Hidden-layer regions are synthesised from sound bounds of the image in
  `dlv_containment.py` (DLV's `regionSynth` + `precisionSynth`, made to cover the image).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from bastion.errors import ConfigError
from bastion.verify.linear_maps import layer_matrix
from bastion.verify.network import (
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)

HEURISTICS = ("sift", "derivative", "activation")
ENUMERATIONS = ("convex", "line", "point")


@dataclass(frozen=True)
class Region:
    """The manipulated dims of one activation (flat indices), their spans and numSpan m."""

    layer: int
    dims: np.ndarray
    span: np.ndarray
    num_span: int


def input_features(
    network: Network, x: torch.Tensor, label: int, *, feature_dims: int, heuristic: str
) -> list[np.ndarray]:
    """Every feature of the input, in the heuristic's order: flat coordinate indices."""
    if heuristic not in HEURISTICS:
        raise ConfigError(f"unknown feature heuristic {heuristic!r}; choose one of {HEURISTICS}")
    if feature_dims < 1:
        raise ConfigError(f"featureDims must be at least 1, got {feature_dims}")
    flat = x.detach().double().cpu().flatten().numpy()
    if heuristic == "sift":
        return _sift_features(x, feature_dims)
    if heuristic == "activation":
        score = np.abs(flat - flat.mean())
    else:
        score = _margin_gradient(network, x, label)
    order = np.lexsort((np.arange(len(score)), -score))  # stable: ties to the lower index
    return [order[i : i + feature_dims] for i in range(0, len(order), feature_dims)]


def _margin_gradient(network: Network, x: torch.Tensor, label: int) -> np.ndarray:
    z = x.detach().double().cpu()[None].requires_grad_(True)
    y = network.forward(z)[0]
    others = y.detach().clone()
    others[label] = -np.inf
    (grad,) = torch.autograd.grad(y[label] - y[int(others.argmax())], z)
    return grad.abs().flatten().numpy()


def _sift_features(x: torch.Tensor, feature_dims: int) -> list[np.ndarray]:
    from bastion.attacks.saliency import features

    c, h, w = x.shape
    f = features(x.detach().cpu())
    sal = f.saliency.ravel()
    chunks: list[list[np.ndarray]] = []
    for k in np.argsort(-f.keypoints[:, 3], kind="stable"):  # strongest keypoint first
        pixels = f.pixels(int(k))
        pixels = pixels[np.lexsort((pixels, -sal[pixels]))]
        coords = (np.arange(c)[None, :] * h * w + pixels[:, None]).ravel()
        chunks.append([coords[i : i + feature_dims] for i in range(0, len(coords), feature_dims)])
    depth = max(len(ch) for ch in chunks)
    return [ch[j] for j in range(depth) for ch in chunks if j < len(ch)]


def coefficients(d: int, m: int, enumeration: str) -> np.ndarray:
    """The grid's span counts c (P × d ints) in ladder order: Σ|c| ascending, then lexicographic."""
    if enumeration not in ENUMERATIONS:
        raise ConfigError(f"unknown enumeration {enumeration!r}; choose one of {ENUMERATIONS}")
    if enumeration == "point":
        return np.full((1, d), -m, dtype=np.int64)
    steps = np.array([-m, m]) if enumeration == "convex" else np.arange(-m, m + 1)
    grid = np.stack(np.meshgrid(*([steps] * d), indexing="ij"), -1).reshape(-1, d)
    order = np.lexsort((*grid.T[::-1], np.abs(grid).sum(1)))
    return grid[order]


def grid_values(
    region: Region, base: np.ndarray, enumeration: str, clip: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The grid points of `region` around `base` (P × d values) and their span counts.

    With `clip`, values are clipped into it and points that clipping makes equal are kept
    once (the first in ladder order).
    """
    c = coefficients(len(region.dims), region.num_span, enumeration)
    values = base[region.dims][None] + c * region.span[None]
    if clip is not None:
        values = np.clip(values, *clip)
        _, first = np.unique(values, axis=0, return_index=True)
        keep = np.sort(first)
        values, c = values[keep], c[keep]
    return values, c


def grid_size(
    region: Region, base: np.ndarray, enumeration: str, clip: tuple[float, float] | None
) -> int:
    """Π_p (distinct clipped values of dim p): (2m+1)^d for "line", 2^d for "convex" inside."""
    if enumeration == "point":
        return 1
    m = region.num_span
    steps = np.array([-m, m]) if enumeration == "convex" else np.arange(-m, m + 1)
    lo, hi = clip if clip is not None else (-np.inf, np.inf)
    sizes = [
        len(np.unique(np.clip(base[p] + steps * s, lo, hi)))
        for p, s in zip(region.dims, region.span, strict=True)
    ]
    return int(np.prod(sizes))


@functools.lru_cache(maxsize=32)
def _matrix(layer: Layer, shape: tuple[int, ...]) -> tuple[sp.csr_matrix, np.ndarray]:
    """`layer_matrix`, kept: every feature of a search needs the same layers (layers hash
    by identity)."""
    return layer_matrix(layer, shape)


def analysable(network: Network, layer: int) -> bool:
    """DLV analyses the input (0) and the outputs of dense and convolutional layers."""
    if layer == 0:
        return True
    return 0 < layer < len(network.layers) and isinstance(network.layers[layer - 1], Dense | Conv2d)


@dataclass
class Backprop:
    """A back-propagated target: `status` "realised" (the input reproduces the layer-k
    target, checked in float64), "unrealised" (every layer's query was sat but the
    composed input misses the target), "unsat" (a layer has no solution) or "unknown"
    (timeout); `input` (flat, float64, inside the input box) unless unsat/unknown."""

    status: str
    input: np.ndarray | None
    queries: int
    reason: str = ""


def back_propagate(
    network: Network,
    x: torch.Tensor,
    regions: list[Region],
    target: np.ndarray,
    *,
    deadline: float,
    query_timeout: float = 10.0,
) -> Backprop:
    """Find an input in the input feature's box whose layer-k activation is `target`.

    DLV §1.4: for i = k down to 1, one QF_LRA query on a fresh z3 solver with only layer
    i−1's manipulated dims free (inside their region; ≥ 0 after a ReLU) and every other dim
    its original activation, folded into the sums: `y_q == target_q` for a dense layer, the
    band |y_q − target_q| ≤ p (p = the layer's span) for a convolution. ReLU passes a
    positive target through (0 becomes y ≤ 0), max-pooling targets its window's original
    maximum, flatten and elementwise layers invert in closed form. Timeout: unknown.
    """
    acts = [a[0].flatten().numpy() for a in network.activations(x.double().cpu()[None])]
    k = regions[-1].layer
    band = regions[-1].span if isinstance(network.layers[k - 1], Conv2d) else 0 * target
    goal = {int(q): (t - b, t + b) for q, t, b in zip(regions[-1].dims, target, band, strict=True)}
    targets = dict(goal)
    queries = 0
    for j in range(k - 1, -1, -1):
        lay = network.layers[j]
        if isinstance(lay, ReLU):
            if any(hi < 0 for _, hi in targets.values()):
                return Backprop("unsat", None, queries, "a ReLU output below 0")
            targets = {q: (lo if lo > 0 else -np.inf, hi) for q, (lo, hi) in targets.items()}
        elif isinstance(lay, Elementwise):
            targets = _invert_elementwise(lay, network.shapes[j], targets)
        elif isinstance(lay, MaxPool2d):
            targets = _unpool(lay, network.shapes[j], acts[j], targets)
        elif not isinstance(lay, Flatten):
            lo, hi = _box(network, acts[j], regions[j], j)
            queries += 1
            out = _solve_layer(network, j, acts[j], regions[j].dims, lo, hi, targets,
                               min(deadline, time.perf_counter() + query_timeout))  # fmt: skip
            if out.status != "sat" or out.witness is None:
                return Backprop(out.status, None, queries, out.reason)
            targets = {int(p): (out.witness[p], out.witness[p]) for p in regions[j].dims}
    lo0, hi0 = _box(network, acts[0], regions[0], 0)
    x_in = acts[0].copy()
    for p, (lo, hi) in targets.items():
        x_in[p] = lo if np.isfinite(lo) else hi
    x_in[regions[0].dims] = np.clip(x_in[regions[0].dims], lo0, hi0)
    reached = network.activations(torch.from_numpy(x_in).view(1, *network.input_shape))[k]
    reached_flat = reached[0].flatten().numpy()
    ok = all(
        lo - 1e-6 * (1 + abs(lo)) <= reached_flat[q] <= hi + 1e-6 * (1 + abs(hi))
        for q, (lo, hi) in goal.items()
    )
    return Backprop("realised" if ok else "unrealised", x_in, queries)


def _box(
    network: Network, act: np.ndarray, region: Region, j: int
) -> tuple[np.ndarray, np.ndarray]:
    """The region of activation j on its manipulated dims: a ± span·m, in [0, 1] at the
    input (or its flattened copy) and ≥ 0 after a ReLU."""
    a = act[region.dims]
    lo, hi = a - region.span * region.num_span, a + region.span * region.num_span
    if all(isinstance(lay, Flatten) for lay in network.layers[:j]):
        return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    below = network.layers[j - 1]
    if isinstance(below, ReLU) or (
        isinstance(below, MaxPool2d) and j > 1 and isinstance(network.layers[j - 2], ReLU)
    ):
        lo = np.maximum(lo, 0.0)
    return lo, hi


def _invert_elementwise(
    lay: Elementwise, shape: tuple[int, ...], targets: dict[int, tuple[float, float]]
) -> dict[int, tuple[float, float]]:
    scale = np.broadcast_to(lay.scale.double().cpu().numpy(), shape).ravel()
    shift = np.broadcast_to(lay.shift.double().cpu().numpy(), shape).ravel()
    out = {}
    for q, (lo, hi) in targets.items():
        a, b = (lo - shift[q]) / scale[q], (hi - shift[q]) / scale[q]
        out[q] = (min(a, b), max(a, b))
    return out


def _unpool(
    lay: MaxPool2d, shape: tuple[int, ...], act: np.ndarray, targets: dict[int, tuple[float, float]]
) -> dict[int, tuple[float, float]]:
    c, h, w = shape
    (kh, kw), (sh, sw) = lay.kernel, lay.stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = {}
    for q, bounds in targets.items():
        ch, rest = divmod(q, oh * ow)
        oy, ox = divmod(rest, ow)
        window = [(ch * h + oy * sh + a) * w + ox * sw + b for a in range(kh) for b in range(kw)]
        out[max(window, key=lambda i: (act[i], -i))] = bounds
    return out


def _solve_layer(
    network: Network,
    j: int,
    act: np.ndarray,
    dims: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    targets: dict[int, tuple[float, float]],
    deadline: float,
) -> Any:
    """One QF_LRA query for layer j: free dims of activation j, the rest constants."""
    import z3

    from bastion.verify.outcome import Answer, Outcome
    from bastion.verify.smt import _check, _Encoder, _q, _z3c

    ctx = z3.Context()
    enc = _Encoder(ctx)
    terms: list[Any] = [Fraction(float(v)) for v in act]
    free = []
    for p, a, b in zip(dims, lo, hi, strict=True):
        terms[int(p)] = enc.real(float(a), float(b))
        free.append((int(p), terms[int(p)]))
    rows = sorted(targets)
    matrix, bias = _matrix(network.layers[j], network.shapes[j])
    outs = enc.affine(matrix[rows], [_q(bias[r]) for r in rows], terms)
    for r, y in zip(rows, outs, strict=True):
        t_lo, t_hi = targets[r]
        if isinstance(y, Fraction):
            if not (t_lo <= y <= t_hi):
                return Outcome(Answer.UNSAT, None, 0.0, "a target the free dims cannot reach")
        elif t_lo == t_hi:
            enc.solver.add(y == _z3c(_q(t_lo), ctx))
        else:
            if np.isfinite(t_lo):
                enc.solver.add(y >= _z3c(_q(t_lo), ctx))
            if np.isfinite(t_hi):
                enc.solver.add(y <= _z3c(_q(t_hi), ctx))
    return _check(enc, free, act.astype(np.float64), time.perf_counter(), deadline)
