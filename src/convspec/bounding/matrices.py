"""Tensor layer of SVB: clip the singular values of a stack of matrices (SVD and Gram routes).

:func:`bound_singular_values` takes a weight tensor and returns it bounded; everything here acts on
tensors only (no modules, no communication). The Gram route and the constants that decide when it
is taken are justified in Note [Gram route accuracy].

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithm 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Tuple

import torch

from .._geometry import check_weight_dtype
from .._precision import no_autocast
from .layers import _all_finite, _matrices

METHODS = ("auto", "svd", "gram")

#: ``method='auto'`` takes the Gram route for matrices at least this elongated
#: (``max(m, n) / min(m, n)``), when the accuracy check of Note [Gram route accuracy] passes.
#: Set from ``benchmarks/svb.py``: on CPU the Gram route (one float64 GEMM, a ``min(m, n)``
#: eigendecomposition and one GEMM back) beat the float64 SVD for every shape measured, square ones
#: included, so the threshold is 1.
GRAM_MIN_ASPECT = 1.0

#: Matrices of one shape are decomposed together in batches of at most this many elements.
_BATCH_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------
# Validation helpers


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"{name} must be a positive finite number, got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {eps!r}")
    return value


def _band(eps: float) -> Tuple[float, float]:
    return 1.0 / (1.0 + eps), 1.0 + eps


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method



# --------------------------------------------------------------------------------------------
# Tensor layer: bound a stack of matrices

# Note [Gram route accuracy]: for a wide m x n matrix A (m <= n; a tall one is transposed) with
# G = A A^T = U diag(s^2) U^T, the bounded matrix is
#
#     A' = U diag(clip(s)) V^T = h(G) A,        h(l) = clip(sqrt(l)) / sqrt(l),
#
# so one GEMM, one m x m eigendecomposition and one GEMM back replace the SVD, and A' is written
# as A + (h(G) - I) A: in-band singular values have h = 1 exactly and contribute exactly zero.
# Forming G in precision u and the backward-stable eigh give the exact h of G + E with
# ||E||_F <~ c u ||G||_F <= c u sqrt(m) s_max^2. The first-order error of h(G + E) A, in the
# eigenbasis of G, is h[l_i, l_j] E_ij s_j, with h[.,.] the divided difference of h. Writing
# g(s) = clip(s) / s, h[l_i, l_j] = g[s_i, s_j] / (s_i + s_j), so |h[l_i, l_j] s_j| <= L =
# max |g'| over [s_min, s_max]; g is flat (= 1) inside the band, |g'| = lo / s^2 below it and
# hi / s^2 <= 1 / hi above it. So ||dA'||_F <= L ||E||_F, and with ||A'||_F >= lo sqrt(m):
#
#     ||dA'||_F / ||A'||_F  <~  c u (1 + eps)^2 kappa^2,        kappa = s_max / s_min,
#
# the bad terms being the values far *below* the band, stretched up to 1/(1+eps) (L = lo /
# s_min^2); values far above it are shrunk, where g' -> 0 and errors are damped; values near the
# band edges (the only ones whose clip decision matters) are accurate to ~u kappa^2 s, tiny.
# So the Gram route loses about kappa^2 u against the SVD, and it is taken only where
#
#     eps(dtype) * kappa^2 <= tol * eps(weight dtype),   i.e.  l_min >= l_max * eps / (tol eps_w)
#
# (checked per matrix on the computed eigenvalues; failures are redone by SVD in ``dtype``).
# Rank-deficient matrices (s_min = 0: the singular vector that the clip needs is not determined
# by G) fail the check in every precision. The tolerance depends on what ``dtype`` promises:
#
# * dtype=float64 (G, eigh and h in float64): as accurate as a float64 SVD, to GRAM_TOLERANCE =
#   0.1 weight ulps. For a float32 weight this allows kappa up to ~7e3; a float64 weight never
#   passes, so float64 weights always take the SVD route.
# * dtype=float32 (G, eigh, h and the product back all in float32, LAPACK syevd): as accurate as
#   the float32 SVD, whose own error is not one ulp but grows with m, because its U and V are
#   orthogonal only to ~sqrt(m) u: measured 1.3 (m = 2), 4 (m = 8), 5.4 (m = 32), 10 (m = 160)
#   and 18 (m = 640) float32 eps from the exact clip (medians over spectra and seeds). For
#   kappa <= 1.5 the float32 Gram route measured at most 1.2 (m = 2), 3.8 (m = 8 .. 32), 4.9
#   (m = 160) and 6.3 (m = 640) eps, below the float32 SVD's error at every m (0.62x of it at
#   worst in tests/test_svb_routes.py); its error is dominated by float32 eigh, not by the
#   float32 Gram (float32 G with float64 eigh stays within ~1 eps). At kappa = 2 it is up to
#   1.5x the SVD's for m <= 8, at kappa = 64 seven to ten times it (m = 160 .. 640): the kappa^2
#   growth is real. So GRAM_TOLERANCE_FLOAT32 = 2, i.e. kappa <= sqrt(2) for float32 weights
#   (kappa <= 128 for float16, 362 for bfloat16, whose ulp is larger). Under SVB a layer's kappa
#   stays near (1 + eps)^2 between passes, so training takes this route; a freshly initialised
#   random layer (kappa ~ 2 or more) takes the float32 SVD. tests/test_svb_routes.py checks both
#   sides of the threshold against a float64 SVD and the float32 SVD loop.
#
# The last product, D = (h(G) - I) A, is the only O(m n min(m, n)) step after G. Only the k
# out-of-band eigenvectors Q_k (f = clip(s)/s - 1 != 0) enter it: D = Q_k diag(f_k) (Q_k^T A),
# 2 k m n flops instead of m^2 n, taken when 2k < m (and nothing at all when k = 0: the matrix
# is returned bit-identical). Where dtype=float64 and the weight is float32 (or lower), D of a
# large matrix is formed in float32: its rounding error is about eps32 * ||h(G) - I|| * ||A||,
# i.e. eps32 * rho relative to ||A'|| with rho = max|f| s_max / max(s'), and writing A' back in
# float32 costs one eps32 anyway. We do so only where rho <= APPLY_RHO (a few ulps at most;
# rho ~ 1 for freshly initialised layers), else in float64.
GRAM_TOLERANCE = 0.1
GRAM_TOLERANCE_FLOAT32 = 2.0
APPLY_RHO = 4.0
#: Matrices with at least this many entries are processed one by one (batching does not help a
#: CPU LAPACK call that size and stacking costs copies); smaller ones are stacked by shape.
_LARGE = 1 << 16
#: Row-block size of the lower-triangle Gram product (eigh reads the lower triangle only): 55% of
#: the full product's flops for 640 rows (160-row blocks: 62%). Measured (float32, one CPU
#: thread): 63% of the full product's time for 640 x 5760 with blocks of 64 to 160, and for
#: 320 x 2880 63% with blocks of 64 against 77% with 160.
_GRAM_BLOCK = 64


def _gram_allowed(weight_dtype: torch.dtype, dtype: torch.dtype) -> float:
    """Smallest ``l_min / l_max`` for which the Gram route is accurate; > 1 when never."""
    tol = GRAM_TOLERANCE if dtype == torch.float64 else GRAM_TOLERANCE_FLOAT32
    return torch.finfo(dtype).eps / (tol * torch.finfo(weight_dtype).eps)


class _DecompositionError(RuntimeError):
    def __init__(self, index: int, cause: BaseException):
        super().__init__(str(cause))
        self.index = index
        self.cause = cause


def _per_item(fn, x: torch.Tensor):
    """``fn(x)`` on a stack; on failure, find the item at fault and raise ``_DecompositionError``."""
    try:
        return fn(x)
    except RuntimeError:
        for i in range(x.shape[0]):
            try:
                fn(x[i : i + 1])
            except RuntimeError as err:
                raise _DecompositionError(i, err) from err
        raise


def _svd_route(a: torch.Tensor, lo: float, hi: float, dtype: torch.dtype):
    """SVD route on a stack ``(B, m, n)``: ``(new in a's dtype, s before, s after)``, s descending."""
    a64 = a.to(dtype)
    u, s, vh = _per_item(lambda x: torch.linalg.svd(x, full_matrices=False), a64)
    s_new = s.clamp(lo, hi)
    delta = torch.matmul(u * (s_new - s).unsqueeze(-2), vh)  # (B, m, n), exactly 0 if in band
    return (a64 + delta).to(a.dtype), s, s_new


def _lower_gram(x: torch.Tensor) -> torch.Tensor:
    """Lower triangle of ``x @ x^T`` for a stack ``(B, r, n)``; the upper one is left 0."""
    r = x.shape[-2]
    if r <= 2 * _GRAM_BLOCK:
        return x @ x.mT
    g = x.new_zeros(x.shape[0], r, r)
    for i in range(0, r, _GRAM_BLOCK):
        j = min(r, i + _GRAM_BLOCK)
        g[:, i:j, :j] = x[:, i:j] @ x[:, :j].mT  # row block i, columns 0..j
    return g


def _gram_route(a: torch.Tensor, lo: float, hi: float, dtype: torch.dtype, min_ratio: float):
    """Gram route (Note [Gram route accuracy]); returns ``(new, s, s_new, ok)``, s descending.

    ``G``, its eigendecomposition and ``h`` are in ``dtype``. Entries with ``ok[i] == False``
    failed the accuracy check and hold garbage.
    """
    wide = a.shape[-2] <= a.shape[-1]
    x = a.to(dtype)
    x = x if wide else x.mT  # (B, r, n'), r = min(m, n)
    lam, q = _per_item(lambda g: torch.linalg.eigh(g, UPLO="L"), _lower_gram(x))  # ascending
    ok = (lam[:, 0] >= min_ratio * lam[:, -1]) & (lam[:, -1] > 0) & torch.isfinite(lam).all(-1)
    s = lam.clamp_min(torch.finfo(dtype).tiny).sqrt()
    s_new = s.clamp(lo, hi)
    f = torch.where(ok[:, None], s_new / s - 1, torch.zeros_like(s))  # 0 exactly when in band
    if a[0].numel() >= _LARGE:
        outs = [_apply_one(a[i], q[i], f[i], s[i], s_new[i], dtype) for i in range(a.shape[0])]
        new = outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
    else:
        h = (q * f.unsqueeze(-2)) @ q.mT  # h(G) - I, (B, r, r)
        new = torch.baddbmm(x, h, x).to(a.dtype)
        new = new if wide else new.mT
    return new, s.flip(-1), s_new.flip(-1), ok


def _apply_one(a: torch.Tensor, q: torch.Tensor, f: torch.Tensor, s, s_new, dtype) -> torch.Tensor:
    """``a + (h(G) - I) a`` for one large matrix (Note [Gram route accuracy], last paragraph).

    ``q`` (r, r) and ``f`` (r,) are the eigenvectors and ``clip(s)/s - 1`` in ``dtype``, ``s``
    and ``s_new`` ascending. Only the out-of-band columns of ``q`` are used; none: ``a`` itself.
    """
    out_of_band = (f != 0).nonzero().flatten()
    k = out_of_band.numel()
    if k == 0:
        return a.clone()  # bit-identical, and not a view of the caller's weight
    work = dtype
    if a.dtype != dtype and f.abs().max() * s[-1] / s_new[-1] <= APPLY_RHO:
        work = torch.promote_types(a.dtype, torch.float32)
    wide = a.shape[0] <= a.shape[1]
    x = a.to(work)
    x = x if wide else x.mT  # (r, n')
    if 2 * k < x.shape[0]:  # 2 k r n' flops instead of r^2 n'
        qk = q[:, out_of_band]  # (r, k)
        out = torch.addmm(x, (qk * f[out_of_band]).to(work), qk.to(work).mT @ x)
    else:
        out = torch.addmm(x, ((q * f) @ q.mT).to(work), x)  # x + (h(G) - I) x
    return (out if wide else out.mT).to(a.dtype)


def _bound_stack(
    a: torch.Tensor, lo: float, hi: float, dtype: torch.dtype, route: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[str]]:
    """Bound every matrix of ``a`` (B, m, n); ``route`` is ``'svd'`` or ``'gram'``."""
    if route == "svd":
        new, s, s_new = _svd_route(a, lo, hi, dtype)
        return new, s, s_new, ["svd"] * a.shape[0]
    new, s, s_new, ok = _gram_route(a, lo, hi, dtype, _gram_allowed(a.dtype, dtype))
    routes = ["gram"] * a.shape[0]
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        try:
            new_b, s_b, s_new_b = _svd_route(a[bad], lo, hi, dtype)
        except _DecompositionError as err:
            raise _DecompositionError(bad[err.index], err.cause) from err.cause
        new[bad], s[bad], s_new[bad] = new_b, s_b, s_new_b
        for i in bad:
            routes[i] = "svd"
    return new, s, s_new, routes


def _route_for(shape: Tuple[int, int], weight_dtype: torch.dtype, dtype, method: str) -> str:
    if method == "svd" or _gram_allowed(weight_dtype, dtype) >= 1:
        return "svd"
    if method == "gram":
        return "gram"
    m, n = shape
    return "gram" if max(m, n) / min(m, n) >= GRAM_MIN_ASPECT else "svd"


def _bound_matrices(
    mats: List[torch.Tensor], lo: float, hi: float, dtype: torch.dtype, method: str
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """Bound a list of ``(groups, m, n)`` stacks; equal shapes are decomposed in one batch.

    Returns per input ``(new, s, s_new, route)`` with ``new`` shaped like the input and ``s``,
    ``s_new`` float64 on the CPU, descending per group. Raises ``_DecompositionError`` with the
    index of the input at fault.
    """
    buckets: Dict[tuple, List[Tuple[int, int]]] = {}
    for i, m in enumerate(mats):
        key = (tuple(m.shape[1:]), m.dtype, m.device)
        buckets.setdefault(key, []).extend((i, g) for g in range(m.shape[0]))
    out_new: List[Optional[torch.Tensor]] = [None] * len(mats)
    r_of = [min(m.shape[1:]) for m in mats]
    out_s = [torch.empty(m.shape[0], r, dtype=torch.float64) for m, r in zip(mats, r_of)]
    out_s_new = [torch.empty_like(s) for s in out_s]
    out_routes: List[set] = [set() for _ in mats]
    for (shape, wdtype, _), members in buckets.items():
        route = _route_for(shape, wdtype, dtype, method)
        size = shape[0] * shape[1]
        per = 1 if size >= _LARGE else max(1, _BATCH_ELEMENTS // size)
        for start in range(0, len(members), per):
            chunk = members[start : start + per]
            if len(chunk) == 1:
                i, g = chunk[0]
                a = mats[i][g : g + 1]  # a view, no copy
            else:
                a = torch.stack([mats[i][g] for i, g in chunk])
            try:
                with no_autocast(a.device):  # dtype=float32 GEMMs would run in bf16/fp16 else
                    new, s, s_new, routes = _bound_stack(a, lo, hi, dtype, route)
            except _DecompositionError as err:
                raise _DecompositionError(chunk[err.index][0], err.cause) from err.cause
            s, s_new = s.double().cpu(), s_new.double().cpu()
            if len(chunk) == 1 and mats[chunk[0][0]].shape[0] == 1:
                out_new[chunk[0][0]] = new  # a whole one-group layer: no copy
            for j, (i, g) in enumerate(chunk):
                if out_new[i] is None:
                    out_new[i] = torch.empty_like(mats[i])
                if out_new[i] is not new:
                    out_new[i][g] = new[j]
                out_s[i][g] = s[j]
                out_s_new[i][g] = s_new[j]
                out_routes[i].add(routes[j])
    return [
        (new, s.flatten(), s_new.flatten(), "+".join(sorted(routes)))
        for new, s, s_new, routes in zip(out_new, out_s, out_s_new, out_routes)
    ]


def bound_singular_values(
    weight: torch.Tensor,
    eps: float,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    method: str = "auto",
) -> torch.Tensor:
    """Return ``weight`` with the singular values of its reshaped matrices clipped into the band.

    ``weight`` (any shape with at least 2 dimensions) is read as ``groups`` matrices, group
    ``j`` being rows ``j * r .. (j + 1) * r - 1`` of ``weight.reshape(weight.shape[0], -1)``,
    ``r = weight.shape[0] // groups``: for a ``Linear`` weight ``(out, in)`` the matrix itself,
    for a convolution weight ``(out, in // groups, *kernel_size)`` the
    ``(out // groups) x (in // groups * prod(kernel_size))`` reshaped kernels, for a transposed
    convolution weight ``(in, out // groups, *kernel_size)`` the
    ``(in // groups) x (out // groups * prod(kernel_size))`` ones (see :func:`convspec.svb_` for
    why). Each ``W = U diag(s) V^T`` is replaced by ``U diag(clip(s, 1/(1+eps), 1+eps)) V^T``
    (Jia et al., Algorithm 1, lines 4-6).
    These are the singular values of the reshaped kernel, **not** of the convolution operator
    (see :func:`convspec.conv_operator`), which are different. Matrices whose values are all in
    the band come back bit-identical. Not in place, not differentiable.

    The decomposition runs in ``dtype`` (float64 by default) with ``torch.autocast`` off; the
    result has ``weight``'s dtype, which must be float16, bfloat16, float32 or float64 (anything
    else raises ``ValueError`` naming the dtype).
    ``method``: ``'svd'`` (``torch.linalg.svd``), ``'gram'`` (eigendecomposition of the smaller
    Gram matrix, only where it is as accurate as the SVD in ``dtype``, else SVD: see Note [Gram
    route accuracy] in the source) or ``'auto'`` (Gram for matrices at least
    ``GRAM_MIN_ASPECT`` times wider than tall, or taller than wide). "As accurate" is per
    ``dtype``: with float64 (the default) the result is within ~1 float32 ulp of the exact clip
    for condition numbers up to ~7e3; with ``dtype=torch.float32`` (Gram, eigendecomposition and
    products all in float32, several times faster on CPU) it is as accurate as a float32 SVD,
    which for a float32 weight needs ``s_max / s_min <= sqrt(2)`` (what SVB keeps a layer at; a
    freshly initialised random layer usually takes the float32 SVD). Cost per group:
    ``O(m n min(m, n))``, less when few values lie outside the band.

    >>> w = torch.randn(8, 4, 3, 3)
    >>> b = bound_singular_values(w, 0.1)
    >>> s = torch.linalg.svdvals(b.reshape(8, -1).double())
    >>> bool(((s >= 1 / 1.1 - 1e-6) & (s <= 1.1 + 1e-6)).all())
    True

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithm 1.
    """
    eps = _check_eps(eps)
    dtype = _check_dtype(dtype)
    method = _check_method(method)
    check_weight_dtype(weight)
    if weight.dim() < 2 or weight.numel() == 0:
        raise ValueError(f"weight must have at least 2 non-empty dimensions, got {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(
            f"weight.shape[0] ({weight.shape[0]}: out_channels, or in_channels of a transposed "
            f"convolution) is not divisible by groups ({groups})"
        )
    if not _all_finite(weight):
        raise ValueError("weight contains NaN or Inf values")
    lo, hi = _band(eps)
    mats = _matrices(weight.detach(), groups)
    try:
        ((new, _, _, _),) = _bound_matrices([mats], lo, hi, dtype, method)
    except _DecompositionError as err:
        raise RuntimeError(f"decomposition of the weight failed: {err.cause}") from err.cause
    return new.reshape(weight.shape)


__all__ = [
    "APPLY_RHO",
    "GRAM_MIN_ASPECT",
    "GRAM_TOLERANCE",
    "GRAM_TOLERANCE_FLOAT32",
    "METHODS",
    "bound_singular_values",
]
