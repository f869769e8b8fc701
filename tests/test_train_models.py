import pytest
import torch
from torch import nn

from convspec.train.models import build_model, parse_model_name, upgrade_model_keys


def _weight_layers(model):
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))]


@pytest.mark.parametrize("name,depth", [("convnet-20", 20), ("convnet-38", 38),
                                        ("preact-resnet-68", 68), ("preact-resnet-14", 14)])
def test_depth_counts_weight_layers(name, depth):
    model = build_model(name, num_classes=10, in_channels=3)
    assert len(_weight_layers(model)) == depth
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_28_10_parameter_count():
    model = build_model("wrn-28-10")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 36.5e6) < 0.1e6


def test_input_channels_and_classes_follow_the_data():
    model = build_model("convnet-8", num_classes=4, in_channels=1)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 4)


@pytest.mark.parametrize("name,msg", [
    ("convnet-21", "6X\\+2"), ("preact-resnet-6", "6X\\+2"), ("wrn-27-10", "6n\\+4"),
    ("convnet-20-2", "no widen factor"), ("wrn-28-0", "widen factor"), ("vgg-16", "unknown model"),
    ("wrn-28", "needs its widen factor: wrn-D-W, e.g. wrn-28-10"), ("convnet-020", "unknown"),
    ("convnet", "needs its depth in the name: convnet-D"), ("wrn", "wrn-D-W"),
    ("preact_resnet-68", "now written 'preact-resnet-68'"), ("preact_resnet", "preact-resnet-68"),
    ("", "unknown model"), (20, "not a name"),
])
def test_bad_model_names(name, msg):
    with pytest.raises(ValueError, match=msg):
        build_model(name)


def test_names_round_trip():
    for name in ("convnet-8", "convnet-20", "preact-resnet-68", "wrn-16-1", "wrn-28-10"):
        assert parse_model_name(name).name == name


@pytest.mark.parametrize("old,new", [
    ({"model": "convnet", "depth": 20, "width": 1}, "convnet-20"),
    ({"model": "preact_resnet", "depth": 68, "width": 1}, "preact-resnet-68"),
    ({"model": "wrn", "depth": 28, "width": 10}, "wrn-28-10"),
    ({"model": "wrn", "depth": 16}, "wrn-16-1"),  # the old default width
    ({"model": "convnet-8"}, "convnet-8"),  # already the new naming
])
def test_old_config_keys_are_upgraded(old, new):
    cfg = {"data": "synthetic", **old, "seed": 3}
    up = upgrade_model_keys(cfg)
    assert up == {"data": "synthetic", "model": new, "seed": 3}
    assert list(up) == ["data", "model", "seed"]  # the model keeps its place
    assert "depth" in cfg or "depth" not in old  # the input is not changed
