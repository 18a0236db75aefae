"""Defensive distillation: the recipe, gradient masking (FGSM fails, Z/T and CW do not),
the harness's sanity flag, determinism, errors and `bastion defend distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bastion.attacks import FGSM, CarliniWagnerL2
from bastion.cli import main
from bastion.data import Dataset, load_data
from bastion.defenses import Distilled, TemperatureScaled, distill
from bastion.defenses.distillation import soft_labels, temperature_of, undo_temperature
from bastion.defenses.training_check import TrainingFailedError, check_trained
from bastion.errors import ConfigError, InvalidInputError
from bastion.model_io import load_model, save_model
from bastion.suites.sanity import run_sanity_checks
from bastion.zoo import DigitsCNN, train_classifier


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


@pytest.fixture(scope="module")
def train() -> Dataset:
    return load_data("digits", split="train")


@pytest.fixture(scope="module")
def test_set() -> Dataset:
    return load_data("digits", split="test")


@pytest.fixture(scope="module")
def distilled(train: Dataset) -> Distilled:
    """T = 100 on digits: 1 + 5 + 5 epochs of Adam, a few seconds."""
    return distill(
        DigitsCNN, train, temperature=100, epochs=5, batch_size=32, optimizer=_adam, seed=0
    )


@pytest.fixture(scope="module")
def undistilled(train: Dataset) -> torch.nn.Module:
    model = DigitsCNN()
    recipe = {"seed": 0, "epochs": 10, "batch_size": 32, "lr": 1e-2}
    train_classifier(model, train, recipe)
    return model


def _run(argv: list[str]) -> int:
    """main(argv), with argparse's usage errors (SystemExit) turned into their exit code."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _accuracy(model: torch.nn.Module, data: Dataset) -> float:
    return float((soft_labels(model, data.x, 1.0).argmax(1) == data.y).float().mean())


def test_student_learns_the_teachers_labels(
    distilled: Distilled, train: Dataset, test_set: Dataset
) -> None:
    student = soft_labels(distilled.student, train.x, 1.0).argmax(1)
    teacher = soft_labels(distilled.teacher, train.x, 1.0).argmax(1)
    assert float((student == teacher).float().mean()) >= 0.95
    assert _accuracy(distilled.student, test_set) >= 0.9
    assert not distilled.student.training and distilled.temperature == 100.0


def test_student_logits_grow_with_the_temperature(train: Dataset) -> None:
    small = train.subset(400)
    scales = []
    for t in (1, 10, 100):
        d = distill(DigitsCNN, small, temperature=t, epochs=3, batch_size=32, optimizer=_adam)
        with torch.no_grad():
            z = d.student(small.x)
        scales.append(float((z - z.mean(1, keepdim=True)).abs().mean()))
    assert scales[0] * 3 < scales[1] and scales[1] * 3 < scales[2], scales


def test_distilled_model_masks_fgsm_but_not_cw(
    distilled: Distilled, undistilled: torch.nn.Module, test_set: Dataset
) -> None:
    x, y = test_set.x[:64], test_set.y[:64]
    student = distilled.student
    masked = FGSM(0.1)(student, x, y).success_rate
    unmasked = FGSM(0.1)(TemperatureScaled(student, 100), x, y).success_rate
    assert masked < 0.3 and unmasked > masked + 0.25, (masked, unmasked)
    cw = CarliniWagnerL2(binary_search_steps=6, max_iterations=100)
    on_student = cw(student, x[:24], y[:24])
    on_plain = cw(undistilled, x[:24], y[:24])
    assert on_student.success_rate >= 0.9 and on_plain.success_rate >= 0.9
    l2_student = on_student.distances["l2"][on_student.success].mean()
    l2_plain = on_plain.distances["l2"][on_plain.success].mean()
    assert 0.5 < l2_student / l2_plain < 2.0, (l2_student, l2_plain)


def test_sanity_check_flags_the_distilled_models_masked_gradients(
    distilled: Distilled, undistilled: torch.nn.Module, test_set: Dataset
) -> None:
    def flags(model: torch.nn.Module) -> set[str]:
        correct = soft_labels(model, test_set.x, 1.0).argmax(1) == test_set.y
        found, _ = run_sanity_checks(model, test_set, correct, 128, torch.device("cpu"), 0)
        return {f.name for f in found}

    assert "zero_gradients" in flags(distilled.student)
    assert "zero_gradients" not in flags(undistilled)


def test_seeded_runs_are_identical_and_the_given_module_is_untouched(train: Dataset) -> None:
    small = train.subset(128)
    torch.manual_seed(3)
    start = DigitsCNN()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    calls: list[tuple[int, int]] = []
    kwargs: dict[str, Any] = dict(temperature=20, epochs=1, batch_size=32, optimizer=_adam)
    kwargs["check"] = False  # one epoch on 128 images: no accuracy to speak of
    a = distill(start, small, seed=1, progress=lambda d, t: calls.append((d, t)), **kwargs)
    b = distill(start, small, seed=1, **kwargs)
    c = distill(start, small, seed=2, **kwargs)
    sa, sb, sc = (r.student.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(before[k], v) for k, v in start.state_dict().items())
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    ("kwargs", "error", "phrase"),
    [
        ({"temperature": 0.5}, ConfigError, "temperature must be"),
        ({"temperature": float("nan")}, ConfigError, "temperature must be"),
        ({"epochs": 0}, ConfigError, "epochs and batch_size"),
        ({"model": lambda: "not a module"}, ConfigError, "nn.Module"),
        ({"model": lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))},
         InvalidInputError, "one logit per class"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused(
    train: Dataset, kwargs: dict[str, Any], error: type[Exception], phrase: str
) -> None:
    model = kwargs.pop("model", DigitsCNN)
    with pytest.raises(error, match=phrase):
        distill(model, train.subset(32), **kwargs)


