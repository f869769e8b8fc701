"""Penalties on the spectrum of a convolution operator ``M``: Frobenius and 2-norm.

``frobenius_penalty`` is exact and never forms ``M``; ``frobenius_penalty_reference`` forms it;
``frobenius_penalty_grad_reference`` is the closed-form gradient of Guo (2019), Theorems 2.1/3.1. ``spectral_penalty`` is the 2-norm
penalty ``||M^T M - alpha I||_2`` of Guo & Ye, by persistent power iteration.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._geometry import (
    AxisGeometry, ConvGeometry, IntPair, Padding, check_real, check_weight, conv2d, conv_geometry,
)
from ._precision import compute_dtype, no_autocast, to_weight_dtype
from .operator import DEFAULT_MAX_BYTES, conv_operator
from .spectrum import _conv_t

# Note [structure of M]: per spatial axis let A_p (P x N) be the 0/1 matrix with A_p[y, x] = 1
# iff output y reads input x through kernel offset p (zero padding drops taps outside [0, N),
# circular padding wraps them, and a wrapped tap that lands on an existing one adds up). Then,
# with K_{pq} = weight[:, :, p, q] (h x g),
#
#     M = sum_{p,q} K_{pq} (x) A_p (x) B_q                      ((x): Kronecker product)
#     M M^T = sum_{P,P'} (K_P K_P'^T) (x) (A_p A_p'^T) (x) (B_q B_q'^T)
#     ||M M^T||_F^2 = sum_{P,P',R,R'} <T_PP', T_RR'> Q1[pp', rr'] Q2[qq', ss']
#
# with T_PP' = K_P K_P'^T and Q[pp', rr'] = <A_p A_p'^T, A_r A_r'^T>_F, a k^2 x k^2 PSD matrix per
# axis that depends on the geometry only. Factor Q = V V^T (rank <= k^2) and the sum becomes
# sum_{u,v} || sum_{P,P'} V1[pp', u] V2[qq', v] T_PP' ||_F^2: one h x h Frobenius norm per pair
# (u, v), at most k1^2 * k2^2 of them, whatever N is. ||M^T M|| = ||M M^T||, and the same
# construction on the input side (T_PP' = K_P^T K_P', g x g) is used when g < h.


@lru_cache(maxsize=1024)
def _axis_pair_sums(ax: AxisGeometry) -> Tuple[np.ndarray, np.ndarray]:
    """Per-axis constants ``(Q_out, D)`` of Note [structure of M], in O(1) time in ``N``.

    ``Q_out`` is ``(k^2, k^2)``: ``sum_{y,y'} e(y,y') e(y,y')^T`` over all pairs of output
    positions, where ``e(y, y')[p, p'] = (A_p A_p'^T)[y, y']``. ``D`` is ``(k, k)``:
    ``D[p, p'] = trace(A_p A_p'^T)``.
    """
    k, n, s, d, P = ax.kernel, ax.size, ax.stride, ax.dilation, ax.out_size
    offsets = d * np.arange(k)
    reach = d * (k - 1) // s  # |y - y'| beyond which no tap is shared (without wrapping)

    # Note [boundary classes]: e(y, y + t) depends on y only through which taps of y are valid
    # (or wrap) and whether y + t is an output. For "interior" y -- every tap inside
    # [lo_safe, hi_safe] and y +- reach both outputs -- it depends on t alone, so one
    # representative with a multiplicity stands for all of them. The rest lie within a distance
    # set by padding, dilation and stride of either end: their number does not grow with N.
    if ax.circular:
        # A wrapped tap lands in [0, pad_hi) or [N - pad_lo, N); keep interior taps clear of both.
        lo_safe, hi_safe = ax.pad_hi, n - 1 - ax.pad_lo
    else:
        lo_safe, hi_safe = 0, n - 1
    y_lo = max(reach, -(-(lo_safe + ax.pad_lo) // s))
    y_hi = min(P - 1 - reach, (hi_safe + ax.pad_lo - d * (k - 1)) // s)
    if y_lo <= y_hi:
        reps = [(y, 1) for y in range(0, y_lo)] + [(y_lo, y_hi - y_lo + 1)]
        reps += [(y, 1) for y in range(y_hi + 1, P)]
    else:
        reps = [(y, 1) for y in range(P)]

    wraps = (-2, -1, 0, 1, 2) if ax.circular else (0,)
    q = np.zeros((k * k, k * k), dtype=np.float64)
    diag = np.zeros((k, k), dtype=np.float64)
    for y, w in reps:
        taps = s * y - ax.pad_lo + offsets  # (k,)
        valid = np.ones(k, bool) if ax.circular else (taps >= 0) & (taps < n)
        # Partners y' share a tap: s*y' = s*y + d*(p - p') + m*N for some p, p', m.
        partners = set()
        for m in wraps:
            for delta in range(-(k - 1), k):
                num = s * y + d * delta + m * n
                if num % s == 0 and 0 <= num // s < P:
                    partners.add(num // s)
        for y2 in partners:
            taps2 = s * y2 - ax.pad_lo + offsets
            diff = taps[:, None] - taps2[None, :]
            same = (diff % n == 0) if ax.circular else (diff == 0)
            e = (same & valid[:, None]).astype(np.float64)  # (k, k)
            v = e.reshape(-1)
            q += w * np.outer(v, v)
            if y2 == y:
                diag += w * e
    return q, diag


@lru_cache(maxsize=1024)
def _axis_factor(ax: AxisGeometry, side: str) -> np.ndarray:
    """``V`` with ``Q = V V^T`` for ``side`` ``'out'`` (Gram M M^T) or ``'in'`` (Gram M^T M)."""
    q, _ = _axis_pair_sums(ax)
    k = ax.kernel
    if side == "in":
        # <A_p^T A_p', A_r^T A_r'> = tr(A_p A_r^T A_r' A_p'^T) = Q_out[(r, p), (r', p')].
        q = q.reshape(k, k, k, k).transpose(2, 0, 3, 1).reshape(k * k, k * k)
    evals, evecs = np.linalg.eigh((q + q.T) / 2)
    keep = evals > evals.max(initial=0.0) * 1e-13
    return evecs[:, keep] * np.sqrt(evals[keep])


@lru_cache(maxsize=256)
def _constants(
    ax1: AxisGeometry, ax2: AxisGeometry, side: str, dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached tensors: ``V1 (x) V2`` with rows ``(p, q, p', q')``, and ``kron(D1, D2)``."""
    k1, k2 = ax1.kernel, ax2.kernel
    v1 = _axis_factor(ax1, side).reshape(k1, k1, -1)
    v2 = _axis_factor(ax2, side).reshape(k2, k2, -1)
    v = np.einsum("abu,cdv->acbduv", v1, v2).reshape(k1 * k2 * k1 * k2, -1)
    d = np.kron(_axis_pair_sums(ax1)[1], _axis_pair_sums(ax2)[1])
    return (
        torch.as_tensor(v, dtype=dtype, device=device),
        torch.as_tensor(d, dtype=dtype, device=device),
    )


class _GramSquaredNorm(torch.autograd.Function):
    """``(||M M^T||_F^2, ||M||_F^2)`` from ``T = A A^T`` (Note [structure of M]).

    ``A`` is ``(G, c k1 k2, n)`` with rows ordered ``(c, P)``, ``P = (p, q)``; the first output is
    ``sum_w || sum_{P,P'} V[(P,P'), w] T_PP' ||_F^2``, the second ``sum_{c,P,P'} T[(c,P),(c,P')]
    D[P,P']`` (the diagonal channel blocks of the same ``T``). Forward: one Gram GEMM, one
    permutation of ``T`` to ``(c, c', P, P')``, one GEMM against ``V``. Backward mirrors it;
    ``dS/dT`` is symmetric (``Q`` is invariant under swapping ``(p, p') -> (p', p)``, ``D`` is
    symmetric), so ``dA = 2 (dS/dT) A`` is a single GEMM. Both directions run with autocast off
    (Note [working precision]): PyTorch would otherwise run a backward called inside an autocast
    region in low precision, which is why ``||M||^2`` is taken from ``T`` here and not by a
    separate differentiable GEMM.
    """

    @staticmethod
    def forward(ctx, a, v, d, c, k1, k2):  # type: ignore[override]
        G = a.shape[0]
        kk = k1 * k2
        with no_autocast(a.device):
            t = torch.matmul(a, a.transpose(-1, -2)).view(G, c, kk, c, kk)  # (G, c, P, c', P')
            fro = (torch.diagonal(t, dim1=1, dim2=3) * d[..., None]).sum()  # blocks c = c'
            t = t.permute(0, 1, 3, 2, 4)
            z = torch.matmul(t.reshape(G * c * c, kk * kk), v)  # (G c c', r1 r2)
        ctx.save_for_backward(a, v, d, z)
        ctx.shape = (G, c, kk)
        return torch.dot(z.view(-1), z.view(-1)), fro

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gram, grad_fro):  # type: ignore[override]
        a, v, d, z = ctx.saved_tensors
        G, c, kk = ctx.shape
        with no_autocast(a.device):
            dt = torch.matmul(z, v.T).mul_(2 * grad_gram.to(z.dtype))  # (G c c', P P')
            dt = dt.view(G, c, c, kk, kk).permute(0, 1, 3, 2, 4).contiguous()  # (G, c, P, c', P')
            torch.diagonal(dt, dim1=1, dim2=3).add_(d[..., None] * grad_fro.to(d.dtype))
            return torch.matmul(dt.view(G, c * kk, c * kk), a).mul_(2), None, None, None, None, None


