"""Dataset loaders: every spec gives N×C×H×W float32 in [0, 1] and int64 labels, or a DataError."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bastion.data import Dataset, load_data, parse_spec
from bastion.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_RAW = SHARED / "MNIST" / "raw"
CIFAR_NPZ = SHARED / "cifar10" / "cifar10_subset.npz"
needs_mnist = pytest.mark.skipif(
    not MNIST_RAW.is_dir(), reason=f"MNIST files not found at {MNIST_RAW}"
)
needs_fashion = pytest.mark.skipif(
    not (SHARED / "FashionMNIST" / "raw").is_dir(),
    reason="Fashion-MNIST files not found under ../shared/data",
)
needs_cifar_npz = pytest.mark.skipif(
    not CIFAR_NPZ.is_file(), reason=f"CIFAR-10 subset not found at {CIFAR_NPZ}"
)


def assert_well_formed(d: Dataset, n: int, chw: tuple[int, int, int]) -> None:
    assert d.x.shape == (n, *chw) and d.x.dtype == torch.float32
    assert d.y.shape == (n,) and d.y.dtype == torch.int64
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0
    assert int(d.y.min()) >= 0 and int(d.y.max()) < d.num_classes


# -- digits -----------------------------------------------------------------------------------


def test_digits_split_is_stratified_disjoint_and_deterministic() -> None:
    train, test = load_data("digits", split="train"), load_data("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert_well_formed(train, 1347, (1, 8, 8))
    assert_well_formed(test, 450, (1, 8, 8))
    assert train.classes == [str(i) for i in range(10)]
    assert float(train.x.max()) == 1.0  # 16/16: the values are divided by 16, not 255
    train_rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    test_rows = [tuple(r) for r in test.x.flatten(1).tolist()]
    # digits holds a handful of duplicate images; a split by index keeps nearly all apart
    assert sum(r in train_rows for r in test_rows) < 10
    assert torch.equal(load_data("digits", split="test").x, test.x)
    assert set(torch.bincount(test.y).tolist()) <= {43, 44, 45, 46}  # stratified: ~45 per class


def test_n_keeps_the_first_samples_and_subset_matches() -> None:
    full = load_data("digits")
    head = load_data("digits", n=7)
    assert len(head) == 7 and torch.equal(head.x, full.x[:7]) and torch.equal(head.y, full.y[:7])
    assert torch.equal(full.subset(7).x, head.x)
    assert len(load_data("digits", n=10**6)) == len(full)
    assert "n=7" in repr(head) and "1×8×8" in repr(head)
    with pytest.raises(DataError, match="n >= 1"):
        load_data("digits", n=0)
    with pytest.raises(DataError, match="n >= 1"):
        full.subset(0)


# -- specs and arguments ----------------------------------------------------------------------


def test_parse_spec_kinds_and_errors(tmp_path: Path) -> None:
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec("mnist:~/data") == ("mnist", "~/data")
    assert parse_spec("npz:/a/b.npz#test") == ("npz", "/a/b.npz#test")
    with pytest.raises(DataError, match="unknown data spec 'imagenet:/x'.*cifar10:ROOT"):
        parse_spec("imagenet:/x")
    with pytest.raises(DataError, match="needs a path; write mnist:ROOT"):
        parse_spec("mnist:")
    with pytest.raises(DataError, match="write npz:"):
        parse_spec(str(tmp_path))  # an existing path without a kind gets a hint


def test_bad_split_and_missing_paths_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_data("digits", split="val")
    for spec in ("mnist", "fashion-mnist", "cifar10", "folder", "npz"):
        with pytest.raises(DataError, match="not found|does not exist"):
            load_data(f"{spec}:{tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="--download"):
        load_data(f"mnist:{tmp_path}")


# -- MNIST and Fashion-MNIST ------------------------------------------------------------------


@needs_mnist
def test_mnist_test_split_matches_the_published_figures() -> None:
    d = load_data(f"mnist:{SHARED}")
    assert_well_formed(d, 10000, (1, 28, 28))
    assert int(d.y[0]) == 7 and d.classes == [str(i) for i in range(10)]
    assert float(d.x.mean()) == pytest.approx(0.1325, abs=5e-4)
    assert torch.bincount(d.y).tolist()[:3] == [980, 1135, 1032]
    train = load_data(f"mnist:{SHARED}", split="train", n=100)
    assert_well_formed(train, 100, (1, 28, 28))
    assert int(train.y[0]) == 5


@needs_mnist
def test_mnist_root_may_be_the_parent_the_dataset_or_the_raw_folder(monkeypatch) -> None:
    ref = load_data(f"mnist:{SHARED}", n=50)
    for root in (SHARED / "MNIST", MNIST_RAW):
        assert torch.equal(load_data(f"mnist:{root}", n=50).x, ref.x)
    monkeypatch.setenv("HOME", str(SHARED.parent))
    assert torch.equal(load_data("mnist:~/data", n=50).x, ref.x)


@needs_mnist
def test_decompressed_layout_matches_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in MNIST_RAW.glob("t10k-*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    ours = load_data(f"mnist:{tmp_path}")
    assert torch.equal(ours.x, load_data(f"mnist:{SHARED}").x)
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
    assert torch.equal(ours.x, images[:, None].float() / 255)
    assert torch.equal(ours.y, read_label_file(str(raw / "t10k-labels-idx1-ubyte")))


@needs_mnist
def test_truncated_or_corrupt_idx_files_are_named(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in MNIST_RAW.glob("t10k-*.gz"):
        shutil.copy(gz, raw / gz.name)
    images = raw / "t10k-images-idx3-ubyte.gz"
    full = images.read_bytes()
    images.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*download"):
        load_data(f"mnist:{tmp_path}")
    # A complete gzip stream whose content is cut short: caught by the size in the header.
    images.write_bytes(gzip.compress(gzip.decompress(full)[:-100], compresslevel=1))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_data(f"mnist:{tmp_path}")
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20))  # a labels magic
    with pytest.raises(DataError, match="not an idx file"):
        load_data(f"mnist:{tmp_path}")


@needs_mnist
def test_download_asks_torchvision_only_when_files_are_missing(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    calls = []

    def fake_mnist(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for gz in MNIST_RAW.glob("t10k-*.gz"):
            shutil.copy(gz, raw / gz.name)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    d = load_data(f"mnist:{tmp_path / 'new'}", download=True, n=3)
    assert calls == [(str(tmp_path / "new"), False, True)] and int(d.y[0]) == 7
    load_data(f"mnist:{tmp_path / 'new'}", download=True, n=3)
    assert len(calls) == 1


@needs_fashion
def test_fashion_mnist_has_torchvision_class_names() -> None:
    d = load_data(f"fashion-mnist:{SHARED}")
    assert_well_formed(d, 10000, (1, 28, 28))
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert int(d.y[0]) == 9  # the first test image is an ankle boot
    assert torch.bincount(d.y).tolist() == [1000] * 10


# -- CIFAR-10 ---------------------------------------------------------------------------------


def _cifar_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    meta = {
        b"label_names": [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ],
        b"num_cases_per_batch": 4,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 and numpy 1 wrote the published files (str = bytes)."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    dtype = (
        b"cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    shape = b"".join(b"J" + struct.pack("<i", d) for d in data.shape) + b"\x86"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01"
        + shape
        + dtype
        + b"\x89T"
        + struct.pack("<I", data.nbytes)
        + data.tobytes()
        + b"tb"
    )
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return (
        b"\x80\x02}("
        + s(b"batch_label")
        + s(b"testing batch 1 of 1")
        + s(b"data")
        + array
        + s(b"labels")
        + b"]("
        + items
        + b"eu."
    )


def test_cifar10_published_layout_is_r_g_b_planes(tmp_path: Path) -> None:
    folder = _cifar_folder(tmp_path)
    data = np.zeros((4, 3072), dtype=np.uint8)
    data[2, 1 * 1024 + 5 * 32 + 7] = 200  # green plane, row 5, column 7 of image 2
    data[3, 2 * 1024 + 31 * 32 + 0] = 51  # blue plane, last row, first column of image 3
    data[0, 0] = 255
    (folder / "test_batch").write_bytes(_py2_batch(data, [3, 8, 8, 0]))
    assert pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"].shape == (
        4,
        3072,
    )  # the hand-built Python 2 pickle is itself valid
    d = load_data(f"cifar10:{tmp_path}")
    assert_well_formed(d, 4, (3, 32, 32))
    assert d.y.tolist() == [3, 8, 8, 0] and d.classes[3] == "cat"
    assert float(d.x[2, 1, 5, 7]) == pytest.approx(200 / 255)
    assert float(d.x[3, 2, 31, 0]) == pytest.approx(51 / 255)
    assert float(d.x[0, 0, 0, 0]) == 1.0
    assert int((d.x > 0).sum()) == 3
    assert torch.equal(load_data(f"cifar10:{folder}").x, d.x)  # ROOT may be the batches folder


def test_cifar10_train_reads_five_batches_pickled_by_python3(tmp_path: Path) -> None:
    folder = _cifar_folder(tmp_path)
    for i in range(1, 6):
        data = np.full((2, 3072), i, dtype=np.uint8)
        batch = {b"data": data, b"labels": [i, i]} if i % 2 else {"data": data, "labels": [i, i]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2 + i % 3))
    d = load_data(f"cifar10:{tmp_path}", split="train")
    assert d.y.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert torch.equal(d.x[:, 0, 0, 0] * 255, d.y.float())
    assert len(load_data(f"cifar10:{tmp_path}", split="train", n=3)) == 3


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    folder = _cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": _Evil(marker), b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"references (posix|os)\.system"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_data(f"cifar10:{tmp_path}")
    (folder / "test_batch").write_bytes(b"\x80\x02}(U\x04data")
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_data(f"cifar10:{tmp_path}")


@needs_cifar_npz
def test_shared_cifar10_subset_through_npz() -> None:
    d = load_data(f"npz:{CIFAR_NPZ}#test")
    assert_well_formed(d, 932, (3, 32, 32))
    assert d.classes[:3] == ["airplane", "automobile", "bird"] and d.split == "test"
    raw = np.load(CIFAR_NPZ)
    assert d.y.tolist() == raw["y_test"].astype(int).tolist()
    assert float(d.x[5, 2, 10, 20]) == pytest.approx(raw["x_test"][5, 10, 20, 2] / 255)


# -- folder -----------------------------------------------------------------------------------


def test_folder_reads_classes_in_sorted_order(tmp_path: Path) -> None:
    for cls, value in (("dog", 200), ("cat", 10)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 4), value + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = load_data(f"folder:{tmp_path}")
    assert_well_formed(d, 4, (1, 5, 4))
    assert d.classes == ["cat", "dog"] and d.y.tolist() == [0, 0, 1, 1]
    assert (d.x[:, 0, 0, 0] * 255).round().tolist() == [10, 11, 200, 201]
    # One colour image makes the set RGB; the grey ones repeat into three equal channels.
    rgb = np.zeros((5, 4, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "dog" / "2.png")
    d = load_data(f"folder:{tmp_path}")
    assert d.x.shape == (5, 3, 5, 4)
    assert d.x[4, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(d.x[0, 0], d.x[0, 2])


def test_folder_refuses_mixed_sizes_and_empty_trees(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(f"folder:{tmp_path}")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "a" / "y.png")
    with pytest.raises(DataError, match="y.png is 9×8 but .*x.png is 8×8; resize"):
        load_data(f"folder:{tmp_path}")
    (tmp_path / "a" / "z.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*z.png"):
        load_data(f"folder:{tmp_path}")


# -- npz --------------------------------------------------------------------------------------


def test_npz_layouts_and_uint8_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(6, 3, 5, 4), dtype=np.uint8)
    y = np.arange(6) % 3
    np.savez(tmp_path / "nchw.npz", x=nchw, y=y)
    np.savez(tmp_path / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1), y=y)
    np.savez(tmp_path / "nhw.npz", x=nchw[:, 0], y=y, x_val=nchw[:2] / 255.0, y_val=y[:2])
    a, b = load_data(f"npz:{tmp_path / 'nchw.npz'}"), load_data(f"npz:{tmp_path / 'nhwc.npz'}")
    assert_well_formed(a, 6, (3, 5, 4))
    assert torch.equal(a.x, b.x) and torch.equal(a.x, torch.from_numpy(nchw).float() / 255)
    assert a.classes == ["0", "1", "2"]
    c = load_data(f"npz:{tmp_path / 'nhw.npz'}")
    assert torch.equal(c.x, a.x[:, :1])
    v = load_data(f"npz:{tmp_path / 'nhw.npz'}#val")
    assert torch.allclose(v.x, a.x[:2]) and v.y.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.full((2, 1, 3, 3), 2.0), "y": np.zeros(2, int)},
            r"span \[2, 2\].*scale to \[0, 1\]",
        ),
        ({"x": np.full((2, 1, 3, 3), np.nan), "y": np.zeros(2, int)}, "NaN"),
        ({"x": np.zeros((2, 1, 3, 3), np.int32), "y": np.zeros(2, int)}, "dtype int32"),
        ({"x": np.zeros((2, 1, 3, 3)), "y": np.zeros(2)}, "integer array"),
        ({"x": np.zeros((2, 1, 3, 3)), "y": np.zeros(3, int)}, "one label per image"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2, int)}, "shape"),
        ({"images": np.zeros((2, 1, 3, 3)), "y": np.zeros(2, int)}, "no array 'x'.*holds images"),
        ({"x": np.zeros((2, 1, 3, 3)), "y": np.array([0, -1])}, "start at 0"),
        (
            {"x": np.zeros((2, 1, 3, 3)), "y": np.array([0, 1]), "label_names": np.array(["a"])},
            "2 classes|1 classes",
        ),
    ],
)
def test_npz_problems_are_data_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_refuses_object_arrays_and_missing_names(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.array([object()]), y=np.zeros(1, int))
    with pytest.raises(DataError, match="no object arrays"):
        load_data(f"npz:{tmp_path / 'o.npz'}")
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 1, 2, 2)), y=np.zeros(1, int))
    with pytest.raises(DataError, match="no array 'x_test'.*npz:PATH#NAME"):
        load_data(f"npz:{tmp_path / 'd.npz'}#test")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not an .npz file .an .npz is a zip archive"):
        load_data(f"npz:{tmp_path / 'bad.npz'}")