def _cli_student(tmp_path: Path, capsys: Any, extra: list[str]) -> tuple[torch.nn.Module, str]:
    """`bastion defend distill` with the default data, recipe and T plus `extra`: the saved
    student, loaded back, and the command's output."""
    out = tmp_path / "student.pt2"
    assert _run(["defend", "distill", *extra, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out} student of defensive distillation at T = 100")
    assert temperature_of(out) == 100.0
    return load_model(out), printed


def test_cli_distill_with_no_options_trains_a_student_within_5_points_of_the_demo_model(
    tmp_path: Path, capsys: Any, test_set: Dataset
) -> None:
    """The whole default run (digits, Adam, T = 100, 1 + 50 + 50 epochs; ~25 s of one
    core): the student's test accuracy is within 5 points of the demo model's and in the
    output, and the file carries T, so that FGSM on logits/T is no longer masked."""
    from bastion.zoo import demo_model

    student, printed = _cli_student(tmp_path, capsys, [])
    acc = _accuracy(student, test_set)
    assert acc >= _accuracy(demo_model(), test_set) - 0.05, acc
    assert f"test accuracy {acc:.3f}" in printed
    assert temperature_of(student) == 100.0
    x, y = test_set.x[:100], test_set.y[:100]
    masked = FGSM(0.2)(student, x, y).success_rate
    unmasked = FGSM(0.2)(TemperatureScaled(student, temperature_of(student) or 1.0), x, y)
    assert unmasked.success_rate > masked + 0.2, (masked, unmasked.success_rate)


def test_training_to_chance_exits_2_saves_nothing_and_says_what_to_try(
    tmp_path: Path, capsys: Any
) -> None:
    """Carlini's SGD at T = 100 on digits stays at chance: refused, one line, no file."""
    out = tmp_path / "s.pt2"
    argv = ["defend", "distill", "--optimizer", "sgd", "--epochs", "3", "--quiet"]
    assert _run([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "within 1.5× of chance" in err and "use Adam" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_the_guard_refuses_chance_and_far_below_the_reference() -> None:
    check_trained("m", 0.16, 0.1, hint="h")  # above 1.5× chance, no reference
    with pytest.raises(TrainingFailedError, match="within 1.5× of chance"):
        check_trained("m", 0.15, 0.1, hint="h")
    check_trained("m", 0.55, 0.1, hint="h", reference=("ref", 0.98))
    with pytest.raises(TrainingFailedError, match=r"far below ref \(0.980\)"):
        check_trained("m", 0.53, 0.1, hint="h", reference=("ref", 0.98))


def test_temperature_of_reads_models_and_files(distilled: Distilled, tmp_path: Path) -> None:
    assert temperature_of(distilled.student) == 100.0
    assert temperature_of(TemperatureScaled(distilled.student, 100)) == 100.0
    assert temperature_of(distilled.teacher) is None and temperature_of(DigitsCNN()) is None
    save_model(
        distilled.student, tmp_path / "w.safetensors", torch.rand(2, 1, 8, 8), format="safetensors"
    )
    assert temperature_of(tmp_path / "w.safetensors") == 100.0
    save_model(DigitsCNN(), tmp_path / "plain.pt2", torch.rand(2, 1, 8, 8))
    assert temperature_of(tmp_path / "plain.pt2") is None
    scaled = undo_temperature(load_model(tmp_path / "w.safetensors", arch="bastion.zoo:DigitsCNN"))
    assert not isinstance(scaled, TemperatureScaled)  # weights alone carry no metadata object
    save_model(distilled.student, tmp_path / "s.pt2", torch.rand(2, 1, 8, 8))
    scaled = undo_temperature(load_model(tmp_path / "s.pt2"))
    assert isinstance(scaled, TemperatureScaled) and scaled.temperature == 100.0
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(scaled(x), distilled.student(x) / 100, atol=1e-5)
    plain = DigitsCNN()
    assert undo_temperature(plain) is plain


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--temperature", "0.5"], "temperature must be"),
        (["--temperature", "abc"], "invalid float"),
        (["--data", "mnist:/nonexistent"], "MNIST not found"),
        (["--epochs", "0"], "--epochs and --batch-size"),
        (["--optimizer", "adam", "--lr", "-1"], "--lr must be"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, capsys: Any, extra: list[str], phrase: str) -> None:
    argv = ["defend", "distill", "--n", "64", "--epochs", "1", "--quiet", *extra]
    assert _run([*argv, "--out", str(tmp_path / "m.pt2")]) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_cli_safetensors_needs_arch(tmp_path: Path, capsys: Any) -> None:
    assert _run(["defend", "distill", "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "needs --arch" in capsys.readouterr().err
