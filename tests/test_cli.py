"""The `bastion` command line: reports written, exit codes 0/1/2, one-line errors, resume."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bastion.cli import main
from bastion.model_io import save_model
from bastion.zoo import DigitsCNN

TINY_SUITE = """\
name = "tiny"

[[check]]
id = "fgsm"
attack = "FGSM"
norm = "linf"
eps = [0.1]

[[check]]
id = "pgd"
attack = "PGD"
norm = "linf"
eps = [0.1]
params = { steps = 5 }
"""

ANSI = "\x1b["
VOLATILE = {"seconds", "created", "timings", "command_seconds", "total_seconds"}


def write_suite(path: Path, pgd_extra: str = "") -> Path:
    """The tiny suite, with `pgd_extra` lines added to its PGD check."""
    path.write_text(TINY_SUITE + pgd_extra)
    return path


def tiny(out: Path, suite: Path) -> list[str]:
    """Options for a small quiet run: 32 samples, the given suite, outputs into `out`."""
    return ["--out", str(out), "--n", "32", "--suite", str(suite), "--quiet"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured into plain (non-terminal) buffers."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors exit through SystemExit
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_bad_input(argv: list[str], *phrases: str) -> str:
    """Exit 2, exactly one stderr line `bastion: error: …`, no traceback; returns the line."""
    code, out, err = run_cli(argv)
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("bastion: error: "), err
    assert "Traceback" not in out + err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def load_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def suite_file(workdir: Path) -> Path:
    return write_suite(workdir / "tiny.toml")


@pytest.fixture(scope="module")
def base_args(suite_file: Path) -> list[str]:
    # batch 32 over 64 samples: two items per check, so resume has something to skip and redo
    return ["--n", "64", "--batch-size", "32", "--suite", str(suite_file), "--quiet"]


@pytest.fixture(scope="module")
def first_run(workdir: Path, base_args: list[str], demo: nn.Module) -> dict[str, Any]:
    """One full default-model run, shared by the tests that read its outputs."""
    out = workdir / "first"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    junit = workdir / "junit.xml"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            mp.delenv(var, raising=False)
        mp.setenv("TERM", "xterm-256color")  # colours come from the stream, not from TERM
        code, stdout, stderr = run_cli(
            ["report", "--out", str(out), *base_args, "--junit", str(junit)]
        )
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "junit": junit}


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torchscript_file(workdir: Path, demo: nn.Module, inputs: torch.Tensor) -> Path:
    path = workdir / "demo.torchscript.pt"
    save_model(demo, path, inputs, format="torchscript")
    return path


# --- a full run ------------------------------------------------------------------------------


def test_default_model_report_is_written(first_run: dict[str, Any]) -> None:
    assert first_run["code"] == 0, first_run["stderr"]
    out = first_run["out"]
    report = load_report(out)
    assert report["clean_accuracy"] >= 0.9
    assert 0.0 <= report["robust_accuracy"] <= report["clean_accuracy"]
    assert [c["attack"] for c in report["checks"]] == ["FGSM", "PGD"]
    assert all(c["results"][0]["eps"] == pytest.approx(0.1) for c in report["checks"])
    assert isinstance(report["flags"], list)
    assert report["model"]["source"] == "demo"
    assert report["data"]["n"] == 64
    assert (out / "report.html").stat().st_size > 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert len(lines) == 1 + 2 + 2 + 2  # header, clean and two checks, two batches each


def test_piped_summary_is_plain_lines(first_run: dict[str, Any]) -> None:
    stdout = first_run["stdout"]
    assert "Bastion report" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith(("fgsm ", "pgd "))]
    assert rows[0].startswith("fgsm FGSM linf eps=") and "robust_accuracy=" in rows[0]
    assert any(r.startswith("pgd PGD linf eps=") for r in rows)
    assert not any(ch in stdout for ch in "┏━┃│└")  # no box drawing when piped
    assert "clean accuracy" in stdout and "robust accuracy" in stdout
    assert "report.json" in stdout
    assert ANSI not in stdout
    assert first_run["stderr"] == ""


def test_out_dir_keeps_other_files(first_run: dict[str, Any]) -> None:
    assert (first_run["out"] / "notes.txt").read_text() == "mine\n"


def test_junit_has_one_testcase_per_check(first_run: dict[str, Any]) -> None:
    root = ET.parse(first_run["junit"]).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["fgsm", "pgd"]
    assert root.get("tests") == "2" and root.get("failures") == "0"


def test_no_arguments_is_report_on_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite_file: Path
) -> None:
    # a tiny stand-in for the built-in quick suite, which takes ~25 s
    builtin = tmp_path / "suites"
    builtin.mkdir()
    shutil.copy(suite_file, builtin / "quick.toml")
    monkeypatch.setattr("bastion.suites.suite.BUILTIN_DIR", builtin)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli([])
    assert code == 0, err
    report = load_report(tmp_path / "bastion-report")
    assert report["model"]["source"] == "demo"
    assert report["data"]["spec"] == "digits" and report["data"]["n"] == 450
    assert "model demo (builtin)" in stdout


def test_json_flag_prints_the_report(tmp_path: Path, base_args: list[str]) -> None:
    code, stdout, _ = run_cli(["report", "--out", str(tmp_path), *base_args, "--json"])
    assert code == 0
    printed = json.loads(stdout)
    assert printed["clean_accuracy"] == load_report(tmp_path)["clean_accuracy"]
    assert [c["id"] for c in printed["checks"]] == ["fgsm", "pgd"]


# --- pass criteria: exit 1 only when a criterion the user asked for fails ----------------------


def test_fail_under_exits_1_and_still_writes_the_report(
    tmp_path: Path, base_args: list[str]
) -> None:
    code, _, _ = run_cli(["report", "--out", str(tmp_path), *base_args, "--fail-under", "0.99"])
    assert code == 1
    report = load_report(tmp_path)
    assert report["passed"] is False and report["fail_under"] == ["0.99"]
    assert all(t["passed"] is False for t in report["threat_models"])
    assert (tmp_path / "report.html").exists()


def test_fail_under_that_holds_exits_0(tmp_path: Path, base_args: list[str]) -> None:
    code, _, _ = run_cli(["report", "--out", str(tmp_path), *base_args, "--fail-under", "0"])
    assert code == 0
    assert load_report(tmp_path)["passed"] is True


@pytest.mark.parametrize(("criterion", "expected"), [(">= 0.99", 1), (">= 0.0", 0)])
def test_suite_criterion_sets_the_exit_code(tmp_path: Path, criterion: str, expected: int) -> None:
    suite = write_suite(
        tmp_path / "crit.toml", pgd_extra=f'criterion = "robust_accuracy {criterion}"\n'
    )
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["report", *tiny(out, suite)])
    assert code == expected
    pgd = load_report(out)["checks"][1]
    assert pgd["passed"] is (expected == 0)
    assert ("FAILED" in stdout) is (expected == 1)


# --- bastion attack ------------------------------------------------------------------------------


def test_attack_pgd(tmp_path: Path) -> None:
    code, _, err = run_cli(
        ["attack", "pgd", "--eps", "0.1", "--n", "32", "--out", str(tmp_path), "--quiet"]
    )
    assert code == 0, err
    (check,) = load_report(tmp_path)["checks"]
    assert check["attack"] == "PGD" and check["eps"] == [0.1]


def test_attack_cw(tmp_path: Path) -> None:
    code, _, err = run_cli(["attack", "cw", "--n", "4", "--out", str(tmp_path), "--quiet"])
    assert code == 0, err
    (check,) = load_report(tmp_path)["checks"]
    assert check["attack"] == "CarliniWagnerL2" and check["norm"] == "l2"
    assert check["minimum_norm"]["attacked"] > 0
    assert check["params"] == {"binary_search_steps": 5, "max_iterations": 1000}


# --- saved models ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torchscript", "export", "safetensors"])
def test_saved_model_formats(
    tmp_path: Path, fmt: str, demo: nn.Module, inputs: torch.Tensor, suite_file: Path
) -> None:
    path = tmp_path / "model.bin"  # the format is read from the bytes, not the name
    save_model(demo, path, inputs, format=fmt)
    arch = ["--arch", "bastion.zoo:DigitsCNN"] if fmt == "safetensors" else []
    out = tmp_path / "out"
    code, stdout, err = run_cli(["report", str(path), *arch, *tiny(out, suite_file)])
    assert code == 0, err
    report = load_report(out)
    assert report["model"]["format"] == fmt
    # piped output is not cut to 80 columns: the long path stays whole on its line
    assert f"model {path} ({fmt})" in stdout
    assert report["model"]["source"] == str(path)
    assert report["clean_accuracy"] >= 0.9


def test_mean_std_wraps_the_model(
    tmp_path: Path, torchscript_file: Path, suite_file: Path, demo: nn.Module, digits: Any
) -> None:
    normalise = ["--mean", "0.5", "--std", "0.5"]
    code, _, err = run_cli(
        ["report", str(torchscript_file), *normalise, *tiny(tmp_path, suite_file)]
    )
    assert code == 0, err
    with torch.no_grad():
        pred = demo((digits.x[:32] - 0.5) / 0.5).argmax(1)
    expected = float((pred == digits.y[:32]).double().mean())
    assert load_report(tmp_path)["clean_accuracy"] == pytest.approx(expected)


def test_pickled_model_loads_only_with_trust_pickle(
    tmp_path: Path, demo: nn.Module, suite_file: Path
) -> None:
    path = tmp_path / "model.pt"
    model = DigitsCNN()
    model.load_state_dict(demo.state_dict())
    torch.save(model, path)
    args = ["report", str(path), *tiny(tmp_path / "out", suite_file)]
    assert_bad_input(args, "--trust-pickle")
    assert not (tmp_path / "out" / "report.json").exists()
    code, _, err = run_cli([*args, "--trust-pickle"])
    assert code == 0, err
    assert load_report(tmp_path / "out")["model"]["format"] == "pickle"


# --- bad input: exit 2, one line ------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path, suite_file: Path) -> None:
    assert_bad_input(
        ["report", str(tmp_path / "nope.pt2"), *tiny(tmp_path / "out", suite_file)],
        "does not exist",
    )


def test_corrupt_model_file(tmp_path: Path, suite_file: Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "model.pt2"
    path.write_bytes(b"\x01" + bytes(rng.randrange(256) for _ in range(4095)))
    assert_bad_input(["report", str(path), *tiny(tmp_path / "out", suite_file)])


def test_truncated_torchscript_file(
    tmp_path: Path, torchscript_file: Path, suite_file: Path
) -> None:
    blob = torchscript_file.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(blob[: len(blob) // 2])
    assert_bad_input(["report", str(path), *tiny(tmp_path / "out", suite_file)])


def test_safetensors_without_arch(
    tmp_path: Path, demo: nn.Module, inputs: torch.Tensor, suite_file: Path
) -> None:
    path = tmp_path / "weights.safetensors"
    save_model(demo, path, inputs, format="safetensors")
    assert_bad_input(["report", str(path), *tiny(tmp_path / "out", suite_file)], "--arch")


def _npz(path: Path, x: np.ndarray, n: int = 8) -> str:
    np.savez(path, x=x, y=np.arange(n) % 10)
    return f"npz:{path}"


@pytest.mark.parametrize(
    "case", ["unknown-spec", "missing-mnist", "nan-pixels", "pixels-above-1", "wrong-shape"]
)
def test_bad_data(tmp_path: Path, suite_file: Path, case: str) -> None:
    rng = np.random.default_rng(0)
    if case == "unknown-spec":
        spec = "nope:x"
    elif case == "missing-mnist":
        spec = f"mnist:{tmp_path / 'no-such-root'}"
    elif case == "nan-pixels":
        x = rng.random((8, 1, 8, 8), dtype=np.float32)
        x[3, 0, 2, 2] = np.nan
        spec = _npz(tmp_path / "d.npz", x)
    elif case == "pixels-above-1":
        spec = _npz(tmp_path / "d.npz", rng.random((8, 1, 8, 8), dtype=np.float32) * 2)
    else:  # the demo takes 1×8×8; give it 3×32×32 (NHWC uint8)
        spec = _npz(tmp_path / "d.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    line = assert_bad_input(["report", "--data", spec, *tiny(tmp_path / "out", suite_file)])
    if case == "wrong-shape":
        assert "3×32×32" in line


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * float("nan")


def test_model_returning_nan(tmp_path: Path, inputs: torch.Tensor, suite_file: Path) -> None:
    path = tmp_path / "nan.pt"
    save_model(_NaNModel(), path, inputs, format="torchscript")
    assert_bad_input(["report", str(path), *tiny(tmp_path / "out", suite_file)], "NaN")


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["report", "--suite", "nope"], "unknown suite"),
        (["attack", "nope"], "unknown attack"),
        (["report", "--eps", "5"], "eps"),
        (["report", "--eps", "-0.1"], "eps"),
        (["attack", "pgd", "--eps", "5"], "eps"),
        (["report", "--n", "0"], "--n"),
        (["report", "--mean", "0.5"], "--std"),
        (["report", "--n", "many"], "--n"),
    ],
)
def test_bad_options(tmp_path: Path, argv: list[str], phrase: str) -> None:
    assert_bad_input([*argv, "--out", str(tmp_path), "--quiet"], phrase)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(tmp_path: Path) -> None:
    assert_bad_input(["report", "--device", "cuda", "--out", str(tmp_path), "--quiet"], "cuda")


def test_suite_with_unknown_key(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "bad.toml", pgd_extra="stepz = 5\n")
    assert_bad_input(["report", "--suite", str(suite), "--out", str(tmp_path), "--quiet"], "stepz")


# --- resume ------------------------------------------------------------------------------------


def test_resume_after_a_torn_write_reproduces_the_run(
    tmp_path: Path, first_run: dict[str, Any], base_args: list[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(first_run["out"], out)
    log = out / "results.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    code, _, err = run_cli(["report", "--out", str(out), *base_args, "--resume"])
    assert code == 0, err
    first, resumed = load_report(first_run["out"]), load_report(out)
    assert resumed["clean_accuracy"] == first["clean_accuracy"]
    assert resumed["robust_accuracy"] == first["robust_accuracy"]
    assert strip_volatile(resumed["checks"]) == strip_volatile(first["checks"])
    assert strip_volatile(resumed) == strip_volatile(first)
    # the finished items were kept as they were, not redone; the torn one was
    new_lines = log.read_text().splitlines(keepends=True)
    assert new_lines[:3] == lines[:3]
    assert len(new_lines) == len(lines)
    assert all(json.loads(line) for line in new_lines)


def test_resume_refuses_a_different_run(
    tmp_path: Path, first_run: dict[str, Any], base_args: list[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(first_run["out"], out)
    before = (out / "results.jsonl").read_bytes()
    assert_bad_input(["report", "--out", str(out), *base_args, "--resume", "--seed", "1"], "seed")
    assert (out / "results.jsonl").read_bytes() == before


# --- the real console script -----------------------------------------------------------------


def _console_script() -> str:
    found = shutil.which("bastion", path=str(Path(sys.executable).parent))
    found = found or shutil.which("bastion")
    if found is None:
        pytest.skip("the bastion console script is not installed")
    return found


def test_console_script(tmp_path: Path) -> None:
    exe = _console_script()
    env = {**os.environ, "TERM": "xterm-256color"}
    bad = subprocess.run(
        [exe, "report", "--data", "nope:x", "--out", str(tmp_path), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("bastion: error: ") and "nope:x" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0
    assert "report" in helped.stdout and "attack" in helped.stdout
    assert ANSI not in helped.stdout


def test_options_without_a_subcommand_mean_report(tmp_path: Path, suite_file: Path) -> None:
    code, _, err = run_cli(tiny(tmp_path / "out", suite_file))
    assert code == 0, err
    assert load_report(tmp_path / "out")["model"]["source"] == "demo"


def test_attack_writes_each_adversarial_image_as_png(tmp_path, demo) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from bastion.data import load_data

    out = tmp_path / "att"
    assert main(["attack", "fgsm", "--eps", "0.3", "--n", "12", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    broken = (
        report["checks"][0]["results"][0]["success_rate"]
        * report["checks"][0]["results"][0]["attacked"]
    )
    pngs = sorted(out.glob("adv-*.png"))
    assert len(pngs) == round(broken) > 0
    data = load_data("digits", n=12)
    for png in pngs:
        i = int(png.stem.split("-")[1])
        x = torch.from_numpy(np.asarray(Image.open(png), dtype=np.float32) / 255)[None, None]
        assert float((x - data.x[i]).abs().max()) <= 0.3 + 1 / 255


def test_attack_fooling_is_the_fool_command(tmp_path, demo, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["attack", "fooling", "--generations", "3", "--population", "20", "--quiet"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "fooling.json").is_file() and list(tmp_path.glob("fooling-*.png"))
