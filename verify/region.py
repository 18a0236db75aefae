"""`verify_region`: local robustness of a classifier around one image, in one call."""

from __future__ import annotations

import torch

from bastion.errors import InvalidInputError
from bastion.modes import eval_mode
from bastion.validation import check_images
from bastion.verify.extract import extract
from bastion.verify.network import Network
from bastion.verify.spec import robustness_property
from bastion.verify.verdict import Verdict
from bastion.verify.verifier import verify


def verify_region(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    label: int | None = None,
    mask: torch.Tensor | None = None,
    engine: str = "auto",
    timeout: float = 60.0,
    seed: int = 0,
    network: Network | None = None,
) -> Verdict:
    """Is every image within L∞ distance eps of x (pixels in [0, 1]) classified as `label`?

    `x` is one image `C × H × W` (or `1 × C × H × W`); `label` defaults to the model's
    prediction of x. `mask` (shape of x, or broadcastable) restricts the region to the
    pixels where it is True, the others fixed (DLV-style feature regions). `network` is
    the extracted model, when the caller has it already. UNSAFE counterexamples are
    confirmed by `model` itself in float32.
    """
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise InvalidInputError(
            f"verify_region takes one image C×H×W, got shape {tuple(x.shape)}; "
            "pass a single image, e.g. data.x[i]"
        )
    check_images(x[None])
    net = network if network is not None else extract(model, tuple(x.shape))
    device = next((p.device for p in getattr(model, "parameters", list)()), torch.device("cpu"))

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device=device, dtype=torch.float32)).cpu()

    with eval_mode(model), torch.no_grad():
        pred = int(forward(x[None]).argmax(1)[0])
    label = pred if label is None else int(label)
    prop = robustness_property(x, label, net.num_outputs, eps=eps, mask=mask)
    with eval_mode(model):
        verdict = verify(net, prop, model=forward, engine=engine, timeout=timeout, seed=seed)
    verdict.details.update(label=label, prediction=pred, eps=eps)
    return verdict
