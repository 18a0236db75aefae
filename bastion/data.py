"""Datasets from a one-line spec: `digits`, `mnist:ROOT`, `fashion-mnist:ROOT`, `cifar10:ROOT`,
`folder:PATH` and `npz:PATH[#NAME]`.

Every loader returns the same `Dataset`: float32 images N×C×H×W in [0, 1] and int64 labels.
Nothing is resized, clipped or rescaled beyond uint8 → /255; anything else is a `DataError`
that says what to fix. Nothing is downloaded unless `download=True` is asked for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from bastion.data_formats import read_cifar_batch, read_cifar_label_names, read_idx
from bastion.errors import DataError
from bastion.validation import span

SPLITS = ("train", "test")
SPEC_FORMS = (
    "digits",
    "mnist:ROOT",
    "fashion-mnist:ROOT",
    "cifar10:ROOT",
    "folder:PATH",
    "npz:PATH[#NAME]",
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DIGIT_CLASSES = [str(i) for i in range(10)]

Array = npt.NDArray[np.generic]


@dataclass(repr=False)
class Dataset:
    """Images `x` (N×C×H×W float32 in [0, 1]), labels `y` (N int64) and where they came from."""

    x: torch.Tensor
    y: torch.Tensor
    spec: str
    split: str
    classes: list[str]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int) -> Dataset:
        """The first `n` samples (all of them when `n` is larger than the dataset)."""
        if n < 1:
            raise DataError(f"cannot keep {n} samples; pass n >= 1")
        return dataclasses.replace(self, x=self.x[:n], y=self.y[:n])

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.x.shape[1:])
        return (
            f"Dataset({self.spec!r}, split={self.split!r}, n={len(self)}, "
            f"image={shape}, classes={self.num_classes})"
        )


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a data spec into its kind and its argument (None for `digits`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"data spec must be a non-empty string, got {spec!r}; use one of "
            f"{', '.join(SPEC_FORMS)}"
        )
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in _LOADERS:
        hint = ""
        if _exists(spec):
            hint = f" (to read that path, write npz:{spec} or folder:{spec})"
        raise DataError(f"unknown data spec {spec!r}{hint}; use one of {', '.join(SPEC_FORMS)}")
    if kind == "digits":
        if arg:
            raise DataError(f"data spec {spec!r} takes no argument; write just 'digits'")
        return kind, None
    if not arg:
        form = next(f for f in SPEC_FORMS if f.startswith(kind + ":"))
        raise DataError(f"data spec {spec!r} needs a path; write {form}")
    return kind, arg


def load_data(
    spec: str, *, split: str | None = None, n: int | None = None, download: bool = False
) -> Dataset:
    """Load the dataset named by `spec` as float32 images in [0, 1] and int64 labels.

    `split` picks "train" or "test" (the default) for digits, MNIST, Fashion-MNIST and
    CIFAR-10; for `folder:` and `npz:` the spec itself names the data, and a split that
    contradicts it (`npz:PATH#test` with split="train") is a `DataError`. `n` keeps the first
    n samples. `download=True` lets torchvision fetch MNIST, Fashion-MNIST or CIFAR-10 into
    ROOT when the files are missing; otherwise nothing touches the network.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if n is not None and n < 1:
        raise DataError(f"cannot keep {n} samples; pass n >= 1 or leave n unset for all")
    kind, arg = parse_spec(spec)
    named = spec_split(spec)
    if split is not None and named is not None and split != named:
        raise DataError(
            f"data spec {spec!r} names the {named} split but split {split!r} was asked for; "
            f"drop the split option or write #{split} in the spec"
        )
    split = split or named or "test"
    x, y, classes, split = _LOADERS[kind](arg or "", split, n, download)
    if len(x) == 0:
        raise DataError(f"data spec {spec!r} holds no samples; check the path")
    x, y = x[:n], y[:n]
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise DataError(
            f"labels of {spec!r} span [{y.min()}, {y.max()}] but there are "
            f"{len(classes)} classes; fix the labels or the class names"
        )
    images = torch.from_numpy(_to_unit_float(x, spec))
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return Dataset(images, labels, spec, split, classes)


def spec_split(spec: str) -> str | None:
    """The split a spec names itself (`npz:PATH#train` → "train"), else None."""
    kind, arg = parse_spec(spec)
    if kind != "npz" or arg is None:
        return None
    name = _npz_parts(arg)[1]
    return name if name in SPLITS else None


def takes_split(spec: str) -> bool:
    """Whether `split` picks the data of this spec (digits, MNIST, Fashion-MNIST, CIFAR-10)."""
    return parse_spec(spec)[0] not in ("folder", "npz")


# Each loader returns (images N×C×H×W as uint8 or float in [0, 1], labels, classes, split).
Loaded = tuple[Array, Array, list[str], str]


