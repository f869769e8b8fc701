"""Orthogonal initialisers: of the reshaped kernel (SVB's starting point) and of the operator.

:func:`orthogonal_` makes every reshaped weight matrix (per group) semi-orthogonal, which is
Algorithm 1, line 1 of Jia et al. (all singular values of the reshaped kernel equal to 1).
:func:`delta_orthogonal_` puts an orthogonal matrix on the centre tap of a convolution and zeros
elsewhere, which makes the convolution *operator* itself orthogonal for circular padding (Xiao et
al., 2018). Both cover ``Linear`` (``orthogonal_`` only), ``Conv1d/2d/3d`` and
``ConvTranspose1d/2d/3d``, per group, and read weights as :func:`convspec.svb_` does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ._geometry import check_real
from .bounding.layers import (
    CONVS,
    SUPPORTED_LAYERS,
    TRANSPOSED_CONVS,
    Skip,
    _collect_layers,
    _weight_of,
)


def _check_gain(gain) -> float:
    return check_real(gain, "gain")


def _semi_orthogonal(
    batch: int, rows: int, cols: int, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """``(batch, rows, cols)`` float64, Haar-distributed, orthonormal rows or columns."""
    tall = rows >= cols
    a = torch.randn(batch, max(rows, cols), min(rows, cols), dtype=torch.float64,
                    generator=generator)
    q, r = torch.linalg.qr(a)  # (batch, max, min)
    # Sign fix (Mezzadri 2007) so that q is Haar distributed, not biased by the QR convention.
    d = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    q = q * torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-2)
    return q if tall else q.mT


def orthogonal_(
    module: nn.Module,
    gain: float = 1.0,
    *,
    layers: Sequence[type] = SUPPORTED_LAYERS,
    skip: Skip = None,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Initialise reshaped weight matrices to be (semi-)orthogonal, in place; returns ``module``.

    ``module`` is one ``Linear`` / ``Conv1d/2d/3d`` / ``ConvTranspose1d/2d/3d`` layer, or a model
    whose every instance of ``layers`` (default: all of these) not excluded by ``skip`` is
    initialised. The matrices are those :func:`convspec.svb_` bounds: a ``Linear`` weight
    ``(out, in)`` is one matrix, a convolution weight ``(out, in // groups, *k)`` is ``groups``
    matrices ``(out // groups) x (in // groups * prod(k))``, a transposed convolution weight
    ``(in, out // groups, *k)`` is ``groups`` matrices ``(in // groups) x (out // groups *
    prod(k))``. Each becomes ``gain`` times a random Haar-distributed matrix with orthonormal rows
    (if it is wide) or columns (if tall), so all its singular values equal ``gain``: Jia et al.,
    Algorithm 1, line 1. This is the *reshaped kernel*; the convolution operator is then
    generally **not** orthogonal (see :func:`delta_orthogonal_` for that). Biases are left alone.
    The random matrices are drawn in float64 and written in each weight's dtype.

    Everything is checked before anything is written: a weight that is not float16, bfloat16,
    float32 or float64, a parametrized weight, a ``Lazy*`` layer not initialised yet (run a forward
    pass first, or ``skip`` it) or a non-finite ``gain`` raises ``ValueError`` naming the layer; a
    convolution of a type not listed above is named in a ``RuntimeWarning`` and left alone.

    >>> conv = torch.nn.Conv2d(4, 8, 3, groups=2)
    >>> _ = orthogonal_(conv)
    >>> w = conv.weight.reshape(2, 4, 18).double()       # per group: 4 x (2 * 3 * 3)
    >>> torch.allclose(w @ w.mT, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-6)
    True
    >>> up = torch.nn.ConvTranspose1d(4, 6, 2, groups=2)   # weight (4, 3, 2)
    >>> w = orthogonal_(up).weight.reshape(2, 2, 6).double()   # per group: 2 x (3 * 2)
    >>> torch.allclose(w @ w.mT, torch.eye(2, dtype=torch.float64).expand(2, 2, 2), atol=1e-6)
    True

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithm 1 (line 1); A. M. Saxe, J. L. McClelland,
    S. Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep linear neural
    networks", ICLR 2014.
    """
    gain = _check_gain(gain)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, SUPPORTED_LAYERS):  # a single layer is always accepted
        layers, skip = SUPPORTED_LAYERS, None
    targets = _collect_layers(module, layers, skip, "orthogonal_", 3)  # validates all
    if not targets and not isinstance(module, SUPPORTED_LAYERS):
        raise ValueError(
            f"orthogonal_: {type(module).__name__} is not a Linear/Conv layer and contains "
            f"none of {[c.__name__ for c in layers]}"
        )
    draws = []
    for layer in targets:
        mats = layer.matrices()  # (groups, rows, cols)
        draws.append(_semi_orthogonal(layer.groups, mats.shape[1], mats.shape[2], generator))
    with torch.no_grad():
        for layer, q in zip(targets, draws):
            layer.weight.copy_((gain * q).reshape(layer.weight.shape))
    return module


