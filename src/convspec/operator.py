"""The dense convolution operator ``M``: the reference every exact method is tested against."""

from __future__ import annotations

import math

import torch

from ._geometry import (
    UNSET, ConvGeometry, IntTuple, check_weight, layer_forward, resolve,
)

#: Default cap on the size of a dense operator, in bytes (raise it with ``max_bytes=``).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Working memory for one chunk of basis vectors (Note [chunking]), in bytes.
_WORKSPACE = 256 * 1024**2


def conv_operator(
    conv,
    input_size: IntTuple,
    *,
    stride=UNSET,
    padding=UNSET,
    dilation=UNSET,
    groups=UNSET,
    padding_mode=UNSET,
    transposed=UNSET,
    output_padding=UNSET,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """The layer as an explicit matrix ``M`` with ``vec(layer(X)) = M @ vec(X)`` (no bias).

    ``conv`` is a convolution module (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, an
    initialised ``Lazy*`` form), whose geometry is read from it, or a weight tensor with the
    keywords of ``nn.Conv*d`` and their defaults (``stride=1, padding=0, dilation=1, groups=1,
    padding_mode='zeros'``; ``transposed=True`` and ``output_padding`` for a
    ``nn.ConvTranspose*d`` weight laid out ``(in, out // groups, *k)``). The input ``X`` is
    ``g x N_1 x ... x N_d`` (``input_size`` an int or one entry per spatial axis), the output
    ``h x P_1 x ... x P_d`` exactly as the module computes them, for every padding mode
    (``'zeros'``, ``'circular'``, ``'reflect'``, ``'replicate'``). ``M`` has shape
    ``(h P_1...P_d, g N_1...N_d)``; for a transposed layer it is the transpose of the matrix of
    the convolution with the same weight (see Note [conv view] in ``convspec/_geometry.py``).

    ``vec`` is row-major over ``(channel, *spatial)``: ``vec(X) = X.reshape(-1)``. For a 2-D
    convolution with ``padding='same'``, stride 1 and zero padding, ``M`` is the doubly block
    banded Toeplitz matrix of eq. (2.1) of Guo (2019).

    ``M`` is built by pushing the identity basis through the layer in chunks, so it is exact and
    differentiable with respect to the weight. It costs ``O(h g N^{2d})`` memory: the call
    refuses, before allocating anything, when ``M`` would exceed ``max_bytes``; beyond ``M``
    itself the chunks use about 256 MiB.

    >>> conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False).double()
    >>> M = conv_operator(conv, 5)
    >>> M.shape
    torch.Size([50, 75])
    >>> x = torch.randn(3, 5, 5, dtype=torch.float64)
    >>> torch.allclose(M @ x.reshape(-1), conv(x[None]).reshape(-1))
    True
    >>> t = torch.nn.ConvTranspose1d(2, 3, 4, stride=2, bias=False)
    >>> conv_operator(t, 6).shape      # 3 x 14 outputs, 2 x 6 inputs
    torch.Size([42, 12])

    References: P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to
    avoid unstable gradient problem", arXiv:1907.11235, eq. (2.1).
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    return dense_operator(weight, geom, max_bytes)


def dense_operator(
    weight: torch.Tensor, geom: ConvGeometry, max_bytes: int = DEFAULT_MAX_BYTES
) -> torch.Tensor:
    """The layer's matrix ``M`` for a validated ``geom`` (see :func:`conv_operator`)."""
    elem = weight.element_size()
    rows, cols = geom.layer_n_out, geom.layer_n_in
    need = rows * cols * elem
    if need > max_bytes:
        raise ValueError(
            f"the dense operator would have shape ({rows}, {cols}) and take "
            f"{need / 2**20:.1f} MiB, above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); "
            "pass a larger max_bytes, or use the structured functions that never form it"
        )
    # Note [chunking]: each chunk of basis vectors costs its own rows (cols), its outputs (rows)
    # and the convolution's unfolded input (in k_1...k_d P_1...P_d per vector on the CPU).
    # Bounding all three by _WORKSPACE keeps the peak near the size of M itself, filled in place.
    unfolded = geom.in_channels * math.prod(geom.kernel_size) * math.prod(geom.output_size)
    per_vector = elem * (rows + cols + unfolded)
    chunk = max(1, min(cols, _WORKSPACE // per_vector))
    shape = (geom.layer_in_channels, *geom.layer_input_size)
    m = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    for start in range(0, cols, chunk):
        stop = min(cols, start + chunk)
        basis = torch.zeros(stop - start, cols, dtype=weight.dtype, device=weight.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        out = layer_forward(basis.view(-1, *shape), weight, geom)
        m[:, start:stop] = out.reshape(stop - start, rows).T
    return m
