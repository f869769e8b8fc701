"""The dense convolution operator ``M``: the reference every exact method is tested against."""

from __future__ import annotations

import torch

from ._geometry import IntPair, Padding, check_finite, conv2d, conv_geometry

#: Default cap on the size of a dense operator, in bytes (raise it with ``max_bytes=``).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Working memory for one chunk of basis vectors (Note [chunking]), in bytes.
_WORKSPACE = 256 * 1024**2


def conv_operator(
    weight: torch.Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """The convolution as an explicit matrix ``M`` with ``vec(conv(X)) = M @ vec(X)``.

    ``weight`` has shape ``(h, g // groups, k1, k2)``; the input ``X`` is ``g x N1 x N2`` and the
    output ``h x P1 x P2``, with ``P`` given by ``stride``, ``padding``, ``dilation`` exactly as
    ``nn.Conv2d(g, h, (k1, k2), stride=..., padding=..., dilation=..., groups=...,
    padding_mode=..., bias=False)`` computes them (``padding_mode`` ``'zeros'`` or ``'circular'``).
    ``M`` has shape ``(h*P1*P2, g*N1*N2)``.

    ``vec`` is row-major over ``(channel, row, column)``: ``vec(X) = X.reshape(-1)``. With
    ``padding='same'``, stride 1 and zero padding, ``M`` is the doubly block banded Toeplitz matrix
    of eq. (2.1) of Guo (2019): an ``h x g`` grid of blocks, each block an ``N1 x N1`` banded
    Toeplitz grid of banded Toeplitz ``N2 x N2`` blocks.

    ``M`` is built by pushing the identity basis through ``F.conv2d`` in chunks, so it is exact
    and differentiable with respect to ``weight``. It costs ``O(h g N^4)`` memory: the call
    refuses, before allocating anything, when ``M`` would exceed ``max_bytes``; beyond ``M``
    itself the chunks use about 256 MiB.

    >>> w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    >>> M = conv_operator(w, 5)
    >>> M.shape
    torch.Size([50, 75])
    >>> x = torch.randn(3, 5, 5, dtype=torch.float64)
    >>> y = torch.nn.functional.conv2d(x[None], w, padding='same')[0]
    >>> torch.allclose(M @ x.reshape(-1), y.reshape(-1))
    True

    References: P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to
    avoid unstable gradient problem", arXiv:1907.11235, eq. (2.1).
    """
    geom = conv_geometry(
        weight,
        input_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    check_finite(weight)
    elem = weight.element_size()
    need = geom.n_out * geom.n_in * elem
    if need > max_bytes:
        raise ValueError(
            f"the dense operator would have shape ({geom.n_out}, {geom.n_in}) and take "
            f"{need / 2**20:.1f} MiB, above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); "
            "pass a larger max_bytes, or use the structured functions that never form it"
        )
    n1, n2 = geom.input_size
    (k1, k2), (p1, p2) = geom.kernel_size, geom.output_size
    # Note [chunking]: each chunk of basis vectors costs its own rows (n_in), its outputs (n_out)
    # and the convolution's unfolded input (g k1 k2 P1 P2 per vector on the CPU). Bounding all
    # three by _WORKSPACE keeps the peak near the size of M itself, which is filled in place.
    per_vector = elem * (geom.n_in + geom.n_out + geom.in_channels * k1 * k2 * p1 * p2)
    chunk = max(1, min(geom.n_in, _WORKSPACE // per_vector))
    m = torch.empty(geom.n_out, geom.n_in, dtype=weight.dtype, device=weight.device)
    for start in range(0, geom.n_in, chunk):
        stop = min(geom.n_in, start + chunk)
        basis = torch.zeros(stop - start, geom.n_in, dtype=weight.dtype, device=weight.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        out = conv2d(basis.view(-1, geom.in_channels, n1, n2), weight, geom)
        m[:, start:stop] = out.reshape(stop - start, geom.n_out).T
    return m
