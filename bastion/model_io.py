"""Loading and saving models safely, with the format read from the file's bytes (`model_formats`).

Readable formats: TorchScript and torch.export archives, safetensors and plain torch.save
state dicts (both with an architecture factory), ONNX (optional extra) and, only when the
caller trusts the file, full pickled modules. Every failure is a one-sentence
`ModelLoadError`; nothing here prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.errors import (
    BastionWarning,
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    UntrustedModelError,
)
from bastion.exported_module import METADATA_ATTR, _ExportedModule, _input_shape, _static_batch
from bastion.model_formats import (
    _LABELS,
    FORMATS,
    _corrupt,
    _detect,
    _existing_file,
    _reason,
    _shape,
    _torch_load,
    detect_format,
)
from bastion.modes import eval_mode
from bastion.normalized import Normalized

__all__ = [
    "FORMATS",
    "SAVE_FORMATS",
    "detect_format",
    "file_sha256",
    "load_model",
    "model_source",
    "module_fingerprint",
    "read_metadata",
    "save_model",
    "weights_sha256",
]

SAVE_FORMATS = ("export", "torchscript", "safetensors")
# the key of the weights' SHA-256 in a safetensors file's metadata (zip archives carry
# CRC-32s per member, which load_model checks)
CHECKSUM_KEY = "bastion_weights_sha256"
SOURCE_ATTR = "bastion_source"
"""The attribute `load_model` sets on the model it returns: the path it was read from."""
_METADATA_FILE = "bastion.json"  # the extra file of .pt2 and TorchScript archives


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # torch >= 2.14 marks torch.jit.{trace,load,save} deprecated; TorchScript files are still
    # common, so reading and writing them stays supported without the noise.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning
        )
        yield


# --- loading -----------------------------------------------------------------------------


def _load_export(path: Path) -> nn.Module:
    # an open file, not the path: torch.export.load logs a warning for names not ending .pt2
    extra = {_METADATA_FILE: ""}
    with path.open("rb") as f:
        program = torch.export.load(f, extra_files=extra)
    batch = _static_batch(program)
    if batch is not None:
        warnings.warn(
            f"{path} was exported with a fixed batch size of {batch}, so it runs {batch} "
            "image(s) at a time (often 10× slower); re-export it with bastion.save_model or "
            "a dynamic batch dimension",
            BastionWarning,
            stacklevel=2,
        )
    return _ExportedModule(
        program.module(),
        batch,
        _parse_metadata(extra),
        input_shape=_input_shape(program),
        name=f"the model {path.name}",
    )


def _load_torchscript(path: Path) -> nn.Module:
    with _quiet_jit():
        module: nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module


def resolve_arch(arch: str) -> nn.Module:
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ModelLoadError(
            f"--arch {arch!r} is not of the form 'package.module:factory'; "
            "name the module and the function or class that builds the model"
        )
    try:
        module = _import(module_name)
    except Exception as exc:  # noqa: BLE001 - an import runs arbitrary user code
        raise ModelLoadError(
            f"cannot import module {module_name!r} named by --arch {arch!r} "
            f"({_reason(exc)}); check the name and that it is on PYTHONPATH"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(
                f"module {module_name!r} has no attribute {attr!r} named by "
                f"--arch {arch!r}; check the factory's name"
            )
    if not callable(factory):
        raise ModelLoadError(
            f"{arch!r} is not callable; --arch must name a function or class "
            "that builds the model with no arguments"
        )
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"calling the factory {arch!r} with no arguments failed "
            f"({_reason(exc)}); --arch must build the model with no arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"the factory {arch!r} returned {type(model).__name__}, not a "
            "torch.nn.Module; point --arch at the function that builds the model"
        )
    return model


def _import(module_name: str) -> Any:
    with _cwd_on_path():
        return importlib.import_module(module_name)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory on sys.path for the duration (if not there already).

    Console scripts do not put the working directory on sys.path, yet users expect
    `--arch mynet:Net` to find ./mynet.py, and a pickled model to find the class it was
    saved from in the directory they run Bastion in.
    """
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.append(cwd)  # last: a local file never shadows an installed package
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str
) -> nn.Module:
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} is {_shape(state[k].shape)} in the file but {_shape(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ModelLoadError(
            f"the weights in {path} do not fit --arch {arch!r} "
            f"({', '.join(problems[:3])}{more}); pass the architecture these "
            "weights were saved from"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"the weights in {path} do not fit --arch {arch!r} "
            f"({_reason(exc)}); pass the architecture these weights were "
            "saved from"
        ) from None
    return model


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; when Bastion wrote it, checked against the
    SHA-256 it recorded (safetensors itself has no checksum: flipped bytes would load)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(CHECKSUM_KEY)
    state = load_file(str(path), device="cpu")
    if recorded is not None and weights_sha256(state) != recorded:
        raise ModelLoadError(
            f"{path} is damaged: its weights do not match the SHA-256 Bastion recorded when "
            "it saved the file (a bad download or disk?); re-save or re-download it"
        )
    return state


def _load_onnx(path: Path) -> nn.Module:
    from bastion.onnx_io import load_onnx

    return load_onnx(path)


def _load_pickle(path: Path) -> nn.Module:
    try:
        with _cwd_on_path():
            obj = _torch_load(path, weights_only=False)
    except (ImportError, AttributeError) as exc:
        where = (
            "it was pickled from a script run as __main__, so move the class into a module "
            "(mynet.py) and re-save, or re-save it with torch.export"
            if _pickled_from_main(exc)
            else "run Bastion in the folder that holds the class's module, add that folder "
            "to PYTHONPATH, or re-save the model with torch.export"
        )
        raise ModelLoadError(
            f"{path} is a pickled model whose class cannot be found ({_reason(exc)}); {where}"
        ) from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{path} holds {type(obj).__name__}, not a torch.nn.Module; "
            "save the model itself, or its state dict and pass --arch"
        )
    return obj


def _pickled_from_main(exc: BaseException) -> bool:
    """Whether unpickling failed on a class the pickle expects in `__main__` (the script that
    saved it), which no later program has."""
    main = sys.modules.get("__main__")
    text = str(exc)
    return "__main__" in text or (main is not None and repr(main) in text)


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    mean: Any = None,
    std: Any = None,
) -> nn.Module:
    """Load a model file in any format `detect_format` knows, in eval mode on `device`.

    `arch` ("package.module:factory", called with no arguments) builds the network for weight
    files (safetensors, torch.save state dicts), which are then loaded strictly; with any
    other format it is a `ConfigError` (the file holds its own architecture). The working
    directory is on the import path while `arch` and pickled classes are imported. Pickled
    modules run arbitrary code when loaded, so they load only with `trust_pickle=True`;
    otherwise `UntrustedModelError`, without unpickling anything. Zip archives (TorchScript,
    .pt2, torch.save) must pass their CRC-32 checks, a safetensors file Bastion wrote its
    recorded SHA-256, and safetensors headers and ONNX initializers must fit their bytes.
    With `mean` and `std` the model is wrapped in `Normalized`, so it takes [0, 1] pixels.
    Parameters are left as they are (requires_grad untouched). The model's `bastion_source`
    attribute is the path (`model_source`). A .pt2 with a fixed batch size loads with a
    `BastionWarning`. Every failure is a `ModelLoadError` with one sentence.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"unknown device {device!r} ({_reason(exc)}); use e.g. 'cpu' or 'cuda'"
        ) from None
    p = _existing_file(path)
    fmt, payload = _detect(p)
    if fmt in ("safetensors", "torch-weights") and arch is None:
        raise ModelLoadError(
            f"{p} holds only weights ({_LABELS[fmt]}); pass the architecture "
            "with --arch package.module:factory (arch= in Python)"
        )
    if fmt == "pickle" and not trust_pickle:
        raise UntrustedModelError(
            f"{p} is a pickled Python object, which can run arbitrary code when loaded; "
            "re-save it with torch.export or safetensors, or pass --trust-pickle if you trust "
            "its source"
        )
    if arch is not None and fmt not in ("safetensors", "torch-weights"):
        raise ConfigError(
            f"{p} is a {_LABELS[fmt]} file, which holds its own architecture, so --arch "
            f"{arch!r} would be ignored; drop --arch (it is only for weight files)"
        )
    model: nn.Module
    if fmt == "onnx":
        model = _load_onnx(p)
    elif fmt in ("safetensors", "torch-weights"):
        assert arch is not None
        net = resolve_arch(arch)
        try:
            state = payload if payload is not None else _load_safetensors(p)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(p, fmt, exc) from None
        model = _load_weights(net, state, p, arch)
    else:
        loaders = {"torchscript": _load_torchscript, "export": _load_export}
        loader = loaders.get(fmt, _load_pickle)
        try:
            model = loader(p)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure is a corrupt file
            raise _corrupt(p, fmt, exc) from None
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("give both mean and std for normalisation, or neither")
        model = Normalized(model, mean, std)
    try:
        model = model.to(target)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"cannot move the model to device {str(target)!r} ({_reason(exc)}); "
            "choose an available device such as 'cpu'"
        ) from None
    _tag(model, str(p))
    return model.eval()


def _tag(model: nn.Module, source: str) -> None:
    with contextlib.suppress(AttributeError, RuntimeError, TypeError):  # TorchScript may refuse
        object.__setattr__(model, SOURCE_ATTR, source)


def model_source(model: Any) -> str:
    """Where a model came from, for reports: the file `load_model` read it from, else its
    class (`package.module.Class`)."""
    source = getattr(model, SOURCE_ATTR, None)
    if isinstance(source, str):
        return source
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


# --- saving and hashing ------------------------------------------------------------------


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    format: str = "export",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save `model` so that `load_model` reads it back; the model is captured in eval mode.

    "export" (the recommended `.pt2`) writes a torch.export program with a dynamic batch
    dimension; "torchscript" traces the model on `example_input`; "safetensors" writes only
    the state dict (load it back with `arch=`) and the weights' SHA-256 (`weights_sha256`),
    which `load_model` verifies: the format has no checksum of its own. `metadata` (default:
    the model's `bastion_metadata` attribute, if any) is stored beside the weights as
    strings and read back by `read_metadata`. Errors raised by torch while exporting or
    tracing (unsupported Python in the model) are not caught.
    """
    if format not in SAVE_FORMATS:
        raise ConfigError(
            f"unknown save format {format!r}; choose one of {', '.join(SAVE_FORMATS)}"
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise InvalidInputError("example_input must be a batched tensor, e.g. N×C×H×W images")
    # a view (x[:2]) would store its whole base tensor as the program's sample input
    example_input = example_input.detach().clone()
    out = str(Path(path).expanduser())
    meta = {
        str(k): str(v) for k, v in (metadata or getattr(model, METADATA_ATTR, None) or {}).items()
    }
    extra = {_METADATA_FILE: json.dumps(meta)} if meta else None
    if format == "safetensors":
        from safetensors.torch import save_file

        # clone: safetensors refuses tensors that share storage (tied or sliced weights)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, out, metadata={**meta, CHECKSUM_KEY: weights_sha256(state)})
        return
    with eval_mode(model), torch.no_grad():
        if format == "torchscript":
            with _quiet_jit():
                traced = torch.jit.trace(model, example_input)  # type: ignore[no-untyped-call]
                torch.jit.save(traced, out, _extra_files=extra)  # type: ignore[no-untyped-call]
            return
        example = example_input
        if example.shape[0] < 2:
            # a batch of 1 would be specialised to 1 rather than kept dynamic
            example = torch.cat([example_input] * 2)
        dim = torch.export.Dim
        batch = dim.DYNAMIC if hasattr(dim, "DYNAMIC") else dim("batch")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        with open(out, "wb") as f:  # a file, so any name works (a path must end in .pt2)
            torch.export.save(program, f, extra_files=extra)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata `save_model` stored in a .pt2, TorchScript or safetensors file
    ({} when there is none or the format holds none)."""
    import zipfile

    p = _existing_file(path)
    fmt = detect_format(p)
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                stored = dict(f.metadata() or {})
            stored.pop(CHECKSUM_KEY, None)  # Bastion's own record, not the caller's metadata
            return stored
        if fmt in ("export", "torchscript"):
            with zipfile.ZipFile(p) as z:
                names = [n for n in z.namelist() if n.endswith(f"/extra/{_METADATA_FILE}")]
                return _parse_metadata({_METADATA_FILE: z.read(names[0]).decode()}) if names else {}
    except Exception as exc:  # noqa: BLE001 - a damaged archive is a corrupt file
        raise _corrupt(p, fmt, exc) from None
    return {}


def _parse_metadata(extra: Mapping[str, Any]) -> dict[str, str]:
    text = extra.get(_METADATA_FILE) or ""
    if isinstance(text, bytes):
        text = text.decode()
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    p = _existing_file(path)
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(model: nn.Module) -> str:
    """A SHA-256 over the model's class name and its state dict's names, dtypes, shapes and bytes.

    Stable across runs and processes; two models with the same class and the same weights get
    the same fingerprint, and changing any weight changes it.
    """
    digest = hashlib.sha256()
    cls = type(model)
    digest.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    _hash_state(digest, model.state_dict())
    return digest.hexdigest()


def weights_sha256(state: Mapping[str, Any]) -> str:
    """A SHA-256 over a state dict's names, dtypes, shapes and bytes (the checksum
    `save_model` records in a safetensors file and `load_model` verifies)."""
    digest = hashlib.sha256()
    _hash_state(digest, state)
    return digest.hexdigest()


def _hash_state(digest: Any, state: Mapping[str, Any]) -> None:
    for name, tensor in sorted(state.items()):
        if not isinstance(tensor, torch.Tensor):
            continue  # extra state is not a weight
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{_shape(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
