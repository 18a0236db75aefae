"""Attack first: projected gradient ascent on the violation inside the property's box.

Most UNSAFE instances fall to a few hundred gradient steps, long before an exact engine
would finish. The search runs on the float32 model the user gave (or the extracted
network in float32), maximises `Property.violation` (the depth inside the unsafe set),
from the box centre and seeded uniform restarts, all restarts in one batch, with a step of
a fraction of each input's range that shrinks over the run. Only a point the float32 model
puts strictly inside the unsafe set is returned.
"""

from __future__ import annotations

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
) -> torch.Tensor | None:
    """A point of the box that the model maps strictly into the unsafe set, or None.

    `forward` maps a batch `N × input_shape` (float32) to outputs `N × K`.
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
    best = x[:1].clone()
    best_value = torch.tensor(float("-inf"))
    for step in range(steps + 1):
        x.requires_grad_(True)
        value = prop.violation(forward(x).flatten(1))
        top = int(value.argmax())
        if float(value[top].detach()) > float(best_value):
            best_value, best = value[top].detach(), x[top : top + 1].detach().clone()
        if float(best_value) > 0 or step == steps:
            break
        (grad,) = torch.autograd.grad(value.sum(), x)
        size = 0.5 * (1 - step / steps) + 0.01
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + size * span * grad.sign(), lo), hi)
    return best[0] if float(best_value) > 0 else None
