"""Bad input at the command line: one line `bastion: error: …`, exit 2, no traceback (issue 16).

Each case here used to end in a traceback (exit 1) or be accepted silently.
"""

from __future__ import annotations

import errno
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import assert_bad_input, run_cli  # tests/ is on sys.path
from torch import nn

from bastion.commands.common import default_threads, set_threads
from bastion.errors import BastionWarning, InvalidInputError
from bastion.model_io import load_model, model_source, save_model
from bastion.validation import check_model_accepts
from bastion.zoo import DigitsCNN

DIGITS = (1, 8, 8)  # the shape of the digits images (the default data)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory, net: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("models") / "digits.pt2"
    save_model(net, path, torch.rand(4, *DIGITS))
    return path


class _TwoOutputs(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.inner(x)
        return logits, logits.softmax(1)


def _static_export(model: nn.Module, path: Path, batch: int = 2) -> Path:
    """A torch.export program with a fixed batch size, as a plain torch.export.export makes."""
    torch.export.save(torch.export.export(model, (torch.rand(batch, *DIGITS),)), path)
    return path


def _npz(path: Path, x: np.ndarray) -> str:
    np.savez(path, x=x, y=np.arange(len(x)) % 10)
    return f"npz:{path}"


def _errors_after_warnings(argv: list[str], *phrases: str) -> tuple[str, list[str]]:
    """Exit 2 with the error as the last stderr line and only `bastion: warning:` lines before."""
    code, out, err = run_cli(argv)
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert lines and lines[-1].startswith("bastion: error: "), err
    assert all(line.startswith("bastion: warning: ") for line in lines[:-1]), err
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]
    return lines[-1], lines[:-1]


# --- a model that cannot take the data ---------------------------------------------------


@pytest.mark.parametrize(("shape", "got"), [((8, 3, 8, 8), "3×8×8"), ((8, 1, 16, 16), "1×16×16")])
def test_pt2_given_images_of_the_wrong_shape(
    tmp_path: Path, pt2: Path, shape: tuple[int, ...], got: str
) -> None:
    spec = _npz(tmp_path / "d.npz", np.random.default_rng(0).random(shape, dtype=np.float32))
    line = assert_bad_input(
        ["attack", "fgsm", str(pt2), "--data", spec, "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert "N×1×8×8" in line and got in line, line
    assert not (tmp_path / "o" / "report.json").exists()


def test_pt2_shape_guard_is_a_bastion_error_in_python(pt2: Path) -> None:
    """In pytest (run_suite, the fixture) the guard failure must not look like a test failure
    of the model's robustness: an InvalidInputError naming both shapes, not AssertionError."""
    model = load_model(pt2)
    with pytest.raises(
        InvalidInputError, match=r"takes 1×8×8 inputs \(batches N×1×8×8\), got 3×8×8"
    ):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="cannot take 3×8×8 images"):
        check_model_accepts(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.rand(4, 3, 8, 8))


def test_pt2_shape_guard_in_run_suite_is_a_bastion_error(tmp_path: Path, pt2: Path) -> None:
    """The path of the pytest fixture: run_suite on a loaded .pt2 and data it cannot take."""
    from bastion.data import load_data
    from bastion.suites.runner import run_suite

    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    data = load_data(_npz(tmp_path / "d.npz", x))
    with pytest.raises(InvalidInputError, match="takes 1×8×8 inputs"):
        run_suite(load_model(pt2), data, "quick")


def test_static_batch_pt2_returning_a_tuple(tmp_path: Path, net: nn.Module) -> None:
    path = _static_export(_TwoOutputs(net), tmp_path / "two.pt2")
    _, warned = _errors_after_warnings(
        ["attack", "fgsm", str(path), "--out", str(tmp_path / "o"), "--quiet"],
        "tuple of 2 outputs",
        "only the logits",
    )
    assert len(warned) == 1 and "fixed batch size of 2" in warned[0]
    # chunking keeps the outputs as the program returns them: per element, in order
    x = torch.rand(5, *DIGITS)
    with pytest.warns(BastionWarning):
        logits, probs = load_model(path)(x)
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-5) and probs.shape == (5, 10)


# --- damaged model files -------------------------------------------------------------------


def _flip_inside_largest_member(path: Path, count: int = 400) -> None:
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len + info.file_size // 2 - count // 2
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_model_file_with_flipped_bytes_is_refused(tmp_path: Path, net: nn.Module, fmt: str) -> None:
    path = tmp_path / "m.bin"
    save_model(net, path, torch.rand(4, *DIGITS), format=fmt)
    _flip_inside_largest_member(path)
    assert_bad_input(
        ["attack", "fgsm", str(path), "--out", str(tmp_path / "o"), "--quiet"], "CRC-32", str(path)
    )


# --- output folder -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        "a-file",
        "under-a-file",
        pytest.param(
            "proc", marks=pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc")
        ),
    ],
)
def test_unwritable_out_fails_before_any_work(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out = {
        "a-file": tmp_path / "file",
        "under-a-file": tmp_path / "file" / "report",
        "proc": Path("/proc/bastion-out"),
    }[where]
    missing = tmp_path / "no-such-model.pt2"  # never reached: --out is checked first
    for command in (["attack", "fgsm"], ["report"], ["fool"]):
        line = assert_bad_input([*command, str(missing), "--out", str(out), "--quiet"], "--out")
        assert str(out) in line and "no-such-model" not in line, line


def test_out_unwritable_mid_run_says_resume_keeps_the_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import bastion.commands.report as report

    def fail(args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "results.jsonl"))

    monkeypatch.setattr(report, "run", fail)
    line = assert_bad_input(["report", "--out", str(tmp_path)], "Permission denied", "rerun")
    assert "--resume" not in line  # nothing finished yet
    (tmp_path / "results.jsonl").write_text("{}\n")
    assert_bad_input(["report", "--out", str(tmp_path)], "results.jsonl is kept", "--resume")


