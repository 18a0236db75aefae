"""Compositional pattern-producing networks (CPPNs): the indirect encoding of the fooling images.

A CPPN maps each pixel's coordinates `(x, y, d, bias)` to the pixel's value through a small
feed-forward network whose nodes use sine, sigmoid, Gaussian or linear activations, so its
images are regular (lines, stripes, symmetric shapes). As in the fooling-images code
(sferes2 `nn2` / `HyperNn`, Nguyen et al. 2015): x and y are the raw pixel indices, d the
distance from the centre in coordinates normalised to [−1, 1]; weights lie in [−10, 10];
a new genome is the perceptron inputs → outputs with random weights and no hidden node;
the pixel is `int(|o|·255)/255` for each output o (one per channel).

A genome keeps its nodes in topological order (inputs, hidden nodes, outputs last) and its
connections as a dense upper-triangular weight matrix, so a whole population renders in one
batched pass of as many steps as the largest genome has nodes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from bastion.attacks.evolution_ops import polynomial_mutation

ACTIVATIONS = ("sine", "sigmoid", "gaussian", "linear")
N_INPUTS = 4  # x, y, d, bias


@dataclass(frozen=True)
class CppnParams:
    """Mutation rates of the code's MNIST experiment (`dl_map_elites_images_mnist.cpp`)."""

    weight_rate: float = 0.1  # per weight, polynomial mutation
    eta: float = 15.0
    weight_range: float = 10.0  # weights lie in [−range, range]
    activation_rate: float = 0.1  # per node, activation resampled
    change_connection: float = 0.5  # per connection, new random source or target
    add_connection: float = 0.5
    delete_connection: float = 0.3
    add_neuron: float = 0.5  # by splitting a random connection
    delete_neuron: float = 0.2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name not in ("eta", "weight_range") and not 0.0 <= value <= 1.0:
                raise ValueError(f"CPPN rate {name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class CppnGenome:
    """A CPPN: `weights[i, j]` is the weight of connection i → j (i < j), where `connected`."""

    weights: npt.NDArray[np.float32]  # n × n
    connected: npt.NDArray[np.bool_]  # n × n, upper triangular
    activations: npt.NDArray[np.int64]  # n indices into ACTIVATIONS (unused for inputs)
    outputs: int

    @property
    def nodes(self) -> int:
        return int(self.weights.shape[0])

    @property
    def hidden(self) -> int:
        return self.nodes - N_INPUTS - self.outputs


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded from `generator`: structural mutations draw many scalars,
    which NumPy does in a fraction of a microsecond where torch takes tens."""
    return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))


def random_genomes(
    n: int, outputs: int, params: CppnParams, generator: torch.Generator
) -> list[CppnGenome]:
    """Initial CPPNs: every input connected to every output, random weights, no hidden node."""
    rng = numpy_rng(generator)
    nodes = N_INPUTS + outputs
    connected = np.zeros((nodes, nodes), dtype=np.bool_)
    connected[:N_INPUTS, N_INPUTS:] = True
    genomes = []
    for _ in range(n):
        weights = _random_weights(rng, params, (nodes, nodes)) * connected
        activations = rng.integers(len(ACTIVATIONS), size=nodes)
        genomes.append(CppnGenome(weights, connected.copy(), activations, outputs))
    return genomes


def _random_weights(
    rng: np.random.Generator, params: CppnParams, shape: tuple[int, ...] = ()
) -> npt.NDArray[np.float32]:
    return ((rng.random(shape) * 2 - 1) * params.weight_range).astype(np.float32)


def mutate(
    genomes: list[CppnGenome], params: CppnParams, generator: torch.Generator
) -> list[CppnGenome]:
    """Mutated copies, with the operators of sferes' `Dnn::mutate` in its order: weights
    (polynomial, rate 0.1, η 15) and activations (resampled, rate 0.1), for all genomes in
    one vectorised draw; then per genome each connection re-wired w.p. 0.5, a connection
    added w.p. 0.5, one deleted w.p. 0.3, one split by a new neuron w.p. 0.5 and a neuron
    deleted w.p. 0.2.

    Re-wiring picks the new source or target among the nodes that keep the network
    feed-forward in its topological order (the code's feed-forward CPPN forbids cycles).
    """
    r = params.weight_range
    sizes = [g.nodes for g in genomes]
    unit = torch.from_numpy(np.concatenate([g.weights.ravel() for g in genomes]) + r) / (2 * r)
    unit = polynomial_mutation(unit, rate=params.weight_rate, eta=params.eta, generator=generator)
    flat_weights = (unit * 2 * r - r).numpy()
    resample = (torch.rand(sum(sizes), generator=generator) < params.activation_rate).numpy()
    fresh = torch.randint(len(ACTIVATIONS), (sum(sizes),), generator=generator).numpy()
    rng = numpy_rng(generator)
    out, w_at, a_at = [], 0, 0
    for g, n in zip(genomes, sizes, strict=True):
        weights = flat_weights[w_at : w_at + n * n].reshape(n, n) * g.connected
        activations = np.where(resample[a_at : a_at + n], fresh[a_at : a_at + n], g.activations)
        w_at, a_at = w_at + n * n, a_at + n
        child = CppnGenome(weights, g.connected.copy(), activations, g.outputs)
        _change_connections(child, params, rng)
        if rng.random() < params.add_connection:
            _add_connection(child, params, rng)
        if rng.random() < params.delete_connection:
            _delete_connection(child, rng)
        if rng.random() < params.add_neuron:
            child = _add_neuron(child, params, rng)
        if rng.random() < params.delete_neuron:
            child = _delete_neuron(child, rng)
        out.append(child)
    return out


def _allowed(g: CppnGenome) -> npt.NDArray[np.bool_]:
    """Connections i → j that keep the network feed-forward: i < j, j not an input, i not
    an output (read-only: shared between genomes of one size)."""
    return _allowed_mask(g.nodes, g.outputs)


@functools.lru_cache(maxsize=256)
def _allowed_mask(nodes: int, outputs: int) -> npt.NDArray[np.bool_]:
    allowed = np.triu(np.ones((nodes, nodes), dtype=np.bool_), 1)
    allowed[:, :N_INPUTS] = False
    allowed[nodes - outputs :, :] = False
    allowed.flags.writeable = False
    return allowed


def _change_connections(g: CppnGenome, params: CppnParams, rng: np.random.Generator) -> None:
    """Re-wire each connection w.p. `change_connection` (in place, on a fresh child)."""
    allowed = _allowed(g)
    edges = np.argwhere(g.connected)
    for src, dst in edges[rng.random(len(edges)) < params.change_connection]:
        if rng.random() < 0.5:
            free = np.flatnonzero(allowed[:, dst] & ~g.connected[:, dst])
            new = (int(rng.choice(free)), dst) if len(free) else None
        else:
            free = np.flatnonzero(allowed[src] & ~g.connected[src])
            new = (src, int(rng.choice(free))) if len(free) else None
        if new is not None:
            g.weights[new], g.connected[new] = g.weights[src, dst], True
            g.weights[src, dst], g.connected[src, dst] = 0.0, False


def _add_connection(g: CppnGenome, params: CppnParams, rng: np.random.Generator) -> None:
    free = np.argwhere(_allowed(g) & ~g.connected)
    if len(free):
        src, dst = free[rng.integers(len(free))]
        g.weights[src, dst], g.connected[src, dst] = _random_weights(rng, params), True


def _delete_connection(g: CppnGenome, rng: np.random.Generator) -> None:
    edges = np.argwhere(g.connected)
    if len(edges):
        src, dst = edges[rng.integers(len(edges))]
        g.weights[src, dst], g.connected[src, dst] = 0.0, False


def _add_neuron(g: CppnGenome, params: CppnParams, rng: np.random.Generator) -> CppnGenome:
    """Split a random connection s → t into s → k → t with a new node k just before t (or
    before the first output): s → k keeps the weight, k → t gets a random one."""
    edges = np.argwhere(g.connected)
    if not len(edges):
        return g
    src, dst = edges[rng.integers(len(edges))]
    k = min(int(dst), g.nodes - g.outputs)
    old = np.concatenate([np.arange(k), np.arange(k + 1, g.nodes + 1)])  # old → new index
    n = g.nodes + 1
    weights = np.zeros((n, n), dtype=np.float32)
    connected = np.zeros((n, n), dtype=np.bool_)
    weights[np.ix_(old, old)] = g.weights
    connected[np.ix_(old, old)] = g.connected
    s, t = old[src], old[dst]
    weights[s, t], connected[s, t] = 0.0, False
    weights[s, k], connected[s, k] = g.weights[src, dst], True
    weights[k, t], connected[k, t] = _random_weights(rng, params), True
    activations = np.zeros(n, dtype=np.int64)
    activations[old] = g.activations
    activations[k] = rng.integers(len(ACTIVATIONS))
    return CppnGenome(weights, connected, activations, g.outputs)


def _delete_neuron(g: CppnGenome, rng: np.random.Generator) -> CppnGenome:
    if g.hidden == 0:
        return g
    k = N_INPUTS + int(rng.integers(g.hidden))
    keep = np.delete(np.arange(g.nodes), k)
    return CppnGenome(
        g.weights[np.ix_(keep, keep)],
        g.connected[np.ix_(keep, keep)],
        g.activations[keep],
        g.outputs,
    )


def coordinates(height: int, width: int) -> torch.Tensor:
    """The CPPN inputs per pixel, 4 × (H·W): raw column x, raw row y, normalised distance
    from the centre d, and bias 1, as the code feeds them."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    xn = -1 + 2 * x / max(width - 1, 1)
    yn = -1 + 2 * y / max(height - 1, 1)
    d = torch.sqrt(xn**2 + yn**2)
    return torch.stack([x, y, d, torch.ones_like(x)]).reshape(N_INPUTS, -1)


def activate(z: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """sferes' CPPN activations, chosen per row of `z` (P × X) by `kind` (P): sin(z);
    the sigmoid rescaled to (−1, 1); exp(−z²); and linear clipped to [−3, 3] then divided
    by 3, so every node's output lies in [−1, 1]."""
    candidates = torch.stack(
        [torch.sin(z), 2 * torch.sigmoid(z) - 1, torch.exp(-z * z), z.clamp(-3, 3) / 3]
    )
    index = kind.to(z.device).reshape(1, -1, *([1] * (z.dim() - 1))).expand(1, *z.shape)
    return candidates.gather(0, index)[0]


def render(
    genomes: list[CppnGenome], shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The images (P × C × H × W, 8-bit values in [0, 1]) of a population, in one batched
    pass: genomes are padded with unconnected hidden nodes to a common size, then every
    node is computed, in topological order, for all genomes and pixels at once."""
    channels, height, width = shape
    if any(g.outputs != channels for g in genomes):
        raise ValueError(f"every genome must have {channels} outputs for {channels} channels")
    if not genomes:
        return torch.zeros(0, *shape, device=device)
    hidden = max(g.hidden for g in genomes)
    m = N_INPUTS + hidden + channels
    weights = np.zeros((len(genomes), m, m), dtype=np.float32)
    kinds = np.zeros((len(genomes), m), dtype=np.int64)
    for p, g in enumerate(genomes):
        index = np.arange(g.nodes)
        index[g.nodes - channels :] += hidden - g.hidden  # outputs stay last
        weights[p][np.ix_(index, index)] = g.weights
        kinds[p, index] = g.activations
    w, kind = torch.from_numpy(weights).to(device), torch.from_numpy(kinds).to(device)
    inputs = coordinates(height, width).to(device)
    values = torch.zeros(len(genomes), m, height * width, device=device)
    values[:, :N_INPUTS] = inputs
    for k in range(N_INPUTS, m):
        z = torch.einsum("pi,pix->px", w[:, :k, k], values[:, :k])
        values[:, k] = activate(z, kind[:, k])
    out = values[:, m - channels :].abs().reshape(len(genomes), *shape)
    return torch.floor(out * 255) / 255


def offspring(
    parents: list[CppnGenome], size: int, params: CppnParams, generator: torch.Generator
) -> list[CppnGenome]:
    """`size` children: size/2 pairs of parents drawn uniformly, each pair copied in random
    order (the code's CPPN crossover is a no-op), every copy mutated."""
    pairs = torch.randint(len(parents), (math.ceil(size / 2), 2), generator=generator)
    swap = torch.rand(len(pairs), generator=generator) < 0.5
    order = torch.where(swap[:, None], pairs.flip(1), pairs).flatten()[:size]
    return mutate([parents[i] for i in order.tolist()], params, generator)
