"""Network extraction from nn.Module, TorchScript, torch.export and ONNX, checked against the
models themselves (and onnxruntime for the VNN-COMP networks)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from torch import nn

from bastion.errors import ModelLoadError
from bastion.normalized import Normalized
from bastion.verify.extract import UnsupportedLayerError, check_network, extract, load_network
from bastion.verify.network import (
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    MaxPool2d,
    Network,
    ReLU,
)

VNN = SHARED_DATA / "vnncomp2021"
needs_vnncomp = pytest.mark.skipif(not VNN.is_dir(), reason=f"no VNN-COMP files under {VNN}")
DEMO_LAYERS = [Conv2d, ReLU, Conv2d, ReLU, MaxPool2d, Flatten, Dense, ReLU, Dense]


def _kinds(net: Network) -> list[type]:
    return [type(layer) for layer in net.layers]


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated from torch 2.14 on
        return torch.jit.script(model)


def _trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, x)


def _assert_same(net: Network, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
    got = net.forward(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


class BnPoolNet(nn.Module):
    """Conv → BN → ReLU → AvgPool → MaxPool → Dropout → flatten by view → Linear → BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        self.bn1 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.conv(x))))
        x = self.drop(F.max_pool2d(x, 2))
        return self.bn1(self.fc(x.view(x.size(0), -1)))


@pytest.fixture(scope="module")
def bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = BnPoolNet()
    for bn in (net.bn, net.bn1):  # running statistics far from the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return net.eval()


def test_demo_model_from_module_script_trace_and_export(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.x[:64]
    example = x[:1]
    forms = {
        "module": (demo, (1, 8, 8)),
        "script": (_script(demo), (1, 8, 8)),
        "trace": (_trace(demo, example), None),
        "export": (torch.export.export(demo, (example,)), None),
    }
    for name, (model, shape) in forms.items():
        net = extract(model, shape)
        assert _kinds(net) == DEMO_LAYERS, name
        assert net.input_shape == (1, 8, 8) and net.num_outputs == 10
        assert torch.equal(net.layers[0].weight, demo.features[0].weight)  # float32, untouched
        _assert_same(net, demo, x)
        assert torch.equal(net.forward(x).argmax(1), demo(x).argmax(1))


def test_normalized_model_starts_with_its_elementwise_layer(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    model = Normalized(demo, mean=0.5, std=0.25).eval()
    net = extract(model, (1, 8, 8))
    assert _kinds(net) == [Elementwise, *DEMO_LAYERS]
    first = net.layers[0]
    assert isinstance(first, Elementwise)
    # 0.25 is a power of two: (x − 0.5)/0.25 folds exactly, so the layer carries no radius
    assert torch.equal(first.scale.double(), torch.full((1, 8, 8), 4.0, dtype=torch.float64))
    assert torch.equal(first.shift.double(), torch.full((1, 8, 8), -2.0, dtype=torch.float64))
    assert first.err is None
    _assert_same(net, model, digits.x[:32])
    exported = extract(torch.export.export(model, (digits.x[:1],)))
    assert _kinds(exported) == _kinds(net)


def test_batchnorm_is_folded_and_pooling_kept_in_every_form(bn_net: nn.Module) -> None:
    x = torch.rand(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    want = [Conv2d, ReLU, AvgPool2d, MaxPool2d, Flatten, Dense]
    forms = {
        "module": (bn_net, (2, 8, 8)),
        "script": (_script(bn_net), (2, 8, 8)),
        "trace": (_trace(bn_net, x[:2]), None),
        "export": (torch.export.export(bn_net, (x[:2],)), None),
    }
    for name, (model, shape) in forms.items():
        net = extract(model, shape)
        assert _kinds(net) == want, name
        _assert_same(net, bn_net, x)
    # BatchNorm with nothing before it to fold into becomes an Elementwise layer
    lone = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).eval()
    lone[0].running_mean.fill_(0.5)
    net = extract(lone, (3,))
    assert _kinds(net) == [Elementwise, ReLU, Dense]
    _assert_same(net, lone, torch.rand(8, 3))


def test_constants_and_functional_calls_in_a_custom_forward() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)
            self.register_buffer("offset", torch.linspace(-1, 1, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (torch.flatten(x, 1) - self.offset) * 2.0
            x = torch.relu(self.fc1(x) + 1.0)
            return 3.0 - self.fc2(x).reshape(-1, 2) / 4

    model = Custom().eval()
    net = extract(model, (2, 3))
    assert _kinds(net) == [Flatten, Elementwise, Dense, ReLU, Dense]  # constants folded
    _assert_same(net, model, torch.randn(8, 2, 3))


@pytest.mark.parametrize(
    ("model", "name", "position"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), "Sigmoid", 1),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LSTM(4, 4)), "LSTM", 2),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh()), "Tanh", 3),
    ],
)
def test_unsupported_layer_is_named_with_its_position(
    model: nn.Module, name: str, position: int
) -> None:
    with pytest.raises(
        UnsupportedLayerError, match=f"unsupported layer {name} at position {position}"
    ) as err:
        extract(model.eval(), (4,))
    assert "supported: Linear" in str(err.value)
    with pytest.raises(UnsupportedLayerError, match=f"at position {position}"):
        extract(_trace(model.eval(), torch.rand(1, 4)))


