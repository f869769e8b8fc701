"""Penalties on the spectrum of a convolution operator ``M``: Frobenius and 2-norm.

Every function takes the layer itself (any ``nn.Conv*d`` / ``nn.ConvTranspose*d``) or a weight
with the keywords of ``nn.Conv*d``.

``frobenius_penalty`` is exact and never forms ``M``; ``frobenius_penalty_reference`` forms it;
``frobenius_penalty_grad_reference`` is the closed-form gradient of Guo (2019), Theorems 2.1/3.1. ``spectral_penalty`` is the 2-norm
penalty ``||M^T M - alpha I||_2`` of Guo & Ye, by persistent power iteration.
"""

from __future__ import annotations

import math
from dataclasses import astuple, replace
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._geometry import (
    UNSET, AxisGeometry, ConvGeometry, IntTuple, axis_pair_sums, check_real, check_weight,
    layer_adjoint, layer_forward, resolve,
)
from ._precision import compute_dtype, no_autocast, to_weight_dtype
from .operator import DEFAULT_MAX_BYTES, dense_operator

# Note [pair layout]: with rows ``(P, c)`` (``P`` a kernel multi-index, ``c`` a channel of the
# side with fewer channels, ``n`` the other side) the Gram ``T = A A^T`` has blocks
# ``T_PP' = A_P A_P'^T`` (``c x c``), and Note [structure of M] reads
#
#     ||C C^T||_F^2 = <T, (Q_1 (x) ... (x) Q_d) T>,      ||C||_F^2 = sum_{P,P'} D[P, P'] tr T_PP'
#
# with one ``Q_i`` (``k_i^2 x k_i^2``, rows ``(p_i, p_i')``) per axis. ``T`` is held in the *pair
# layout* ``(k_1, k_1', ..., k_d, k_d', c, c')``: each ``Q_i`` is then one small batched GEMM
# along its own pair axis (``sum_i k_i^2 K^2 c^2`` multiply-adds, 1458 ``c^2`` for 3 x 3, where one
# joint GEMM against a rank-``r`` factor of the whole Kronecker product cost ``K^2 r c^2``, 3969
# ``c^2`` at ``r = 49``, and as much again backward). ``S = Q T`` kept from the forward is, up to
# scalars, ``dR/dT`` itself: the backward has no contraction left, only one GEMM
# ``dA = 2 G A`` (``G = 2 g_gram S + g_fro D (x) I``; the ``D`` part is applied to ``A``
# directly, a ``K x K`` GEMM).
#
# The Gram: ``T_P'P = T_PP'^T``, so only ``K (K + 1) / 2`` blocks are products. The *triangle*
# route forms them by ``K`` GEMMs ``A_{P..} A_P^T`` (rows ``P' >= P`` are contiguous in this row
# order) and writes each block and its transpose into the pair layout; the *square* route is one
# GEMM ``A A^T`` and a permutation. Measured CPU time per 3 x 3 layer, forward and backward
# (interleaved, 1 thread, the machine of ``benchmarks/results/regularizer.json``): triangle /
# square = 1.3 at ``c = 32``, 1.0-1.1 at ``c = 64`` and 128 (the saved multiply-adds are spent
# on the transposed copy), 0.85 at ``c = 256``: hence ``TRIANGLE_MIN``. The backward cannot use
# the symmetry (``G A`` with a symmetric ``G`` still costs ``K^2 c^2 n``), so a layer costs
# ``(K (K + 1) / 2 + K^2) c^2 n`` multiply-adds (126 ``c^3`` for a square 3 x 3 layer) on the
# triangle route and ``2 K^2 c^2 n`` on the square one, plus the ``Q_i``.
#
# Accuracy: ``<T, QT>`` is a dot product of terms of both signs, not a sum of squares. Measured
# in float32 against float64 on the same rounded weights (c = 16, 64, 128; random, scaled random
# and near-orthogonal kernels; both routes): the value within 3e-6 of ``max(R, g N)`` relative
# (the joint route: 1e-4), the gradient within 2e-6 relative (joint route: 6e-7).
# tests/test_penalty_routes.py checks 3e-5 and 1e-5. Near orthogonality the three-term
# cancellation of ``frobenius_penalty`` (absolute error ~ ``eps g N``) dominates, as before.

#: Below this many channels (``c``) the Gram is one GEMM (square route), else ``K`` GEMMs
#: over the block triangle (Note [pair layout]).
TRIANGLE_MIN = 128


