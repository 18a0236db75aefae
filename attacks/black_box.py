"""The one batched query helper of the black-box attacks (tree search, evolution, scaling).

Black-box attacks read only `model(x)`. They evaluate many candidates at once (every child
of a tree node, a whole population) in one call, chunked to bound memory, without autograd,
and count every image they send.
"""

from __future__ import annotations

import torch

from bastion.attacks.base import Model
from bastion.validation import check_logits


class BlackBoxQueries:
    """Counted, chunked, gradient-free model queries.

    `logits(x)` evaluates a batch of any size in chunks of `chunk` images; `count` is the
    number of images sent so far (the query count the papers report).
    """

    def __init__(self, model: Model, *, chunk: int = 1024) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.model = model
        self.chunk = chunk
        self.count = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `N × K` for the images `N × C × H × W`."""
        outs = []
        with torch.inference_mode():
            for part in x.split(self.chunk):
                out = self.model(part)
                check_logits(out, part.shape[0])
                outs.append(out.float())
        self.count += x.shape[0]
        return torch.cat(outs) if outs else torch.empty(0)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits: the confidences the black-box papers score."""
        return self.logits(x).softmax(1)