def _penalty_terms(weight: torch.Tensor, geom: ConvGeometry) -> Dict[str, torch.Tensor]:
    """``||M^T M||_F^2`` and ``||M||_F^2`` from Note [structure of M]; differentiable."""
    h, gg, k1, k2 = weight.shape
    G = geom.groups
    hg = h // G
    side = "out" if hg <= gg else "in"
    v, dfull = _constants(geom.axes[0], geom.axes[1], side, weight.dtype, weight.device)
    kw = weight.reshape(G, hg, gg, k1, k2)
    # Rows (c, p, q) of the side with fewer channels; T = rows rows^T.
    rows = kw.permute(0, 1, 3, 4, 2) if side == "out" else kw.permute(0, 2, 3, 4, 1)
    c = rows.shape[1]
    # ||M||_F^2 = sum_{P,P'} <K_P, K_P'> tr(A_p A_p'^T) tr(B_q B_q'^T); off-diagonal terms of D
    # are non-zero only when circular padding makes two taps land on the same input.
    gram_sq, fro_sq = _GramSquaredNorm.apply(rows.reshape(G, c * k1 * k2, -1), v, dfull, c, k1, k2)
    return {"gram_sq": gram_sq, "fro_sq": fro_sq}


def _frobenius_value(weight: torch.Tensor, geom: ConvGeometry, alpha: float) -> torch.Tensor:
    """The penalty in ``compute_dtype(weight.dtype)``, autocast off (Note [working precision]).

    ``weight`` and ``alpha`` must be validated already; differentiable.
    """
    with no_autocast(weight.device):
        terms = _penalty_terms(weight.to(compute_dtype(weight.dtype)), geom)
        return terms["gram_sq"] - 2 * alpha * terms["fro_sq"] + alpha**2 * geom.n_in


