import pytest
import torch
from torch import nn

from convspec.train.models import build_model


def _weight_layers(model):
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))]


@pytest.mark.parametrize("name,depth,width", [("convnet", 20, 1), ("convnet", 38, 1),
                                              ("preact_resnet", 68, 1), ("preact_resnet", 14, 1)])
def test_depth_counts_weight_layers(name, depth, width):
    model = build_model(name, depth, width, num_classes=10, in_channels=3)
    assert len(_weight_layers(model)) == depth
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_28_10_parameter_count():
    model = build_model("wrn", 28, 10)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 36.5e6) < 0.1e6


def test_input_channels_and_classes_follow_the_data():
    model = build_model("convnet", 8, 1, num_classes=4, in_channels=1)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 4)


@pytest.mark.parametrize("name,depth,width,msg", [
    ("convnet", 21, 1, "6X\\+2"), ("preact_resnet", 6, 1, "6X\\+2"), ("wrn", 27, 10, "6n\\+4"),
    ("convnet", 20, 2, "width"), ("vgg", 16, 1, "unknown model"),
])
def test_bad_model_arguments(name, depth, width, msg):
    with pytest.raises(ValueError, match=msg):
        build_model(name, depth, width)
