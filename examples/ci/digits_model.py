"""The model under test: a small MLP on scikit-learn's 8×8 digits, trained in about a second.

Stands in for your own model module. What Bastion needs from it: an `nn.Module` in eval mode
that takes N×1×8×8 pixels in [0, 1] and returns logits N×10 (normalisation inside the model).
"""

from __future__ import annotations

import torch
from torch import nn

import bastion


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_model(epochs: int = 100, seed: int = 0) -> DigitsMLP:
    """Full-batch Adam on the digits training split; deterministic for a given seed."""
    train = bastion.load_data("digits", split="train")
    torch.manual_seed(seed)
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(train.x), train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
