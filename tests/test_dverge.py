"""DVERGE: feature distillation, the diversity training loop, layer lists by hooks, Ensemble."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bastion.attacks import FGSM, PGD
from bastion.defenses import dverge
from bastion.defenses.model_families import (
    FeaturePoint,
    SmallCNN,
    feature_layers,
    read_features,
    resnet20,
)
from bastion.errors import ConfigError, InvalidInputError, ModelOutputError
from bastion.normalized import Normalized
from bastion.validation import looks_like_probabilities


def _cnn(seed: int, width: int = 4, channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=channels, width=width).eval()


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_distilled_images_stay_in_the_ball_and_approach_the_target_features() -> None:
    model = _cnn(0, width=8)
    x, xs = _images(16, 1), _images(16, 2)
    point = feature_layers(model)[2]
    eps = 0.07
    distilled = [dverge.distill(model, x, xs, point, steps=k) for k in (0, 3, 6, 10)]
    dist = [float(dverge.feature_distance(model, x, z, point).mean()) for z in distilled]
    z = dverge.distill(model, x, xs, point)
    assert float((z - xs).abs().max()) <= eps + 1e-6
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert dist == sorted(dist, reverse=True) and dist[-1] < 0.7 * dist[0]
    # a random corner of the same ball does not bring the features closer
    noise = (xs + eps * torch.randn_like(xs).sign()).clamp(0, 1)
    assert float(dverge.feature_distance(model, x, noise, point).mean()) > 0.9 * dist[0]


def test_distill_does_not_change_its_inputs_and_works_at_the_logits() -> None:
    model = _cnn(0)
    x, xs = _images(4, 1), _images(4, 2)
    x0, xs0 = x.clone(), xs.clone()
    z = dverge.distill(model, x, xs, feature_layers(model)[-1], momentum=0.0)
    assert torch.equal(x, x0) and torch.equal(xs, xs0)
    assert not z.requires_grad and not torch.equal(z, xs)


def _tiny_set(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return _images(n, 3), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(4))


def test_training_changes_the_weights_deterministically_given_a_seed() -> None:
    models = [_cnn(0), _cnn(1)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    kwargs = {"epochs": 2, "batch_size": 16, "steps": 2, "lr": 0.01, "check": False}
    calls: list[tuple[int, int]] = []
    a = dverge.train(
        models, _tiny_set(), seed=0, progress=lambda d, t: calls.append((d, t)), **kwargs
    )
    b = dverge.train(models, _tiny_set(), seed=0, **kwargs)
    c = dverge.train(models, _tiny_set(), seed=1, **kwargs)
    assert calls[-1] == (4, 4) and len(calls) == 4
    for m, old in zip(models, before, strict=True):  # the inputs are copied, not trained
        assert all(torch.equal(v, old[k]) for k, v in m.state_dict().items())
    for ma, mb, mc, old in zip(a.members, b.members, c.members, before, strict=True):
        sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], old[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def _cross_loss(
    models: list[nn.Module], x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, layer: int
) -> float:
    """The DVERGE objective Σ_i Σ_{j≠i} CE(f_i(x'_{f_j}(x, x_s)), y_s) on one fixed batch."""
    distilled = [dverge.distill(m, x, xs, feature_layers(m)[layer - 1]) for m in models]
    with torch.no_grad():
        return sum(
            float(F.cross_entropy(mi(xd), ys))
            for i, mi in enumerate(models)
            for j, xd in enumerate(distilled)
            if i != j
        )


def test_diversity_training_lowers_the_cross_distillation_loss() -> None:
    x = _images(64, 3)
    y = x.mean((2, 3)).argmax(1)  # a learnable toy task: the brightest channel
    xs, ys, xt = x[:32], y[:32], x[32:]
    models = [_cnn(k, width=8) for k in range(3)]
    before = _cross_loss(models, xt, xs, ys, layer=3)
    ens = dverge.train(
        models, (x, y), epochs=10, batch_size=32, lr=0.05, layer=3, augment=False, steps=3,
        check=False,  # untrained sub-models: there is no accuracy to keep
    )  # fmt: skip
    after = _cross_loss(list(ens.members), xt, xs, ys, layer=3)
    assert after < 0.7 * before


def test_layer_lists_read_pre_relu_features_by_hooks() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for model, depth in (
        (SmallCNN(), 5),
        (resnet20(), 20),
        (torchvision.models.resnet18(num_classes=10), 18),
        (Normalized(resnet20(), 0.5, 0.25), 20),
    ):
        model.eval()
        points = feature_layers(model)
        assert len(points) == depth
        with torch.no_grad():
            feats = [read_features(model, x, p) for p in points]
        assert all(float(f.min()) < 0 for f in feats[:-1])  # before ReLU: negatives survive
        assert torch.allclose(feats[-1], model(x), atol=1e-5)
        assert all(not p.module._forward_hooks and not p.module._forward_pre_hooks for p in points)


@pytest.mark.parametrize("kind", ["resnet20", "resnet18"])
def test_block_sum_feature_is_the_block_output_before_its_relu(kind: str) -> None:
    torch.manual_seed(0)
    model = (resnet20() if kind == "resnet20" else torchvision.models.resnet18()).eval()
    blocks = list(model.blocks) if kind == "resnet20" else list(model.layer2)
    block = blocks[1]
    merge = block.merge if kind == "resnet20" else block.relu
    point = next(p for p in feature_layers(model) if p.module is merge)
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        handle.remove()
        assert torch.allclose(torch.relu(read_features(model, x, point)), seen[0], atol=1e-6)


def test_ensemble_returns_the_log_of_the_mean_softmax() -> None:
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    ens = dverge.Ensemble([a, b])
    x = torch.randn(5, 3)
    with torch.no_grad():
        out = ens(x)
        expected = torch.log((F.softmax(a(x), 1) + F.softmax(b(x), 1)) / 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(F.softmax(out, 1), out.exp(), atol=1e-6)  # logits up to a constant
    assert not looks_like_probabilities(out)


class _Constant(nn.Module):
    """Always predicts class 0, with a zero input gradient (the graph still reaches x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 0] = 1.0
        return logits + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_transfer_matrix_rows_are_sources_and_columns_targets() -> None:
    """Oracles: a constant model misclassifies every sample whose label is not 0, whatever
    the image; FGSM on it moves nothing (zero gradient), so the linear model keeps its
    clean (all-correct) predictions; identical models give identical rows."""
    torch.manual_seed(0)
    linear = nn.Linear(3 * 8 * 8, 10)
    with torch.no_grad():
        linear.bias.copy_(-0.5 * linear.weight.sum(1))  # centred: every class gets predicted
    model = nn.Sequential(nn.Flatten(), linear)
    x, _ = _tiny_set(32)
    with torch.no_grad():
        y = model(x).argmax(1)  # the linear model is right on every clean sample
    not_zero = float((y != 0).float().mean())
    assert 0 < not_zero < 1
    m = dverge.transfer_matrix([model, _Constant()], x, y, FGSM(0.3))
    assert float(m[0, 0]) > 0.5  # white-box FGSM breaks the linear model
    assert m[0, 1] == pytest.approx(not_zero) and m[1, 1] == pytest.approx(not_zero)
    assert float(m[1, 0]) == 0.0  # nothing transfers from a model without gradient
    same = dverge.transfer_matrix([model, model], x, y, FGSM(0.3))
    assert torch.allclose(same, m[0, 0].expand(2, 2))


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def test_bad_input_raises_clear_errors() -> None:
    x, y = _tiny_set(8)
    with pytest.raises(ConfigError, match="at least one"):
        dverge.Ensemble([])
    with pytest.raises(ConfigError, match="at least 2"):
        dverge.train([_cnn(0)], (x, y))
    with pytest.raises(ConfigError, match="one architecture"):
        dverge.train([_cnn(0), resnet20()], (x, y))
    with pytest.raises(ConfigError, match="layer must be"):
        dverge.train([_cnn(0), _cnn(1)], (x, y), layer=6)
    with pytest.raises(ConfigError, match="no layer list"):
        dverge.train([_NoLayers(), _NoLayers()], (x, y))
    with pytest.raises(InvalidInputError, match="must lie in"):
        dverge.train([_cnn(0), _cnn(1)], (x * 2, y))
    with pytest.raises(InvalidInputError, match="one shape"):
        dverge.distill(_cnn(0), x, x[:4], feature_layers(_cnn(0))[0])
    with pytest.raises(ConfigError, match="eps > 0"):
        dverge.distill(_cnn(0), x, x, feature_layers(_cnn(0))[0], eps=0)
    with pytest.raises(ConfigError, match="never reached"):
        read_features(_cnn(0), x, FeaturePoint(nn.Linear(1, 1)))
    with pytest.raises(ModelOutputError, match="same K"):
        dverge.Ensemble([nn.Linear(3, 4), nn.Linear(3, 5)])(torch.randn(2, 3))


def _cli_ensemble(tmp_path, capsys, extra: list[str]):  # type: ignore[no-untyped-def]
    """`bastion defend dverge` on the default data with `extra`: the loaded ensemble and
    the output."""
    from bastion.cli import main
    from bastion.model_io import load_model

    out = tmp_path / "ensemble.pt2"
    assert main(["defend", "dverge", *extra, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out} DVERGE ensemble of 3 sub-models")
    return load_model(str(out)), printed


def _test_accuracy(model: nn.Module) -> float:
    from bastion.data import load_data

    test = load_data("digits", split="test")
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())


def test_cli_dverge_defaults_with_fewer_epochs_train_an_accurate_ensemble(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The default path (3 small CNNs, 20 baseline epochs, lr 0.01, no augmentation on 8×8
    digits, reachable milestones) with 2 of its 20 DVERGE epochs: the saved ensemble
    returns log-probabilities and is as accurate as the demo model within 5 points."""
    from bastion.zoo import demo_model

    model, printed = _cli_ensemble(tmp_path, capsys, ["--epochs", "2"])
    logp = model(torch.rand(3, 1, 8, 8))
    assert logp.shape == (3, 10) and torch.allclose(logp.exp().sum(1), torch.ones(3), atol=1e-5)
    acc = _test_accuracy(model)
    assert acc >= _test_accuracy(demo_model()) - 0.05, acc
    assert f"test accuracy {acc:.3f}" in printed


@pytest.mark.slow
def test_cli_dverge_with_no_options_is_within_5_points_of_the_demo_model(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The whole default run (20 + 20 epochs; ~2 min of one core)."""
    from bastion.zoo import demo_model

    model, _ = _cli_ensemble(tmp_path, capsys, [])
    assert _test_accuracy(model) >= _test_accuracy(demo_model()) - 0.05


def test_cli_refuses_a_collapsed_ensemble_and_bad_options(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The paper's lr 0.1 on the small CNN without batch norm collapses to chance: exit 2,
    one line saying what to try, nothing saved."""
    from bastion.cli import main

    out = tmp_path / "e.pt2"
    argv = ["defend", "dverge", "--baseline-epochs", "5", "--epochs", "1", "--lr", "0.1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lower the learning rate" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main([*argv, "--out", str(tmp_path / "e.safetensors")]) == 2
    assert main(["defend", "dverge", "--members", "1", "--out", str(out)]) == 2


def test_augmentation_and_milestones_follow_the_data_and_the_epochs() -> None:
    assert not dverge.default_augment(torch.rand(2, 1, 8, 8))
    assert not dverge.default_augment(torch.rand(2, 1, 28, 28))
    assert not dverge.default_augment(torch.rand(2, 3, 16, 16))
    assert dverge.default_augment(torch.rand(2, 3, 32, 32))
    assert dverge.scaled_milestones(200) == [100, 150]
    assert dverge.scaled_milestones(20) == [10, 15]


def _digit_members(train, seed: int) -> list[nn.Module]:  # type: ignore[no-untyped-def]
    from bastion.zoo import train_classifier

    members = []
    for k in range(3):
        model = SmallCNN(1, 10, width=8)
        recipe = {"epochs": 20, "batch_size": 64, "lr": 3e-3, "seed": 10 * seed + k}
        train_classifier(model, train, recipe)
        members.append(model.eval())
    return members


@pytest.mark.slow
def test_dverge_resists_transfer_attacks_better_than_its_baseline(digits) -> None:  # type: ignore[no-untyped-def]
    """The paper's headline at small scale (digits, ~75 s on one core): PGD examples of an
    independent baseline ensemble transfer less to the DVERGE ensemble than to the baseline
    it was fine-tuned from, and its sub-models fool each other less."""
    from bastion.data import load_data

    train = load_data("digits", split="train")
    surrogate = dverge.Ensemble(_digit_members(train, 9)).eval()
    baseline = dverge.Ensemble(_digit_members(train, 0)).eval()
    diverse = dverge.train(
        list(baseline.members), train, epochs=5, lr=0.01, milestones=[], augment=False
    )
    x, y = digits.x, digits.y
    x_adv = PGD(0.15, steps=10, early_stop=False)(surrogate, x, y).x_adv
    with torch.no_grad():
        robust = [float((m(x_adv).argmax(1) == y).float().mean()) for m in (baseline, diverse)]
    assert robust[1] > robust[0] + 0.05
    attack = PGD(0.1, steps=10, early_stop=False)
    offdiag = [
        float(t.sum() - t.diag().sum()) / 6
        for t in (
            dverge.transfer_matrix(list(e.members), x, y, attack) for e in (baseline, diverse)
        )
    ]
    assert offdiag[1] < offdiag[0] - 0.03
