"""One verdict for a VNN-LIB file: its properties (one per input box) share one deadline.

    >>> network = load_network("net.onnx")
    >>> props = read_vnnlib("prop.vnnlib", network.input_shape, network.num_outputs)
    >>> verdict = decide_file(network, props, timeout=120, replay=onnx_replay("net.onnx"))

The file's unsafe set is the union over its properties: the first UNSAFE decides it; it is
SAFE only when every property is. Counterexamples are replayed alone on `replay`, the model
as the user gave it (for an ONNX file: onnxruntime, `onnx_replay`), so the result file's
output values are what the real model computes at the witness.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from bastion.verify.network import Network
from bastion.verify.spec import Property
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE, Verdict
from bastion.verify.verifier import verify

Forward = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["decide_file", "onnx_replay"]


def onnx_replay(path: str | os.PathLike[str]) -> Forward:
    """The ONNX file run by onnxruntime (float32, one sample at a time when its batch is
    fixed at 1), as a function of a batch `N × network.input_shape`."""
    import onnx

    from bastion.onnx_io import runtime

    return runtime(onnx.load(os.fspath(path)))


def decide_file(
    network: Network,
    props: Sequence[Property],
    *,
    timeout: float,
    engine: str = "auto",
    seed: int = 0,
    model: Forward | None = None,
    replay: Forward | None = None,
) -> Verdict:
    """The verdict for properties read from one VNN-LIB file, within `timeout` seconds in
    all (see the module docstring); `model`/`replay` as in `verify`."""
    start = time.perf_counter()
    if not props:
        return Verdict(
            SAFE, "vnnlib", 0.0,
            guarantee="SAFE: the file's constraints are contradictory, its unsafe set is empty",
            details={"boxes": 0},
        )  # fmt: skip
    verdicts: list[Verdict] = []
    for prop in props:
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            break
        v = verify(
            network, prop, model=model, replay=replay, engine=engine, timeout=left, seed=seed
        )
        verdicts.append(v)
        if v.status == UNSAFE:
            break
    final = next((v for v in verdicts if v.status == UNSAFE), None)
    if final is None:
        final = next((v for v in verdicts if v.status != SAFE), None)
    if final is None and len(verdicts) == len(props):
        final = verdicts[-1]
        final.engine = "+".join(dict.fromkeys(v.engine for v in verdicts))
        from bastion.verify.verdict import guarantee_text

        final.guarantee = guarantee_text(final.engine)
    if final is None:
        last = verdicts[-1] if verdicts else None
        final = Verdict(
            UNKNOWN,
            last.engine if last is not None else "none",
            0.0,
            last.layers if last is not None else [],
            reason=f"deadline reached after {len(verdicts)} of {len(props)} input boxes",
        )
    final.seconds = time.perf_counter() - start
    final.details["boxes"] = len(props)
    return final
