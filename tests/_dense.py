"""Dense references built from the module itself (float64), and random layers for property tests.

The operator here never goes through convspec: the layer is applied to the unit impulses of its
input space, so every exactness test compares against what PyTorch computes.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MODES = ("zeros", "circular", "reflect", "replicate")


def module_operator(module: nn.Module, input_size) -> torch.Tensor:
    """``M`` with ``vec(module(X)) = M vec(X)`` (bias removed), in float64, from impulses."""
    m = copy.deepcopy(module).double()
    if getattr(m, "bias", None) is not None:
        m.bias = None
    d = m.weight.dim() - 2
    size = (input_size,) * d if isinstance(input_size, int) else tuple(input_size)
    c = m.in_channels
    n = c * torch.Size(size).numel()
    with torch.no_grad():
        out = m(torch.eye(n, dtype=torch.float64).view(n, c, *size))
    return out.reshape(n, -1).T.contiguous()


def dense_penalty(module: nn.Module, input_size, alpha: float = 1.0) -> float:
    m = module_operator(module, input_size)
    gram = m.T @ m - alpha * torch.eye(m.shape[1], dtype=torch.float64)
    return float(gram.square().sum())


def random_layer(rng: random.Random, *, ndim=None, transposed=None, mode=None, max_n=6,
                 max_channels=3):
    """A random float64 convolution module and an input size it accepts.

    Covers 1-3 spatial axes, transposed layers (stride, padding, output_padding, dilation,
    groups), every padding mode, rectangular inputs and kernels, even kernels, ``'same'``,
    strides that do not divide the size and that skip inputs.
    """
    while True:
        d = ndim or rng.choice((1, 2, 3))
        tr = rng.random() < 0.35 if transposed is None else transposed
        groups = rng.choice((1, 1, 2, 3))
        cin = groups * rng.randint(1, max_channels)
        cout = groups * rng.randint(1, max_channels)
        lim = max_n if d < 3 else min(max_n, 4)
        k = tuple(rng.randint(1, 4 if d < 3 else 3) for _ in range(d))
        s = tuple(rng.randint(1, 3) for _ in range(d))
        dil = tuple(rng.randint(1, 2) for _ in range(d))
        n = tuple(rng.randint(1, lim) for _ in range(d))
        try:
            if tr:
                p = tuple(rng.randint(0, 2) for _ in range(d))
                op = tuple(rng.randint(0, max(a, b) - 1) for a, b in zip(s, dil))
                m = CONV_T[d](cin, cout, k, stride=s, padding=p, output_padding=op,
                              dilation=dil, groups=groups, bias=False)
            else:
                pm = mode or rng.choice(MODES)
                if rng.random() < 0.2:
                    s = (1,) * d
                    p = "same"
                else:
                    p = tuple(rng.randint(0, 3) for _ in range(d))
                m = CONV[d](cin, cout, k, stride=s, padding=p, dilation=dil, groups=groups,
                            bias=False, padding_mode=pm)
            m = m.double()
            with torch.no_grad():
                m(torch.zeros(1, cin, *n, dtype=torch.float64))
        except (RuntimeError, ValueError):
            continue  # PyTorch rejects this geometry (too small, pad too large, ...)
        return m, n


def random_axes(rng: random.Random, count: int, *, mode=None, max_n: int = 30):
    """``count`` valid random ``AxisGeometry`` (k 1..5, stride 1..3, dilation 1..3, padding
    0..4, zero padding's hi down to -1); ``mode=None`` draws the padding mode per axis."""
    from convspec._geometry import AxisGeometry

    made = 0
    while made < count:
        m = rng.choice(MODES) if mode is None else mode
        k, s, d, n = rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, max_n)
        lo, hi = rng.randint(0, 4), rng.randint(-1 if m == "zeros" else 0, 4)
        if (m == "circular" and max(lo, hi) > n) or (m == "reflect" and max(lo, hi) >= n):
            continue
        ax = AxisGeometry(n, k, s, d, lo, hi, m)
        if ax.out_size < 1:
            continue
        made += 1
        yield ax
