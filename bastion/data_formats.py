"""Readers for the raw files the public datasets ship in: MNIST's idx and CIFAR-10's pickles.

Both read untrusted bytes and fail with a `DataError` that names the file. CIFAR-10's
published batches are pickles, so they go through a restricted unpickler that can rebuild
numpy arrays and nothing else: a tampered batch cannot run code.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bastion.errors import DataError

_IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> npt.NDArray[np.uint8]:
    """Read an idx file of unsigned bytes with `ndim` axes, gzip-compressed or not.

    The magic number and the size its header promises are checked, so a truncated or
    corrupt download fails here instead of giving garbage pixels.
    """
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path} is not an idx file of {ndim}-D unsigned bytes (magic "
            f"{raw[:4].hex() or 'missing'}); download the dataset again"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download the dataset again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(
            f"{path} is truncated or corrupt: it has {len(raw)} bytes where its "
            f"header promises {expected}; download the dataset again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, decompressed when they start with the gzip magic (whatever the name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {path} ({exc}); the file is corrupt or truncated, "
            "download the dataset again"
        ) from exc
    return raw


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 uses it to pickle bytes under protocol 2, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing _codecs.encode({encoding!r}) in a pickled data file")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a CIFAR-10 batch may reference: numpy's array rebuilding, under either module name."""
    # The rebuild function lives in numpy.core (numpy 1) or numpy._core (numpy 2); asking an
    # array for its reduce tuple finds the right one without importing a deprecated alias.
    reconstruct = np.zeros(0).__reduce__()[0]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `_allowed_globals`."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path} references {module}.{name}, which a CIFAR-10 batch "
                "never needs; the file is not a published batch, so it was not "
                "loaded (download the dataset again)"
            ) from None


def load_restricted_pickle(path: Path) -> Any:
    """Unpickle a data file that may hold only dicts, lists, strings, numbers and arrays."""
    try:
        with path.open("rb") as f:
            return _ArraysOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes means a corrupt file
        raise DataError(
            f"cannot unpickle {path} ({type(exc).__name__}: {exc}); the file is "
            "corrupt or truncated, download the dataset again"
        ) from exc


def _field(batch: dict[Any, Any], key: str) -> Any:
    """`batch[key]`, accepting the bytes keys of Python 2 pickles and str keys alike."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_cifar_batch(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read one CIFAR-10 python batch as N×3×32×32 uint8 images and N labels."""
    batch = load_restricted_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(
            f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; "
            "download the dataset again"
        )
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else repr(type(data))
        raise DataError(
            f"{path} has no N×3072 uint8 'data' array (got {got}); download the dataset again"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path} has no integer 'labels' list; download the dataset again") from exc
    if y.shape != (len(data),) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(
            f"{path} has {y.size} labels in [{y.min(initial=0)}, "
            f"{y.max(initial=0)}] for {len(data)} images, expected one in [0, 9] "
            "per image; download the dataset again"
        )
    # Each row is the red plane, then green, then blue, each 32×32 in row-major order.
    return data.reshape(-1, 3, 32, 32), y


def read_cifar_label_names(path: Path) -> list[str] | None:
    """The class names in `batches.meta`, or None when the file is absent."""
    if not path.is_file():
        return None
    meta = load_restricted_pickle(path)
    names = _field(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path} has no 'label_names' list; download the dataset again")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
