import math

import pytest
import torch
import torch.nn as nn

from convspec import conv_geometry, conv_operator, frobenius_penalty


def test_output_size_matches_nn_conv2d():
    cases = [
        dict(kernel_size=3, stride=1, padding="same", dilation=1),
        dict(kernel_size=4, stride=1, padding="same", dilation=2),
        dict(kernel_size=(2, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2)),
        dict(kernel_size=3, stride=3, padding=0, dilation=1),
        dict(kernel_size=5, stride=1, padding="valid", dilation=1),
    ]
    for mode in ("zeros", "circular"):
        for kw in cases:
            conv = nn.Conv2d(4, 6, groups=2, bias=False, padding_mode=mode, **kw)
            x = torch.randn(1, 4, 11, 9)
            g = conv_geometry(
                conv.weight, (11, 9), stride=conv.stride, dilation=conv.dilation,
                padding=kw["padding"], groups=2, padding_mode=mode,
            )
            assert g.output_size == tuple(conv(x).shape[-2:])
            assert g.n_in == 4 * 11 * 9 and g.n_out == 6 * math.prod(conv(x).shape[-2:])


@pytest.mark.parametrize(
    "weight_shape, kwargs, message",
    [
        ((3, 3), {}, "weight must have 1, 2 or 3 spatial axes"),
        ((5, 2, 3, 3), dict(groups=2), "not divisible by groups"),
        ((4, 2, 3, 3), dict(groups=0), "groups must be a positive int"),
        ((4, 2, 3, 3), dict(input_size=0), "input_size must be >= 1"),
        ((4, 2, 3, 3), dict(input_size=(4, 4, 4)), "input_size must be an int or a tuple of 2 ints"),
        ((4, 2, 3, 3), dict(stride=2, padding="same"), "'same' is not supported with stride > 1"),
        ((4, 2, 3, 3), dict(padding_mode="mirror"), "padding_mode must be one of"),
        ((4, 2, 3, 3), dict(padding_mode="bogus"), "padding_mode must be one of"),
        ((4, 2, 3, 3), dict(padding=-1), "padding must be >= 0"),
        ((4, 2, 3, 3), dict(padding="full"), "padding must be an int, a tuple, 'same' or 'valid'"),
        ((4, 2, 3, 3), dict(stride=0), "stride must be >= 1"),
        ((4, 2, 3, 3), dict(dilation=0), "dilation must be >= 1"),
        ((4, 2, 3, 3), dict(input_size=2, padding=0), "output would be empty"),
        ((4, 2, 3, 3), dict(input_size=2, padding=3, padding_mode="circular"), "wrap around"),
        ((4, 2, 3, 3), dict(stride=True), "stride must be an int or a tuple of 2 ints"),
    ],
)
def test_bad_geometry_raises_value_error(weight_shape, kwargs, message):
    kwargs = dict(kwargs)
    input_size = kwargs.pop("input_size", 8)
    w = torch.randn(*weight_shape)
    for fn in (conv_geometry, conv_operator, frobenius_penalty):
        with pytest.raises(ValueError, match=message):
            fn(w, input_size, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_rejected(bad):
    w = torch.randn(2, 2, 3, 3)
    w[0, 1, 2, 0] = bad
    for fn in (conv_operator, frobenius_penalty):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(w, 5)
