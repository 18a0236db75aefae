"""Damaged safetensors and ONNX files: refused with one line and exit 2, never loaded
silently where the format (or the checksum Bastion records) can tell."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from test_cli import assert_bad_input  # tests/ is on sys.path
from torch import nn

from bastion.errors import ModelLoadError
from bastion.model_io import CHECKSUM_KEY, load_model, read_metadata, save_model
from bastion.zoo import DigitsCNN

ARCH = "bastion.zoo:DigitsCNN"
DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def _safetensors(path: Path, net: nn.Module, **metadata: str) -> Path:
    save_model(net, path, torch.rand(2, *DIGITS), format="safetensors", metadata=metadata)
    return path


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _flip(path: Path, start: int, count: int = 400) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cli(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["attack", "fgsm", str(path), *extra, "--out", str(tmp_path / "o"), "--quiet"]


def test_bastions_safetensors_round_trip_and_keep_the_callers_metadata(
    tmp_path: Path, net: nn.Module
) -> None:
    path = _safetensors(tmp_path / "m.safetensors", net, recipe="digits")
    assert CHECKSUM_KEY in _header(path)[1]["__metadata__"]
    assert read_metadata(path) == {"recipe": "digits"}  # the checksum is Bastion's own
    loaded = load_model(path, arch=ARCH)
    x = torch.rand(5, *DIGITS)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_flipped_weight_bytes_in_bastions_safetensors_are_refused(
    tmp_path: Path, net: nn.Module
) -> None:
    path = _safetensors(tmp_path / "m.safetensors", net)
    n, header = _header(path)
    begin, end = max(
        (v["data_offsets"] for k, v in header.items() if k != "__metadata__"),
        key=lambda span: span[1] - span[0],
    )
    _flip(path, 8 + n + (begin + end) // 2 - 200)  # inside the largest tensor
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(path, arch=ARCH)
    assert_bad_input(_cli(path, tmp_path, "--arch", ARCH), "damaged", "SHA-256", str(path))


def test_a_safetensors_header_that_does_not_fit_its_bytes_is_refused(
    tmp_path: Path, net: nn.Module
) -> None:
    path = _safetensors(tmp_path / "m.safetensors", net)
    raw = path.read_bytes()
    n, header = _header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [*header[name]["shape"][:-1], header[name]["shape"][-1] + 1]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n  # the same header length, so only the table is wrong
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    assert_bad_input(_cli(path, tmp_path, "--arch", ARCH), "damaged safetensors", name)
    # bytes flipped inside the JSON header
    path.write_bytes(raw)
    _flip(path, 8 + n // 2, 8)
    assert_bad_input(_cli(path, tmp_path, "--arch", ARCH), "damaged safetensors", str(path))


def test_a_safetensors_file_without_bastions_checksum_still_loads(
    tmp_path: Path, net: nn.Module
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "third_party.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    x = torch.rand(3, *DIGITS)
    with torch.no_grad():
        assert torch.equal(load_model(path, arch=ARCH)(x), net(x))


@pytest.fixture
def onnx_file(tmp_path: Path, net: nn.Module) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.rand(2, *DIGITS),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    return path


def test_a_truncated_onnx_file_is_refused(tmp_path: Path, onnx_file: Path) -> None:
    raw = onnx_file.read_bytes()
    onnx_file.write_bytes(raw[: len(raw) * 2 // 3])
    assert_bad_input(_cli(onnx_file, tmp_path), "damaged ONNX", "protobuf", str(onnx_file))


def test_an_onnx_initializer_shorter_than_its_shape_is_refused(
    tmp_path: Path, onnx_file: Path
) -> None:
    import onnx

    proto = onnx.load(str(onnx_file))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.raw_data = tensor.raw_data[:-4]
    onnx.save(proto, str(onnx_file))
    assert_bad_input(_cli(onnx_file, tmp_path), "damaged ONNX", tensor.name, "bytes")
