"""What the defense-evaluation kinds (`adaptive`, `transfer`) share with each other: the
rows an item reads from the run's environment, its successes folded into the run's
per-sample smallest breaking eps, and the loop that runs their items."""

from __future__ import annotations

import torch

from bastion.suites.executor import Work, WorkEnv
from bastion.suites.json_codec import JsonObject
from bastion.suites.progress import Task
from bastion.suites.run_context import RunContext


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


def execute_and_fold(
    ctx: RunContext, works: list[Work], task: Task, done: int, broken: torch.Tensor
) -> None:
    """Run `works` through the run's executor (items already done: `done`), lowering
    `broken` by each finished item's successes at its eps; advances and closes `task`."""
    task.update(done)

    def advance(k: int, m: int) -> None:
        task.update(done + k / m)

    for _, rec in ctx.execute(works, advance):
        eps = rec["eps"]
        assert isinstance(eps, int | float)
        fold(rec, broken, float(eps))
        done += 1
        task.update(done)
    task.close()
