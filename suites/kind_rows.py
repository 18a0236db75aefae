"""What the defense-evaluation kinds (`adaptive`, `transfer`) share with each other: the
rows an item reads from the run's environment, and its successes folded into the run's
per-sample smallest breaking eps."""

from __future__ import annotations

import torch

from bastion.suites.executor import WorkEnv
from bastion.suites.json_codec import JsonObject


def take(env: WorkEnv, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the dataset indices `idx` from the run's environment."""
    return env.samples.take(idx)


def fold(rec: JsonObject, broken: torch.Tensor, eps: float) -> None:
    """Lower `broken` (per sample) to `eps` where the item's rows say `success`."""
    rows = rec["rows"]
    assert isinstance(rows, dict)
    index, success = rows["index"], rows["success"]
    assert isinstance(index, list) and isinstance(success, list)
    hit = [i for i, s in zip(index, success, strict=True) if s]
    if hit:
        idx = torch.tensor(hit)
        broken[idx] = torch.clamp(broken[idx], max=eps)
