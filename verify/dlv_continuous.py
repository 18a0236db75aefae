"""DLV regions decided exactly: mode (b) of spec §1.6, next to the grid search of `dlv.py`.

Each examined feature's continuous box (its pixels within L∞ eps = span·numSpan of the image,
the other pixels fixed) is handed to `verify`, whose SAFE is an exact proof; the first
feature with a counterexample, or without an answer, decides the status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bastion.verify.network import Network
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE

Forward = Callable[[torch.Tensor], torch.Tensor]


def continuous_boxes(
    net: Network,
    forward: Forward,
    x: torch.Tensor,
    label: int,
    feats: list[np.ndarray],
    eps: float,
    timeout: float,
    seed: int,
) -> dict[str, Any]:
    """Mode (b): the exact verdict of `verify` on each examined feature's continuous box
    (its dims within ±eps, the other pixels fixed), one feature after another."""
    from bastion.verify.spec import robustness_property
    from bastion.verify.verdict import EXACTNESS
    from bastion.verify.verifier import verify  # imported here: verifier imports much

    start = time.perf_counter()
    per_feature: list[str] = []
    status, reason = SAFE, ""
    for f, dims in enumerate(feats):
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            status, reason = UNKNOWN, f"deadline reached after {f} of {len(feats)} features"
            break
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[torch.from_numpy(dims)] = True
        prop = robustness_property(x, label, net.num_outputs, eps=eps, mask=mask.view(x.shape))
        v = verify(net, prop, model=forward, timeout=left, seed=seed)
        per_feature.append(v.status)
        if v.status == UNSAFE:
            status, reason = UNSAFE, f"feature {f}: a point of its box changes the class"
            break
        if v.status == UNKNOWN:
            status, reason = UNKNOWN, f"feature {f}: {v.reason}"
    if not feats:
        status, reason = UNKNOWN, "no feature was examined"
    return {
        "status": status,
        "seconds": round(time.perf_counter() - start, 4),
        "eps": eps,
        "features": per_feature,
        "reason": reason,
        "guarantee": (
            f"every point of each examined feature's continuous box (L∞ {eps:g}, other "
            f"pixels fixed) keeps the class; {EXACTNESS}"
        )
        if status == SAFE
        else "",
    }
