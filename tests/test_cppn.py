"""CPPN encoding: rendering against the formula, value range and shape, regularity,
mutations that keep the network feed-forward, determinism."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from bastion.attacks import cppn


def genomes(n: int, outputs: int = 1, seed: int = 0) -> list[cppn.CppnGenome]:
    return cppn.random_genomes(n, outputs, cppn.CppnParams(), torch.Generator().manual_seed(seed))


def evolved(n: int, rounds: int, seed: int = 0, outputs: int = 1) -> list[cppn.CppnGenome]:
    """`n` genomes after `rounds` rounds of mutation (they grow hidden nodes)."""
    gen = torch.Generator().manual_seed(seed)
    pop = cppn.random_genomes(n, outputs, cppn.CppnParams(), gen)
    for _ in range(rounds):
        pop = cppn.mutate(pop, cppn.CppnParams(), gen)
    return pop


def test_initial_cppn_renders_the_perceptron_formula() -> None:
    """No hidden node: pixel = int(|act(w·(x, y, d, 1))|·255)/255 with raw x, y indices."""
    g = genomes(1)[0]
    assert g.hidden == 0 and g.connected[:4, 4].all()
    image = cppn.render([g], (1, 5, 7))[0, 0].double()
    w = torch.from_numpy(g.weights[:4, 4]).double()
    formulas = {
        0: torch.sin,
        1: lambda z: 2 * torch.sigmoid(z) - 1,
        2: lambda z: torch.exp(-z * z),
        3: lambda z: z.clamp(-3, 3) / 3,
    }
    act = formulas[int(g.activations[4])]
    for row in range(5):
        for col in range(7):
            xn, yn = -1 + 2 * col / 6, -1 + 2 * row / 4
            z = w[0] * col + w[1] * row + w[2] * (xn**2 + yn**2) ** 0.5 + w[3]
            expected = torch.floor(act(z).abs() * 255) / 255
            assert float(image[row, col]) == pytest.approx(float(expected), abs=1.5 / 255)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 20), (1, 1, 1)])
def test_render_range_shape_and_8_bit_values(shape: tuple[int, int, int]) -> None:
    pop = evolved(30, rounds=4, outputs=shape[0])
    images = cppn.render(pop, shape)
    assert images.shape == (30, *shape)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())


def test_cppn_images_are_regular_unlike_noise() -> None:
    """CPPN images compress far better than direct-encoding noise of the same size: they
    are lines, stripes and smooth regions, not independent pixels."""

    def packed(images: torch.Tensor) -> float:
        return float(
            np.mean([len(zlib.compress((im * 255).byte().numpy().tobytes(), 9)) for im in images])
        )

    pop = evolved(100, rounds=5)
    regular = packed(cppn.render(pop, (1, 28, 28)))
    noise = packed(torch.floor(torch.rand(100, 1, 28, 28, generator=torch.Generator()) * 255) / 255)
    assert regular < 0.4 * noise


def test_mutation_keeps_the_network_feed_forward_and_in_range() -> None:
    pop = evolved(60, rounds=15, seed=3)
    assert max(g.hidden for g in pop) > 0  # add-neuron happens
    for g in pop:
        n = g.nodes
        assert g.weights.shape == g.connected.shape == (n, n) and g.activations.shape == (n,)
        assert not np.tril(g.connected).any()  # i → j only for i < j: acyclic
        assert not g.connected[:, : cppn.N_INPUTS].any()  # nothing feeds an input
        assert not g.connected[n - g.outputs :].any()  # outputs feed nothing
        assert (g.weights[~g.connected] == 0).all()
        assert np.abs(g.weights).max() <= 10.0
        assert ((g.activations >= 0) & (g.activations < len(cppn.ACTIVATIONS))).all()
    images = cppn.render(pop, (1, 12, 12))
    assert torch.isfinite(images).all()


def test_split_connection_inserts_a_node_on_the_path() -> None:
    g = genomes(1)[0]
    rng = np.random.default_rng(0)
    child = cppn._add_neuron(g, cppn.CppnParams(), rng)
    assert child.nodes == g.nodes + 1 and child.hidden == 1
    k = cppn.N_INPUTS  # the new node sits before the output
    (src,) = np.flatnonzero(child.connected[:, k])
    assert child.connected[k, -1] and not child.connected[src, -1]
    assert child.weights[src, k] == g.weights[src, g.nodes - 1]  # s → k keeps the weight
    shrunk = cppn._delete_neuron(child, rng)
    assert shrunk.nodes == g.nodes and shrunk.hidden == 0


def test_mutation_and_rendering_are_deterministic_given_a_seed() -> None:
    a, b, c = evolved(20, 5, seed=7), evolved(20, 5, seed=7), evolved(20, 5, seed=8)
    ra, rb, rc = (cppn.render(p, (1, 10, 10)) for p in (a, b, c))
    assert torch.equal(ra, rb)
    assert not torch.equal(ra, rc)


def test_bad_rates_and_mismatched_outputs_are_refused() -> None:
    with pytest.raises(ValueError, match="add_neuron"):
        cppn.CppnParams(add_neuron=1.5)
    with pytest.raises(ValueError, match="3 outputs"):
        cppn.render(genomes(2, outputs=1), (3, 4, 4))