@lru_cache(maxsize=1024)
def _axis_q(ax: AxisGeometry, side: str) -> np.ndarray:
    """``Q`` of one axis for the Gram on ``side``: ``'out'`` (``C C^T``) or ``'in'`` (``C^T C``).

    Symmetric, and invariant under swapping both pairs ``(p, p') -> (p', p)``: the backward of
    :class:`_GramSquaredNorm` relies on both (tests/test_penalty_routes.py checks them).
    """
    q, _ = axis_pair_sums(ax)
    k = ax.kernel
    if side == "in":
        # <A_p^T A_p', A_r^T A_r'> = tr(A_p A_r^T A_r' A_p'^T) = Q_out[(r, p), (r', p')].
        q = q.reshape(k, k, k, k).transpose(2, 0, 3, 1).reshape(k * k, k * k)
    return q


def _pair_index(ks: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Flat pair-layout positions of ``T_P'P`` (``lower``) and ``T_PP'`` (``upper``) for
    ``P' >= P``, in the order the triangle route forms the blocks (Note [pair layout])."""
    pairs = tuple(j for k in ks for j in (k, k))
    kk = math.prod(ks)

    def flat(first, second):  # position of the block of the tap pair (first, second)
        p, r = np.unravel_index(first, ks), np.unravel_index(second, ks)
        return np.ravel_multi_index([j for i in range(len(ks)) for j in (p[i], r[i])], pairs)

    lower = [flat(R, P) for P in range(kk) for R in range(P, kk)]
    upper = [flat(P, R) for P in range(kk) for R in range(P, kk)]
    return np.array(lower, dtype=np.int64), np.array(upper, dtype=np.int64)


def _constants(
    axes: Tuple[AxisGeometry, ...], side: str, dtype: torch.dtype, device: torch.device
) -> tuple:
    """:func:`_build_constants` for ``axes``, computed eagerly even under ``torch.compile``."""
    key = tuple(astuple(ax) for ax in axes)
    return _constants_of_key(key, side, dtype, device)


@torch.compiler.assume_constant_result
def _constants_of_key(key, side: str, dtype: torch.dtype, device: torch.device):
    """Run eagerly and treated as a constant by ``torch.compile``: the geometry constants are
    plain data of the layer's shape, so a compiled training step has no graph break inside the
    penalty (Dynamo cannot trace the NumPy code that builds them)."""
    return _build_constants(tuple(AxisGeometry(*k) for k in key), side, dtype, device)


@lru_cache(maxsize=256)
def _build_constants(
    axes: Tuple[AxisGeometry, ...], side: str, dtype: torch.dtype, device: torch.device
) -> tuple:
    """Cached ``(qs, d, lower, upper)`` of Note [pair layout]: ``qs`` one ``Q_i`` per axis, ``d``
    the ``D_i`` as an outer product in pair layout ``(k_1, k_1', ..., k_d, k_d')``, and the
    triangle route's block positions."""
    d = np.ones(())
    for ax in axes:
        d = np.multiply.outer(d, axis_pair_sums(ax)[1])
    lower, upper = _pair_index(tuple(ax.kernel for ax in axes))
    return (
        tuple(torch.as_tensor(_axis_q(ax, side), dtype=dtype, device=device) for ax in axes),
        torch.as_tensor(d, dtype=dtype, device=device),
        torch.as_tensor(lower, device=device),
        torch.as_tensor(upper, device=device),
    )


def _pair_perm(nd: int) -> List[int]:
    """Dimensions of ``(B, k_1..k_d, c, k_1'..k_d', c')`` in pair layout order."""
    return [0] + [j for i in range(nd) for j in (1 + i, nd + 2 + i)] + [nd + 1, 2 * nd + 2]


def _pair_gram(a: torch.Tensor, c: int, ks: Tuple[int, ...], lower, upper) -> torch.Tensor:
    """``T = A A^T`` in pair layout ``(B, k_1, k_1', ..., c, c')`` (Note [pair layout])."""
    B, K = a.shape[0], math.prod(ks)
    pairs = tuple(j for k in ks for j in (k, k))
    if c < TRIANGLE_MIN or K == 1:
        t = torch.matmul(a, a.transpose(-1, -2)).view(B, *ks, c, *ks, c)
        return t.permute(_pair_perm(len(ks))).contiguous()
    # (B, K - P, c, c): T_P'P for P' >= P
    u = torch.cat([torch.matmul(a[:, P * c:], a[:, P * c:(P + 1) * c].transpose(-1, -2))
                   for P in range(K)], dim=1).view(B, -1, c, c)
    x = a.new_empty((B, K * K, c, c))
    x.index_copy_(1, lower, u)
    x.index_copy_(1, upper, u.transpose(-1, -2))
    return x.view(B, *pairs, c, c)


class _GramSquaredNorm(torch.autograd.Function):
    """``(||C C^T||_F^2, ||C||_F^2)`` summed over a batch, from ``T = A A^T`` (Note [pair layout]).

    ``a`` is ``(B, K c, n)`` with rows ordered ``(P, c)``: ``B`` independent Gram problems of one
    geometry (conv groups, layers of equal shape). Forward: the Gram (triangle or square route),
    one GEMM per spatial axis applying ``Q_i`` in pair layout, two dot products. The backward is a
    single GEMM (and a ``K x K`` one): ``R = <T, QT>`` and ``Q`` is symmetric, so
    ``dR/dT = 2 QT = 2 S`` with ``S`` kept from the forward, and ``G = dL/dT`` is symmetric
    (``S_P'P = S_PP'^T`` as ``Q`` commutes with the pair swap, ``D`` symmetric), so
    ``dA = (G + G^T) A = 2 G A``. Both directions run with autocast off (Note [working
    precision]): PyTorch would otherwise run a backward called inside an autocast region in low
    precision, which is why ``||C||^2`` is taken from ``T`` here and not by a separate
    differentiable GEMM.
    """

    @staticmethod
    def forward(ctx, a, qs, d, lower, upper, c, ks):  # type: ignore[override]
        B = a.shape[0]
        with no_autocast(a.device):
            x = _pair_gram(a, c, ks, lower, upper)  # (B, k1, k1', ..., c, c')
            s, pre, post = x, B, x[0].numel()
            for q, k in zip(qs, ks):
                post //= k * k
                s = torch.matmul(q, s.view(pre, k * k, post))  # Q_i along (p_i, p_i')
                pre *= k * k
            s = s.view(x.shape)
            gram = torch.dot(x.view(-1), s.view(-1))
            traces = torch.diagonal(x, dim1=-2, dim2=-1).sum(-1).sum(0)  # (k1, k1', ...)
            fro = torch.dot(traces.reshape(-1), d.reshape(-1))
        ctx.save_for_backward(a, s, d)
        ctx.shape = (c, ks)
        return gram, fro

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gram, grad_fro):  # type: ignore[override]
        a, s, d = ctx.saved_tensors
        c, ks = ctx.shape
        B, kc, _ = a.shape
        nd, kk = len(ks), math.prod(ks)
        with no_autocast(a.device):
            g = a.new_empty((B, kc, kc))
            g.view(B, *ks, c, *ks, c).permute(_pair_perm(nd)).copy_(s)  # S, GEMM layout
            da = torch.matmul(g, a * (4 * grad_gram.to(a.dtype)))
            # + 2 (D (x) I_c) A: D acts on the tap index of the rows (P, c) only.
            dmat = d.permute([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])
            dmat = dmat.reshape(kk, kk) * (2 * grad_fro.to(d.dtype))
            da += torch.matmul(dmat, a.reshape(B, kk, -1)).view(da.shape)
            return da, None, None, None, None, None, None


