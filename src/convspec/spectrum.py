"""Singular values of the convolution operator ``M``."""

from __future__ import annotations

from typing import Tuple

import torch

from ._geometry import IntPair, Padding
from .operator import DEFAULT_MAX_BYTES, conv_operator


def extreme_singular_values(
    weight: torch.Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tuple[float, float]:
    """Exact ``(sigma_max, sigma_min)`` of the convolution operator ``M``.

    ``M`` is the ``(h P1 P2) x (g N1 N2)`` matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride,
    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` on a
    ``g x N1 x N2`` input (see :func:`conv_operator`). ``sigma_min`` is the smallest of the
    ``min(h P1 P2, g N1 N2)`` singular values of ``M``: it is 0 only if ``M`` is rank deficient
    beyond its shape (a wide ``M`` with ``g > h`` has ``h P1 P2`` singular values, not 0s for the
    missing ones).

    Exact (SVD of the dense operator in float64): ``O(g h N^4)`` memory and ``O(g h N^6)`` time;
    refuses above ``max_bytes`` like :func:`conv_operator`.

    >>> w = torch.zeros(3, 3, 3, 3); w[:, :, 1, 1] = 2 * torch.eye(3)
    >>> extreme_singular_values(w, 8)          # 2 * identity
    (2.0, 2.0)

    References: P.-C. Guo, arXiv:1907.11235, Section 4 (sigma_max and sigma_min of M).
    """
    m = conv_operator(
        weight.detach().to(torch.float64),
        input_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        max_bytes=max_bytes,
    )
    s = torch.linalg.svdvals(m)
    return float(s.max()), float(s.min())


def _gram_extremes(m: torch.Tensor) -> Tuple[float, float]:
    """``(sigma_max, sigma_min)`` of a dense ``m`` from the eigenvalues of its smaller Gram matrix.

    About twice as fast as ``svdvals`` for the sizes of Algorithm 3.1's records, and as accurate
    except for ``sigma_min`` below about ``1e-8 * sigma_max`` (the Gram squares the condition
    number), where it returns a value near 0 instead.
    """
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    e = torch.linalg.eigvalsh(gram)
    return float(e[-1].clamp(min=0).sqrt()), float(e[0].clamp(min=0).sqrt())
