"""ONNX files as `torch.onnx.export` writes them load: legacy (`dynamo=False`) and dynamo
exporters, opsets 13–20; MLPs and CNNs with BatchNorm for the verifier, a torchvision
ResNet-18 for the attacks (`bastion.load_model`), each compared with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

import bastion
from bastion.verify.chain import UnsupportedLayerError
from bastion.verify.network import Conv2d, Dense
from bastion.verify.onnx_graph import read_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

LEGACY_OPSETS = (13, 17, 20)
DYNAMO_OPSETS = (18, 20)  # the dynamo exporter writes opset 18 when asked for less


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool,
            fold: bool = True) -> Path:  # fmt: skip
    """`torch.onnx.export` with a dynamic batch, quietly (both exporters print and warn)."""
    if dynamo and not _has_onnxscript():
        pytest.skip("the dynamo exporter needs onnxscript")
    kwargs: dict[str, object] = (
        {"dynamic_shapes": ({0: torch.export.Dim("batch")},), "external_data": False}
        if dynamo
        else {"dynamic_axes": {"x": {0: "batch"}}, "do_constant_folding": fold}
    )
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=dynamo,
                          opset_version=opset, input_names=["x"], **kwargs)  # fmt: skip
    return path


def _onnxruntime(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options)
    name = session.get_inputs()[0].name
    out: np.ndarray = session.run(None, {name: x.numpy()})[0]
    return out


def _with_bn_statistics(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _mlp(fresh_bn: bool) -> nn.Module:
    """Two equal BatchNorm1d: fresh (equal parameters, which the legacy exporter shares
    through Identity nodes) or with random statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip
    return model.eval() if fresh_bn else _with_bn_statistics(model, 1)


