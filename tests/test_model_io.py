"""Model files: formats detected from bytes, safe loading, faithful round trips, clear errors."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.errors import ConfigError, ModelLoadError, UntrustedModelError
from bastion.model_io import (
    detect_format,
    file_sha256,
    load_model,
    module_fingerprint,
    save_model,
)
from bastion.normalized import Normalized


class TinyNet(nn.Module):
    """A small CNN for 1×8×8 images and 10 classes."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, hidden, 3, padding=1)
        self.fc = nn.Linear(hidden * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = nn.functional.max_pool2d(h, 2)
        out: torch.Tensor = self.fc(h.flatten(1))
        return out


def wide_net() -> nn.Module:
    return TinyNet(hidden=6)


def not_a_module() -> int:
    return 3


ARCH = f"{__name__}:TinyNet"


class Evil:
    """Unpickling this creates a directory: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    # a different batch size from the example input the model was saved with
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def saved(
    tmp_path_factory: pytest.TempPathFactory, model: nn.Module, example: torch.Tensor
) -> dict[str, Path]:
    """One file per format, all with misleading or no extensions."""
    d = tmp_path_factory.mktemp("models")
    files = {
        "export": d / "model.onnx",
        "torchscript": d / "model.safetensors",
        "safetensors": d / "model.pt",
        "torch-weights": d / "weights.pt2",
        "pickle": d / "model.bin",
    }
    for fmt in ("export", "torchscript", "safetensors"):
        save_model(model, files[fmt], example, format=fmt)
    torch.save(model.state_dict(), files["torch-weights"])
    torch.save(model, files["pickle"])
    return files


def assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> None:
    message = str(exc.value)
    assert message and "\n" not in message, message


def assert_same_outputs_and_gradients(loaded: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    assert not loaded.training
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loaded(xg).logsumexp(1).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr).logsumexp(1).sum(), xr)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, ref, atol=1e-6)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["export", "torchscript", "safetensors", "torch-weights"])
def test_round_trip_detects_format_from_bytes_and_reproduces_outputs(
    fmt: str, saved: dict[str, Path], model: nn.Module, batch: torch.Tensor
) -> None:
    path = saved[fmt]
    assert detect_format(path) == fmt
    loaded = load_model(path, arch=ARCH if fmt in ("safetensors", "torch-weights") else None)
    assert_same_outputs_and_gradients(loaded, model, batch)
    assert_same_outputs_and_gradients(loaded, model, batch[:1])


def test_trusted_pickle_round_trip(
    saved: dict[str, Path], model: nn.Module, batch: torch.Tensor
) -> None:
    assert detect_format(saved["pickle"]) == "pickle"
    loaded = load_model(saved["pickle"], trust_pickle=True)
    assert isinstance(loaded, TinyNet)
    assert_same_outputs_and_gradients(loaded, model, batch)


def test_legacy_non_zip_torch_save_is_detected(tmp_path: Path, model: nn.Module) -> None:
    weights, full = tmp_path / "w.pt", tmp_path / "m.pt"
    torch.save(model.state_dict(), weights, _use_new_zipfile_serialization=False)
    torch.save(model, full, _use_new_zipfile_serialization=False)
    assert weights.read_bytes()[:1] == b"\x80"
    assert detect_format(weights) == "torch-weights"
    assert detect_format(full) == "pickle"
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_model(weights, arch=ARCH)(x), model(x), atol=1e-6)


def test_checkpoint_dict_with_state_dict_key_loads_as_weights(
    tmp_path: Path, model: nn.Module
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    assert detect_format(path) == "torch-weights"
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_model(path, arch=ARCH)(x), model(x), atol=1e-6)


def test_export_with_batch_of_one_stays_dynamic(
    tmp_path: Path, model: nn.Module, batch: torch.Tensor
) -> None:
    path = tmp_path / "m.pt2"
    save_model(model, path, batch[:1])
    assert_same_outputs_and_gradients(load_model(path), model, batch)


def test_static_batch_export_runs_other_batch_sizes_in_chunks(
    tmp_path: Path, model: nn.Module, batch: torch.Tensor
) -> None:
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 8, 8),)), path)
    loaded = load_model(path)
    assert_same_outputs_and_gradients(loaded, model, batch)  # 5 = 2 + 2 + 1 (padded)
    assert_same_outputs_and_gradients(loaded, model, batch[:1])


def test_save_model_keeps_the_training_flag(tmp_path: Path, example: torch.Tensor) -> None:
    net = TinyNet().train()
    save_model(net, tmp_path / "m.pt2", example)
    assert net.training and net.conv.training


def test_save_model_rejects_unknown_format(
    tmp_path: Path, model: nn.Module, example: torch.Tensor
) -> None:
    with pytest.raises(ConfigError) as exc:
        save_model(model, tmp_path / "m.onnx", example, format="onnx")
    assert_one_line(exc)


def test_onnx_round_trip(
    tmp_path: Path, model: nn.Module, example: torch.Tensor, batch: torch.Tensor
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    path = tmp_path / "model.pt"  # misleading extension
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    assert detect_format(path) == "onnx"
    assert_same_outputs_and_gradients(load_model(path), model, batch)


# --- pickles are never unpickled without trust ---------------------------------------------


def test_pickled_module_needs_trust(saved: dict[str, Path]) -> None:
    with pytest.raises(UntrustedModelError) as exc:
        load_model(saved["pickle"])
    assert_one_line(exc)
    assert "arbitrary code" in str(exc.value) and "--trust-pickle" in str(exc.value)


@pytest.mark.parametrize("writer", ["torch", "torch-legacy", "pickle"])
def test_evil_pickle_does_not_run_without_trust(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    else:
        torch.save(Evil(marker), path, _use_new_zipfile_serialization=writer == "torch")
    assert detect_format(path) == "pickle"
    with pytest.raises(UntrustedModelError):
        load_model(path, arch=ARCH)
    assert not marker.exists()
    if writer == "torch":
        # the payload is live: trusting the file runs it (and then it is not a model)
        with pytest.raises(ModelLoadError):
            load_model(path, trust_pickle=True)
        assert marker.exists()


# --- weights need a matching architecture --------------------------------------------------


def test_weights_without_arch_explain_arch(saved: dict[str, Path]) -> None:
    for fmt in ("safetensors", "torch-weights"):
        with pytest.raises(ModelLoadError) as exc:
            load_model(saved[fmt])
        assert_one_line(exc)
        assert "--arch" in str(exc.value)


def test_weights_with_wrong_arch_name_the_mismatching_keys(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError) as exc:
        load_model(saved["safetensors"], arch=f"{__name__}:wide_net")
    assert_one_line(exc)
    assert "conv.weight" in str(exc.value) and "4×1×3×3" in str(exc.value)
    with pytest.raises(ModelLoadError) as exc:
        load_model(saved["torch-weights"], arch="torch.nn:Identity")
    assert_one_line(exc)
    assert "unexpected conv.weight" in str(exc.value)


@pytest.mark.parametrize(
    "arch",
    [
        "no_colon",
        ":TinyNet",
        "mod:",
        "a:b:c",
        "surely_not_a_module_xyz:Net",
        f"{__name__}:NoSuchFactory",
        f"{__name__}:not_a_module",
        f"{__name__}:ARCH",
    ],
)
def test_bad_arch_is_a_model_load_error(arch: str, saved: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError) as exc:
        load_model(saved["safetensors"], arch=arch)
    assert_one_line(exc)


# --- broken files ------------------------------------------------------------------------


def broken_files(d: Path, saved: dict[str, Path]) -> dict[str, Path]:
    ts = saved["torchscript"].read_bytes()
    st = saved["safetensors"].read_bytes()
    cases = {
        "empty": b"",
        "truncated-torchscript": ts[: len(ts) // 2],
        "truncated-safetensors": st[: len(st) // 2],
        "random": torch.randint(
            0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8
        )
        .numpy()
        .tobytes(),
        "text": b"<html>404 Not Found</html>\n",
        "onnx-like": b"\x08\x07" + b"\xff" * 64,
    }
    out = {}
    for name, data in cases.items():
        out[name] = d / f"{name}.pt"
        out[name].write_bytes(data)
    return out


def test_missing_empty_truncated_and_random_files_are_model_load_errors(
    tmp_path: Path, saved: dict[str, Path]
) -> None:
    paths = {
        "missing": tmp_path / "nope.pt2",
        "directory": tmp_path,
        **broken_files(tmp_path, saved),
    }
    for name, path in paths.items():
        for call in (lambda p: load_model(p, arch=ARCH), detect_format):
            with pytest.raises(ModelLoadError) as exc:
                call(path)
            assert type(exc.value) is ModelLoadError, name
            assert_one_line(exc)
            assert str(path) in str(exc.value), name
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(paths["truncated-torchscript"])


def test_zip_with_a_corrupt_member_is_a_model_load_error(
    tmp_path: Path, saved: dict[str, Path]
) -> None:
    data = bytearray(saved["export"].read_bytes())
    start = len(data) // 3
    data[start : start + 64] = b"\0" * 64  # keeps the central directory, breaks the contents
    path = tmp_path / "damaged.pt2"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line(exc)


def test_missing_onnx_extra_is_explained(
    tmp_path: Path, saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx_file = tmp_path / "model.onnx"
    proto = b"\x08\x09\x12\x07pytorch" + b"\0" * 16
    onnx_file.write_bytes(proto)
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx -> ImportError
    assert detect_format(onnx_file) == "onnx"
    with pytest.raises(ModelLoadError) as exc:
        load_model(onnx_file)
    assert_one_line(exc)
    assert 'pip install "bastion[onnx]"' in str(exc.value)


# --- options -----------------------------------------------------------------------------


def test_load_model_wraps_in_normalized_on_the_device(
    saved: dict[str, Path], model: nn.Module
) -> None:
    loaded = load_model(saved["export"], mean=[0.5], std=[0.25], device="cpu")
    assert isinstance(loaded, Normalized) and not loaded.training
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model((x - 0.5) / 0.25), atol=1e-6)
    assert loaded.mean.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["export", "torchscript", "safetensors", "torch-weights"])
def test_load_model_places_every_format_on_cuda(
    fmt: str, saved: dict[str, Path], model: nn.Module, batch: torch.Tensor
) -> None:
    arch = ARCH if fmt in ("safetensors", "torch-weights") else None
    loaded = load_model(saved[fmt], arch=arch, device="cuda", mean=0.5, std=0.5)
    with torch.no_grad():
        out = loaded(batch.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), model(batch * 2 - 1), atol=1e-5)


def test_pickled_module_whose_class_is_gone_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "gone.pt"
    # a pickle that names a class in a module that does not exist
    path.write_bytes(b"\x80\x02cno_such_module_xyz\nNet\nq\x00)\x81q\x01.")
    assert detect_format(path) == "pickle"
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, trust_pickle=True)
    assert_one_line(exc)
    assert "no_such_module_xyz" in str(exc.value)


def test_load_model_rejects_unknown_device(saved: dict[str, Path]) -> None:
    with pytest.raises(ConfigError):
        load_model(saved["export"], device="warp-drive")


def test_normalized_equals_manual_normalisation() -> None:
    torch.manual_seed(4)
    inner = nn.Conv2d(3, 2, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = Normalized(inner, mean, std)
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 4, 4)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), inner(manual), atol=1e-6)
    scalar = Normalized(inner, 0.5, 0.5)
    assert torch.allclose(scalar(x), inner(x * 2 - 1), atol=1e-6)


@pytest.mark.parametrize(
    "mean,std",
    [
        ((0.5,), (0.0,)),
        ((0.5,), (-1.0,)),
        ((0.5,), (float("nan"),)),
        ((0.1, 0.2), (0.1, 0.2, 0.3)),
        ((), ()),
        ("abc", (0.5,)),
    ],
)
def test_normalized_rejects_bad_statistics(mean: object, std: object) -> None:
    with pytest.raises(ConfigError) as exc:
        Normalized(nn.Identity(), mean, std)  # type: ignore[arg-type]
    assert_one_line(exc)


# --- hashing -----------------------------------------------------------------------------


def test_module_fingerprint_tracks_weights(model: nn.Module) -> None:
    twin = TinyNet()
    twin.load_state_dict(model.state_dict())
    assert module_fingerprint(twin) == module_fingerprint(model)
    with torch.no_grad():
        twin.fc.bias[3] += 1e-3
    assert module_fingerprint(twin) != module_fingerprint(model)
    assert len(module_fingerprint(model)) == 64


def test_module_fingerprint_covers_every_dtype_and_shape() -> None:
    net = nn.Module()
    net.register_buffer("mask", torch.tensor([True, False]))
    net.register_buffer("bf16", torch.ones(2, 3, dtype=torch.bfloat16))
    net.register_buffer("step", torch.tensor(7))
    before = module_fingerprint(net)
    assert module_fingerprint(net) == before
    net.bf16 = net.bf16.reshape(3, 2)  # same bytes, new shape
    assert module_fingerprint(net) != before


def test_file_sha256_matches_hashlib(saved: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    path = saved["safetensors"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    copy = tmp_path / "copy"
    shutil.copy(path, copy)
    assert file_sha256(copy) == file_sha256(path)


def test_saved_program_does_not_carry_the_example_inputs_base_tensor(tmp_path) -> None:
    import zipfile

    from bastion.model_io import load_model, save_model
    from bastion.zoo import DigitsCNN

    model = DigitsCNN().eval()
    big = torch.rand(4096, 1, 8, 8)  # 1 MiB; the example is a 2-image view into it
    path = tmp_path / "m.pt2"
    save_model(model, path, big[:2])
    stored = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    assert stored < 200_000  # the weights (~40 kB) and two sample images, not the base
    assert torch.equal(load_model(path)(big[:5]), model(big[:5]))
