"""Real-valued variation operators of sferes2's `evo_float`, as the fooling-images code uses them.

Polynomial mutation (Deb & Agrawal) and simulated binary crossover (SBX, Deb & Agrawal
1995) on genes bounded by `[low, high]`, vectorised over a whole population. Randomness comes
from a caller-supplied CPU `torch.Generator`, so a seeded run repeats exactly on any device.
"""

from __future__ import annotations

import torch

# sferes compares parent genes against float's machine epsilon before crossing them
_SAME_GENE = float(torch.finfo(torch.float32).eps)


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def polynomial_mutation(
    genes: torch.Tensor,
    *,
    rate: float,
    eta: float,
    generator: torch.Generator,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Each gene, with probability `rate`, moves by the polynomial perturbation of index
    `eta`, then is clipped to `[low, high]` (a new tensor; `genes` is not changed).

    `δ = (2r)^(1/(η+1)) − 1` for r < ½, else `1 − (2(1−r))^(1/(η+1))`, scaled by the
    range `high − low` (sferes adds δ unscaled to genes in [0, 1]; scaling is the same map
    for other ranges). The paper's "mutation strength 15" is η = 15.
    """
    pick = _rand(tuple(genes.shape), generator, genes) < rate
    r = _rand(tuple(genes.shape), generator, genes)
    power = 1.0 / (eta + 1.0)
    delta = torch.where(r < 0.5, (2 * r) ** power - 1, 1 - (2 * (1 - r)) ** power)
    moved = (genes + delta * (high - low)).clamp(low, high)
    return torch.where(pick, moved, genes)


def sbx_crossover(
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    rate: float,
    eta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated binary crossover of parent pairs (rows of `first` and `second`, genes in
    [0, 1]), as sferes' `cross_over_sbx`.

    Each pair is crossed with probability `rate`; then every gene where the parents differ
    gets the two bounded SBX children (one shared draw r per gene, spread index `eta`),
    clipped to [0, 1] and assigned to the two children in random order. A pair that is not
    crossed gives copies of its parents in random order.
    """
    if first.shape != second.shape:
        raise ValueError(f"parents differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    pairs, shape = first.shape[0], tuple(first.shape)
    cross = (_rand((pairs,), generator, first) < rate).reshape(-1, *([1] * (first.dim() - 1)))
    r = _rand(shape, generator, first)
    swap_gene = _rand(shape, generator, first) < 0.5
    swap_pair = (_rand((pairs,), generator, first) < 0.5).reshape(cross.shape)

    y1, y2 = torch.minimum(first, second), torch.maximum(first, second)
    differ = (y2 - y1) > _SAME_GENE
    spread = torch.where(differ, y2 - y1, torch.ones_like(y1))
    power = 1.0 / (eta + 1.0)

    def beta_q(beta: torch.Tensor) -> torch.Tensor:
        alpha = 2.0 - beta ** -(eta + 1.0)
        return torch.where(
            r <= 1.0 / alpha, (r * alpha) ** power, (1.0 / (2.0 - r * alpha)) ** power
        )

    c1 = 0.5 * ((y1 + y2) - beta_q(1.0 + 2.0 * y1 / spread) * spread)
    c2 = 0.5 * ((y1 + y2) + beta_q(1.0 + 2.0 * (1.0 - y2) / spread) * spread)
    c1, c2 = c1.clamp(0.0, 1.0), c2.clamp(0.0, 1.0)
    crossed1 = torch.where(differ, torch.where(swap_gene, c2, c1), first)
    crossed2 = torch.where(differ, torch.where(swap_gene, c1, c2), second)
    copied1 = torch.where(swap_pair, second, first)
    copied2 = torch.where(swap_pair, first, second)
    return torch.where(cross, crossed1, copied1), torch.where(cross, crossed2, copied2)
