"""Attack first: projected gradient ascent on the violation inside the property's box.

Most UNSAFE instances fall to a few hundred gradient steps, long before an exact engine
would finish. The search runs on the float32 model the user gave (or the extracted
network in float32), maximises `Property.violation` (the depth inside the unsafe set),
from the box centre and seeded uniform restarts, all restarts in one batch, with a step of
a fraction of each input's range that shrinks over the run. The points the float32 model
puts strictly inside the unsafe set, in the batch, are returned; a batched evaluation can
differ from a single one in the last bits, so the caller replays each point alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bastion.verify.spec import Property

Forward = Callable[[torch.Tensor], torch.Tensor]


def falsify(
    forward: Forward,
    prop: Property,
    *,
    restarts: int = 32,
    steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    deadline: float | None = None,
) -> list[torch.Tensor]:
    """Points of the box that the model, in a batch, maps strictly into the unsafe set,
    deepest first (empty if none); the caller replays each alone before trusting it.

    `forward` maps a batch `N × input_shape` (float32) to outputs `N × K`. The search
    stops at `deadline` (a `time.perf_counter()` value) if it is given.
    """
    lo = prop.lower.to(device=device, dtype=torch.float32)
    hi = prop.upper.to(device=device, dtype=torch.float32)
    # float32 rounding of the box must not leave it: pull the ends inside
    lo = torch.where(lo.double() < prop.lower.to(lo.device), lo.nextafter(hi), lo)
    hi = torch.where(hi.double() > prop.upper.to(hi.device), hi.nextafter(lo), hi)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((restarts - 1, *lo.shape), generator=gen).to(device)
    x = torch.cat([((lo + hi) / 2)[None], lo + noise * (hi - lo)])
    span = hi - lo
    for step in range(steps + 1):
        x.requires_grad_(True)
        value = prop.violation(forward(x).flatten(1)).cpu()
        hits = (value > 0).nonzero().flatten()
        late = deadline is not None and time.perf_counter() >= deadline
        if len(hits) or step == steps or late:
            order = hits[value[hits].detach().argsort(descending=True)]
            return [x[k].detach().clone() for k in order.tolist()]
        (grad,) = torch.autograd.grad(value.sum(), x)
        size = 0.5 * (1 - step / steps) + 0.01
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + size * span * grad.sign(), lo), hi)
    return []
