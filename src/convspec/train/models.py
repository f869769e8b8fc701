"""The architectures of Jia et al. (2017): plain ConvNets, pre-activation ResNets, Wide ResNets.

``depth`` counts weight layers as the papers do: convolutions on the main path plus the final
fully connected layer (1x1 projection shortcuts are not counted). Models are named with their
size, as in the papers: ``convnet-20``, ``preact-resnet-68``, ``wrn-28-10`` (Note [model names]).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Mapping, NamedTuple, Optional

import torch
from torch import nn



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
        raise ValueError("convnet has no width multiplier (only wrn has one)")
    return ConvNet(depth, num_classes, in_channels)


def preact_resnet(depth: int = 68, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if width != 1:
        raise ValueError("preact-resnet has no width multiplier (only wrn has one)")
    return PreActResNet(_x_of(depth, "preact-resnet"), 1, num_classes, in_channels)


def wrn(depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Wide ResNet-``depth``-``width`` (Zagoruyko & Komodakis, 2016): ``depth = 6n + 4``."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"wrn depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
    if width < 1:
        raise ValueError(f"wrn width must be >= 1, got {width}")
    return PreActResNet((depth - 4) // 6, width, num_classes, in_channels)


REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "convnet": convnet,
    "preact-resnet": preact_resnet,
    "wrn": wrn,
}

# Note [model names]: one name carries the architecture and its size, as the papers write it
# (ConvNet-20, PreAct-ResNet-68, WRN-28-10), in every command, config file and record:
# ``convnet-D`` and ``preact-resnet-D`` (D = 6X+2 weight layers), ``wrn-D-W`` (D = 6n+4, widen
# factor W). Run directories written before this naming stored ``model`` (a family: ``convnet``,
# ``preact_resnet``, ``wrn``), ``depth`` and ``width``; :func:`upgrade_model_keys` reads them.
MODEL_NAME_FORMS = "convnet-D, preact-resnet-D (D = 6X+2) or wrn-D-W (D = 6n+4)"
MODEL_EXAMPLES = "convnet-20, convnet-38, preact-resnet-68, wrn-28-10"
_NAME = re.compile(r"^(convnet|preact-resnet|wrn)-([1-9][0-9]*)(?:-([1-9][0-9]*|0))?$")
#: The family names of the old ``--model FAMILY --depth D --width W`` form.
LEGACY_FAMILIES = {"convnet": "convnet", "preact_resnet": "preact-resnet", "wrn": "wrn"}
_LEGACY_DEFAULTS = {"depth": 20, "width": 1}  # the old TrainConfig defaults


class ModelSpec(NamedTuple):
    family: str  # a key of REGISTRY
    depth: int
    width: int

    @property
    def name(self) -> str:
        return model_name(self.family, self.depth, self.width)


def model_name(family: str, depth: int, width: int = 1) -> str:
    """The name of a registry model: ``('wrn', 28, 10)`` -> ``'wrn-28-10'``."""
    family = LEGACY_FAMILIES.get(family, family)
    return f"{family}-{depth}-{width}" if family == "wrn" else f"{family}-{depth}"


def _example(family: str) -> str:
    return {"convnet": "convnet-20", "preact-resnet": "preact-resnet-68"}.get(family, "wrn-28-10")


def parse_model_name(name: object) -> ModelSpec:
    """``'wrn-28-10'`` -> ``ModelSpec('wrn', 28, 10)``, after checking the depth and width.

    A ``ValueError`` says what is wrong and, for the old spellings (``convnet``,
    ``preact_resnet-68``), the name to write instead.

    >>> parse_model_name("preact-resnet-68")
    ModelSpec(family='preact-resnet', depth=68, width=1)
    >>> parse_model_name("convnet")
    Traceback (most recent call last):
    ...
    ValueError: model 'convnet' needs its depth in the name: convnet-D (D = 6X+2), e.g. convnet-20
    """
    if not isinstance(name, str):
        raise ValueError(f"model {name!r} is not a name such as {MODEL_EXAMPLES}")
    m = _NAME.match(name)
    if m is None:
        text = name.replace("_", "-")
        if text in REGISTRY:  # a bare family
            form = "wrn-D-W (D = 6n+4, W the widen factor)" if text == "wrn" else f"{text}-D (D = 6X+2)"
            raise ValueError(f"model {name!r} needs its depth in the name: {form}, e.g. "
                             f"{_example(text)}")
        if text != name and _NAME.match(text):
            raise ValueError(f"model {name!r} is now written {text!r}")
        raise ValueError(f"unknown model {name!r}: expected {MODEL_NAME_FORMS}, e.g. "
                         f"{MODEL_EXAMPLES}")
    family, depth = m.group(1), int(m.group(2))
    if family == "wrn":
        if m.group(3) is None:
            raise ValueError(f"model {name!r} needs its widen factor: wrn-D-W, e.g. {name}-10 "
                             "(W = 1 for no widening)")
        width = int(m.group(3))
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model {name!r}: the depth of wrn-D-W must be 6n+4 (10, 16, 22, 28, "
                             f"...), got {depth}")
        if width < 1:
            raise ValueError(f"model {name!r}: the widen factor W of wrn-D-W must be >= 1")
        return ModelSpec(family, depth, width)
    if m.group(3) is not None:
        raise ValueError(f"model {name!r}: {family} has no widen factor (only wrn-D-W has one); "
                         f"write {family}-{depth}")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model {name!r}: the depth of {family}-D must be 6X+2 (8, 14, 20, 38, "
                         f"68, ...), got {depth}")
    return ModelSpec(family, depth, 1)


def legacy_model_name(values: Mapping) -> Optional[str]:
    """The model name that the old keys in ``values`` (``model`` a family, ``depth``,
    ``width``) stand for, or None if ``values`` uses the current naming. Missing old keys take
    their old defaults (depth 20, width 1)."""
    model = values.get("model", "convnet")
    if "depth" not in values and "width" not in values and model not in LEGACY_FAMILIES:
        return None
    family = LEGACY_FAMILIES.get(model, model) if isinstance(model, str) else model
    depth = values.get("depth", _LEGACY_DEFAULTS["depth"])
    width = values.get("width", _LEGACY_DEFAULTS["width"])
    return model_name(str(family), depth, width)


def upgrade_model_keys(config: Mapping) -> Dict:
    """A copy of a stored config with the old ``model``/``depth``/``width`` keys replaced by
    the one model name (Note [model names]); a config in the current naming comes back equal.

    >>> upgrade_model_keys({"model": "preact_resnet", "depth": 68, "width": 1, "seed": 0})
    {'model': 'preact-resnet-68', 'seed': 0}
    """
    name = legacy_model_name(config)
    if name is None:
        return dict(config)
    out = {k: (name if k == "model" else v) for k, v in config.items() if k not in ("depth", "width")}
    out.setdefault("model", name)
    return out


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The registry model ``name`` (Note [model names]), e.g. ``build_model('wrn-28-10')``;
    ``ValueError`` for an unknown name or a bad depth or width."""
    spec = parse_model_name(name)
    return REGISTRY[spec.family](depth=spec.depth, width=spec.width, num_classes=num_classes,
                                 in_channels=in_channels)
