"""Singular values of the convolution operator ``M``: dense, FFT (circular) and matrix-free.

Three exact routes and one certified bound, all for the operator that ``nn.Conv2d`` applies
(see :func:`convspec.conv_operator` for ``M`` and its shape ``(h P1 P2, g N1 N2)``):

* ``'dense'``: SVD of ``M`` formed explicitly, one block per group. The reference.
* ``'fft'``: circular padding with ``P * stride == N`` on each axis: ``M`` is (a polyphase
  rearrangement of) a block circulant, diagonalised by the 2-D DFT into ``N1 N2 / (s1 s2)``
  transfer matrices of size ``h x (g s1 s2)``, whose singular values are those of ``M``.
* ``'iterative'``: anything, ``which='extremes'`` or ``'max'``. ``sigma_max`` by Lanczos on the
  Gram operator applied through ``F.conv2d`` and its transpose; ``sigma_min`` by shift-and-invert
  Lanczos with a block-tridiagonal Cholesky factorisation of the Gram operator assembled from
  the kernel (never the dense ``M``).

:func:`conv_spectral_norm_bound` is a certified upper bound on ``sigma_max`` (Gram iteration on
the transfer matrices of a circular embedding) whose cost is fixed in advance: batched GEMMs,
no convergence test, no operator of size ``N^2``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._geometry import (
    AxisGeometry, ConvGeometry, IntPair, Padding, check_finite, conv2d, conv_geometry,
)
from .operator import DEFAULT_MAX_BYTES, conv_operator

WHICH = ("all", "extremes", "max")
METHODS = ("auto", "dense", "fft", "iterative")

#: ``method='auto'`` uses the dense SVD when each group's operator has at most this many rows
#: and columns (a few tenths of a second in float64).
AUTO_DENSE_MAX_N = 1024


@dataclass
class ConvSpectrum:
    """Singular values of a convolution operator ``M``, and how they were obtained.

    ``sigma_max`` and ``sigma_min`` are the largest and smallest of the ``min(rows, cols)``
    singular values of ``M`` (``sigma_min`` is ``None`` for ``which='max'``); ``values`` holds all
    of them in descending order for ``which='all'`` (else ``None``). ``exact`` is ``True`` for the
    dense and FFT routes (exact up to float64 rounding); for ``'iterative'`` it is ``converged``:
    every returned value met the relative tolerance ``tol`` (see :func:`conv_singular_values`).
    ``n_products`` counts applications of ``M`` or ``M^T`` (``F.conv2d`` or its transpose; a Gram
    product counts 2), ``n_solves`` the solves with the factorised Gram operator of
    shift-and-invert.
    """

    sigma_max: float
    sigma_min: Optional[float]
    values: Optional[torch.Tensor]
    method: str
    exact: bool
    converged: bool
    n_products: int = 0
    n_solves: int = 0
    tol: Optional[float] = None


# --------------------------------------------------------------------------------------------
# Validation and groups


def _check_which_method(which: str, method: str, tol: float) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")


def _group_weights(weight: torch.Tensor, geom: ConvGeometry) -> Tuple[torch.Tensor, ConvGeometry]:
    """``(G, h / G, g / G, k1, k2)`` weights and the geometry of one group (``groups=1``)."""
    G = geom.groups
    h, gg, k1, k2 = weight.shape
    w = weight.reshape(G, h // G, gg, k1, k2)
    return w, replace(geom, out_channels=h // G, in_channels=gg, groups=1)


def _without_idle_wrap(geom: ConvGeometry) -> ConvGeometry:
    """``geom`` with circular axes that have no padding marked non-circular.

    Without padding no tap leaves ``[0, N)``, so nothing wraps and the axis is the zero-padded
    one; the banded Gram of the iterative route then keeps its band instead of one dense block.
    """
    axes = tuple(replace(ax, mode="zeros") if ax.circular and not (ax.pad_lo or ax.pad_hi)
                 else ax for ax in geom.axes)
    mode = geom.padding_mode if any(ax.circular for ax in axes) else "zeros"
    return replace(geom, axes=axes, padding_mode=mode)


def _fft_applicable(geom: ConvGeometry) -> Optional[str]:
    """``None`` if the FFT route is exact for ``geom``, else the reason it is not."""
    if geom.padding_mode != "circular":
        return "it needs padding_mode='circular' (zero padding breaks the circulant structure)"
    for name, ax in zip(("height", "width"), geom.axes):
        if ax.out_size * ax.stride != ax.size:
            return (
                f"the output {name} {ax.out_size} times the stride {ax.stride} is not the input "
                f"{name} {ax.size} (circular padding must total dilation * (kernel - 1) and the "
                "stride must divide the input size)"
            )
    return None


# --------------------------------------------------------------------------------------------
# FFT route

# Note [polyphase transfer matrices]: with circular padding, output y of an axis reads input
# (s y + t_p) mod N, t_p = d p - pad_lo. When s divides N = s N', write t_p = s q_p + r_p
# (0 <= r_p < s): output y reads phase r_p of the input at (y + q_p) mod N', where phase r of x
# is x_r[m] = x[s m + r]. So M is an N'-periodic convolution from g s1 s2 input channels
# (channel, phase1, phase2) to h outputs, and the DFT over N' splits it into N1' N2' transfer
# matrices T(w)[i, (j, r1, r2)] = sum over taps with phases (r1, r2) of
# K[i, j, p, q] exp(-2 pi i (w1 q1_p / N1' + w2 q2_q / N2')). The union of their singular values
# is the spectrum of M (Sedghi et al. 2019, Theorem 6, for s = 1).


def _phases(ax: AxisGeometry, size: int, stride: int) -> Tuple[torch.Tensor, np.ndarray]:
    """``(E, R)``: ``E`` (size/stride, k) complex DFT phases of the taps, ``R`` (k,) their phase."""
    n = size // stride
    t = ax.dilation * np.arange(ax.kernel) - ax.pad_lo
    r, q = np.mod(t, stride), np.floor_divide(t, stride)
    omega = np.arange(n)[:, None] * np.mod(q, n)[None, :] / n
    angle = torch.as_tensor(-2 * np.pi * omega)
    e = torch.polar(torch.ones(omega.shape, dtype=torch.float64), angle)
    return e, r


def _transfer_chunks(
    weight: torch.Tensor,
    axes: Tuple[AxisGeometry, AxisGeometry],
    half: bool = False,
    chunk_bytes: int = 2**27,
) -> Iterator[torch.Tensor]:
    """Yield the transfer matrices of Note [polyphase transfer matrices], in chunks over ``w1``.

    ``weight`` is ``(G, h', g', k1, k2)``; ``axes`` give size, stride, dilation and ``pad_lo``
    (``size`` divisible by ``stride``). Each chunk is ``(G, c, N2', h', g' s1 s2)`` complex128.
    With ``half``, only ``w2 <= N2' / 2``: the kernel is real, so ``T(-w) = conj(T(w))`` has the
    same singular values and the other half adds nothing to a maximum.
    """
    G, hg, gg, k1, k2 = weight.shape
    a, b = axes
    e1, r1 = _phases(a, a.size, a.stride)
    e2, r2 = _phases(b, b.size, b.stride)
    if half:
        e2 = e2[: e2.shape[0] // 2 + 1]
    s1, s2 = a.stride, b.stride
    # Scatter each tap to its input phase: (G, h', g', s1, s2, k1, k2), zero off its phase.
    w = weight.to(torch.float64)
    onehot1 = torch.zeros(k1, s1, dtype=torch.float64)
    onehot1[torch.arange(k1), torch.as_tensor(r1)] = 1
    onehot2 = torch.zeros(k2, s2, dtype=torch.float64)
    onehot2[torch.arange(k2), torch.as_tensor(r2)] = 1
    wp = torch.einsum("gijpq,pr,qt->gijrtpq", w, onehot1, onehot2).to(torch.complex128)
    n1, n2 = e1.shape[0], e2.shape[0]
    per_row = G * n2 * hg * gg * s1 * s2 * 16 * 2
    step = max(1, min(n1, chunk_bytes // max(1, per_row)))
    # Contract the width taps once: (G, h', g', s1, s2, k1, N2').
    wq = torch.einsum("gijrtpq,bq->gijrtpb", wp, e2)
    for start in range(0, n1, step):
        t = torch.einsum("gijrtpb,ap->gabijrt", wq, e1[start : start + step])
        yield t.reshape(G, t.shape[1], n2, hg, gg * s1 * s2)


def _fft_values(w: torch.Tensor, geom1: ConvGeometry) -> torch.Tensor:
    """All singular values (descending) of the grouped circular operator; ``w`` is grouped."""
    vals = [torch.linalg.svdvals(t).reshape(-1) for t in _transfer_chunks(w, geom1.axes)]
    return torch.sort(torch.cat(vals), descending=True).values


# --------------------------------------------------------------------------------------------
# Dense route


def _dense_values(w: torch.Tensor, geom1: ConvGeometry, max_bytes: int) -> torch.Tensor:
    """All singular values (descending): SVD of each group's dense operator, concatenated."""
    a, b = geom1.axes
    kwargs = dict(
        stride=(a.stride, b.stride),
        padding=((a.pad_lo, b.pad_lo) if (a.pad_lo, b.pad_lo) == (a.pad_hi, b.pad_hi) else None),
        dilation=(a.dilation, b.dilation),
        padding_mode=geom1.padding_mode,
    )
    vals = []
    for i in range(w.shape[0]):
        if kwargs["padding"] is None:
            # Asymmetric padding only arises from padding='same' (stride 1).
            m = conv_operator(w[i], geom1.input_size, padding="same", dilation=kwargs["dilation"],
                              padding_mode=geom1.padding_mode, max_bytes=max_bytes)
        else:
            m = conv_operator(w[i], geom1.input_size, max_bytes=max_bytes, **kwargs)
        vals.append(torch.linalg.svdvals(m))
    return torch.sort(torch.cat(vals), descending=True).values


# --------------------------------------------------------------------------------------------
# Matrix-free products


def _conv_t(y: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``M^T y`` for a batch ``y`` of outputs ``(B, h, P1, P2)``: the adjoint of :func:`conv2d`."""
    a, b = geom.axes
    full = []
    for ax in (a, b):
        span = (ax.out_size - 1) * ax.stride + ax.dilation * (ax.kernel - 1) + 1
        full.append(ax.size + ax.pad_lo + ax.pad_hi - span)  # rows of the padded input unread
    z = F.conv_transpose2d(
        y, weight, stride=(a.stride, b.stride), dilation=(a.dilation, b.dilation),
        groups=geom.groups, output_padding=(full[0], full[1]),
    )  # gradient on the padded input
    n1, n2 = geom.input_size
    if geom.padding_mode == "circular":
        # Fold the wrapped borders back onto the input positions they copy.
        z = _fold(z, a.pad_lo, n1, dim=2)
        return _fold(z, b.pad_lo, n2, dim=3)
    return z[:, :, a.pad_lo : a.pad_lo + n1, b.pad_lo : b.pad_lo + n2]


def _fold(z: torch.Tensor, lo: int, n: int, dim: int) -> torch.Tensor:
    out = z.narrow(dim, lo, n).clone()
    if lo:
        out.narrow(dim, n - lo, lo).add_(z.narrow(dim, 0, lo))
    hi = z.shape[dim] - lo - n
    if hi:
        out.narrow(dim, 0, hi).add_(z.narrow(dim, lo + n, hi))
    return out


def _tall(geom: ConvGeometry) -> bool:
    """True if ``M`` (of one group) has at least as many rows as columns: work with ``M^T M``."""
    return geom.n_out >= geom.n_in


# --------------------------------------------------------------------------------------------
# Lanczos


@dataclass
class _Lanczos:
    theta: float
    vector: torch.Tensor
    residual: float
    steps: int
    converged: bool


def _lanczos_largest(
    apply: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    tol: float,
    max_steps: int,
    max_basis: int = 300,
) -> _Lanczos:
    """Largest eigenpair of a symmetric PSD operator by Lanczos with full reorthogonalisation.

    Stops when the Ritz residual ``beta_m |s_m|`` is at most ``tol * theta`` (then an eigenvalue
    lies within ``tol * theta`` of ``theta``, and ``theta`` never exceeds the largest one).
    Restarts from the current Ritz vector when the basis reaches ``max_basis`` vectors.
    """
    n = v0.numel()
    max_basis = max(2, min(max_basis, n))
    v = v0.reshape(-1) / v0.norm()
    steps = 0
    theta, resid, ritz = 0.0, math.inf, v
    while True:
        basis = torch.empty(max_basis, n, dtype=v.dtype)
        alphas: List[float] = []
        betas: List[float] = []
        basis[0] = v
        m = 0
        while True:
            w = apply(basis[m]).reshape(-1)
            steps += 1
            alpha = float(torch.dot(w, basis[m]))
            # Full reorthogonalisation, twice (Kahan-Parlett "twice is enough").
            for _ in range(2):
                w = w - basis[: m + 1].T @ (basis[: m + 1] @ w)
            beta = float(w.norm())
            alphas.append(alpha)
            m += 1
            check = m == max_basis or steps >= max_steps or m % 5 == 0 or m == n or beta == 0
            if check:
                t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                if m > 1:
                    off = torch.tensor(betas, dtype=torch.float64)
                    t = t + torch.diag(off, 1) + torch.diag(off, -1)
                evals, evecs = torch.linalg.eigh(t)
                theta = float(evals[-1])
                resid = abs(beta * float(evecs[-1, -1]))
                ritz = evecs[:, -1].to(v.dtype) @ basis[:m]
                if resid <= tol * abs(theta) or beta <= 1e-14 * max(abs(theta), 1e-300) or m == n:
                    return _Lanczos(theta, ritz / ritz.norm(), resid, steps, True)
                if steps >= max_steps:
                    return _Lanczos(theta, ritz / ritz.norm(), resid, steps, False)
                if m == max_basis:
                    break
            betas.append(beta)
            basis[m] = w / beta
        v = ritz / ritz.norm()  # explicit restart


# --------------------------------------------------------------------------------------------
# Banded Gram operator for shift-and-invert

# Note [banded Gram]: order the unknowns of the Gram operator (M^T M on the input side, or
# M M^T on the output side) as (row, column, channel). With E_p the per-axis 0/1 tap matrices
# (A_p^T for the input side, A_p for the output side) and C_pq = K_pq^T (resp. K_pq),
#
#     Gram[(i, j, a), (i', j', b)] = sum_{p,p',q,q'} (E_p E_p'^T)[i, i'] (F_q F_q'^T)[j, j']
#                                                    (C_pq C_p'q'^T)[a, b],
#
# and (E_p E_p'^T)[i, i'] = 0 for |i - i'| > reach (d (k - 1) on the input side, d (k - 1) / s on
# the output side; without wrap-around). Grouping `reach` rows per block makes the Gram block
# tridiagonal with blocks of size reach * R2 * c: a Cholesky factorisation costs
# O(R1 reach^2 R2^3 c^3) and a solve O(R1 reach R2^2 c^2), never the O(n^3) of a dense one.


def _tap_matrices(ax: AxisGeometry) -> np.ndarray:
    """``A_p`` (k, P, N): ``A_p[y, x]`` = times output ``y`` reads input ``x`` via tap ``p``."""
    k, n, P = ax.kernel, ax.size, ax.out_size
    a = np.zeros((k, P, n))
    for p in range(k):
        for y in range(P):
            x = ax.tap(y, p)
            if ax.circular:
                a[p, y, x % n] += 1
            elif 0 <= x < n:
                a[p, y, x] += 1
    return a


def _gram_parts(w: torch.Tensor, axes, tall: bool):
    """Per-axis ``Z[p, p', i, i'] = (E_p E_p'^T)[i, i']``; channel matrices ``C`` (k1, k2, c, c')."""
    z = []
    for ax in axes:
        a = _tap_matrices(ax)
        e = a.transpose(0, 2, 1) if tall else a  # (k, R, R')
        z.append(torch.as_tensor(np.einsum("pir,qjr->pqij", e, e)))
    c = w.permute(2, 3, 1, 0) if tall else w.permute(2, 3, 0, 1)  # (k1, k2, c, c')
    return z, c.to(torch.float64)


def _plan_banded(w: torch.Tensor, geom1: ConvGeometry) -> Tuple[bool, int, int]:
    """``(swap, block_rows, bytes)``: the cheaper axis to order by, and the memory it needs."""
    tall = _tall(geom1)
    c = geom1.in_channels if tall else geom1.out_channels
    best = None
    for swap in (False, True):
        axes = geom1.axes[::-1] if swap else geom1.axes
        sizes = [ax.size if tall else ax.out_size for ax in axes]
        ax0 = axes[0]
        reach = ax0.dilation * (ax0.kernel - 1)
        if not tall:
            reach = reach // ax0.stride
        if ax0.circular:
            reach = sizes[0]  # wrap-around couples the first and last rows: one dense block
        rows = max(1, min(reach, sizes[0]))
        block = rows * sizes[1] * c
        nblocks = -(-sizes[0] // rows)
        flops = nblocks * block**3
        # Blocks of the Gram, of its Cholesky factor and of the Schur updates, plus H.
        memory = 8 * (4 * nblocks * block**2 + axes[0].kernel ** 2 * (sizes[1] * c) ** 2)
        if best is None or flops < best[0]:
            best = (flops, swap, rows, memory)
    return best[1], best[2], best[3]


class _BandedCholesky:
    """Cholesky factor of ``Gram + shift I``, block tridiagonal as in Note [banded Gram]."""

    def __init__(self, w: torch.Tensor, axes, tall: bool, rows: int, shift: float):
        (z1, z2), c = _gram_parts(w, axes, tall)
        k1, k2, cc, _ = c.shape
        r1, r2 = z1.shape[-1], z2.shape[-1]
        cc_pq = torch.einsum("pqab,rscb->pqrsac", c, c)  # C_pq C_rs^T
        # H[p, p'] = sum_{q,q'} Z2[q,q'] (x) C_pq C_p'q'^T, rows (j, a): (k1, k1, R2 c, R2 c)
        h = torch.einsum("qsjl,pqrsac->prjalc", z2, cc_pq).reshape(k1, k1, r2 * cc, r2 * cc)
        self.sizes = [min(rows, r1 - s) * r2 * cc for s in range(0, r1, rows)]
        starts = list(range(0, r1, rows))
        self.diag, self.low = [], []
        for bi, s in enumerate(starts):
            e = min(r1, s + rows)
            d = torch.einsum("pqxy,pqJK->xJyK", z1[:, :, s:e, s:e], h)
            d = d.reshape(self.sizes[bi], self.sizes[bi])
            self.diag.append(d + shift * torch.eye(d.shape[0], dtype=d.dtype))
            if bi:
                ps = starts[bi - 1]
                lo = torch.einsum("pqxy,pqJK->xJyK", z1[:, :, s:e, ps:s], h)
                self.low.append(lo.reshape(self.sizes[bi], self.sizes[bi - 1]))
        self.ok = self._factor()
        del self.diag, self.low  # the factor is all that solves need

    def _factor(self) -> bool:
        self.L, self.W = [], []
        for bi, d in enumerate(self.diag):
            if bi:
                # W_i = E_i L_{i-1}^{-T}; D_i - W_i W_i^T is the Schur complement.
                wi = torch.linalg.solve_triangular(self.L[-1], self.low[bi - 1].T, upper=False).T
                self.W.append(wi)
                d = d - wi @ wi.T
            l, info = torch.linalg.cholesky_ex(d)
            if int(info) != 0:
                return False
            self.L.append(l)
        return True

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        parts = list(torch.split(b.reshape(-1), self.sizes))
        y = []
        for bi, part in enumerate(parts):
            rhs = part if bi == 0 else part - self.W[bi - 1] @ y[-1]
            y.append(torch.linalg.solve_triangular(self.L[bi], rhs[:, None], upper=False)[:, 0])
        x = [None] * len(y)
        for bi in range(len(y) - 1, -1, -1):
            rhs = y[bi] if bi == len(y) - 1 else y[bi] - self.W[bi].T @ x[bi + 1]
            x[bi] = torch.linalg.solve_triangular(self.L[bi].T, rhs[:, None], upper=True)[:, 0]
        return torch.cat(x)


# --------------------------------------------------------------------------------------------
# Iterative route


def _iterative(
    w: torch.Tensor,
    geom: ConvGeometry,
    which: str,
    tol: float,
    max_bytes: int,
    max_products: int,
    generator: torch.Generator,
) -> ConvSpectrum:
    weight = w.reshape(-1, *w.shape[2:])  # (h, g / G, k1, k2), grouped layout of nn.Conv2d
    n1, n2 = geom.input_size
    p1, p2 = geom.output_size
    G = geom.groups
    wg, geom1 = _group_weights(weight, geom)
    tall = _tall(geom1)
    counts = {"products": 0, "solves": 0}

    def fwd(x):  # x: (g, N1, N2) -> (h, P1, P2)
        counts["products"] += 1
        return conv2d(x[None], weight, geom)[0]

    def adj(y):
        counts["products"] += 1
        return _conv_t(y[None], weight, geom)[0]

    shape_in = (geom.in_channels, n1, n2)
    shape_out = (geom.out_channels, p1, p2)

    def gram(v):
        if tall:
            return adj(fwd(v.reshape(shape_in))).reshape(-1)
        return fwd(adj(v.reshape(shape_out))).reshape(-1)

    dim = math.prod(shape_in if tall else shape_out)
    v0 = torch.randn(dim, dtype=torch.float64, generator=generator)
    top = _lanczos_largest(gram, v0, tol, max_steps=max_products // 2)
    # sigma = ||M v|| of the Ritz vector: a Rayleigh quotient, never above the true sigma_max.
    ritz = fwd(top.vector.reshape(shape_in)) if tall else adj(top.vector.reshape(shape_out))
    sigma_max = float(ritz.norm())
    converged = top.converged
    sigma_min = None
    if which == "extremes":
        sigma_min, ok = _sigma_min(wg, geom1, tall, sigma_max, tol, max_bytes,
                                   max_products, generator, counts)
        converged = converged and ok
    if not converged:
        warnings.warn(
            f"the iterative spectrum did not reach tol={tol} within max_products={max_products} "
            "(see ConvSpectrum.converged); raise max_products or use method='dense'",
            stacklevel=3,
        )
    return ConvSpectrum(
        sigma_max=sigma_max, sigma_min=sigma_min, values=None, method="iterative",
        exact=converged, converged=converged, n_products=counts["products"],
        n_solves=counts["solves"], tol=tol,
    )


def _accept(res: float, rho: float, lam_max: float, tol: float) -> bool:
    """An eigenvalue lies within relative ``tol`` of ``rho``, or ``rho`` is at rounding level."""
    return res <= tol * rho or res <= 64 * torch.finfo(torch.float64).eps * lam_max


def _sigma_min(wg, geom1, tall, sigma_max, tol, max_bytes, max_products, generator, counts):
    """Smallest of the ``min(rows, cols)`` singular values, over the groups (min of minima)."""
    swap, rows, need = _plan_banded(wg[0], geom1)
    axes = geom1.axes[::-1] if swap else geom1.axes
    lam_max = sigma_max**2
    if lam_max == 0:
        return 0.0, True  # a zero kernel: every singular value is 0
    result, all_ok = math.inf, True
    for gi in range(wg.shape[0]):
        wgi = wg[gi]  # (h', g', k1, k2)
        wt = wgi.transpose(-1, -2) if swap else wgi

        def fwd(x):
            counts["products"] += 1
            return conv2d(x[None], wgi, geom1)[0]

        def adj(y):
            counts["products"] += 1
            return _conv_t(y[None], wgi, geom1)[0]

        def to_conv(v):  # (i, j, a) layout of Note [banded Gram] -> (a, i, j) of F.conv2d
            r = [ax.size if tall else ax.out_size for ax in axes]
            x = v.reshape(r[0], r[1], -1)
            return x.permute(2, 1, 0) if swap else x.permute(2, 0, 1)

        def rayleigh(v):
            x = to_conv(v)
            y = fwd(x) if tall else adj(x)
            return float(y.norm() ** 2), y

        def residual(v, rho, y):
            g = adj(y) if tall else fwd(y)
            return float((g - rho * to_conv(v)).norm())

        dim = wgi.shape[1 if tall else 0] * math.prod(
            ax.size if tall else ax.out_size for ax in axes
        )
        v0 = torch.randn(dim, dtype=torch.float64, generator=generator)
        if need <= max_bytes:
            shift = 1e-12 * lam_max
            chol = None
            while shift <= 1e-3 * lam_max + 1e-300:
                chol = _BandedCholesky(wt, axes, tall, rows, shift)
                if chol.ok:
                    break
                shift *= 100
            if chol is None or not chol.ok:
                raise RuntimeError("the shifted Gram operator could not be factorised")

            def inv(v):
                counts["solves"] += 1
                return chol.solve(v)

            inner = tol / 10
            ok = False
            for _ in range(4):
                lz = _lanczos_largest(inv, v0, inner, max_steps=max(50, max_products // 4))
                rho, y = rayleigh(lz.vector)
                res = residual(lz.vector, rho, y)
                # Some eigenvalue lies within `res` of rho: relative error of sigma <= res / rho.
                if _accept(res, rho, lam_max, tol):
                    ok = True
                    break
                v0, inner = lz.vector, inner / 100
        else:
            warnings.warn(
                f"the banded Gram factorisation would need {need / 2**20:.0f} MiB (above "
                f"max_bytes); sigma_min falls back to plain Lanczos on lambda_max I - Gram, "
                "which converges slowly for clustered small singular values",
                stacklevel=3,
            )
            c = lam_max * (1 + 1e-6)

            def flipped(v):
                x = to_conv(v)
                g = adj(fwd(x)) if tall else fwd(adj(x))
                xr = g.permute(1, 2, 0) if not swap else g.permute(2, 1, 0)
                return c * v - xr.reshape(-1)

            lz = _lanczos_largest(flipped, v0, tol * 1e-3, max_steps=max_products // 2)
            rho, y = rayleigh(lz.vector)
            res = residual(lz.vector, rho, y)
            ok = _accept(res, rho, lam_max, tol)
        result = min(result, math.sqrt(max(rho, 0.0)))
        all_ok = all_ok and ok
    return result, all_ok


# --------------------------------------------------------------------------------------------
# Public API


def conv_singular_values(
    weight: torch.Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    which: str = "all",
    method: str = "auto",
    tol: float = 1e-6,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_products: int = 20000,
    seed: int = 0,
) -> ConvSpectrum:
    """Exact singular values of the operator ``M`` of ``nn.Conv2d`` on a ``g x N1 x N2`` input.

    ``M`` is the ``(h P1 P2) x (g N1 N2)`` matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride,
    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)``
    with ``weight`` of shape ``(h, g // groups, k1, k2)`` (see :func:`convspec.conv_operator`).
    Its singular values are the ``min(h P1 P2, g N1 N2)`` values of the SVD; with groups ``M`` is
    block diagonal and they are the union of the blocks' (``sigma_max`` is the max of the
    blocks' maxima, ``sigma_min`` the min of their minima).

    ``which``: ``'all'`` (every singular value, descending, in ``.values``), ``'extremes'``
    (``sigma_max`` and ``sigma_min``) or ``'max'`` (``sigma_max`` only). ``method``:

    * ``'dense'``: SVD of each group's dense operator in float64; exact;
      ``O(G (h' P^2)(g' N^2) min(...))`` time, ``O(h' g' P^2 N^2)`` memory (``h' = h/G``).
    * ``'fft'``: circular padding with ``P * stride == N`` on both axes (padding totalling
      ``dilation * (k - 1)``, stride dividing ``N``); exact. One SVD of an ``h' x (g' s1 s2)``
      transfer matrix per frequency and group: ``O(G N1 N2 / (s1 s2) h' g' min(h', g' s1 s2))``.
      ``ValueError`` if not applicable.
    * ``'iterative'``: any padding, ``which`` ``'extremes'`` or ``'max'``; never forms ``M``.
      ``sigma_max``: Lanczos (full reorthogonalisation) on ``M^T M`` (or ``M M^T`` if ``M`` is
      wide) applied by ``F.conv2d`` / ``F.conv_transpose2d``: 70 to 400 products in the
      benchmarks. ``sigma_min``: shift-and-invert Lanczos on the smaller Gram operator, whose
      block tridiagonal Cholesky factor is assembled from the kernel (``O(N1 r^2 N2^3 c^3)``
      time, ``O(N1 r N2^2 c^2)`` memory, ``r = dilation (k - 1)`` rows per block, ``c`` the
      channels of the Gram's side); each Lanczos step is one solve, and clustered small
      singular values converge in about 10 solves in the benchmarks. If that factor exceeds
      ``max_bytes`` it falls back (with a warning) to Lanczos on ``sigma_max^2 I - Gram``, which
      is slow (thousands of products) when the small singular values cluster. Each value is
      returned as ``||M v||`` of its Ritz vector ``v``; ``sigma_max`` is accepted when Lanczos'
      residual bound is at most ``tol * sigma_max^2``, ``sigma_min`` when
      ``||Gram v - ||M v||^2 v|| <= tol * ||M v||^2``. Either way an eigenvalue of the Gram lies
      within relative ``tol`` of the value squared (within rounding, ``64 eps sigma_max^2``, for
      a numerically singular ``M``); ``.converged`` says if that held within ``max_products``.
    * ``'auto'``: ``'fft'`` when applicable, else ``'dense'`` when each group's operator has
      at most ``AUTO_DENSE_MAX_N`` (1024) rows and columns, else ``'iterative'``.

    All routes compute in float64 on the CPU, whatever the weight's dtype and device. ``seed``
    fixes Lanczos' random start vectors, so results are deterministic; ``max_products`` caps
    the products of ``'iterative'``.

    Returns a :class:`ConvSpectrum`. Raises ``ValueError`` for bad shapes, geometry, NaN/Inf
    weights, ``which``, ``method``, ``tol``, or a method that does not apply.

    >>> w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> fft = conv_singular_values(w, 8, padding=1, padding_mode='circular', method='fft')
    >>> dense = conv_singular_values(w, 8, padding=1, padding_mode='circular', method='dense')
    >>> fft.values.shape, bool(torch.allclose(fft.values, dense.values))
    (torch.Size([192]), True)
    >>> it = conv_singular_values(w, 8, which='extremes', method='iterative')
    >>> zd = conv_singular_values(w, 8, method='dense')
    >>> abs(it.sigma_min / zd.sigma_min - 1) < 1e-6, it.converged
    (True, True)

    References: H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers",
    ICLR 2019 (FFT route, Theorem 6); C. Lanczos (1950) and B. N. Parlett, "The Symmetric
    Eigenvalue Problem" (1998), Ch. 13 (Lanczos, shift-and-invert); P.-C. Guo,
    arXiv:1907.11235 (the operator ``M``).
    """
    _check_which_method(which, method, tol)
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < 10:
        raise ValueError(f"max_products must be an int >= 10, got {max_products!r}")
    geom = conv_geometry(
        weight, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode,
    )
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a tensor, got {type(weight).__name__}")
    check_finite(weight)
    w = weight.detach().to(torch.float64).cpu()
    wg, geom1 = _group_weights(w, geom)
    fft_reason = _fft_applicable(geom)
    if method == "auto":
        if fft_reason is None:
            method = "fft"
        elif max(geom1.n_in, geom1.n_out) <= AUTO_DENSE_MAX_N or which == "all":
            method = "dense"
        else:
            method = "iterative"
    if method == "fft" and fft_reason is not None:
        raise ValueError(f"method='fft' does not apply: {fft_reason}; use 'dense' or 'iterative'")
    if method == "iterative":
        if which == "all":
            raise ValueError(
                "method='iterative' computes which='extremes' or 'max' only; "
                "use 'dense' or 'fft' for all singular values"
            )
        gen = torch.Generator().manual_seed(seed)
        return _iterative(wg, _without_idle_wrap(geom), which, tol, max_bytes, max_products, gen)
    values = _fft_values(wg, geom1) if method == "fft" else _dense_values(wg, geom1, max_bytes)
    return ConvSpectrum(
        sigma_max=float(values[0]),
        sigma_min=None if which == "max" else float(values[-1]),
        values=values if which == "all" else None,
        method=method, exact=True, converged=True, tol=None,
    )


def conv_spectral_norm_bound(
    weight: torch.Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    n_iter: int = 6,
) -> float:
    """A certified **upper bound** on ``sigma_max`` of ``M``, cheap for huge layers.

    ``M`` is the operator of ``nn.Conv2d(g, h, (k1, k2), stride=stride, padding=padding,
    dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` on a
    ``g x N1 x N2`` input (see :func:`conv_singular_values`). It is bounded by a circular
    operator ``C`` with ``||M||_2 <= ||C||_2``:

    * zero padding: ``M = R C E`` where ``E`` embeds the input in the zero-padded one, ``C`` is
      the circular convolution (same stride) on the padded size ``N + pad_lo + pad_hi`` rounded
      up to a multiple of the stride, and ``R`` keeps the rows ``M`` has;
    * circular padding where the FFT route applies: ``C = M`` (the bound is then only the Gram
      iteration's); otherwise ``M = S C1`` with ``C1`` the stride-1 circulant and ``S`` a row
      selection, and the bound is multiplied by ``sqrt`` of the largest number of times ``S``
      repeats a row.

    ``||C||_2`` is the largest spectral norm of its transfer matrices (Note [polyphase transfer
    matrices]), each bounded by ``n_iter`` steps of Gram iteration:
    ``||T||_2 <= ||G_t||_F^(1 / 2^t)``, ``G_0 = T``, ``G_{i+1} = G_i^H G_i`` (rescaled), which
    overestimates ``||T||_2`` by at most ``rank^(1 / 2^(t+1))`` (1.044 for rank 256 and
    ``t = 6``). Cost ``O(G N'1 N'2 n_iter c^3)`` for ``c = min(h', g' s1 s2)``, in chunks of
    frequencies (bounded memory); no ``O(N^2)``-sized matrix, and no convergence test: at
    ``g = h = 256``, ``N = 32`` it took 11.6 s on 2 CPU cores, within 0.1% of ``sigma_max``
    (the iterative ``sigma_max`` took 9.1 s there; ``benchmarks/spectrum.py``). A relative margin
    of ``1e-12`` covers float64 rounding.

    >>> w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> bound = conv_spectral_norm_bound(w, 10)
    >>> exact = conv_singular_values(w, 10, which='max', method='dense').sigma_max
    >>> exact <= bound < 1.2 * exact
    True

    References: B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023; H. Sedghi,
    V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019.
    """
    geom = conv_geometry(
        weight, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode,
    )
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 0 <= n_iter <= 30:
        raise ValueError(f"n_iter must be an int in [0, 30], got {n_iter!r}")
    check_finite(weight)
    w = weight.detach().to(torch.float64).cpu()
    wg, geom1 = _group_weights(w, geom)
    factor = 1.0
    if _fft_applicable(geom) is None:
        axes = geom.axes
    elif geom.padding_mode == "zeros":
        axes = []
        for ax in geom.axes:
            size = ax.size + ax.pad_lo + ax.pad_hi
            size = -(-size // ax.stride) * ax.stride
            axes.append(AxisGeometry(size, ax.kernel, ax.stride, ax.dilation, 0, 0, True))
    else:
        axes = []
        for ax in geom.axes:
            rows = np.bincount((ax.stride * np.arange(ax.out_size)) % ax.size)
            factor *= float(rows.max())
            axes.append(replace(ax, stride=1))
        factor = math.sqrt(factor)
    best = 0.0
    for t in _transfer_chunks(wg, tuple(axes), half=True):
        best = max(best, float(_gram_iteration_bound(t, n_iter).max()))
    return best * factor * (1 + 1e-12)


def _gram_iteration_bound(t: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Per-matrix upper bound on the spectral norm of a batch ``t`` (..., a, b)."""
    log_bound = torch.zeros(t.shape[:-2], dtype=torch.float64)
    x = t
    if x.shape[-2] < x.shape[-1]:
        x = x.mH
    for i in range(n_iter):
        norm = torch.linalg.matrix_norm(x).clamp_min(1e-300)
        log_bound += norm.log() / 2**i
        x = x / norm[..., None, None]
        x = x.mH @ x
    norm = torch.linalg.matrix_norm(x).clamp_min(1e-300)
    log_bound += norm.log() / 2**n_iter
    zero = torch.linalg.matrix_norm(t) == 0
    return torch.where(zero, torch.zeros_like(log_bound), log_bound.exp())


def extreme_singular_values(
    weight: torch.Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    method: str = "auto",
    tol: float = 1e-6,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tuple[float, float]:
    """Exact ``(sigma_max, sigma_min)`` of the convolution operator ``M``.

    ``M`` is the ``(h P1 P2) x (g N1 N2)`` matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride,
    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` on a
    ``g x N1 x N2`` input (see :func:`conv_operator`). ``sigma_min`` is the smallest of the
    ``min(h P1 P2, g N1 N2)`` singular values of ``M``: it is 0 only if ``M`` is rank deficient
    beyond its shape (a wide ``M`` with ``g > h`` has ``h P1 P2`` singular values, not 0s for the
    missing ones).

    A thin call to :func:`conv_singular_values` with ``which='extremes'``: exact up to rounding
    for the dense and FFT routes, to relative ``tol`` for ``'iterative'`` (``'auto'`` picks the
    cheapest exact route; see there for costs).

    >>> w = torch.zeros(3, 3, 3, 3); w[:, :, 1, 1] = 2 * torch.eye(3)
    >>> extreme_singular_values(w, 8)          # 2 * identity
    (2.0, 2.0)

    References: P.-C. Guo, arXiv:1907.11235, Section 4 (sigma_max and sigma_min of M);
    H. Sedghi, V. Gupta, P. M. Long, ICLR 2019.
    """
    res = conv_singular_values(
        weight, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, which="extremes", method=method, tol=tol, max_bytes=max_bytes,
    )
    return res.sigma_max, res.sigma_min


def _gram_extremes(m: torch.Tensor) -> Tuple[float, float]:
    """``(sigma_max, sigma_min)`` of a dense ``m`` from the eigenvalues of its smaller Gram matrix.

    About twice as fast as ``svdvals`` for the sizes of Algorithm 3.1's records, and as accurate
    except for ``sigma_min`` below about ``1e-8 * sigma_max`` (the Gram squares the condition
    number), where it returns a value near 0 instead.
    """
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    e = torch.linalg.eigvalsh(gram)
    return float(e[-1].clamp(min=0).sqrt()), float(e[0].clamp(min=0).sqrt())