def _to_unit_float(x: Array, spec: str) -> npt.NDArray[np.float32]:
    """uint8 → /255; floats must already be finite and in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"images of {spec!r} have dtype {x.dtype}; save them as uint8 "
            "(0..255) or as floats in [0, 1]"
        )
    if not np.isfinite(x).all():
        raise DataError(
            f"images of {spec!r} contain NaN or infinite pixels; clean or drop those images"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"pixel values of {spec!r} span {span(lo, hi)} but must lie in "
            "[0, 1]; scale to [0, 1] (normalisation belongs inside the model)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _exists(text: str) -> bool:
    """Whether `text` names an existing path (False for names the OS rejects)."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def _root(arg: str, what: str) -> Path:
    """The path in a spec, with `~` expanded, which must exist."""
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(f"{what} path {path} does not exist; check the spec's path")
    return path


# -- digits -----------------------------------------------------------------------------------


def _load_digits(arg: str, split: str, n: int | None, download: bool) -> Loaded:
    """scikit-learn's bundled 8×8 digits, split 75/25 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.25, random_state=0, stratify=digits.target)
    chosen = train if split == "train" else test
    x = (digits.images[chosen] / 16.0)[:, None].astype(np.float32)
    return x, digits.target[chosen], list(_DIGIT_CLASSES), split


# -- MNIST and Fashion-MNIST ------------------------------------------------------------------


def _idx_file(raw: Path, name: str) -> Path | None:
    """`raw/name`, or its `.gz`, whichever exists (the decompressed one first)."""
    for candidate in (raw / name, raw / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _find_raw(root: Path, folder: str, first_file: str) -> Path | None:
    """The `raw` folder under ROOT, accepting ROOT/<folder>/raw, ROOT/raw or ROOT itself."""
    for raw in (root / folder / "raw", root / "raw", root):
        if _idx_file(raw, first_file) is not None:
            return raw
    return None


def _idx_loader(folder: str, classes: list[str], fetch: str) -> Callable[..., Loaded]:
    """A loader for a dataset in MNIST's idx layout, as torchvision stores it."""

    def load(arg: str, split: str, n: int | None, download: bool) -> Loaded:
        prefix = "train" if split == "train" else "t10k"
        images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        root = Path(arg).expanduser()
        raw = _find_raw(root, folder, images_name) if root.exists() else None
        if raw is None and download:
            _download(fetch, root, split)
            raw = _find_raw(root, folder, images_name)
        if raw is None:
            raise DataError(
                f"{folder} not found under {root} (looked for "
                f"{root / folder / 'raw' / images_name}[.gz]); pass the folder that "
                f"holds {folder}/raw, or add --download to let torchvision fetch it"
            )
        images_file, labels_file = _idx_file(raw, images_name), _idx_file(raw, labels_name)
        if images_file is None or labels_file is None:
            raise DataError(
                f"{raw} has {images_name} but not {labels_name}[.gz]; download {folder} again"
            )
        x, y = read_idx(images_file, 3), read_idx(labels_file, 1)
        if len(x) != len(y):
            raise DataError(
                f"{images_file} has {len(x)} images but {labels_file} has {len(y)} "
                f"labels; download {folder} again"
            )
        return x[:, None], y, list(classes), split

    return load


def _download(fetch: str, root: Path, split: str) -> None:
    """Let torchvision download a dataset into `root` (only when the user asked for it)."""
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, fetch)(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"could not download {fetch} into {root} ({exc}); check the network, "
            "or download the files by hand and pass their folder"
        ) from exc


# -- CIFAR-10 ---------------------------------------------------------------------------------


def _load_cifar10(arg: str, split: str, n: int | None, download: bool) -> Loaded:
    """The published python batches in ROOT/cifar-10-batches-py (or in ROOT itself)."""
    root = Path(arg).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]

    def find() -> Path | None:
        for folder in (root / "cifar-10-batches-py", root):
            if (folder / names[0]).is_file():
                return folder
        return None

    folder = find() if root.exists() else None
    if folder is None and download:
        _download("CIFAR10", root, split)
        folder = find()
    if folder is None:
        raise DataError(
            f"CIFAR-10 not found under {root} (looked for "
            f"{root / 'cifar-10-batches-py' / names[0]}); pass the folder that "
            "holds cifar-10-batches-py, or add --download to let torchvision fetch it"
        )
    xs, ys = [], []
    for name in names:
        if not (folder / name).is_file():
            raise DataError(f"{folder} lacks {name}; download CIFAR-10 again")
        x, y = read_cifar_batch(folder / name)
        xs.append(x)
        ys.append(y)
        if n is not None and sum(map(len, xs)) >= n:
            break
    classes = read_cifar_label_names(folder / "batches.meta") or list(CIFAR10_CLASSES)
    return np.concatenate(xs), np.concatenate(ys), classes, split


# -- folder of images -------------------------------------------------------------------------