def test_scale_attack_out_that_is_a_folder(tmp_path: Path) -> None:
    assert_bad_input(["scale-attack", "a.png", "b.png", "--out", str(tmp_path)], "is a folder")


# --- options accepted silently before --------------------------------------------------------


def test_arch_with_a_file_that_holds_its_architecture(tmp_path: Path, pt2: Path) -> None:
    assert_bad_input(
        ["attack", "fgsm", str(pt2), "--arch", "m:f", "--out", str(tmp_path), "--quiet"],
        "--arch",
        "drop --arch",
    )


@pytest.mark.parametrize("spec_tail", ["#test", ""])
def test_split_with_a_spec_that_names_its_data(tmp_path: Path, spec_tail: str) -> None:
    x = np.random.default_rng(0).random((8, *DIGITS), dtype=np.float32)
    y = np.arange(8)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x, y_test=y)
    spec = f"npz:{tmp_path / 'd.npz'}{spec_tail}"
    assert_bad_input(
        ["attack", "fgsm", "--data", spec, "--split", "train", "--out", str(tmp_path / "o")],
        "--split",
    )


def test_static_batch_pt2_warns_that_it_is_slow(tmp_path: Path, net: nn.Module) -> None:
    path = _static_export(net, tmp_path / "static.pt2")
    argv = ["fool", str(path), "--generations", "1", "--population", "2", "--classes", "0"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("bastion: warning: ")]
    assert len(warnings) == 1 and "fixed batch size of 2" in warnings[0], err
    assert "Traceback" not in err


# --- messages that misled ------------------------------------------------------------------


def test_pixel_just_above_one_is_shown_with_enough_digits(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((8, *DIGITS), dtype=np.float32) * 0.5
    x[3, 0, 2, 2] = np.float32(1.0001)
    spec = _npz(tmp_path / "d.npz", x)
    line = assert_bad_input(["attack", "fgsm", "--data", spec, "--out", str(tmp_path / "o")])
    assert "1.0001]" in line, line


def test_text_file_named_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("label,pixels\n3,0 0 0\n")
    line = assert_bad_input(
        ["attack", "fgsm", "--data", f"npz:{tmp_path / 'd.npz'}", "--out", str(tmp_path / "o")],
        "not an .npz file",
        "zip archive",
        "numpy.savez",
    )
    assert "pickle" not in line, line


# --- pickled models whose class lives in the working directory ---------------------------


def test_trust_pickle_finds_a_class_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "bastion_cwd_net"
    (tmp_path / f"{module}.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = __import__(module).Net()
    torch.save(saved, tmp_path / "net.pt")
    # a fresh process state: the module is neither imported nor importable from sys.path
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(tmp_path), "")])
    monkeypatch.chdir(tmp_path)
    model = load_model("net.pt", trust_pickle=True)
    x = torch.rand(3, *DIGITS)
    with torch.no_grad():
        assert torch.equal(model(x), saved(x))
    assert str(tmp_path) not in sys.path  # the working directory was only borrowed


# --- threads -------------------------------------------------------------------------------


def test_threads_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert_bad_input(["attack", "fgsm", "--threads", "0", "--out", str(tmp_path)], "--threads")
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(3) == 3 == torch.get_num_threads()
        assert set_threads(None) == default_threads() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's environment chose: kept
        torch.set_num_threads(3)
        assert set_threads(None) == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)])
def test_default_threads_leaves_cores_free(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_threads() == threads


# --- names in reports ----------------------------------------------------------------------


def test_a_loaded_model_is_named_by_its_file(pt2: Path, net: nn.Module) -> None:
    assert model_source(load_model(pt2)) == str(pt2)
    assert model_source(load_model(pt2, mean=[0.5], std=[0.5])) == str(pt2)
    assert model_source(net) == "bastion.zoo.DigitsCNN"


def test_pickle_of_a_class_from_main_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Net(nn.Linear):
        pass

    Net.__module__, Net.__qualname__ = "__main__", "BastionScriptNet"
    monkeypatch.setattr(sys.modules["__main__"], "BastionScriptNet", Net, raising=False)
    torch.save(Net(64, 10), tmp_path / "script.pt")
    monkeypatch.delattr(sys.modules["__main__"], "BastionScriptNet")  # a later process
    path = str(tmp_path / "script.pt")
    assert_bad_input(
        ["attack", "fgsm", path, "--trust-pickle", "--out", str(tmp_path / "o"), "--quiet"],
        "BastionScriptNet",
        "__main__",
        "move the class into a module",
    )


def test_torchvision_resnet18_from_onnx_runs_an_attack(tmp_path: Path) -> None:
    """Harness level: `bastion attack` on a torchvision ResNet-18 exported to ONNX (this used
    to fail to load for attacks)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    torchvision = pytest.importorskip("torchvision")
    import contextlib
    import io
    import json
    import warnings

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    spec = _npz(tmp_path / "d.npz", x)
    out = tmp_path / "o"
    code, _, err = run_cli(["attack", "fgsm", str(path), "--data", spec, "--out", str(out),
                            "--threat", "linf:8/255", "--quiet"])  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["format"] == "onnx" and report["model"]["source"] == str(path)


@pytest.mark.parametrize("command", [["verify"], ["defend", "distill", "--out", "never.pt2"]])
def test_threads_are_checked_by_verify_and_defend(command: list[str]) -> None:
    assert_bad_input([*command, "--threads", "0"], "--threads must be a positive number")
    assert not Path("never.pt2").exists()