# Note [centre tap]: the tap at c = (k - 1) // 2 per axis: the middle one for odd k, the left of
# the two middle ones for even k. It is the tap that reads the input at the output position itself
# under PyTorch's padding='same' (which pads dilation * (k - 1) // 2 on the left: equal to
# dilation * c for odd k, or for any k with dilation 1), and under an integer padding of
# dilation * c; with k // 2 an even-k 'same' layer with zero padding would read one position to
# the right and lose the last row, so it would not be orthogonal.


def delta_orthogonal_(
    conv: nn.Module, gain: float = 1.0, *, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """Delta-orthogonal initialisation, in place: orthogonal centre tap, zeros elsewhere.

    ``conv`` is an ``nn.Conv1d/2d/3d`` with weight ``(out, in // groups, *k)`` or an
    ``nn.ConvTranspose1d/2d/3d`` with weight ``(in, out // groups, *k)`` (``Lazy*`` forms once
    initialised). The **centre tap** is ``c = (k - 1) // 2`` per spatial axis: the middle tap for
    odd ``k``, the left one of the two middle taps for even ``k`` (the tap that reads the input at
    the output position under ``padding='same'``; Note [centre tap]). Per group it gets ``gain``
    times a Haar-random matrix ``H`` of shape ``(weight.shape[0] // groups) x weight.shape[1]``,
    i.e. ``(out // groups) x (in // groups)`` for a convolution and ``(in // groups) x
    (out // groups)`` for a transposed one, with orthonormal rows (if wide) or columns (if tall);
    every other tap is zero. The bias is left alone. ``H`` is drawn in float64 and written in the
    weight's dtype (float16, bfloat16, float32 or float64, else ``ValueError`` naming the dtype).

    What holds for the layer's operator ``M`` (per group; ``(x)`` is the Kronecker product):

    * **Convolution.** Output position ``p`` reads, through the centre tap, input position
      ``p * stride - padding + c * dilation`` (or nothing), so ``M = H (x) E`` with ``E`` a 0/1
      matrix with at most one 1 per row and column (zeros or circular padding; reflect/replicate
      too where the tap does not reach the border). Every singular value of ``M`` is ``gain`` or 0.
      When the tap never reads padding (``padding=0``, integer ``padding = dilation * c`` per
      axis, or ``padding='same'`` with odd ``k`` or ``dilation=1``) every row of ``E`` has its 1,
      so ``M M^T = gain^2 I`` when ``out <= in``, for any stride and padding mode. With
      stride 1 and output size equal to input size (``padding='same'``, or circular padding of that
      size) ``E`` is a permutation (the identity, or a cyclic shift), so also ``M^T M = gain^2 I``
      when ``out >= in``: for ``in == out`` **M is gain times an orthogonal matrix**, for odd and
      even ``k`` alike.
    * **Transposed convolution.** Input position ``n`` is scattered, through the centre tap, to
      output position ``n * stride - padding + c * dilation`` (or dropped by the crop), so
      ``M = H^T (x) F``, ``F`` 0/1 with at most one 1 per row and column. With
      ``padding = dilation * c`` per axis no input is dropped (any stride, ``output_padding``, odd
      or even ``k``): ``M^T M = gain^2 I`` when ``in <= out`` per group. With stride 1 and odd
      ``k`` the output size equals the input size and ``F = I``: for ``in == out`` M is gain times
      an orthogonal matrix. (Transposed layers only support ``padding_mode='zeros'``.)

    >>> conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode='circular', bias=False)
    >>> _ = delta_orthogonal_(conv)
    >>> basis = torch.eye(4 * 5 * 5, dtype=torch.float64).reshape(-1, 4, 5, 5)
    >>> M = conv.double()(basis).reshape(len(basis), -1).T      # the operator, column by column
    >>> torch.allclose(M.T @ M, torch.eye(100, dtype=torch.float64), atol=1e-6)
    True

    References: L. Xiao, Y. Bahri, J. Sohl-Dickstein, S. S. Schoenholz, J. Pennington,
    "Dynamical Isometry and a Mean Field Theory of CNNs: How to Train 10,000-Layer Vanilla
    Convolutional Neural Networks", ICML 2018, Algorithm 2.
    """
    gain = _check_gain(gain)
    if not isinstance(conv, CONVS + TRANSPOSED_CONVS):
        raise ValueError(
            f"delta_orthogonal_ needs an nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d, got "
            f"{type(conv).__name__} (use orthogonal_ for Linear layers and whole models)"
        )
    w = _weight_of("", conv)
    groups = conv.groups
    rows, cols = w.shape[0] // groups, w.shape[1]
    q = gain * _semi_orthogonal(groups, rows, cols, generator)  # (groups, rows, cols)
    centre = tuple((k - 1) // 2 for k in w.shape[2:])  # Note [centre tap]
    with torch.no_grad():
        w.zero_()
        w[(slice(None), slice(None)) + centre] = q.reshape(groups * rows, cols).to(w.dtype)
    return conv


__all__ = ["delta_orthogonal_", "orthogonal_"]
