"""The `verify` check: verified accuracy and robustness intervals, item by item.

For each correctly classified image and each L∞ eps (increasing), the verifier answers
SAFE / UNSAFE / UNKNOWN; once an eps is UNSAFE every larger one is too (the same
counterexample lies in the larger ball), so it is not asked again. With `interval`, the
robustness interval of the image is then narrowed by bisection: `safe_up_to` is the
largest eps proved SAFE, `adversarial_at` the smallest L∞ distance of a real adversarial
example (a verifier counterexample, or any attack of the suite that ran before). Items of
a few images each go to results.jsonl as they finish, so a run resumes exactly.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from bastion.errors import ConfigError
from bastion.suites.results_log import item_key
from bastion.suites.suite import VERIFY_PARAMS, Check

if TYPE_CHECKING:
    from bastion.suites.runner import _Run

_PER_ITEM = 4  # images per results.jsonl item


def run_verify_check(run: _Run, check: Check) -> None:
    """Verify the check's first n images at every eps; fold UNSAFE into the run state."""
    from bastion.verify.extract import extract

    params = {**VERIFY_PARAMS, **check.params}
    n = min(check.n or len(run.data), len(run.data))
    groups = [torch.arange(s, min(s + _PER_ITEM, n)) for s in range(0, n, _PER_ITEM)]
    task = run.sink.task(f"{check.id} (verifier)", len(groups))
    network = None
    broken = run.state.broken(check.norm)
    for b, idx in enumerate(groups):
        key = item_key("verify", check.id, None, b)
        rec = run.log.get(key)
        if rec is None:
            if network is None:
                if not isinstance(run.model, torch.nn.Module):
                    raise ConfigError(
                        f"check {check.id!r}: the verifier needs the model as an nn.Module "
                        "(or a TorchScript/torch.export/ONNX file), not a plain callable"
                    )
                network = extract(run.model, tuple(run.data.x.shape[1:]))
            rec = run.log.put(key, _item(run, check, params, idx, network))
        for i, at in zip(rec["rows"]["index"], rec["rows"]["adversarial_at"], strict=True):
            if at is not None:
                broken[i] = min(float(broken[i]), at)
        task.update(b + 1)
    task.close()


def _item(
    run: _Run, check: Check, params: dict[str, Any], idx: torch.Tensor, network: Any
) -> dict[str, Any]:
    from bastion.verify.region import verify_region

    start = time.perf_counter()
    eps_list = sorted(check.eps)
    rows: dict[str, list[Any]] = {
        k: []
        for k in ("index", "status", "engine", "seconds", "safe_up_to", "adversarial_at", "layers")
    }

    model = run.model
    assert isinstance(model, torch.nn.Module)  # run_verify_check refused anything else

    def ask(x: torch.Tensor, label: int, eps: float) -> Any:
        return verify_region(
            model, x, eps=eps, label=label, engine=params["engine"],
            timeout=float(params["timeout"]), seed=run.seed, network=network,
        )  # fmt: skip

    for i in idx.tolist():
        rows["index"].append(i)
        if not bool(run.state.correct[i]):
            rows["status"].append(["MISCLASSIFIED"] * len(eps_list))
            rows["engine"].append([None] * len(eps_list))
            rows["seconds"].append(0.0)
            rows["safe_up_to"].append(None)
            rows["adversarial_at"].append(0.0)
            rows["layers"].append([])
            continue
        t0 = time.perf_counter()
        x, label = run.data.x[i].to(run.dev), int(run.data.y[i])
        statuses: list[str] = []
        engines: list[str | None] = []
        safe, adv = 0.0, math.inf
        layers: list[dict[str, Any]] = []
        for eps in eps_list:
            if adv <= eps:
                statuses.append("UNSAFE")
                engines.append("inclusion")
                continue
            v = ask(x, label, eps)
            layers = v.layers  # the bound statistics at the largest eps verified
            statuses.append(v.status)
            engines.append(v.engine)
            if v.status == "SAFE":
                safe = eps
            elif v.status == "UNSAFE":
                adv = min(adv, _distance(v.counterexample, x))
                run.shots[(check.id, eps, i)] = v.counterexample.cpu()
        if params["interval"]:
            attacked = float(run.state.broken("linf")[i])
            safe, adv = _bisect(ask, x, label, safe, min(adv, attacked), params)
        rows["status"].append(statuses)
        rows["engine"].append(engines)
        rows["seconds"].append(time.perf_counter() - t0)
        rows["safe_up_to"].append(safe)
        rows["adversarial_at"].append(adv if math.isfinite(adv) else None)
        rows["layers"].append(layers)
    return {
        "kind": "verify",
        "check": check.id,
        "attack": check.attack,
        "eps": None,
        "eps_list": eps_list,
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "forward": 0,
        "backward": 0,
    }


def _distance(cex: torch.Tensor, x: torch.Tensor) -> float:
    """L∞ distance in float64 (float32 subtraction can round it past eps)."""
    return float((cex.double().cpu() - x.double().cpu()).abs().max())


def _bisect(
    ask: Any, x: torch.Tensor, label: int, safe: float, adv: float, params: dict[str, Any]
) -> tuple[float, float]:
    """Narrow [safe, adv]: SAFE raises the lower end, UNSAFE lowers the upper end to the
    counterexample's distance, UNKNOWN ends the search (nothing more can be proved)."""
    hi = adv if math.isfinite(adv) else 1.0
    for _ in range(int(params["interval_steps"])):
        if hi - safe <= 1e-4:
            break
        mid = (safe + hi) / 2
        v = ask(x, label, mid)
        if v.status == "SAFE":
            safe = mid
        elif v.status == "UNSAFE":
            adv = min(adv, _distance(v.counterexample, x))
            hi = min(mid, adv)
        else:
            break
    return safe, adv
