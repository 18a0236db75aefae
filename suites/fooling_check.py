"""The `fooling` check: one evolved fooling image per class, as one resumable item.

`FoolingEvolution` (Nguyen et al. 2015) runs with the check's parameters over
`FOOLING_PARAMS` and the run's seed; the item in results.jsonl holds the per-class figures
and each class's best image in 8 bits (exact for the direct encoding, whose pixels are
k/255), so a resumed run reports and shows the same images without evolving again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from bastion.suites.results_log import item_key
from bastion.suites.suite import Check, fooling_attack

if TYPE_CHECKING:
    from bastion.suites.runner import _Run


def run_fooling_check(run: _Run, check: Check) -> None:
    """Evolve (or reload) the check's fooling images; keep them for the report's gallery."""
    key = item_key("fooling", check.id, None, 0)
    rec = run.log.get(key)
    if rec is None:
        attack = fooling_attack(check, run.seed)
        task = run.sink.task(f"{check.id} (fooling images)", max(attack.generations, 1))

        def advance(done: int, total: int, best: torch.Tensor) -> None:
            task.update(done)

        result = attack(run.model, input_shape=tuple(run.data.x.shape[1:]), progress=advance)
        task.close()
        names = [
            run.data.classes[k] if k < len(run.data.classes) else str(k)
            for k in range(result.num_classes)
        ]
        summary = result.to_dict(names)
        rec = run.log.put(
            key,
            {
                "kind": "fooling",
                "check": check.id,
                "attack": check.attack,
                "eps": None,
                "result": {k: v for k, v in summary.items() if k != "seconds"},
                "pixels": _pixels(result.images),
                "seconds": result.seconds,
                "forward": result.queries,
                "backward": result.gradients,
            },
        )
    run.figures[check.id] = [np.asarray(p, dtype=np.float64) / 255.0 for p in rec["pixels"]]


def _pixels(images: torch.Tensor) -> list[list[list[list[int]]]]:
    """N×C×H×W floats in [0, 1] as nested H×W×C 8-bit lists (JSON)."""
    hwc = images.detach().cpu().permute(0, 2, 3, 1).double()
    values: list[list[list[list[int]]]] = torch.round(hwc.clamp(0, 1) * 255).long().tolist()
    return values
