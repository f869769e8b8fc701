"""The architectures of Jia et al. (2017): plain ConvNets, pre-activation ResNets, Wide ResNets.

``depth`` counts weight layers as the papers do: convolutions on the main path plus the final
fully connected layer (1x1 projection shortcuts are not counted).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

MODELS = ("convnet", "preact_resnet", "wrn")


def _x_of(depth: int, name: str) -> int:
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"{name} depth must be 6X+2 with X >= 1 (8, 14, 20, 38, 68, ...), got {depth}")
    return (depth - 2) // 6


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ConvNet(nn.Module):
    """Plain ConvNet of ``6X + 2`` layers: a 16-filter 3x3 stem, three stages of ``2X`` 3x3 conv
    layers with 16 / 32 / 64 filters (the first conv of stages 2 and 3 has stride 2), each
    followed by BatchNorm and ReLU, then global average pooling and a linear classifier."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        x = _x_of(depth, "convnet")
        layers = [_conv3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(2 * x):
                stride = 2 if stage > 0 and i == 0 else 1
                layers += [_conv3(cin, width, stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity shortcut, or a 1x1 projection (applied to
    the pre-activated input) when the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + short


class PreActResNet(nn.Module):
    """Pre-activation ResNet: a 3x3 stem, three stages of ``blocks`` pre-activation blocks of
    widths ``16k, 32k, 64k`` (stride 2 at the start of stages 2 and 3), BN-ReLU, global average
    pooling and a linear classifier. ``6 * blocks + 2`` weight layers."""

    def __init__(self, blocks: int, widen: int = 1, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, stem: int = 16):
        super().__init__()
        self.stem = _conv3(in_channels, stem)
        stages, cin = [], stem
        for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stages.append(PreActBlock(cin, width, stride, dropout))
                cin = width
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def convnet(depth: int = 20, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if width != 1:
        raise ValueError("convnet has no width multiplier (--width applies to wrn only)")
    return ConvNet(depth, num_classes, in_channels)


def preact_resnet(depth: int = 68, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if width != 1:
        raise ValueError("preact_resnet has no width multiplier (--width applies to wrn only)")
    return PreActResNet(_x_of(depth, "preact_resnet"), 1, num_classes, in_channels)


def wrn(depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Wide ResNet-``depth``-``width`` (Zagoruyko & Komodakis, 2016): ``depth = 6n + 4``."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"wrn depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
    if width < 1:
        raise ValueError(f"wrn width must be >= 1, got {width}")
    return PreActResNet((depth - 4) // 6, width, num_classes, in_channels)


REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "convnet": convnet,
    "preact_resnet": preact_resnet,
    "wrn": wrn,
}


def build_model(name: str, depth: int, width: int = 1, num_classes: int = 10,
                in_channels: int = 3) -> nn.Module:
    """A model of :data:`MODELS` by name; ``ValueError`` for an unknown name or a bad depth."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return REGISTRY[name](depth=depth, width=width, num_classes=num_classes, in_channels=in_channels)