def frobenius_penalty(
    weight: torch.Tensor,
    input_size: IntPair,
    alpha: float = 1.0,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Exact ``R_alpha(K) = ||M^T M - alpha I||_F^2`` without forming ``M``; differentiable.

    ``M`` is the matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride, padding=padding,
    dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` acting on a
    ``g x N1 x N2`` input (``input_size`` is ``N`` or ``(N1, N2)``), with ``weight`` of shape
    ``(h, g // groups, k1, k2)``: see :func:`conv_operator`. ``padding_mode`` is ``'zeros'`` or
    ``'circular'``; ``padding`` an int, a pair, ``'same'`` or ``'valid'``. ``I`` is the
    ``g N1 N2`` identity.

    The result is **exact** (not a bound, not the interior-only approximation
    ``||conv(K, K) - delta||^2``): boundary rows and columns of ``M``, strides, dilation, circular
    wrap-around and groups (``M`` block diagonal, penalties summed) are all accounted for. Uses
    ``||M^T M - aI||^2 = ||M^T M||^2 - 2a ||M||^2 + a^2 g N1 N2`` and
    ``||M^T M||_F = ||M M^T||_F`` on the side with fewer channels.

    Cost: ``O(c^2 (g+h)/2 k^4)`` time and ``O(c^2 k^4)`` memory for ``c = min(h, g) / groups``,
    plus geometry constants computed once per input size and cached; nothing grows with ``N``.
    Gradients come from autograd. The three-term split cancels when ``M`` is nearly orthogonal:
    the absolute error is about ``eps(dtype) * g N1 N2``, so use float64 where that matters.

    **Dtypes.** ``weight`` must be float16, bfloat16, float32 or float64 (anything else raises
    ``ValueError`` naming the dtype), finite, and ``alpha`` a finite number. float16 and bfloat16
    weights are computed in float32 and the result is rounded once to the weight's dtype: relative
    error at most ``finfo(dtype).eps / 2`` (float16 4.9e-4, bfloat16 3.9e-3) plus the float32 error
    ``~1e-7 g N1 N2``; the gradient has the weight's dtype. float16 holds at most 65504: a larger
    penalty is returned as ``inf`` with a warning (call it on ``weight.float()`` for a float32
    value). The computation runs with ``torch.autocast`` disabled, so forward and backward work
    inside autocast regions (mixed-precision training) and give the same value and gradient as
    outside. See Note [working precision] in ``convspec/_precision.py``.

    >>> import torch
    >>> conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    >>> r = frobenius_penalty(conv.weight, 32, padding=1)
    >>> r.backward()          # gradients flow to conv.weight
    >>> conv.weight.grad.shape
    torch.Size([6, 3, 3, 3])
    >>> w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    >>> exact = frobenius_penalty(w, 6, 0.5)
    >>> dense = frobenius_penalty_reference(w, 6, 0.5)
    >>> bool(torch.isclose(exact, dense, rtol=1e-12))
    True

    References: P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to
    avoid unstable gradient problem", arXiv:1907.11235, eq. (1.3) and Section 3.
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
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    return to_weight_dtype(_frobenius_value(weight, geom, alpha), weight.dtype, "frobenius_penalty")


def frobenius_penalty_reference(
    weight: torch.Tensor,
    input_size: IntPair,
    alpha: float = 1.0,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """``||M^T M - alpha I||_F^2`` through the dense operator (the paper's route); differentiable.

    Same operator and arguments as :func:`frobenius_penalty`; exact up to rounding, but costs
    ``O((g N^2)^2 h N^2)`` time and ``O(g h N^4)`` memory. For tests and small layers only.
    Dtypes, validation and autocast as in :func:`frobenius_penalty` (float16/bfloat16 computed in
    float32, the result in the weight's dtype).

    >>> w = torch.zeros(2, 2, 3, 3, dtype=torch.float64); w[:, :, 1, 1] = torch.eye(2)
    >>> float(frobenius_penalty_reference(w, 4))   # a delta kernel is an identity operator
    0.0

    References: P.-C. Guo, arXiv:1907.11235, eq. (1.3).
    """
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    with no_autocast(weight.device):
        m = conv_operator(
            weight.to(compute_dtype(weight.dtype)),
            input_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            max_bytes=max_bytes,
        )
        gram = m.T @ m
        gram = gram - alpha * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        value = gram.square().sum()
    return to_weight_dtype(value, weight.dtype, "frobenius_penalty_reference")


def frobenius_penalty_grad_reference(
    weight: torch.Tensor,
    input_size: IntPair,
    alpha: float = 1.0,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """The closed-form gradient ``dR/dK`` of Guo (2019), Theorems 2.1 and 3.1, from the dense ``M``.

    With ``R = ||M^T M - alpha I||_F^2`` and ``M`` linear in ``K``, ``dR/dM = 4 M (M^T M - alpha
    I)``, and the derivative with respect to one kernel entry is the sum of that matrix over the
    index set ``Omega`` of positions of ``M`` where the entry appears:

        dR/dK[c, d, p, q] = 4 * sum_{(i, j) in Omega(c, d, p, q)} [M (M^T M - alpha I)]_{ij}.

    (The paper's eq. (3.2) states ``G = (1/2) dR/dK``; this function returns ``dR/dK`` itself.)
    ``Omega`` is read off the 0/1 spatial shift matrix of each tap ``(p, q)``, built by the same
    convolution (for circular padding a position may hold a tap more than once; it then counts
    with that multiplicity). Same operator and arguments as :func:`frobenius_penalty`. Dense:
    ``O(g h N^4)`` memory. For tests and small layers only. Computed in float32 or better with
    autocast off; returned in the weight's dtype (validation as in :func:`frobenius_penalty`).

    >>> w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    >>> frobenius_penalty(w, 5).backward()
    >>> torch.allclose(frobenius_penalty_grad_reference(w.detach(), 5), w.grad)
    True

    References: P.-C. Guo, arXiv:1907.11235, Theorems 2.1 and 3.1, eq. (3.2).
    """
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    geom = conv_geometry(weight, input_size, groups=groups, **kwargs)
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    with no_autocast(weight.device):
        grad = _grad_reference(weight.detach(), input_size, alpha, geom, groups, max_bytes, kwargs)
    return to_weight_dtype(grad, weight.dtype, "frobenius_penalty_grad_reference")


def _grad_reference(weight, input_size, alpha, geom, groups, max_bytes, kwargs) -> torch.Tensor:
    """:func:`frobenius_penalty_grad_reference` in ``compute_dtype(weight.dtype)``."""
    m = conv_operator(
        weight.to(compute_dtype(weight.dtype)), input_size, groups=groups, max_bytes=max_bytes,
        **kwargs,
    )
    eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    dm = 4 * m @ (m.T @ m - alpha * eye)  # dR/dM
    h, gg, k1, k2 = weight.shape
    (n1, n2), (p1, p2) = geom.input_size, geom.output_size
    # Spatial shift matrix S_pq (P1 P2 x N1 N2) of each single tap: Omega(c, d, p, q) is
    # {(c P1 P2 + i, d' N1 N2 + j) : S_pq[i, j] != 0} with d' = d + group(c) * (g // groups).
    taps = torch.zeros(k1 * k2, 1, k1, k2, dtype=m.dtype, device=m.device)
    taps.view(k1 * k2, -1)[torch.arange(k1 * k2), torch.arange(k1 * k2)] = 1
    shifts = torch.stack(
        [conv_operator(taps[i : i + 1], input_size, max_bytes=max_bytes, **kwargs)
         for i in range(k1 * k2)]
    )  # (k1 k2, P1 P2, N1 N2)
    dm = dm.view(h, p1 * p2, geom.in_channels, n1 * n2)
    group_of = torch.arange(h, device=m.device) // (h // groups)
    in_idx = group_of[:, None] * gg + torch.arange(gg, device=m.device)[None, :]  # (h, gg)
    blocks = dm[torch.arange(h, device=m.device)[:, None], :, in_idx]  # (h, gg, P1P2, N1N2)
    grad = torch.einsum("cdij,tij->cdt", blocks, shifts)
    return grad.reshape(h, gg, k1, k2)


# --------------------------------------------------------------------------------------------
# The 2-norm penalty of Guo & Ye

# Power-iteration vectors kept between calls, per weight tensor and geometry, as
# torch.nn.utils.spectral_norm keeps ``u`` in a buffer. Keyed by id() (tensors compare
# elementwise, so they cannot be dict keys by value); an entry vanishes with its weight.
_POWER_STATE: Dict[int, Tuple["weakref.ref", dict]] = {}


def _cached_state(weight: torch.Tensor, geom: ConvGeometry) -> dict:
    key = id(weight)
    entry = _POWER_STATE.get(key)
    if entry is None or entry[0]() is not weight:

        def drop(ref, key=key):
            if _POWER_STATE.get(key, (None,))[0] is ref:
                del _POWER_STATE[key]

        entry = (weakref.ref(weight, drop), {})
        _POWER_STATE[key] = entry
    return entry[1].setdefault(geom, {})


def _gram_apply(u: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``M^T M u`` for ``u`` of shape ``(g, N1, N2)``, through the convolution and its adjoint."""
    return _conv_t(conv2d(u[None], weight, geom), weight, geom)[0]


def spectral_penalty(
    weight: torch.Tensor,
    input_size: IntPair,
    alpha: float = 1.0,
    *,
    n_power_iterations: int = 2,
    state: Optional[dict] = None,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """The 2-norm penalty ``||M^T M - alpha I||_2`` without forming ``M``; differentiable.

    ``M`` is the matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride, padding=padding,
    dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` on a
    ``g x N1 x N2`` input, ``weight`` of shape ``(h, g // groups, k1, k2)`` (see
    :func:`conv_operator`), ``I`` the ``g N1 N2`` identity. The penalty is the largest
    ``|eigenvalue|`` of ``M^T M - alpha I``,

        ``max(sigma_max^2 - alpha, alpha - lambda_min(M^T M))``,

    so it pushes ``sigma_max`` and ``sigma_min`` towards ``sqrt(alpha)`` together.
    ``lambda_min(M^T M) = sigma_min^2`` when ``M`` has at least as many rows as columns; when
    ``M`` is wide (``h P1 P2 < g N1 N2``) ``M^T M`` is singular and the second term is
    ``alpha`` itself (exactly, with no gradient).

    Computed matrix-free by power iteration with ``F.conv2d`` and its transpose: one vector
    ``u`` for the top of the spectrum of ``M^T M``, one ``v`` for the bottom (power iteration on
    ``lambda I - M^T M``, ``lambda`` the current top estimate). Each call runs
    ``n_power_iterations`` steps of each (4 convolutions per step) without gradient, then
    returns ``max(||M u||^2 - alpha, alpha - ||M v||^2)`` with ``u, v`` detached: as for
    ``torch.nn.utils.spectral_norm``, the gradient is that of the eigenvalues when the vectors
    have converged. The vectors persist between calls, so that a few steps per training step
    track the spectrum: in ``state`` when given (a dict that the caller keeps, e.g. one per
    layer), else in a cache keyed by the ``weight`` tensor itself (an ``nn.Parameter`` keeps its
    vectors across steps; a new tensor starts from random vectors) and the geometry. The value
    is a lower bound of the exact penalty that becomes exact as the vectors converge; the
    bottom vector converges slowly when the small singular values cluster, so start with many
    iterations (e.g. 100) where an accurate value matters. Cost per step: ``O(g h k1 k2 N1 N2)``.

    Dtypes, validation and autocast as in :func:`frobenius_penalty`: float16/bfloat16 weights are
    iterated and evaluated in float32 (the vectors are kept in float32), the result is rounded
    once to the weight's dtype, and forward and backward work inside ``torch.autocast`` regions.

    >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    >>> state = {}
    >>> p = spectral_penalty(conv.weight, 8, n_power_iterations=50, state=state)
    >>> p.backward()
    >>> conv.weight.grad.shape, sorted(state)
    (torch.Size([4, 3, 3, 3]), ['u', 'v'])

    References: P.-C. Guo, Q. Ye, "On the regularization of convolutional kernel tensors in
    neural networks", Linear and Multilinear Algebra (2022), the 2-norm penalty; T. Miyato et al.,
    "Spectral Normalization for Generative Adversarial Networks", ICLR 2018 (persistent power
    iteration); P.-C. Guo, arXiv:1907.11235 (the operator ``M``).
    """
    geom = conv_geometry(
        weight, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode,
    )
    check_weight(weight)
    alpha = check_real(alpha, "alpha")
    if (isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int)
            or n_power_iterations < 0):
        raise ValueError(
            f"n_power_iterations must be a non-negative int, got {n_power_iterations!r}"
        )
    if state is None:
        state = _cached_state(weight, geom)
    elif not isinstance(state, dict):
        raise ValueError(f"state must be a dict (or None), got {type(state).__name__}")
    with no_autocast(weight.device):
        value = _spectral_value(weight, geom, alpha, n_power_iterations, state)
    return to_weight_dtype(value, weight.dtype, "spectral_penalty")


def _spectral_value(weight, geom, alpha, n_power_iterations, state) -> torch.Tensor:
    """:func:`spectral_penalty` in ``compute_dtype(weight.dtype)``; arguments validated."""
    shape = (geom.in_channels, *geom.input_size)
    wide = geom.n_out < geom.n_in
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
    top = conv2d(u[None], weight, geom).square().sum()
    if wide:
        return torch.clamp(top - alpha, min=alpha)
    bottom = conv2d(v[None], weight, geom).square().sum()
    return torch.maximum(top - alpha, alpha - bottom)
