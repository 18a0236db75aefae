"""Transfer attacks crafted on a surrogate model, as DVERGE's evaluation uses them (Yang et
al., NeurIPS 2020, `eval/`; spec §6.3): examples made on an independently trained
surrogate, then classified by the target.

* **M-PGD** — momentum iterative L∞ attack (Dong et al., CVPR 2018) from a uniform random
  start: `g ← μ·g + ∇/‖∇‖₁`, `x ← Π(x + α·sign(g))`, μ = 1.
* **M-DI²-FGSM** — the same with diverse inputs (Xie et al., CVPR 2019): with probability
  p = 0.5 a step's gradient is taken through a random resize to r ∈ [H, ⌊1.107·H⌋] (the
  paper's 299 → 330) and a random zero padding to ⌊1.107·H⌋, resized back to H×W so that
  any surrogate takes it (the original feeds the padded size to an Inception network).
* **SGM** — skip gradient method (Wu et al., ICLR 2020): the gradient through every residual
  branch of a ResNet surrogate is multiplied by γ = 0.2 (the skip connections' is not), by a
  hook on the branch's last batch norm; with momentum, as the DVERGE evaluation runs it.

Each with the cross-entropy or the CW loss (`−max(Z_y − max_{i≠y} Z_i + κ, 0)`, κ = 0.1), 100
steps. `paper_attacks(eps)` lists the six; `transfer_accuracy` counts a sample as robust
only when it survives all of them ("all" row), and M-PGD's random restarts count as
separate attacks. Our choices (not in the spec): step α = ε/10; SGM's hook point (the
branch's last batch norm, not the official code's √γ on each ReLU's gradient).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError
from bastion.modes import eval_mode
from bastion.validation import check_images, check_labels

TransferLoss = Literal["ce", "cw"]
DI_RATIO = 330 / 299  # the padded size over the input size of Xie et al.


@dataclass(frozen=True)
class TransferAttack:
    """One L∞ transfer attack: momentum PGD with optional diverse inputs (`diversity` = p)
    and skip-gradient (`sgm_gamma`); `restarts` random starts, each returned separately."""

    eps: float
    steps: int = 100
    step_size: float | None = None  # None: eps / 10
    momentum: float = 1.0
    loss: TransferLoss = "ce"
    kappa: float = 0.1
    diversity: float = 0.0
    sgm_gamma: float | None = None
    restarts: int = 1
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)) or self.steps < 1 or self.restarts < 1:
            raise ConfigError(
                f"a transfer attack needs eps > 0, steps >= 1 and restarts >= 1, got "
                f"{self.eps}, {self.steps}, {self.restarts}"
            )
        if self.loss not in ("ce", "cw"):
            raise ConfigError(f"unknown transfer loss {self.loss!r}; choose 'ce' or 'cw'")
        if not 0 <= self.diversity <= 1 or self.momentum < 0:
            raise ConfigError("diversity must lie in [0, 1] and momentum be >= 0")
        if self.sgm_gamma is not None and not 0 < self.sgm_gamma <= 1:
            raise ConfigError(f"sgm_gamma must lie in (0, 1], got {self.sgm_gamma}")

    @property
    def name(self) -> str:
        kind = "SGM" if self.sgm_gamma is not None else "M-DI2-FGSM" if self.diversity else "M-PGD"
        return f"{kind}-{self.loss.upper()}"

    def __call__(
        self, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> list[torch.Tensor]:
        """Adversarial examples of `x` (labels `y`) on `surrogate`, one tensor per restart."""
        check_images(x)
        check_labels(y, x.shape[0])
        y = y.to(x.device).long()
        alpha = self.step_size if self.step_size is not None else self.eps / 10
        gen = torch.Generator().manual_seed(self.seed)
        outs = []
        gamma = self.sgm_gamma
        sgm = skip_gradient(surrogate, gamma) if gamma is not None else contextlib.nullcontext()
        with eval_mode(surrogate), sgm:
            for _ in range(self.restarts):
                outs.append(self._run(surrogate, x, y, alpha, gen))
        return outs

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator
    ) -> torch.Tensor:
        lo, hi = (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)
        adv = x.clone()
        if self.random_start:
            noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * self.eps
            adv = (x + noise).clamp(0, 1)
        g = torch.zeros_like(x)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            inp = adv
            if self.diversity and float(torch.rand((), generator=gen)) < self.diversity:
                inp = diverse_input(adv, gen)
            with torch.enable_grad():
                loss = _loss(model(inp), y, self.loss, self.kappa)
                (grad,) = torch.autograd.grad(loss, adv)
            l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            g = self.momentum * g + grad / l1
            adv = torch.minimum(torch.maximum(adv.detach() + alpha * g.sign(), lo), hi)
        return adv.detach()


def paper_attacks(
    eps: float, *, steps: int = 100, restarts: int = 3, sgm: bool = True, seed: int = 0
) -> list[TransferAttack]:
    """DVERGE's transfer attacks at `eps`: M-PGD (`restarts` random starts), M-DI²-FGSM
    (p = 0.5) and, with `sgm` (it needs a ResNet surrogate), SGM (γ = 0.2), each with CE
    and CW losses."""
    out = []
    for loss in ("ce", "cw"):
        common = {"eps": eps, "steps": steps, "loss": loss, "seed": seed}
        out += [
            TransferAttack(**common, restarts=restarts),  # type: ignore[arg-type]
            TransferAttack(**common, diversity=0.5, random_start=False),  # type: ignore[arg-type]
        ]
        if sgm:
            out.append(TransferAttack(**common, sgm_gamma=0.2, random_start=False))  # type: ignore[arg-type]
    return out


def transfer_accuracy(
    target: nn.Module,
    surrogate: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[TransferAttack],
) -> dict[str, float]:
    """Accuracy of `target` on each attack's examples made on `surrogate` (per attack, the
    worst of its restarts), and under "all": correct on every example of every attack."""
    y = y.to(x.device).long()
    survive_all = _correct(target, x, y)
    out: dict[str, float] = {"clean": float(survive_all.float().mean())}
    for attack in attacks:
        survive = torch.ones_like(survive_all)
        for x_adv in attack(surrogate, x, y):
            survive &= _correct(target, x_adv, y)
        name, k = attack.name, 2
        while name in out:
            name, k = f"{attack.name} #{k}", k + 1
        out[name] = float(survive.float().mean())
        survive_all &= survive
    out["all"] = float(survive_all.float().mean())
    return out


def diverse_input(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Xie et al.'s input diversity: resize to a random r in [H, ⌊1.107·H⌋], zero-pad at a
    random offset to ⌊1.107·H⌋ (same for W), resize back to H×W (nearest neighbour)."""
    h, w = x.shape[-2:]
    big_h, big_w = max(h + 1, int(h * DI_RATIO)), max(w + 1, int(w * DI_RATIO))
    r = int(torch.randint(h, big_h, (), generator=gen))
    c = int(round(r * w / h))
    c = min(max(c, w), big_w - 1)
    small = F.interpolate(x, size=(r, c), mode="nearest")
    top = int(torch.randint(0, big_h - r + 1, (), generator=gen))
    left = int(torch.randint(0, big_w - c + 1, (), generator=gen))
    padded = F.pad(small, (left, big_w - c - left, top, big_h - r - top))
    return F.interpolate(padded, size=(h, w), mode="nearest")


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, gamma: float
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.gamma = gamma  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.gamma, None  # type: ignore[attr-defined]


def residual_branch_ends(model: nn.Module) -> list[nn.Module]:
    """The last batch norm of every residual branch of a ResNet (Bastion's CIFAR ResNets and
    torchvision's BasicBlock/Bottleneck): where SGM scales the gradient."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from bastion.defenses.model_families import _BasicBlock

    ends: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (_BasicBlock, BasicBlock)):
            ends.append(m.bn2)
        elif isinstance(m, Bottleneck):
            ends.append(m.bn3)
    return ends


@contextlib.contextmanager
def skip_gradient(model: nn.Module, gamma: float) -> Iterator[None]:
    """Within the block, gradients through `model`'s residual branches are × `gamma`."""
    ends = residual_branch_ends(model)
    if not ends:
        raise ConfigError(
            f"SGM needs a ResNet surrogate (residual blocks), and {type(model).__name__} has "
            "none; use M-PGD or M-DI²-FGSM with this surrogate"
        )
    handles = [
        m.register_forward_hook(lambda _m, _i, out: _ScaleGradient.apply(out, gamma)) for m in ends
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: TransferLoss, kappa: float) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    real = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return -(real - other + kappa).clamp_min(0).sum()  # ascended: 0 once beaten by κ


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(c).argmax(1) for c in x.split(1024)]) == y
