"""The `scaling` check: an image-scaling audit per resizer, one resumable item per resizer.

For each scaler of the check, `scaling_audit` runs on the check's first n images (the
model's input size; the attack images are `ratio`× larger and scaled down by the scaler
in front of the model): attack success, PSNR/SSIM to the source, success left after the
selective median filter, Decamouflage's detection and false-positive rates, and advice.
One extra attack on the first (source, target) pair of different classes is kept for the
report (source | attack image | what the model sees) when the source is at most
`EXAMPLE_PIXELS` on its long side; larger ones would bloat results.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from bastion.suites.results_log import item_key
from bastion.suites.suite import SCALING_N, SCALING_PARAMS, Check

if TYPE_CHECKING:
    from bastion.suites.runner import _Run

EXAMPLE_PIXELS = 256
_SUMMARY = (
    "scaler", "input_size", "source_size", "pairs", "attack_success_rate", "psnr_source",
    "ssim_source", "psnr_target", "success_after_median", "median_benign_agreement",
    "detection_rate", "false_positive_rate", "vulnerable", "advice",
)  # fmt: skip


class _Counting(torch.nn.Module):
    """The model, counting the images sent to it (the audit does not count its queries)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += x.shape[0]
        return self.model(x)


def run_scaling_check(run: _Run, check: Check) -> None:
    """Audit every scaler of the check (or reload its finished items)."""
    from bastion.defenses.scaling_defenses import scaling_audit

    p = {**SCALING_PARAMS, **check.params}
    n = min(check.n or SCALING_N, len(run.data))
    images = run.data.x[:n]
    scalers = [str(s) for s in p["scalers"]]
    pairs = int(p["pairs"])
    task = run.sink.task(f"{check.id} (scaling audit)", len(scalers) * pairs)
    examples: dict[str, Any] = {}
    for b, scaler in enumerate(scalers):
        key = item_key("scaling", check.id, None, b)
        rec = run.log.get(key)
        if rec is None:
            start = time.perf_counter()
            model = _Counting(run.model)

            def advance(k: int, m: int, base: int = b * pairs) -> None:
                task.update(base + k)

            audit = scaling_audit(
                model, images, scaler, ratio=int(p["ratio"]), pairs=pairs, seed=run.seed,
                progress=advance,
            )  # fmt: skip
            rec = run.log.put(
                key,
                {
                    "kind": "scaling",
                    "check": check.id,
                    "attack": check.attack,
                    "eps": None,
                    "audit": {k: audit[k] for k in _SUMMARY},
                    "example": _example(model, images, scaler, int(p["ratio"])),
                    "seconds": time.perf_counter() - start,
                    "forward": model.count,
                    "backward": 0,
                },
            )
        if rec["example"] is not None:
            examples[scaler] = rec["example"]
        task.update((b + 1) * pairs)
    task.close()
    run.figures[check.id] = examples


def _example(
    model: Callable[[Any], Any], images: torch.Tensor, scaler: str, ratio: int
) -> dict[str, Any] | None:
    """The attack on the first pair of differently classified images, as 8-bit lists."""
    from bastion.attacks.scaling import ScalingAttack, classify

    h, w = images.shape[2], images.shape[3]
    if ratio * max(h, w) > EXAMPLE_PIXELS:
        return None
    small = [
        np.round(img * 255).astype(np.uint8)
        for img in images.detach().cpu().double().numpy().transpose(0, 2, 3, 1)
    ]
    preds = classify(model, [img / 255.0 for img in small])
    j = next((k for k in range(1, len(small)) if preds[k] != preds[0]), 1)
    source = cv2.resize(small[0], (ratio * w, ratio * h), interpolation=cv2.INTER_CUBIC)
    source = source.reshape(ratio * h, ratio * w, small[0].shape[2])
    res = ScalingAttack(scaler)(source, small[j], model=model, target_label=preds[j])
    attack = res.attack.reshape(source.shape)
    seen = res.scaled.reshape(small[j].shape)
    return {
        "source": source.tolist(),
        "attack": attack.tolist(),
        "seen": seen.tolist(),
        "source_class": preds[0],
        "target_class": res.target_class,
        "predicted_class": res.predicted_class,
        "success": res.success,
        "psnr_source": res.psnr_source,
    }
