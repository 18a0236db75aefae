"""Architectures with a layer list: the places where DVERGE reads features, before ReLU.

A `FeaturePoint` names one module, whether its output or its input is the feature, and on
which call within a forward pass: torchvision's ResNet blocks apply one ReLU module twice,
so a block's pre-ReLU sum is the *input* of that module's second call. `read_features`
reads a point with a forward hook and stops the forward pass there (so no in-place ReLU can
overwrite it, and no work is spent past it). `feature_layers(model)` gives the list for
`SmallCNN`, `CifarResNet` (ResNet-20: He et al. 2016, §4.2, as in the DVERGE code) and
torchvision's ResNets (ResNet-18 included); another model provides its own by a
`feature_layers()` method. Models wrapped in `bastion.Normalized` are unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.normalized import Normalized

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
"""The normalisation of the DVERGE code (spec §6.1), for `Normalized(model, ...)`."""


@dataclass(frozen=True, eq=False)
class FeaturePoint:
    """One layer of a layer list: the `read` ("output" or "input") of `module` at its
    `call`-th call (0-based) within one forward pass."""

    module: nn.Module
    read: Literal["output", "input"] = "output"
    call: int = 0


LayerList = Callable[[nn.Module], list[FeaturePoint]]


class _Reached(Exception):
    """Raised by the hook to stop the forward pass once the feature is read."""


def read_features(model: nn.Module, x: torch.Tensor, point: FeaturePoint) -> torch.Tensor:
    """The features of `x` at `point`, with autograd as the caller has it."""
    found: list[torch.Tensor] = []
    calls = 0

    def grab(value: torch.Tensor) -> None:
        nonlocal calls
        if calls == point.call:
            found.append(value)
            raise _Reached
        calls += 1

    handle = (
        point.module.register_forward_hook(lambda _m, _i, out: grab(out))
        if point.read == "output"
        else point.module.register_forward_pre_hook(lambda _m, inp: grab(inp[0]))
    )
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not found:
        raise ConfigError(
            f"the forward pass never reached the {point.read} of call {point.call} of "
            f"{type(point.module).__name__}; check the model's layer list"
        )
    return found[0]


def feature_layers(model: nn.Module) -> list[FeaturePoint]:
    """The layer list of `model` (first layer first, the logits last)."""
    inner = model.model if isinstance(model, Normalized) else model
    own = getattr(inner, "feature_layers", None)
    if callable(own):
        points: list[FeaturePoint] = own()
        return points
    from torchvision.models import ResNet

    if isinstance(inner, ResNet):
        return torchvision_resnet_layers(inner)
    raise ConfigError(
        f"{type(inner).__name__} has no layer list; give it a feature_layers() method "
        "returning FeaturePoints, or pass layers= to dverge.train"
    )


def torchvision_resnet_layers(model: nn.Module) -> list[FeaturePoint]:
    """A torchvision ResNet's layers, before ReLU: the stem's BN, inside each block every BN
    followed by a ReLU, each block's sum (the input of the block's last ReLU call), the logits.
    ResNet-18 has 1 + 8·2 + 1 = 18."""
    points = [FeaturePoint(model.get_submodule("bn1"))]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in model.get_submodule(stage).children():
            bottleneck = hasattr(block, "conv3")
            inner = ("bn1", "bn2") if bottleneck else ("bn1",)
            points += [FeaturePoint(block.get_submodule(bn)) for bn in inner]
            points.append(FeaturePoint(block.get_submodule("relu"), "input", call=len(inner)))
    return [*points, FeaturePoint(model.get_submodule("fc"))]


class SmallCNN(nn.Module):
    """conv3×3(w) → ReLU → conv3×3(2w, /2) → ReLU → conv3×3(4w, /2) → ReLU → avgpool to 4×4
    → fc(128) → ReLU → fc(classes). Layers: the three convs and two fcs, before ReLU."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(4 * width * 16, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pool(torch.relu(self.conv3(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]

    def feature_layers(self) -> list[FeaturePoint]:
        return [FeaturePoint(m) for m in (self.conv1, self.conv2, self.conv3, self.fc1, self.fc2)]


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN, the shortcut (1×1 conv-BN when the shape changes) and a ReLU;
    `merge` marks the pre-ReLU sum so that a hook can read it."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.merge = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.merge(self.bn2(self.conv2(out)) + self.shortcut(x)))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2 (16-32-64 channels, n basic blocks per stage, global
    average pooling, fc). Its layer list has `depth` entries, numbered as the DVERGE code's
    `get_features`: 1 = stem conv-BN, then each block's first BN and its sum, last the logits."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CifarResNet depth must be 6n+2 with n >= 1 (20, 32, …), got {depth}"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        inplanes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(n):
                blocks.append(_BasicBlock(inplanes, planes, stride if k == 0 else 1))
                inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]

    def feature_layers(self) -> list[FeaturePoint]:
        points = [FeaturePoint(self.bn1)]
        for block in self.blocks.children():
            points += [FeaturePoint(block.get_submodule(n)) for n in ("bn1", "merge")]
        return [*points, FeaturePoint(self.fc)]


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The ResNet-20 of the DVERGE paper (0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_channels)
