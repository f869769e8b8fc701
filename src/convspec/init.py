"""Orthogonal initialisers: of the reshaped kernel (SVB's starting point) and of the operator.

:func:`orthogonal_` makes every reshaped weight matrix (per group) semi-orthogonal, which is
Algorithm 1, line 1 of Jia et al. (all singular values of the reshaped kernel equal to 1).
:func:`delta_orthogonal_` puts an orthogonal matrix on the centre tap of a convolution and zeros
elsewhere, which makes the convolution *operator* itself orthogonal for circular padding (Xiao et
al., 2018).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ._geometry import check_real
from .bounding import SUPPORTED_LAYERS, _check_layers, _weight_of

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    layers: Sequence[type] = (nn.Conv2d, nn.Linear),
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Initialise reshaped weight matrices to be (semi-)orthogonal, in place; returns ``module``.

    ``module`` is one ``Linear`` / ``Conv1d/2d/3d`` layer, or a model whose every instance of
    ``layers`` is initialised. As in :func:`convspec.svb_`, a ``Linear`` weight ``(out, in)`` is
    one matrix and a convolution weight ``(out, in // groups, *k)`` is ``groups`` matrices
    ``(out // groups) x (in // groups * prod(k))``; each becomes ``gain`` times a random
    Haar-distributed matrix with orthonormal rows (if it is wide) or columns (if tall), so all its
    singular values equal ``gain``: Jia et al., Algorithm 1, line 1. This is the *reshaped kernel*;
    the convolution operator is then generally **not** orthogonal (see
    :func:`delta_orthogonal_` for that). Biases are left alone. The random matrices are drawn in
    float64 and written in each weight's dtype; a weight that is not float16, bfloat16, float32 or
    float64, or a non-finite ``gain``, raises ``ValueError`` before anything is written.

    >>> conv = torch.nn.Conv2d(4, 8, 3, groups=2)
    >>> _ = orthogonal_(conv)
    >>> w = conv.weight.reshape(2, 4, 18).double()       # per group: 4 x (2 * 3 * 3)
    >>> torch.allclose(w @ w.mT, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-6)
    True

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithm 1 (line 1); A. M. Saxe, J. L. McClelland,
    S. Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep linear neural
    networks", ICLR 2014.
    """
    gain = _check_gain(gain)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, SUPPORTED_LAYERS):
        targets = [("", module)]
    else:
        layers = _check_layers(layers)
        targets = [(n, m) for n, m in module.named_modules() if isinstance(m, layers)]
        if not targets:
            raise ValueError(
                f"orthogonal_: {type(module).__name__} is not a Linear/Conv layer and contains "
                f"none of {[c.__name__ for c in layers]}"
            )
    weights = [_weight_of(name, m) for name, m in targets]  # validate all before writing
    with torch.no_grad():
        for (_, m), w in zip(targets, weights):
            groups = getattr(m, "groups", 1)
            mats = w.view(groups, w.shape[0] // groups, -1)
            q = _semi_orthogonal(groups, mats.shape[1], mats.shape[2], generator)
            w.copy_((gain * q).reshape(w.shape))
    return module


def delta_orthogonal_(
    conv: nn.Module, gain: float = 1.0, *, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """Delta-orthogonal initialisation, in place: orthogonal centre tap, zeros elsewhere.

    ``conv`` is an ``nn.Conv1d/2d/3d`` with weight ``(out, in // groups, *k)``. The tap at
    ``k // 2`` (per spatial axis) of each group gets ``gain`` times a Haar-random
    ``(out // groups) x (in // groups)`` matrix ``H`` with orthonormal rows (``out <= in``) or
    columns (``out > in``); every other tap is zero. The bias is left alone. ``H`` is drawn in
    float64 and written in the weight's dtype (float16, bfloat16, float32 or float64, else
    ``ValueError`` naming the dtype).

    What holds for the convolution **operator** ``M`` (:func:`convspec.conv_operator`; stride 1
    and ``padding`` equal to ``dilation * (k - 1) // 2`` per axis, i.e. ``'same'`` for odd ``k``):
    the centre tap reads the input at the output position itself, so ``M = H (x) I`` (per group,
    ``(x)`` the Kronecker product), whose singular values are those of ``H``:

    * ``padding_mode='circular'``: all singular values of ``M`` equal ``gain`` (for even ``k``
      too: the tap is then a cyclic shift, still orthogonal).
    * ``padding_mode='zeros'``, odd ``k``: the same, since the centre tap never reaches the
      padding. For even ``k`` or less padding (e.g. ``'valid'``), ``M = H (x) C`` with ``C`` a 0/1
      crop or shift (at most one 1 per row and column): every singular value of ``M`` is ``gain``
      or 0.
    * ``in < out`` (tall ``H``): ``M`` has orthonormal columns (``M^T M = I``), so its ``in * N``
      singular values are all ``gain``; ``in > out``: orthonormal rows, ``out * N`` values of
      ``gain``. Either way ``M`` is an isometry on one side, never a square orthogonal matrix.
    * ``stride > 1`` subsamples rows: ``M M^T = I`` still holds when ``out <= in``, but for
      ``out > in`` only a fraction of the values stays at ``gain`` and the rest are 0.

    >>> conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode='circular', bias=False)
    >>> _ = delta_orthogonal_(conv)
    >>> from convspec import conv_operator
    >>> M = conv_operator(conv.weight.double(), 5, padding=1, padding_mode='circular')
    >>> s = torch.linalg.svdvals(M)
    >>> torch.allclose(s, torch.ones_like(s))
    True

    References: L. Xiao, Y. Bahri, J. Sohl-Dickstein, S. S. Schoenholz, J. Pennington,
    "Dynamical Isometry and a Mean Field Theory of CNNs: How to Train 10,000-Layer Vanilla
    Convolutional Neural Networks", ICML 2018, Algorithm 2.
    """
    gain = _check_gain(gain)
    if not isinstance(conv, _CONVS):
        raise ValueError(
            f"delta_orthogonal_ needs an nn.Conv1d/2d/3d, got {type(conv).__name__} "
            "(use orthogonal_ for Linear layers and whole models)"
        )
    w = _weight_of("", conv)
    groups = conv.groups
    out_g, in_g = w.shape[0] // groups, w.shape[1]
    q = gain * _semi_orthogonal(groups, out_g, in_g, generator)  # (groups, out_g, in_g)
    centre = tuple(k // 2 for k in w.shape[2:])
    with torch.no_grad():
        w.zero_()
        w[(slice(None), slice(None)) + centre] = q.reshape(groups * out_g, in_g).to(w.dtype)
    return conv


__all__ = ["delta_orthogonal_", "orthogonal_"]