def test_branches_missing_shapes_and_wrong_networks_are_errors(demo: nn.Module) -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.fc(x)

    with pytest.raises(UnsupportedLayerError, match="mul of two activations"):
        extract(Gate(), (4,))
    with pytest.raises(ModelLoadError, match="pass input_shape"):
        extract(demo)
    with pytest.raises(ModelLoadError, match="expects 512 inputs but receives shape"):
        extract(demo, (1, 9, 7))

    class BatchDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.size(0) > 1:
                return x
            return -x

    with pytest.raises(ModelLoadError, match="cannot trace BatchDependent.forward"):
        extract(BatchDependent(), (4,))
    with pytest.raises(ModelLoadError, match="branches on a value that depends on its input"):
        extract(_script(BatchDependent()), (4,))
    net = extract(demo, (1, 8, 8))
    with pytest.raises(ModelLoadError, match="pass the right input_shape"):
        check_network(net, lambda x: demo(x[:, :, :4]))
    with pytest.raises(ModelLoadError, match="differs from the model by"):
        check_network(net, lambda x: demo(x) + 1e-3)


def test_saved_model_files_load_as_networks(demo: nn.Module, tmp_path: Path) -> None:
    example = torch.rand(1, 1, 8, 8)
    torch.export.save(torch.export.export(demo, (example,)), tmp_path / "demo.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_trace(demo, example), tmp_path / "demo.ts")
    for name in ("demo.pt2", "demo.ts"):
        # a saved TorchScript file no longer records the traced input's shape
        net = load_network(tmp_path / name, input_shape=(1, 8, 8) if name == "demo.ts" else None)
        assert _kinds(net) == DEMO_LAYERS and net.input_shape == (1, 8, 8)


# --- ONNX -------------------------------------------------------------------------------


def _ort_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))]
    return torch.cat([torch.from_numpy(o).reshape(1, -1) for o in outs])


@needs_vnncomp
def test_mnistfc_onnx_matches_onnxruntime_and_its_property() -> None:
    pytest.importorskip("onnx")
    from bastion.verify.onnx_graph import read_onnx
    from bastion.verify.vnnlib import read_vnnlib

    path = VNN / "mnistfc" / "mnist-net_256x2.onnx"
    net = read_onnx(path)
    assert net.input_shape == (784, 1)
    assert _kinds(net) == [Flatten, Dense, ReLU, Dense, ReLU, Dense]
    x = torch.rand(6, 784, 1, generator=torch.Generator().manual_seed(2))
    want = _ort_outputs(path, x)
    assert (net.forward(x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # X_i is the flattened input: the box centre is the test image, classified as its label
    prop_path = VNN / "mnistfc" / "prop_0_0.03.vnnlib"
    label = int(re.search(r"label: (\d+)", prop_path.read_text())[1])  # type: ignore[index]
    (prop,) = read_vnnlib(prop_path, net.input_shape, net.num_outputs)
    centre = ((prop.lower + prop.upper) / 2).float().unsqueeze(0)
    y = net.forward(centre)
    assert y.argmax().item() == label and prop.violation(y).item() < 0


@needs_vnncomp
def test_acasxu_onnx_with_weights_among_inputs_matches_onnxruntime() -> None:
    pytest.importorskip("onnx")
    from bastion.verify.onnx_graph import read_onnx
    from bastion.verify.vnnlib import read_vnnlib

    path = VNN / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"
    net = load_network(path)
    assert net.input_shape == (1, 1, 5)
    assert _kinds(net) == [Elementwise, Flatten] + [Dense, ReLU] * 6 + [Dense]
    x = torch.rand(6, 1, 1, 5, generator=torch.Generator().manual_seed(3)) - 0.5
    want = _ort_outputs(path, x)
    assert (net.forward(x) - want).abs().max().item() <= 1e-5 * max(1, want.abs().max().item())
    # the property's box has the network's input shape; its corners run through both
    (prop,) = read_vnnlib(VNN / "acasxu" / "prop_1.vnnlib", net.input_shape, net.num_outputs)
    corners = torch.stack([prop.lower, prop.upper]).float()
    assert torch.allclose(net.forward(corners), _ort_outputs(path, corners), rtol=1e-5, atol=1e-6)
    # every ACAS Xu network reads (read_onnx itself compares it with onnxruntime)
    others = sorted((VNN / "acasxu").glob("ACASXU_*.onnx"))
    assert len(others) == 45
    assert all(len(read_onnx(p).layers) == 15 for p in others)


def test_torch_exported_onnx_convnet_and_unsupported_operator(
    bn_net: nn.Module, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    from bastion.verify.onnx_graph import read_onnx

    x = torch.rand(4, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        torch.onnx.export(
            bn_net, (x[:1],), tmp_path / "bn.onnx", dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},  # x.view(x.size(0), -1): Shape-Gather-…
        )  # fmt: skip
        sigmoid = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
        torch.onnx.export(sigmoid, (torch.rand(1, 3),), tmp_path / "s.onnx", dynamo=False)
    net = read_onnx(tmp_path / "bn.onnx")
    assert _kinds(net) == [Conv2d, ReLU, AvgPool2d, MaxPool2d, Flatten, Dense]
    _assert_same(net, bn_net, x)
    with pytest.raises(UnsupportedLayerError, match="unsupported layer Sigmoid at position 1"):
        read_onnx(tmp_path / "s.onnx")


class _Block(nn.Module):
    """A residual block as ResNets write it: conv, BatchNorm, ReLU, conv, BatchNorm, plus a
    shortcut (a 1×1 conv and BatchNorm, or the identity), then ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return torch.relu(out)


def test_residual_blocks_read_as_add_layers_that_match_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        _Block(2, 3), _Block(3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net = extract(model, (2, 4, 4))
    adds = [layer for layer in net.layers if isinstance(layer, Add)]
    assert len(adds) == 2 and len(adds[0].shortcut) == 1 and adds[1].shortcut == ()
    x = torch.rand(6, 2, 4, 4)
    with torch.no_grad():
        assert torch.allclose(net.forward(x), model(x), atol=1e-5)
