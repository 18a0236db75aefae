"""Which kind of model file this is, read from its bytes rather than its name.

Detection never runs code from the file: zip archives are told apart by their entry names,
safetensors by its JSON header, ONNX by its protobuf tag (and a parse when onnx is
installed), and torch.save files only go through torch's restricted weights-only unpickler.
Every failure is a one-sentence `ModelLoadError`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bastion.errors import ModelLoadError

FORMATS = ("torchscript", "export", "safetensors", "onnx", "torch-weights", "pickle")

_LABELS = {
    "torchscript": "TorchScript",
    "export": "torch.export",
    "safetensors": "safetensors",
    "onnx": "ONNX",
    "torch-weights": "torch.save state dict",
    "pickle": "pickled model",
}
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


# --- small helpers -----------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _shape(t: torch.Tensor | torch.Size) -> str:
    """A shape as `2×3×8×8` ("scalar" for none)."""
    return "×".join(str(d) for d in t) or "scalar"


def _corrupt(
    path: Path, fmt: str | None = None, exc: BaseException | None = None
) -> ModelLoadError:
    what = f"{_LABELS[fmt]} file" if fmt else "model file"
    why = f" {_reason(exc)}" if exc is not None else ""
    hint = (
        "re-save or re-download it"
        if fmt
        else "save it with torch.export, TorchScript, safetensors or ONNX"
    )
    return ModelLoadError(
        f"{path} is not a {what} Bastion can read (truncated or corrupt?{why}); {hint}"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _state_dict_in(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """A state dict, or one found under a usual checkpoint key, else None."""
    if _is_state_dict(obj):
        return obj  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]  # type: ignore[no-any-return]
    return None


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist; check the path")
    if not p.is_file():
        raise ModelLoadError(f"{p} is not a file; give the path to a saved model file")
    return p


# --- format detection --------------------------------------------------------------------


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    # an open file, not the path: torch.load picks a loader by extension (".safetensors")
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def _zip_format(path: Path) -> tuple[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # torch's loaders do not check the members' CRC-32s: a damaged weight would load
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise _corrupt(path, None, exc) from None
    if damaged is not None:
        raise ModelLoadError(
            f"{path} is damaged: its member {damaged} fails its CRC-32 check (a bad download "
            "or disk?); re-save or re-download it"
        )
    # torch archives put every entry under one top-level folder named after the file
    inner = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if (
        "archive_format" in inner
        or "serialized_exported_program.json" in inner
        or any(n.startswith("models/") and n.endswith(".json") for n in inner)
    ):
        return "export", None
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript", None
    if "data.pkl" in inner:
        return _torch_save_format(path)
    raise _corrupt(path)


def _torch_save_format(path: Path) -> tuple[str, Any]:
    """torch-weights when the file unpickles safely into a state dict, else pickle."""
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        return "pickle", None  # needs globals that the restricted unpickler refuses
    except Exception as exc:  # noqa: BLE001 - any loader failure is a corrupt file
        raise _corrupt(path, None, exc) from None
    state = _state_dict_in(obj)
    return ("torch-weights", state) if state is not None else ("pickle", None)


# bytes per element of each safetensors dtype (the format's own list)
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _damaged(path: Path, fmt: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a damaged {_LABELS[fmt]} file ({why}; a bad download or disk?); "
        "re-save or re-download it"
    )


def _safetensors_layout(meta: dict[str, Any], data_size: int) -> str | None:
    """What is wrong with a safetensors header's tensor table, or None: each tensor's byte
    range must hold exactly its dtype × shape, and the ranges must tile the data section."""
    spans = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (begin, end) = info["dtype"], info["data_offsets"]
            dims = [int(d) for d in info["shape"]]
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r} has a malformed entry in the header"
        if dtype not in _SAFETENSORS_ITEMSIZE or any(d < 0 for d in dims):
            return f"tensor {name!r} has an unknown dtype or a negative dimension"
        count = math.prod(dims)
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != (
            count * _SAFETENSORS_ITEMSIZE[dtype]
        ):
            return f"tensor {name!r} does not fill its byte range"
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return "the tensors' byte ranges overlap or leave gaps"
        position = end
    if position != data_size:
        return f"the tensors hold {position} bytes but the file has {data_size}"
    return None


def _is_safetensors(head: bytes, size: int, path: Path) -> bool:
    """Whether the file is safetensors; raises for one whose header announces safetensors
    (a plausible length, then a JSON object) but does not parse or does not fit the file."""
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= min(size - 8, 100_000_000) or head[8:9] != b"{":
        return False
    with path.open("rb") as f:
        f.seek(8)
        header = f.read(n)
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "safetensors", "its header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _damaged(path, "safetensors", "its header is not a JSON object")
    problem = _safetensors_layout(meta, size - 8 - n)
    if problem is not None:
        raise _damaged(path, "safetensors", problem)
    return True


def _onnx_initializer_problem(proto: Any) -> str | None:
    """An initializer whose raw bytes do not match its dtype and shape, or None."""
    from onnx import helper

    for tensor in proto.graph.initializer:
        if not tensor.raw_data:
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return f"initializer {tensor.name!r} has an unknown data type {tensor.data_type}"
        count = math.prod(tensor.dims)
        if len(tensor.raw_data) != count * itemsize:
            return (
                f"initializer {tensor.name!r} holds {len(tensor.raw_data)} bytes where its "
                f"shape needs {count * itemsize}"
            )
    return None


def _looks_like_onnx(head: bytes, path: Path) -> bool:
    # An ONNX ModelProto starts with field 1 (ir_version, a varint): tag byte 0x08.
    if len(head) < 4 or head[0] != 0x08 or not 1 <= head[1] <= 0x7F:
        return False
    try:
        import onnx
    except ImportError:
        return True  # cannot check further; load_model will ask for the extra
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds
        # it starts as ONNX does, but its protobuf does not parse
        raise _damaged(path, "onnx", f"its protobuf does not parse: {_reason(exc)}") from None
    if not (proto.ir_version > 0 and proto.HasField("graph") and len(proto.graph.node) > 0):
        return False
    # ONNX has no checksum: flipped weight bytes parse; a wrong length at least is caught
    problem = _onnx_initializer_problem(proto)
    if problem is not None:
        raise _damaged(path, "onnx", problem)
    return True


def _detect(path: Path) -> tuple[str, Any]:
    """The format of `path` and, for torch-weights, the already loaded state dict."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {path} ({_reason(exc)}); check its permissions"
        ) from None
    if size == 0:
        raise ModelLoadError(
            f"{path} is empty (an interrupted download or save?); re-save or re-download it"
        )
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_format(path)
    if _is_safetensors(head, size, path):
        return "safetensors", None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _torch_save_format(path)  # legacy (pre-zip) torch.save or a plain pickle
    if _looks_like_onnx(head, path):
        return "onnx", None
    raise _corrupt(path)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a model file, read from its bytes (the extension is ignored).

    Returns one of "torchscript", "export", "safetensors", "onnx", "torch-weights" (a
    torch.save'd state dict) or "pickle" (any other torch.save'd object; never unpickled
    here: detection only uses torch's restricted weights-only unpickler). Raises
    `ModelLoadError` for a missing, empty, truncated or unrecognised file.
    """
    return _detect(_existing_file(path))[0]