def _load_folder(arg: str, split: str, n: int | None, download: bool) -> Loaded:
    """An ImageFolder tree PATH/<class>/<images>, in torchvision's class and file order."""
    root = _root(arg, "image folder")
    if not root.is_dir():
        raise DataError(
            f"{root} is a file, not a folder; use folder:PATH with PATH/<class>/"
            "<images>, or npz:PATH for an .npz file"
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            files += [
                (Path(dirpath) / f, label)
                for f in sorted(fnames)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
    if not files:
        raise DataError(
            f"no images under {root}/<class>/ (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}); put each class's images in its own "
            "subfolder"
        )
    files = files[:n]
    arrays = [read_image(path) for path, _ in files]
    first = arrays[0].shape[:2]
    for (path, _), a in zip(files, arrays, strict=True):
        if a.shape[:2] != first:
            raise DataError(
                f"{path} is {a.shape[1]}×{a.shape[0]} but {files[0][0]} is "
                f"{first[1]}×{first[0]}; resize the images to one size first"
            )
    if all(a.ndim == 2 for a in arrays):
        x = np.stack(arrays)[:, None]
    else:  # any colour image makes the dataset RGB; grey ones repeat into three channels
        x = np.stack(
            [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
        ).transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    return x, y, classes, split


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    """An 8-bit image as H×W (greyscale) or H×W×3 (anything else, converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;"):
                raise DataError(
                    f"{path} has {im.mode} pixels (16-bit or float); save it as "
                    "8-bit greyscale or RGB"
                )
            return np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); fix or remove it") from exc


# -- npz arrays -------------------------------------------------------------------------------


def _load_npz(arg: str, split: str, n: int | None, download: bool) -> Loaded:
    """Arrays `x`/`y` (or `x_NAME`/`y_NAME` for `npz:PATH#NAME`) from a NumPy .npz file."""
    path_text, name = _npz_parts(arg)
    path = _root(path_text, "npz")
    x_key, y_key = (f"x_{name}", f"y_{name}") if name else ("x", "y")
    _require_npz(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (x_key, y_key) if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} has no array {missing[0]!r} (it holds "
                    f"{', '.join(npz.files) or 'nothing'}); save arrays x and y, "
                    "or name the pair x_NAME/y_NAME and write npz:PATH#NAME"
                )
            x, y = npz[x_key], npz[y_key]
            names = npz["label_names"] if "label_names" in npz.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"cannot read {path} as an .npz of plain arrays ({exc}); save it with "
            "numpy.savez and no object arrays"
        ) from exc
    x = _nchw(x, path, x_key)
    y = _int_labels(y, path, y_key)
    if len(y) != len(x):
        raise DataError(
            f"{path} has {len(x)} images in {x_key!r} but {len(y)} labels in "
            f"{y_key!r}; save one label per image"
        )
    if names is not None:
        classes = [s.decode() if isinstance(s, bytes) else str(s) for s in names.tolist()]
    else:
        classes = [str(i) for i in range(int(y.max(initial=-1)) + 1)]
    return x, y, classes, name if name in SPLITS else split


def _npz_parts(arg: str) -> tuple[str, str]:
    """PATH and NAME of `PATH#NAME` (NAME "" when absent or when PATH#NAME is a file)."""
    if "#" in arg and not Path(arg).expanduser().is_file():
        path_text, _, name = arg.rpartition("#")
        return path_text, name
    return arg, ""


def _require_npz(path: Path) -> None:
    """An .npz is a zip archive; say what the file is instead when it is not one."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; use folder:{path} for a folder of images")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return
    if head.startswith(b"\x93NUMPY"):
        what = "it holds a single .npy array"
    elif head[:1] == b"\x80":
        what = "it is a Python pickle"
    elif not head:
        what = "it is empty"
    else:
        what = "an .npz is a zip archive and this file is not one"
    raise DataError(
        f"{path} is not an .npz file ({what}); save the images and labels with "
        "numpy.savez(PATH, x=images, y=labels)"
    )


def _nchw(x: Array, path: Path, key: str) -> Array:
    """NCHW as stored, NHWC when the last axis is 1 or 3 (and axis 1 is not), N×H×W gains C."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{key!r} in {path} has shape {x.shape}; save images as N×C×H×W, N×H×W×C or N×H×W"
        )
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _int_labels(y: Array, path: Path, key: str) -> Array:
    """Require a 1-D array of non-negative integer labels."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"labels {key!r} in {path} are {y.dtype} with shape {y.shape}; save "
            "them as a 1-D integer array of class indices"
        )
    if y.size and y.min() < 0:
        raise DataError(f"labels {key!r} in {path} include {y.min()}; class indices start at 0")
    return y


_LOADERS: dict[str, Callable[[str, str, int | None, bool], Loaded]] = {
    "digits": _load_digits,
    "mnist": _idx_loader("MNIST", _DIGIT_CLASSES, "MNIST"),
    "fashion-mnist": _idx_loader("FashionMNIST", FASHION_MNIST_CLASSES, "FashionMNIST"),
    "cifar10": _load_cifar10,
    "folder": _load_folder,
    "npz": _load_npz,
}
