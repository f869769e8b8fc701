"""Test helper: the dense matrix of a layer, built by applying the module itself to unit impulses.

Independent of convspec (in particular of ``convspec.conv_operator``): whatever PyTorch's own
forward does (padding mode, stride, dilation, groups, transposed layout) is what the matrix holds.
"""

import copy
import math

import torch
from torch import nn


def module_operator(module: nn.Module, input_size=()) -> torch.Tensor:
    """``M`` (float64) with ``module(x) - module(0) == M @ x.flatten()`` for ``x`` of shape
    ``(in_channels, *input_size)`` (``(in_features,)`` for a Linear): column ``j`` is the module
    applied to the ``j``-th unit impulse, the bias removed.

    >>> conv = nn.Conv1d(1, 1, 2, bias=True)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([[[1.0, 2.0]]]))
    >>> module_operator(conv, 3)
    tensor([[1., 2., 0.],
            [0., 1., 2.]], dtype=torch.float64)
    """
    if isinstance(input_size, int):
        input_size = (input_size,)
    m = copy.deepcopy(module).double().eval()
    channels = m.in_features if isinstance(m, nn.Linear) else m.in_channels
    shape = (channels, *input_size)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = m(basis) - m(torch.zeros(1, *shape, dtype=torch.float64))
    return out.reshape(n, -1).T
