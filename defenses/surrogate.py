"""Independently trained baseline ensembles: the surrogate a transfer attack crafts its
examples on, and the undefended ensemble a diversity-trained one is compared with
(DVERGE's evaluation, Yang et al. 2020, spec §6.3: "held-out baseline ensembles").

`baseline_ensemble(train, members, seed)` trains `members` `SmallCNN`s sized to the data
with Bastion's Adam routine (`bastion.zoo.train_classifier`; the recipe of `bastion defend
dverge`'s baseline stage: 20 epochs, batch 128, lr 1e-3) from seeds `seed·1000 + k`, and
caches them like the demo model (by the recipe's hash, `BASTION_CACHE`). The paper's
surrogates are ResNet-20s trained for 200 epochs; `SmallCNN` has no residual blocks, so SGM
does not apply to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bastion.data import load_data
from bastion.defenses.dverge import Ensemble
from bastion.defenses.model_families import SmallCNN
from bastion.defenses.training_check import accuracy, chance_accuracy, check_trained

RECIPE = {"epochs": 20, "batch_size": 128, "lr": 1e-3}


def baseline_ensemble(
    data_spec: str,
    members: int = 3,
    *,
    epochs: int = 20,
    seed: int,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Ensemble:
    """An `Ensemble` of `members` SmallCNNs trained for `epochs` on the training split of
    `data_spec` (seeds `seed·1000 + k`), cached; refuses a member that trained to near
    chance."""
    from bastion.zoo import cached_model

    train = load_data(data_spec, split="train")
    models = []
    for k in range(members):
        recipe = {"name": "smallcnn", "data": data_spec, **RECIPE, "epochs": epochs}
        recipe["seed"] = seed * 1000 + k

        def step(done: int, total: int, k: int = k) -> None:
            if progress is not None:
                progress(k * total + done, members * total)

        def build(c: int = train.x.shape[1], classes: int = train.num_classes) -> SmallCNN:
            return SmallCNN(c, classes)

        model = cached_model(recipe, build, data_spec, prefix="baseline-", progress=step)
        check_trained(
            f"baseline model {k + 1} on {data_spec}",
            accuracy(model, train.x, train.y),
            chance_accuracy(train.y),
            hint="check the data spec, or give a surrogate model file",
        )
        models.append(model)
    return Ensemble(models).to(device).eval()