def _rows(weight: torch.Tensor, groups: int, side: str) -> torch.Tensor:
    """Rows ``(P, c)`` of the Gram of ``weight`` (``(h, g / groups, *k)``) as a view
    ``(groups, K, c, n)``; :func:`_gram_terms` makes them contiguous (one copy, ``K c n``)."""
    h, gg = weight.shape[:2]
    kk = weight[0, 0].numel()
    w = weight.reshape(groups, h // groups, gg, kk)
    return w.permute(0, 3, 2, 1) if side == "in" else w.permute(0, 3, 1, 2)


def _side(weight: torch.Tensor, groups: int) -> str:
    """The Gram side with fewer channels per group (``'in'`` on a tie)."""
    return "in" if weight.shape[0] // groups >= weight.shape[1] else "out"


def _gram_terms(rows: torch.Tensor, consts: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`_GramSquaredNorm` of ``rows`` (``(B, K, c, n)``, e.g. from :func:`_rows`) with
    ``consts`` from :func:`_constants`: ``(sum ||C C^T||_F^2, sum ||C||_F^2)`` over ``B``."""
    qs, d, lower, upper = consts
    B, kk, c, n = rows.shape
    return _GramSquaredNorm.apply(rows.reshape(B, kk * c, n), qs, d, lower, upper, c,
                                  tuple(d.shape[::2]))


def _penalty_terms(weight: torch.Tensor, geom: ConvGeometry) -> Dict[str, torch.Tensor]:
    """``||C^T C||_F^2`` and ``||C||_F^2`` (Note [structure of M]); differentiable."""
    side = _side(weight, geom.groups)
    consts = _constants(geom.axes, side, weight.dtype, weight.device)
    gram_sq, fro_sq = _gram_terms(_rows(weight, geom.groups, side), consts)
    return {"gram_sq": gram_sq, "fro_sq": fro_sq}


def _frobenius_value(weight: torch.Tensor, geom: ConvGeometry, alpha: float) -> torch.Tensor:
    """The penalty in ``compute_dtype(weight.dtype)``, autocast off (Note [working precision]).

    ``weight`` and ``alpha`` must be validated already; differentiable.
    """
    with no_autocast(weight.device):
        terms = _penalty_terms(weight.to(compute_dtype(weight.dtype)), geom)
        return terms["gram_sq"] - 2 * alpha * terms["fro_sq"] + alpha**2 * geom.layer_n_in


def frobenius_penalty(
    conv,
    input_size: IntTuple,
    alpha: float = 1.0,
    *,
    stride=UNSET,
    padding=UNSET,
    dilation=UNSET,
    groups=UNSET,
    padding_mode=UNSET,
    transposed=UNSET,
    output_padding=UNSET,
) -> torch.Tensor:
    """Exact ``R_alpha(K) = ||M^T M - alpha I||_F^2`` without forming ``M``; differentiable.

    ``conv`` is a convolution module (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, an
    initialised ``Lazy*`` form; its geometry is read from it) or a weight tensor with the
    keywords of ``nn.Conv*d`` and their defaults (``stride=1, padding=0, dilation=1, groups=1,
    padding_mode='zeros'``; ``transposed=True, output_padding=...`` for a transposed weight).
    ``M`` is the matrix the layer applies (no bias) to a ``g x N_1 x ... x N_d`` input
    (``input_size`` an int or one entry per spatial axis): see :func:`conv_operator`. Every
    padding mode (``'zeros'``, ``'circular'``, ``'reflect'``, ``'replicate'``), stride,
    dilation and groups (``M`` block diagonal, penalties summed) is accounted for exactly.
    ``I`` is the identity of the layer's input dimension ``g N_1...N_d``; for a transposed layer
    ``M`` is the transposed layer's own operator.

    The result is **exact** (not a bound, not the interior-only approximation
    ``||conv(K, K) - delta||^2``): boundary rows and columns of ``M``, redirected border taps
    (circular, reflect, replicate), strides, dilation and groups all count. Uses
    ``||M^T M - aI||^2 = ||M^T M||^2 - 2a ||M||^2 + a^2 g N`` and ``||M^T M||_F = ||M M^T||_F``
    on the side with fewer channels.

    Cost: ``O(K^2 c^2 n)`` time and ``O(K^2 c^2)`` memory for ``c = min(h, g) / groups``,
    ``n = max(h, g) / groups`` and ``K = prod k_i`` (forward and backward together
    ``(K (K + 1) / 2 + K^2) c^2 n`` multiply-adds from ``c = 128``, ``2 K^2 c^2 n`` below: Note
    [pair layout]), plus per-axis geometry constants computed once per input size and cached;
    nothing grows with ``N``. Gradients come from autograd. The three-term split cancels when
    ``M`` is nearly orthogonal: the absolute error is about ``eps(dtype) * g N``, so use float64
    where that matters.

    **Dtypes.** The weight must be float16, bfloat16, float32 or float64 (anything else raises
    ``ValueError`` naming the dtype), finite, and ``alpha`` a finite number. float16 and bfloat16
    weights are computed in float32 and the result is rounded once to the weight's dtype: relative
    error at most ``finfo(dtype).eps / 2`` (float16 4.9e-4, bfloat16 3.9e-3) plus the float32 error
    ``~1e-7 g N``; the gradient has the weight's dtype. float16 holds at most 65504: a larger
    penalty is returned as ``inf`` with a warning (call it on ``weight.float()`` for a float32
    value). The computation runs with ``torch.autocast`` disabled, so forward and backward work
    inside autocast regions (mixed-precision training) and give the same value and gradient as
    outside. See Note [working precision] in ``convspec/_precision.py``.

    >>> import torch
    >>> conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    >>> r = frobenius_penalty(conv, 32)
    >>> r.backward()          # gradients flow to conv.weight
    >>> conv.weight.grad.shape
    torch.Size([6, 3, 3, 3])
    >>> up = torch.nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False).double()
    >>> exact = frobenius_penalty(up, (3, 4, 5), 0.5)
    >>> dense = frobenius_penalty_reference(up, (3, 4, 5), 0.5)
    >>> bool(torch.isclose(exact, dense, rtol=1e-12))
    True

    References: P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to
    avoid unstable gradient problem", arXiv:1907.11235, eq. (1.3) and Section 3.
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    return to_weight_dtype(_frobenius_value(weight, geom, alpha), weight.dtype, "frobenius_penalty")


def frobenius_penalty_reference(
    conv,
    input_size: IntTuple,
    alpha: float = 1.0,
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
    """``||M^T M - alpha I||_F^2`` through the dense operator (the paper's route); differentiable.

    Same operator and arguments as :func:`frobenius_penalty`; exact up to rounding, but costs
    ``O((g N)^2 h N)`` time and ``O(g h N^2)`` memory (``N`` the number of input positions). For
    tests and small layers only. Dtypes, validation and autocast as in :func:`frobenius_penalty`.

    >>> w = torch.zeros(2, 2, 3, 3, dtype=torch.float64); w[:, :, 1, 1] = torch.eye(2)
    >>> float(frobenius_penalty_reference(w, 4, padding=1))   # a delta kernel is the identity
    0.0

    References: P.-C. Guo, arXiv:1907.11235, eq. (1.3).
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    with no_autocast(weight.device):
        m = dense_operator(weight.to(compute_dtype(weight.dtype)), geom, max_bytes)
        gram = m.T @ m
        gram = gram - alpha * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        value = gram.square().sum()
    return to_weight_dtype(value, weight.dtype, "frobenius_penalty_reference")


def frobenius_penalty_grad_reference(
    conv,
    input_size: IntTuple,
    alpha: float = 1.0,
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
    """The closed-form gradient ``dR/dK`` of Guo (2019), Theorems 2.1 and 3.1, from the dense ``M``.

    With ``R = ||M^T M - alpha I||_F^2`` and ``M`` linear in ``K``, ``dR/dM = 4 M (M^T M - alpha
    I)``, and the derivative with respect to one kernel entry is the sum of that matrix over the
    index set ``Omega`` of positions of ``M`` where the entry appears:

        dR/dK[c, d, P] = 4 * sum_{(i, j) in Omega(c, d, P)} [M (M^T M - alpha I)]_{ij}.

    (The paper's eq. (3.2) states ``G = (1/2) dR/dK``; this function returns ``dR/dK`` itself.)
    ``Omega`` is read off the 0/1 spatial shift matrix of each tap ``P``, built by the same
    layer (with circular, reflect or replicate padding a position may hold a tap more than once;
    it then counts with that multiplicity; for a transposed layer ``Omega`` is transposed). Same
    operator and arguments as :func:`frobenius_penalty`. Dense: ``O(g h N^2)`` memory. For tests
    and small layers only. Computed in float32 or better with autocast off; returned in the
    weight's dtype.

    >>> w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    >>> frobenius_penalty(w, 5, padding=1).backward()
    >>> torch.allclose(frobenius_penalty_grad_reference(w.detach(), 5, padding=1), w.grad)
    True

    References: P.-C. Guo, arXiv:1907.11235, Theorems 2.1 and 3.1, eq. (3.2).
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    with no_autocast(weight.device):
        grad = _grad_reference(weight.detach(), geom, alpha, max_bytes)
    return to_weight_dtype(grad, weight.dtype, "frobenius_penalty_grad_reference")


def _grad_reference(weight, geom: ConvGeometry, alpha: float, max_bytes: int) -> torch.Tensor:
    """:func:`frobenius_penalty_grad_reference` in ``compute_dtype(weight.dtype)``."""
    weight = weight.to(compute_dtype(weight.dtype))
    m = dense_operator(weight, geom, max_bytes)
    eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    dm = 4 * m @ (m.T @ m - alpha * eye)  # dR/dM
    if geom.transposed:
        dm = dm.T  # M = C^T: the entries of the conv view C
    h, gg, *ks = weight.shape
    kk = math.prod(ks)
    n_in, n_out = math.prod(geom.input_size), math.prod(geom.output_size)
    # Spatial shift matrix S_P (n_out x n_in) of each single tap of C: Omega(c, d, P) is
    # {(c n_out + i, d' n_in + j) : S_P[i, j] != 0} with d' = d + group(c) * (g // groups).
    taps = torch.eye(kk, dtype=m.dtype, device=m.device).view(kk, 1, 1, *ks)
    single = replace(geom, out_channels=1, in_channels=1, groups=1, transposed=False)
    shifts = torch.stack(
        [dense_operator(taps[i], single, max_bytes) for i in range(kk)]
    )  # (K, n_out, n_in)
    dm = dm.view(h, n_out, geom.in_channels, n_in)
    group_of = torch.arange(h, device=m.device) // (h // geom.groups)
    in_idx = group_of[:, None] * gg + torch.arange(gg, device=m.device)[None, :]  # (h, gg)
    blocks = dm[torch.arange(h, device=m.device)[:, None], :, in_idx]  # (h, gg, n_out, n_in)
    grad = torch.einsum("cdij,tij->cdt", blocks, shifts)
    return grad.reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# The 2-norm penalty of Guo & Ye

class _BufferState:
    """The power-iteration vectors of :func:`spectral_penalty` as buffers of the layer module
    (``spectral_penalty_u``, ``spectral_penalty_v``), read and written like a dict: so
    ``state_dict``, ``.to()``, ``deepcopy`` and DDP's buffer broadcast see them, as they see
    ``torch.nn.utils.spectral_norm``'s ``weight_u``. Written in place when the shape, dtype and
    device agree (references held elsewhere stay valid), else replaced."""

    PREFIX = "spectral_penalty_"

    def __init__(self, module: nn.Module):
        self.module = module

    def get(self, key: str):
        return self.module._buffers.get(self.PREFIX + key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.module._buffers[self.PREFIX + key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        name = self.PREFIX + key
        old = self.module._buffers.get(name)
        if (old is not None and old.shape == value.shape and old.dtype == value.dtype
                and old.device == value.device):
            if old is not value:
                old.copy_(value)
        else:
            self.module.register_buffer(name, value.detach().clone())


def _gram_apply(u: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``M^T M u`` for one input ``u`` of the layer, through the layer and its adjoint."""
    return layer_adjoint(layer_forward(u[None], weight, geom), weight, geom)[0]


def spectral_penalty(
    conv,
    input_size: IntTuple,
    alpha: float = 1.0,
    *,
    n_power_iterations: int = 2,
    state: Optional[dict] = None,
    stride=UNSET,
    padding=UNSET,
    dilation=UNSET,
    groups=UNSET,
    padding_mode=UNSET,
    transposed=UNSET,
    output_padding=UNSET,
) -> torch.Tensor:
    """The 2-norm penalty ``||M^T M - alpha I||_2`` without forming ``M``; differentiable.

    ``conv`` and the operator ``M`` as in :func:`frobenius_penalty` (a module, or a weight with
    ``nn.Conv*d`` keywords; every layer type and padding mode); ``I`` the identity of the
    layer's input dimension. The penalty is the largest
    ``|eigenvalue|`` of ``M^T M - alpha I``,

        ``max(sigma_max^2 - alpha, alpha - lambda_min(M^T M))``,

    so it pushes ``sigma_max`` and ``sigma_min`` towards ``sqrt(alpha)`` together.
    ``lambda_min(M^T M) = sigma_min^2`` when ``M`` has at least as many rows as columns; when
    ``M`` is wide (fewer rows than columns) ``M^T M`` is singular and the second term is
    ``alpha`` itself (exactly, with no gradient).

    Computed matrix-free by power iteration with the layer and its adjoint: one vector
    ``u`` for the top of the spectrum of ``M^T M``, one ``v`` for the bottom (power iteration on
    ``lambda I - M^T M``, ``lambda`` the current top estimate). Each call runs
    ``n_power_iterations`` steps of each (4 convolutions per step) without gradient, then
    returns ``max(||M u||^2 - alpha, alpha - ||M v||^2)`` with ``u, v`` detached: as for
    ``torch.nn.utils.spectral_norm``, the gradient is that of the eigenvalues when the vectors
    have converged. The vectors persist between calls, so that a few steps per training step
    track the spectrum: in ``state`` when given (a dict that the caller keeps, e.g. one per
    layer); else, when ``conv`` is a module, in buffers of that module
    (``spectral_penalty_u`` and ``spectral_penalty_v``, created by the first call and
    reinitialised when the input size changes), which ``state_dict``, ``.to()``, ``deepcopy``
    and DDP carry like any buffer (call the penalty once before wrapping the model in DDP, so
    that DDP sees the buffers; to load such a ``state_dict`` into a fresh model, call the
    penalty once first or load with ``strict=False``); a bare weight tensor without ``state``
    starts from random vectors at every call. The value
    is a lower bound of the exact penalty that becomes exact as the vectors converge; the
    bottom vector converges slowly when the small singular values cluster, so start with many
    iterations (e.g. 100) where an accurate value matters. Cost per step: ``O(g h K N)`` (``K`` kernel taps, ``N`` positions).

    Dtypes, validation and autocast as in :func:`frobenius_penalty`: float16/bfloat16 weights are
    iterated and evaluated in float32 (the vectors are kept in float32), the result is rounded
    once to the weight's dtype, and forward and backward work inside ``torch.autocast`` regions.

    >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    >>> state = {}
    >>> p = spectral_penalty(conv, 8, n_power_iterations=50, state=state)
    >>> p.backward()
    >>> conv.weight.grad.shape, sorted(state)
    (torch.Size([4, 3, 3, 3]), ['u', 'v'])

    References: P.-C. Guo, Q. Ye, "On the regularization of convolutional kernel tensors in
    neural networks", Linear and Multilinear Algebra (2022), the 2-norm penalty; T. Miyato et al.,
    "Spectral Normalization for Generative Adversarial Networks", ICLR 2018 (persistent power
    iteration); P.-C. Guo, arXiv:1907.11235 (the operator ``M``).
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    if (isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int)
            or n_power_iterations < 0):
        raise ValueError(
            f"n_power_iterations must be a non-negative int, got {n_power_iterations!r}"
        )
    if state is None and isinstance(conv, nn.Module):
        state = _BufferState(conv)
    elif state is None:
        state = {}  # a bare tensor without a state dict: fresh vectors, nothing kept
    elif not isinstance(state, dict):
        raise ValueError(f"state must be a dict (or None), got {type(state).__name__}")
    with no_autocast(weight.device):
        value = _spectral_value(weight, geom, alpha, n_power_iterations, state)
    return to_weight_dtype(value, weight.dtype, "spectral_penalty")


def _spectral_value(weight, geom, alpha, n_power_iterations, state) -> torch.Tensor:
    """:func:`spectral_penalty` in ``compute_dtype(weight.dtype)``; arguments validated."""
    shape = (geom.layer_in_channels, *geom.layer_input_size)
    wide = geom.layer_n_out < geom.layer_n_in
    weight = weight.to(compute_dtype(weight.dtype))
    w = weight.detach()
    for key in ("u", "v"):
        vec = state.get(key)
        if vec is None or vec.shape != shape or vec.dtype != w.dtype or vec.device != w.device:
            vec = torch.randn(shape, dtype=w.dtype, device=w.device)
            state[key] = vec / vec.norm()
    with torch.no_grad():
        u, v = state["u"], state["v"]
        for _ in range(n_power_iterations):
            gu = _gram_apply(u, w, geom)
            top = torch.dot(gu.reshape(-1), u.reshape(-1))
            u = gu / gu.norm().clamp_min(torch.finfo(w.dtype).tiny)
            if not wide:
                gv = top * v - _gram_apply(v, w, geom)
                v = gv / gv.norm().clamp_min(torch.finfo(w.dtype).tiny)
        state["u"], state["v"] = u, v
    top = layer_forward(u[None], weight, geom).square().sum()
    if wide:
        return torch.clamp(top - alpha, min=alpha)
    bottom = layer_forward(v[None], weight, geom).square().sum()
    return torch.maximum(top - alpha, alpha - bottom)