class _CNN(nn.Module):
    """Conv-BN-ReLU-MaxPool-Conv-BN-ReLU, then `x.view(x.size(0), -1)` (the legacy
    exporter's Shape/Gather/Unsqueeze/Concat/Reshape pattern) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.view(x.size(0), -1))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return _with_bn_statistics(_CNN(), 2)


def _assert_loads_like_onnxruntime(path: Path, x: torch.Tensor, layers: tuple[type, ...]) -> None:
    want = _onnxruntime(path, x)
    net = read_onnx(path)  # also checks itself against onnxruntime
    assert tuple(type(la) for la in net.layers if isinstance(la, Dense | Conv2d)) == layers
    np.testing.assert_allclose(net.forward(x).numpy(), want, rtol=0, atol=1e-5)
    model = bastion.load_model(path)
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("opset", LEGACY_OPSETS)
@pytest.mark.parametrize("fresh_bn", [True, False], ids=["shared-constants", "bn-statistics"])
def test_legacy_mlp_with_batchnorm_loads(tmp_path: Path, opset: int, fresh_bn: bool) -> None:
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    path = _export(_mlp(fresh_bn), x[:2], tmp_path / "mlp.onnx", opset, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" in ops and ("Identity" in ops) == fresh_bn  # the pattern is there
    _assert_loads_like_onnxruntime(path, x, (Dense, Dense, Dense))


@pytest.mark.parametrize("opset", DYNAMO_OPSETS)
def test_dynamo_mlp_with_batchnorm_loads(tmp_path: Path, opset: int) -> None:
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    path = _export(_mlp(False), x[:2], tmp_path / "mlp.onnx", opset, dynamo=True)
    _assert_loads_like_onnxruntime(path, x, (Dense, Dense, Dense))


@pytest.mark.parametrize("opset", LEGACY_OPSETS)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_legacy_cnn_with_batchnorm_loads(tmp_path: Path, opset: int, fold: bool) -> None:
    """With constant folding off, the BatchNormalization nodes stay in the file (and the
    shape pattern keeps its Constant nodes)."""
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    path = _export(_cnn(), x[:2], tmp_path / "cnn.onnx", opset, dynamo=False, fold=fold)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    assert ("BatchNormalization" in ops) == (not fold)
    _assert_loads_like_onnxruntime(path, x, (Conv2d, Conv2d, Dense))


@pytest.mark.parametrize("opset", DYNAMO_OPSETS)
def test_dynamo_cnn_with_batchnorm_loads(tmp_path: Path, opset: int) -> None:
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    path = _export(_cnn(), x[:2], tmp_path / "cnn.onnx", opset, dynamo=True)
    _assert_loads_like_onnxruntime(path, x, (Conv2d, Conv2d, Dense))


def _resnet18_file(tmp_path: Path, opset: int, dynamo: bool) -> tuple[Path, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)  # fresh BatchNorms
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    return _export(model, x[:2], tmp_path / "resnet18.onnx", opset, dynamo), x


def _assert_resnet18_loads(path: Path, x: torch.Tensor) -> None:
    model = bastion.load_model(path)
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, _onnxruntime(path, x), rtol=0, atol=1e-4)
    # residual joins are read now; the stem's padded max-pool is what the verifier refuses
    with pytest.raises(UnsupportedLayerError, match=r"MaxPool2d with padding") as exc:
        read_onnx(path)
    assert "\n" not in str(exc.value)


def test_resnet18_legacy_opset20_loads_for_attacks_and_verifier_refuses_it(
    tmp_path: Path,
) -> None:
    """The legacy exporter shares equal parameters through Identity nodes on initializers
    (onnx2torch: "onnx::Conv_197" missing) and opset 20 gives Identity version 19, which
    onnx2torch lacks; both used to fail."""
    path, x = _resnet18_file(tmp_path, 20, dynamo=False)
    assert "Identity" in {n.op_type for n in onnx.load(str(path)).graph.node}
    _assert_resnet18_loads(path, x)


@pytest.mark.slow
@pytest.mark.parametrize(("opset", "dynamo"), [(13, False), (17, False), (18, True), (20, True)])
def test_resnet18_other_exports_load(tmp_path: Path, opset: int, dynamo: bool) -> None:
    _assert_resnet18_loads(*_resnet18_file(tmp_path, opset, dynamo))


def test_unconvertible_onnx_is_one_line(tmp_path: Path) -> None:
    """An operator onnx2torch lacks is named, with the opset, in one sentence."""
    from onnx import TensorProto, helper

    node = helper.make_node("Hardmax", ["x"], ["y"], axis=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    path = tmp_path / "hardmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(bastion.ModelLoadError, match="Hardmax") as exc:
        bastion.load_model(path)
    assert "\n" not in str(exc.value) and "opset 13" in str(exc.value)


def test_conversion_that_differs_from_onnxruntime_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_model runs the converted module beside onnxruntime: a converter that misreads
    the graph (here: one whose output is off by 1e-3) is an error, not a silently
    different model."""
    import onnx2torch

    x = torch.rand(2, 1, 4, 4)
    path = _export(_mlp(False), x, tmp_path / "mlp.onnx", 17, dynamo=False)
    convert = onnx2torch.convert

    class _Off(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1e-3

    monkeypatch.setattr(onnx2torch, "convert", lambda proto: _Off(convert(proto)))
    with pytest.raises(bastion.ModelLoadError, match="differs from onnxruntime") as exc:
        bastion.load_model(path)
    assert "\n" not in str(exc.value)
    monkeypatch.undo()
    bastion.load_model(path)  # the real conversion passes the same check


def test_batchnorm_node_is_not_folded_lossily(tmp_path: Path) -> None:
    """Issue 13's BatchNorm (running_mean 1000, running_var 0: a scale of ~316) exported with
    its BatchNormalization node: the verifier reads it as the torch reader does, folded in
    float64 with a proven radius (`err`), never rounded into float32 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(1000.0)
        model[1].running_var.fill_(0.0)
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(7))
    path = _export(model, x[:2], tmp_path / "bn.onnx", 17, dynamo=False, fold=False)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    net = read_onnx(path)
    folded = net.layers[0]
    assert isinstance(folded, Dense) and folded.err is not None
    assert folded.weight.dtype == torch.float64
    np.testing.assert_allclose(net.forward(x.double()).numpy(), _onnxruntime(path, x), rtol=1e-5)


@pytest.mark.parametrize(
    "name", ["acasxu/ACASXU_run2a_1_1_batch_2000.onnx", "mnistfc/mnist-net_256x2.onnx"]
)
def test_old_opset_vnncomp_files_load_for_attacks(name: str) -> None:
    """Opsets 8 and 9 (ACAS Xu's Flatten version 1 has no onnx2torch converter) are raised
    to 13 before conversion; outputs equal onnxruntime's."""
    path = SHARED_DATA / "vnncomp2021" / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    proto = onnx.load(str(path))
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = bastion.load_model(path)(x).numpy()
    np.testing.assert_allclose(got.reshape(1, -1), _onnxruntime(path, x).reshape(1, -1), atol=1e-4)
