"""Singular values of the convolution operator ``M``: dense, FFT (circular) and matrix-free.

Three exact routes and one certified bound, all for the operator that ``nn.Conv2d`` applies
(see :func:`convspec.conv_operator` for ``M`` and its shape ``(h P1 P2, g N1 N2)``):

* ``'dense'``: SVD of ``M`` formed explicitly, one block per group. The reference.
* ``'fft'``: circular padding with ``P * stride == N`` on each axis: ``M`` is (a polyphase
  rearrangement of) a block circulant, diagonalised by the 2-D DFT into ``N1 N2 / (s1 s2)``
  transfer matrices of size ``h x (g s1 s2)``, whose singular values are those of ``M``. The
  kernel is real, so they come in complex-conjugate pairs with equal singular values: one SVD
  per pair (Note [conjugate pairs]).
* ``'iterative'``: anything, ``which='extremes'`` or ``'max'``. ``sigma_max`` by Lanczos on the
  Gram operator applied through ``F.conv2d`` and its transpose; ``sigma_min`` by shift-and-invert
  Lanczos with a Cholesky factorisation of the Gram operator assembled from the kernel (never
  the dense ``M``): block-banded, or for two spatial axes by nested dissection
  (:mod:`convspec._nested`) when that needs fewer flops; certified by a second factorisation
  (Note [iterative error bounds]). The eigensolver is :mod:`convspec.linalg` (no convolution
  inside).

:func:`conv_spectral_norm_bound` is a certified upper bound on ``sigma_max`` (Gram iteration on
the transfer matrices of a circular embedding) whose cost is fixed in advance: batched GEMMs,
no convergence test, no operator of size ``N^2``.

Every route runs on the weight scaled by a power of two (exact) so that any finite kernel works,
bounds its memory by ``max_bytes`` (refusing with the estimate when it cannot), and shows a
progress bar when the work is long (``progress``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ._geometry import (
    UNSET, AxisGeometry, ConvGeometry, IntTuple, check_weight, conv_adjoint, conv_forward,
    resolve,
)
from ._nested import NestedCholesky, nested_cost
from ._progress import auto_progress, progress_bar
from .linalg import gram_iteration_bound, lanczos_capacity, lanczos_largest, lanczos_smallest
from .operator import DEFAULT_MAX_BYTES, dense_operator

WHICH = ("all", "extremes", "max")
METHODS = ("auto", "dense", "fft", "iterative")

#: ``method='auto'`` uses the dense SVD when each group's operator has at most this many rows
#: and columns (a few tenths of a second in float64).
AUTO_DENSE_MAX_N = 1024

_EPS = torch.finfo(torch.float64).eps
#: An iterative ``sigma_min`` within this many ``eps * sigma_max`` (plus the rounding bound of one
#: product) of 0 is 0 to float64 rounding (the dense SVD is no more accurate there); see
#: Note [iterative error bounds].
ROUNDING_FLOOR = 64
#: Lanczos steps over which an extreme Ritz value found without a certificate (``sigma_max``)
#: must not have moved by more than ``tol`` (linalg.py's Note [settling]).
SETTLE_STEPS = 10
#: Warn when a route without a visible progress bar is estimated to take longer (seconds).
LONG_SECONDS = 600.0


@dataclass
class ConvSpectrum:
    """Singular values of a convolution operator ``M``, how they were obtained, how accurate.

    ``sigma_max`` and ``sigma_min`` are the largest and smallest of the ``min(rows, cols)``
    singular values of ``M`` (``sigma_min`` is ``None`` for ``which='max'``); ``values`` holds all
    of them in descending order for ``which='all'`` (else ``None``).

    ``sigma_max_error`` / ``sigma_min_error`` are absolute error bounds: the true value lies
    within them of the returned one. ``0.0`` for the dense and FFT routes means "float64
    rounding only": a backward-stable SVD, accurate to a small multiple of ``eps * sigma_max``
    (``eps`` = 2.2e-16), so a ``sigma_min`` is accurate relative to itself only when it is well
    above that. For ``'iterative'`` they are computed (Note [iterative error bounds] in
    ``spectrum.py``) from residuals recomputed with fresh products, a certificate factorisation
    for ``sigma_min`` (Temple's bound, or Weyl's), a bound on the float64 rounding of ``||M v||``,
    and an allowance of ``eps sigma_max^2`` for the rounding of each Gram product (a model: the
    measured rounding is about 0.15 of it). ``converged`` is ``True`` when ``sigma_max_error <=
    tol * sigma_max`` and ``sigma_min_error <= tol * sigma_min``, or ``sigma_min`` is 0 to
    float64 rounding (``sigma_min + sigma_min_error`` at most ``64 eps sigma_max`` plus the
    rounding bound of one product); ``exact`` is ``True`` for the dense and FFT routes and equals
    ``converged`` for ``'iterative'``.

    ``n_products`` counts applications of ``M`` or ``M^T`` (``F.conv2d`` or its transpose; a Gram
    product counts 2), ``n_solves`` the solves with the factorised Gram operator of
    shift-and-invert, ``n_factorizations`` the block-banded Cholesky factorisations (one for
    shift-and-invert and one certificate per group, usually).
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
    sigma_max_error: float = 0.0
    sigma_min_error: Optional[float] = None
    n_factorizations: int = 0


# --------------------------------------------------------------------------------------------
# Scaling

# Note [power-of-two scaling]: every route runs on w * 2^-e with 2^(e-1) <= max|w| < 2^e, and
# multiplies the singular values (and error bounds) by 2^e at the end. Multiplying by a power of
# two is exact in binary floating point (short of underflow of entries 2^-1074 below the largest,
# which cannot change any singular value in float64), so the results are those of the unscaled
# kernel, while the Gram products (squares of the entries), Cholesky shifts and Gram iteration
# (powers 2^t of the entries) stay far from overflow and underflow: kernels of 1e80 or 1e-80
# used to raise torch's LinAlgError.


def _ldexp(x: float, e: int) -> float:
    """``x * 2**e`` exactly (``ValueError`` if it overflows float64)."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        raise ValueError(
            f"a singular value ({x} * 2**{e}) exceeds the float64 range; scale the weight down"
        ) from None


def _scale_weight(w: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(w * 2^-e, e)`` with the largest entry of the result in ``[0.5, 1)`` (``e = 0`` for 0)."""
    amax = float(w.abs().max()) if w.numel() else 0.0
    if amax == 0:
        return w, 0
    e = math.frexp(amax)[1]
    out = w
    for step in (e // 2, e - e // 2):  # two steps: 2^-e alone can overflow for subnormal weights
        out = out * math.ldexp(1.0, -step)
    return out, e


def _rescale(res: "ConvSpectrum", e: int) -> "ConvSpectrum":
    if e == 0:
        return res
    values = None
    if res.values is not None:
        values = res.values * math.ldexp(1.0, e // 2) * math.ldexp(1.0, e - e // 2)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the singular values exceed the float64 range; scale the weight down")
    return replace(
        res,
        sigma_max=_ldexp(res.sigma_max, e),
        sigma_min=None if res.sigma_min is None else _ldexp(res.sigma_min, e),
        values=values,
        sigma_max_error=_ldexp(res.sigma_max_error, e),
        sigma_min_error=None if res.sigma_min_error is None else _ldexp(res.sigma_min_error, e),
    )


# --------------------------------------------------------------------------------------------
# Progress and time


class _Work:
    """A progress bar plus a time estimate: warns once if a long run shows no bar."""

    def __init__(self, bar, shown: bool, what: str):
        self.bar, self.shown, self.what = bar, shown, what
        self.t0 = time.perf_counter()
        self.warned = False

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def estimate(self, done: int, total: int) -> None:
        """After ``done`` of ``total`` units: warn if the rest is long and no bar is shown."""
        if self.shown or self.warned or done <= 0 or total <= done:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed * (total - done) / done
        if left > LONG_SECONDS:
            self.warned = True
            warnings.warn(
                f"{self.what}: about {_duration(left)} left ({done} of {total} done in "
                f"{elapsed:.1f} s); pass progress=True for a progress bar",
                stacklevel=4,
            )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


class _work:
    """``with _work(total, desc, progress, what) as work``: a :class:`_Work` over a progress bar."""

    def __init__(self, total: Optional[int], desc: str, progress: Optional[bool], what: str):
        self.enabled, delay = auto_progress(progress)
        self.cm = progress_bar(total, desc, enabled=self.enabled, delay=delay)
        self.what = what

    def __enter__(self) -> _Work:
        bar = self.cm.__enter__()
        return _Work(bar, self.enabled, self.what)

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


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
    """``(G, h / G, g / G, *k)`` weights and the geometry of one group (``groups=1``)."""
    G = geom.groups
    h, gg, *ks = weight.shape
    w = weight.reshape(G, h // G, gg, *ks)
    return w, replace(geom, out_channels=h // G, in_channels=gg, groups=1)


# Note [canonical form]: the spectra are those of the convolution C of the conv view (Note [conv
# view] in convspec/_geometry.py): a transposed layer's M = C^T has the same singular values. A
# 1-D convolution on N is exactly the 2-D one on N x 1 with a k x 1 kernel, so 1-D layers run
# through the 2-D code; 3-D layers use the same routes, the banded Gram ordering by the first axis
# with the other two merged (Note [banded Gram]).
def _canonical(weight: torch.Tensor, geom: ConvGeometry) -> Tuple[torch.Tensor, ConvGeometry]:
    geom = replace(geom, transposed=False)
    if geom.ndim == 1:
        unit = AxisGeometry(1, 1, 1, 1, 0, 0, "zeros")
        geom = replace(geom, axes=(geom.axes[0], unit))
        weight = weight.unsqueeze(-1)
    return weight, geom


def _without_idle_wrap(geom: ConvGeometry) -> ConvGeometry:
    """``geom`` with axes that have no padding marked zero-padded.

    Without padding no tap leaves ``[0, N)``, so nothing wraps or mirrors and the axis is the
    zero-padded one; the banded Gram of the iterative route then keeps its band instead of one
    dense block.
    """
    axes = tuple(replace(ax, mode="zeros") if ax.mode != "zeros" and not (ax.pad_lo or ax.pad_hi)
                 else ax for ax in geom.axes)
    mode = geom.padding_mode if any(ax.mode != "zeros" for ax in axes) else "zeros"
    return replace(geom, axes=axes, padding_mode=mode)


def _fft_applicable(geom: ConvGeometry) -> Optional[str]:
    """``None`` if the FFT route is exact for ``geom``, else the reason it is not."""
    if geom.padding_mode != "circular":
        return (f"it needs padding_mode='circular' ({geom.padding_mode!r} padding breaks the "
                "circulant structure)")
    names = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}[geom.ndim]
    for name, ax in zip(names, geom.axes):
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
#
# Note [conjugate pairs]: the kernel is real and w enters T(w) only through the phases
# exp(-2 pi i w_j q / N_j'), so T(-w) = conj(T(w)) (frequencies mod N_j' on every axis), in
# every geometry of the Note above: stride, dilation, padding and groups change q, r and the
# block structure but not this. conj(T) = conj(U) S conj(V)^H has the singular values of T, so
# one SVD serves both members of a pair {w, -w}, whose values then count twice. A frequency is
# self-conjugate (w = -w) when each w_j is 0 or N_j' / 2 (N_j' even); its T is real and counts
# once. One representative of each pair: with j* the last axis whose w_j* is not 0 or
# N_j*' / 2, take 0 < w_j* < N_j*' / 2, any w_j before j*, and w_j in {0, N_j' / 2} after it
# (the self-conjugate w have no j*). The pair's other member has the same j* and the same w_j
# after it but -w_j* = N_j*' - w_j* > N_j*' / 2, so exactly one member of every pair is taken:
# (prod N_j' + S) / 2 SVDs instead of prod N_j', S = prod (1 + [N_j' even]) self-conjugate ones
# (514 instead of 1024 at N' = 32 x 32). Contracting the last axis first, this is: the last axis
# takes 0 .. floor(N'/2); each earlier axis takes all its frequencies below a block of
# non-self-conjugate later frequencies, and again 0 .. floor(N'/2) below a self-conjugate one.
# The pairing is exact, not a rounding argument: the SVD of T(w) is as accurate as that of
# conj(T(w)) would be, and the FFT tests compare the duplicated values with the dense SVD.
#
# Note [transfer SVD]: the transfer matrices go to LAPACK's gesdd (values only) through
# numpy.linalg.svd, one call per chunk: backward stable like torch.linalg.svdvals (absolute
# error a small multiple of eps sigma_max(T)). numpy's is used because it was 1.2-1.5x faster
# than torch's for complex 64 x 64 matrices on this project's 2-core benchmark machine (numpy
# ships OpenBLAS, torch's CPU build MKL; benchmarks/fft.py's ablation: 1.19x), while neither was
# consistently faster for 16 x 16 to 48 x 48 and rectangular ones. The
# eigenvalues of the Hermitian Gram T^H T (eigvalsh) are not used: they square the condition
# number (sigma from lambda = sigma^2 has absolute error ~ eps sigma_max^2 / sigma, up to
# sqrt(eps) sigma_max for the smallest values, where gesdd has eps sigma_max), and the GEMM plus
# eigvalsh measured no faster than gesdd at 64 x 64.


def _phases(ax: AxisGeometry) -> Tuple[torch.Tensor, np.ndarray]:
    """``(E, R)``: ``E`` (N/s, k) complex DFT phases of the taps, ``R`` (k,) their input phase."""
    n = ax.size // ax.stride
    t = ax.dilation * np.arange(ax.kernel) - ax.pad_lo
    r, q = np.mod(t, ax.stride), np.floor_divide(t, ax.stride)
    omega = np.arange(n)[:, None] * np.mod(q, n)[None, :] / n
    angle = torch.as_tensor(-2 * np.pi * omega)
    e = torch.polar(torch.ones(omega.shape, dtype=torch.float64), angle)
    return e, r


_TAP, _PHASE = "pqr", "uvw"  # einsum letters for up to three spatial axes


def _transfer_plan(
    weight: torch.Tensor, axes: Tuple[AxisGeometry, ...], pairs: bool, chunk_bytes: int,
) -> Tuple[List[int], List[int]]:
    """``(n, c)``: frequencies per axis and the most of them a chunk of :func:`_transfer_chunks`
    takes per axis.

    Axes are contracted last to first; the intermediate at axis ``j`` holds the taps of the
    axes before it and ``c_j ... c_d`` frequencies, so each ``c_j`` is chosen to keep it near
    ``chunk_bytes``. With ``pairs`` the last axis contributes at most ``n_d // 2 + 1``.
    """
    G, hg, gg, *ks = weight.shape
    ns = [ax.size // ax.stride for ax in axes]
    per_freq = G * hg * gg * math.prod(ax.stride for ax in axes) * 16
    cs = [1] * len(axes)
    block = 1
    for j in range(len(axes) - 1, -1, -1):
        most = ns[j] // 2 + 1 if pairs and j == len(axes) - 1 else ns[j]
        cs[j] = max(1, min(most, chunk_bytes // (per_freq * math.prod(ks[:j]) * block)))
        block *= cs[j]
    return ns, cs


def _axis_blocks(n: int, c: int, halve: bool) -> List[Tuple[int, int, bool]]:
    """Frequency blocks ``(start, stop, self_conjugate)`` of one axis, each at most ``c`` long.

    Without ``halve``: ``0 .. n - 1``, no block self-conjugate. With it (every later axis'
    frequency is self-conjugate, Note [conjugate pairs]): ``{0}``, ``1 .. ceil(n / 2) - 1`` and
    ``{n / 2}`` for even ``n``, the two singletons self-conjugate.

    >>> _axis_blocks(8, 2, True)
    [(0, 1, True), (1, 3, False), (3, 4, False), (4, 5, True)]
    >>> _axis_blocks(5, 8, True), _axis_blocks(1, 8, True), _axis_blocks(5, 8, False)
    ([(0, 1, True), (1, 3, False)], [(0, 1, True)], [(0, 5, False)])
    """
    if not halve:
        return [(b, min(b + c, n), False) for b in range(0, n, c)]
    top = (n + 1) // 2  # the first frequency past the pairs' representatives 1 .. top - 1
    blocks = [(0, 1, True)] + [(b, min(b + c, top), False) for b in range(1, top, c)]
    if n % 2 == 0:
        blocks.append((n // 2, n // 2 + 1, True))
    return blocks


def _transfer_chunks(
    weight: torch.Tensor,
    axes: Tuple[AxisGeometry, ...],
    pairs: bool = False,
    chunk_bytes: int = 2**27,
) -> Iterator[Tuple[torch.Tensor, int]]:
    """Yield ``(T, multiplicity)``: the transfer matrices of Note [polyphase transfer
    matrices], in chunks, each with how many times its singular values occur in ``M``'s.

    ``weight`` is ``(G, h', g', *k)`` (real) with one to three spatial axes; ``axes`` give size,
    stride, dilation and ``pad_lo`` (``size`` divisible by ``stride``). Each chunk is
    ``(G, c, h', g' prod(s))`` complex128 for ``c`` frequencies (a block of each axis'
    frequencies), at most about ``chunk_bytes``, and so is every partially contracted kernel it
    is made from: memory does not grow with ``N``. Without ``pairs`` every frequency comes once
    (multiplicity 1); with it one frequency of each conjugate pair ``{w, -w}``, multiplicity 2,
    and each self-conjugate one, multiplicity 1 (Note [conjugate pairs]).
    """
    G, hg, gg, *ks = weight.shape
    d = len(axes)
    ns, cs = _transfer_plan(weight, axes, pairs, chunk_bytes)
    es, rs = zip(*(_phases(ax) for ax in axes))
    es = [e.to(weight.device) for e in es]
    taps, phases = _TAP[:d], _PHASE[:d]
    # Scatter each tap to its input phase: (G, k_1..k_d, h', g', s_1..s_d), zero off its phase.
    onehots = []
    for j, ax in enumerate(axes):
        oh = torch.zeros(ks[j], ax.stride, dtype=torch.float64, device=weight.device)
        oh[torch.arange(ks[j]), torch.as_tensor(rs[j])] = 1
        onehots.append(oh)
    spec = f"gij{taps}," + ",".join(taps[j] + phases[j] for j in range(d)) + f"->g{taps}ij{phases}"
    wp = torch.einsum(spec, weight.to(torch.float64), *onehots).to(torch.complex128).contiguous()
    width = gg * math.prod(ax.stride for ax in axes)

    # Axes are numbered 0 .. d-1 here. Before contracting axis j, t is
    # (G k_0 ... k_j, c_{j+1} ... c_{d-1} h' width): the taps of the axes not yet contracted, then
    # the chunk's frequencies of the others. Contracting axis j is one batched GEMM whose output
    # is already in this layout, and after axis 0 it is (G, c_0 ... c_{d-1}, h', width): the
    # chunk, without a copy.
    def contract(t: torch.Tensor, j: int, halve: bool) -> Iterator[Tuple[torch.Tensor, int]]:
        if j < 0:
            yield t.view(G, -1, hg, width), 2 if pairs and not halve else 1
            return
        t3 = t.view(-1, ks[j], t.shape[-1])
        for b0, b1, self_conj in _axis_blocks(ns[j], cs[j], halve):
            t2 = torch.matmul(es[j][b0:b1], t3)  # (G k_0 ... k_{j-1}, c_j, c_{j+1} ... h' width)
            yield from contract(t2.view(t3.shape[0], -1), j - 1, self_conj)

    yield from contract(wp.view(G * math.prod(ks), -1), d - 1, pairs)


def _n_chunks(weight, axes, pairs, chunk_bytes) -> int:
    """How many chunks :func:`_transfer_chunks` yields (for the progress bar)."""
    ns, cs = _transfer_plan(weight, axes, pairs, chunk_bytes)

    def count(j: int, halve: bool) -> int:
        if j < 0:
            return 1
        return sum(count(j - 1, sc) for _, _, sc in _axis_blocks(ns[j], cs[j], halve))

    return count(len(axes) - 1, pairs)


def _chunk_bytes(max_bytes: int) -> int:
    """Transfer-matrix chunk size: 128 MiB, or less under a small ``max_bytes``."""
    return int(max(2**16, min(2**27, max_bytes // 8)))


def _transfer_svdvals(t: torch.Tensor) -> np.ndarray:
    """Singular values of each matrix of a complex128 batch ``(..., m, n)`` (Note [transfer
    SVD]): LAPACK gesdd through ``numpy.linalg.svd``, values only, descending per matrix."""
    return np.linalg.svd(t.numpy(), compute_uv=False)


def _fft_spectrum(
    w: torch.Tensor, geom1: ConvGeometry, which: str, max_bytes: int, progress: Optional[bool],
) -> Tuple[Optional[torch.Tensor], float, float]:
    """``(values or None, sigma_max, sigma_min)`` of the grouped circular operator.

    One SVD per conjugate pair of frequencies (Note [conjugate pairs]). ``which='all'`` keeps
    every value, a pair's twice (refused above ``max_bytes``, with the estimate); otherwise the
    chunks stream through a running max and min.
    """
    G, hg, gg = w.shape[:3]
    per = min(hg, gg * math.prod(ax.stride for ax in geom1.axes))
    count = G * math.prod(ax.size // ax.stride for ax in geom1.axes) * per
    if which == "all":
        need = 3 * 8 * count  # the values, their concatenation and the sorted copy
        if need > max_bytes:
            raise ValueError(
                f"all {count} singular values would take {need / 2**20:.1f} MiB to collect and "
                f"sort, above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); pass "
                "which='extremes' or 'max' (streamed in bounded memory) or a larger max_bytes"
            )
    chunk = _chunk_bytes(max_bytes)
    total = _n_chunks(w, geom1.axes, True, chunk)
    vals: List[np.ndarray] = []
    smax, smin = 0.0, math.inf
    with _work(total, "spectrum (fft)", progress, "conv_singular_values(method='fft')") as work:
        for i, (t, mult) in enumerate(_transfer_chunks(w, geom1.axes, True, chunk)):
            sv = _transfer_svdvals(t).reshape(-1)
            if which == "all":
                vals.extend([sv] * mult)
            else:
                smax, smin = max(smax, float(sv.max())), min(smin, float(sv.min()))
            work.update(1)
            work.estimate(i + 1, total)
    if which != "all":
        return None, smax, smin
    # numpy's sort (SIMD) took 0.3 ms for 65536 values where torch.sort took 7 ms.
    values = torch.from_numpy(np.sort(np.concatenate(vals))[::-1].copy())
    return values, float(values[0]), float(values[-1])


# --------------------------------------------------------------------------------------------
# Dense route


def _dense_values(w: torch.Tensor, geom1: ConvGeometry, max_bytes: int) -> torch.Tensor:
    """All singular values (descending): SVD of each group's dense operator, concatenated."""
    vals = [torch.linalg.svdvals(dense_operator(w[i], geom1, max_bytes)) for i in range(w.shape[0])]
    return torch.sort(torch.cat(vals), descending=True).values


# --------------------------------------------------------------------------------------------
# Matrix-free products: convspec._geometry.conv_forward and conv_adjoint (any mode, any axes).


def _tall(geom: ConvGeometry) -> bool:
    """True if ``M`` (of one group) has at least as many rows as columns: work with ``M^T M``."""
    return geom.n_out >= geom.n_in


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
# the output side; without wrap-around). Grouping `rows` image rows per block makes the Gram
# block banded with q = ceil(reach / rows) blocks on each side of the diagonal, blocks of size
# b = rows * R2 * c. Its block Cholesky factor has the same band: per block row one Cholesky
# (b^3 / 3), q triangular solves and q (q + 1) / 2 + q block products, (q^2 + 2q + 1/3) b^3 flops;
# `_plan_banded` picks `rows` (and the axis to order by) with the fewest flops. One image row per
# block (q = reach) costs about 0.6 times the block-tridiagonal choice (rows = reach) for
# 3 x 3 kernels. A solve costs O((2q + 1) b^2) per block row; nothing is ever O(n^3).


def _gram_parts(w: torch.Tensor, axes, tall: bool):
    """Per-axis ``Z[p, p', i, i'] = (E_p E_p'^T)[i, i']``; channel matrices ``C`` (k1, k2, c, c').

    Three axes: the second ``Z`` is the Kronecker product of the last two axes' (taps and
    positions merged row-major), and ``C`` has the last two taps merged likewise.
    """
    z = []
    for ax in axes:
        a = ax.tap_matrices()
        e = a.transpose(0, 2, 1) if tall else a  # (k, R, R')
        z.append(torch.as_tensor(np.einsum("pir,qjr->pqij", e, e)))
    if len(z) == 3:
        z2, z3 = z[1], z[2]
        k2, k3, r2, r3 = z2.shape[0], z3.shape[0], z2.shape[2], z3.shape[2]
        z = [z[0], torch.einsum("pqij,rskl->prqsikjl", z2, z3).reshape(
            k2 * k3, k2 * k3, r2 * r3, r2 * r3)]
        w = w.reshape(*w.shape[:3], k2 * k3)
    c = w.permute(2, 3, 1, 0) if tall else w.permute(2, 3, 0, 1)  # (k1, k2, c, c')
    return z, c.to(torch.float64)


def _row_reach(ax: AxisGeometry, tall: bool) -> int:
    """The largest ``|i - i'|`` with ``(E_p E_p'^T)[i, i'] != 0`` (Note [banded Gram]): input
    positions read by one output (``tall``), or outputs that share an input; ``O(k P)``."""
    x = ax.tap_positions()  # (k, P)
    if tall:
        lo = np.where(x >= 0, x, np.iinfo(np.int64).max).min(0)
        hi = x.max(0)
        ok = hi >= 0
        return int((hi[ok] - lo[ok]).max()) if ok.any() else 0
    first = np.full(ax.size, np.iinfo(np.int64).max)
    last = np.full(ax.size, -1)
    ys = np.arange(ax.out_size)
    for p in range(ax.kernel):
        valid = x[p] >= 0
        np.minimum.at(first, x[p][valid], ys[valid])
        np.maximum.at(last, x[p][valid], ys[valid])
    ok = last >= 0
    return int((last[ok] - first[ok]).max()) if ok.any() else 0


def _banded_cost(r1: int, r2c: int, reach: int, rows: int, kernel: int) -> Tuple[float, int]:
    """``(flops, bytes)`` of the block-banded factorisation with ``rows`` image rows per block."""
    rows = max(1, min(rows, r1))
    q = min(-(-reach // rows), -(-r1 // rows) - 1) if reach else 0
    b = rows * r2c
    nblocks = -(-r1 // rows)
    flops = nblocks * (q * q + 2 * q + 1 / 3) * b**3
    # The factor's blocks, a few working blocks, and H (k1^2 blocks of (R2 c)^2).
    # (plus the q + 1 block rows a certificate factorisation holds next to the factor).
    memory = 8 * (nblocks * (q + 1) * b * b + (q + 5) * b * b + kernel**2 * r2c**2)
    return flops, memory


def _banded_best(w: torch.Tensor, geom1: ConvGeometry) -> Tuple[float, bool, int, int]:
    """``(flops, swap, block_rows, bytes)`` of the cheapest banded ordering (Note [banded Gram])."""
    tall = _tall(geom1)
    c = geom1.in_channels if tall else geom1.out_channels
    best = None
    for swap in ((False, True) if geom1.ndim == 2 else (False,)):
        axes = geom1.axes[::-1] if swap else geom1.axes
        sizes = [ax.size if tall else ax.out_size for ax in axes]
        rest = math.prod(sizes[1:])
        reach = _row_reach(axes[0], tall)
        # Three axes: the merged Z of the last two is dense (k2 k3 R2 R3)^2 (Note [banded Gram]).
        zbytes = 8 * (math.prod(ax.kernel for ax in axes[1:]) * rest) ** 2 if geom1.ndim == 3 else 0
        for rows in range(1, max(1, min(reach, sizes[0])) + 1):
            flops, memory = _banded_cost(sizes[0], rest * c, reach, rows, axes[0].kernel)
            memory += zbytes
            if best is None or flops < best[0]:
                best = (flops, swap, rows, memory)
    return best


def _plan_banded(w: torch.Tensor, geom1: ConvGeometry) -> Tuple[bool, int, int]:
    """``(swap, block_rows, bytes)``: the cheapest ordering axis and block height, its memory."""
    return _banded_best(w, geom1)[1:]


class _Plan(NamedTuple):
    """How the Gram of one group is factorised: block-banded (Note [banded Gram]) or by nested
    dissection (``_nested.py``), whichever needs fewer flops. ``need``: bytes with the factor
    kept for solves; ``need_once``: bytes of a factorisation that only proves definiteness."""

    nested: bool
    swap: bool
    rows: int
    need: int
    need_once: int
    flops: float


def _plan_factor(w: torch.Tensor, geom1: ConvGeometry) -> _Plan:
    flops, swap, rows, need = _banded_best(w, geom1)
    plan = _Plan(False, swap, rows, need, need, flops)
    if geom1.ndim == 2:
        tall = _tall(geom1)
        c = geom1.in_channels if tall else geom1.out_channels
        sizes = [ax.size if tall else ax.out_size for ax in geom1.axes]
        reach = [_row_reach(ax, tall) for ax in geom1.axes]
        nflops, keep, once = nested_cost(*sizes, *reach, c)
        if nflops < flops:
            plan = _Plan(True, False, 0, keep, once, nflops)
    return plan


def _factor(wt: torch.Tensor, axes, tall: bool, plan: _Plan, shift: float, *,
            on_block=None, keep: bool = True, negate: bool = False):
    """The factor of ``Gram + shift I`` (``shift I - Gram`` with ``negate``) that ``plan`` says."""
    if plan.nested:
        (z1, z2), c = _gram_parts(wt, axes, tall)
        r1, r2 = (_row_reach(ax, tall) for ax in axes)
        return NestedCholesky(z1, z2, c, r1, r2, shift, negate=negate, keep=keep,
                              on_front=on_block)
    return _BandedCholesky(wt, axes, tall, plan.rows, shift, on_block=on_block, keep=keep,
                           negate=negate)


class _BandedCholesky:
    """Cholesky factor of ``Gram + shift I (+ gamma u u^T)``, block banded (Note [banded Gram]).

    ``ok`` is ``False`` if a pivot block was not positive definite: then the matrix is not (to
    rounding). With ``shift = -tau`` a successful factorisation proves ``lambda_min(Gram) > tau``;
    with ``rank_one=(gamma, u)`` it proves that ``Gram - tau I`` is positive definite on the
    complement of ``u``, i.e. ``lambda_2(Gram) >= tau`` (Courant-Fischer), which Temple's bound
    needs (Note [iterative error bounds]).

    Note [banded plus rank one]: the factor of ``A + gamma u u^T`` (``A`` block banded, band
    ``q``) is ``L_ij = u_i g_j^T`` below the band, with ``g = L^{-1} (gamma u)`` computed block by
    block: ``g_j = L_jj^{-1} ((gamma - C_{j-q}) u_j - sum_{band l} L_jl g_l)``,
    ``C_m = sum_{l<m} |g_l|^2``. In the band, ``L_ij = (A_ij + u_i (gamma u_j - T_ij)^T -
    sum_{l=i-q}^{j-1} L_il L_jl^T) L_jj^{-T}`` with ``T_ij = C_{j-q} u_j + sum_{l=j-q}^{i-q-1}
    L_jl g_l``, and the pivot is ``A_ii + (gamma - C_{i-q}) u_i u_i^T - sum_band L_il L_il^T``:
    the same band work plus vector operations. With ``rank_one`` or ``keep=False`` only ``ok``
    is kept (and only ``q + 1`` block rows are held at a time); ``solve`` needs the factor.
    """

    def __init__(self, w: torch.Tensor, axes, tall: bool, rows: int, shift: float,
                 on_block: Optional[Callable[[int], None]] = None,
                 rank_one: Optional[Tuple[float, torch.Tensor]] = None, keep: bool = True,
                 negate: bool = False):
        # negate: factor shift I - Gram instead (with shift = tau, success proves
        # lambda_max(Gram) < tau: the certificate of sigma_max).
        if negate and rank_one is not None:
            raise ValueError("negate and rank_one do not combine")
        (z1, z2), c = _gram_parts(w, axes, tall)
        k1, k2, cc, _ = c.shape
        r1, r2 = z1.shape[-1], z2.shape[-1]
        cc_pq = torch.einsum("pqab,rscb->pqrsac", c, c)  # C_pq C_rs^T
        # H[p, p'] = sum_{q,q'} Z2[q,q'] (x) C_pq C_p'q'^T, rows (j, a): (k1, k1, R2 c, R2 c)
        h = torch.einsum("qsjl,pqrsac->prjalc", z2, cc_pq).reshape(k1, k1, r2 * cc, r2 * cc)
        del cc_pq
        rows = max(1, min(rows, r1))
        starts = list(range(0, r1, rows))
        self.sizes = [min(rows, r1 - s) * r2 * cc for s in starts]
        nz = torch.nonzero(z1.abs().sum((0, 1)))
        reach = int((nz[:, 0] - nz[:, 1]).abs().max()) if len(nz) else 0
        self.q = q = min(-(-reach // rows), len(starts) - 1) if reach else 0
        keep = keep and rank_one is None  # a certificate needs only `ok`: q + 1 rows at a time
        zf = z1.permute(2, 3, 0, 1)  # (R1, R1, k1, k1)
        hf = h.reshape(k1 * k1, -1)  # (k1^2, (R2 c)^2)
        del h
        bw = r2 * cc

        def block(bi: int, bj: int) -> torch.Tensor:
            si = slice(starts[bi], starts[bi] + rows)
            sj = slice(starts[bj], starts[bj] + rows)
            zz = zf[si, sj]  # (rows_i, rows_j, k1, k1)
            ri, rj = zz.shape[:2]
            d = (zz.reshape(ri * rj, k1 * k1) @ hf).reshape(ri, rj, bw, bw)
            d = d.permute(0, 2, 1, 3).reshape(self.sizes[bi], self.sizes[bj])
            return -d if negate else d

        if rank_one is not None:
            gamma = float(rank_one[0])
            u = list(torch.split(rank_one[1].reshape(-1).to(torch.float64), self.sizes))
            g: List[torch.Tensor] = []
            csum = [0.0]  # csum[m] = C_m = sum_{l < m} |g_l|^2

            def cg(m: int) -> float:
                return csum[m] if m > 0 else 0.0

        # self.L[i][j - i + q] = L_ij for i - q <= j <= i (left-looking block Cholesky).
        self.L: List[List[Optional[torch.Tensor]]] = []
        self.ok = True
        for bi in range(len(starts)):
            lo = max(0, bi - q)
            row: List[Optional[torch.Tensor]] = [None] * (q + 1)
            for bj in range(lo, bi):
                a = block(bi, bj)
                if rank_one is not None:  # Note [banded plus rank one]
                    t = cg(bj - q) * u[bj]
                    for bl in range(max(bj - q, 0), bi - q):
                        t = t + self.L[bj][bl - bj + q] @ g[bl]
                    a.addr_(u[bi], gamma * u[bj] - t)
                if bj > lo:  # a -= sum_l L_il L_jl^T over the overlap of both bands, one GEMM
                    li = torch.cat(row[lo - bi + q : bj - bi + q], dim=1)
                    lj = torch.cat(self.L[bj][lo - bj + q : q], dim=1)
                    a.addmm_(li, lj.T, alpha=-1)
                # L_ij = a L_jj^{-T}: solve X L_jj^T = a from the right.
                row[bj - bi + q] = torch.linalg.solve_triangular(
                    self.L[bj][q].T, a, upper=True, left=False)
            d = block(bi, bi)
            d.diagonal().add_(shift)
            if rank_one is not None:
                d.addr_(u[bi], u[bi], alpha=gamma - cg(bi - q))
            if bi > lo:
                li = torch.cat(row[lo - bi + q : q], dim=1)
                d.addmm_(li, li.T, alpha=-1)
            l, info = torch.linalg.cholesky_ex(d)
            if int(info) != 0:
                self.ok = False
                self.L = []
                return
            row[q] = l
            self.L.append(row)
            if rank_one is not None:
                rhs = (gamma - cg(bi - q)) * u[bi]
                for bl in range(lo, bi):
                    rhs = rhs - row[bl - bi + q] @ g[bl]
                gi = torch.linalg.solve_triangular(l, rhs[:, None], upper=False)[:, 0]
                g.append(gi)
                csum.append(csum[-1] + float(gi @ gi))
            if not keep and bi >= q:
                self.L[bi - q] = []  # no later row reads it: only the last q + 1 rows stay
            if on_block is not None:
                on_block(1)
        if not keep:
            self.L = []

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        q = self.q
        parts = list(torch.split(b.reshape(-1), self.sizes))
        y: List[torch.Tensor] = []
        for bi, part in enumerate(parts):
            rhs = part.clone()
            for bl in range(max(0, bi - q), bi):
                rhs -= self.L[bi][bl - bi + q] @ y[bl]
            y.append(torch.linalg.solve_triangular(self.L[bi][q], rhs[:, None], upper=False)[:, 0])
        nb = len(y)
        x: List[Optional[torch.Tensor]] = [None] * nb
        for bi in range(nb - 1, -1, -1):
            rhs = y[bi].clone()
            for bj in range(bi + 1, min(nb, bi + q + 1)):
                rhs -= self.L[bj][bi - bj + q].T @ x[bj]
            x[bi] = torch.linalg.solve_triangular(self.L[bi][q].T, rhs[:, None], upper=True)[:, 0]
        return torch.cat(x)


# --------------------------------------------------------------------------------------------
# Iterative route

# Note [iterative error bounds]: both extremes come from a unit Ritz vector v of the smaller
# Gram operator (M^T M if M is tall, else M M^T; write M for whichever of M, M^T is applied
# first) and three numbers computed with fresh products: s = ||M v||, rho = s^2 and
# r = ||M^T M v - rho v||. The returned value is s. Rounding enters twice:
#   * ||fl(M v) - M v|| <= ds = gamma_L || |M| ||_2 (each entry a sum of L products; read off
#     the kernel, _product_rounding): rigorous, so the true Rayleigh quotient is within
#     drho = 2 s ds + ds^2 of rho, and s within ds of ||M v||;
#   * each Gram product carries rounding of about eps sigma_max^2 (measured 0.15 eps
#     sigma_max^2 on random kernels; the worst case is larger by up to the number of terms):
#     every bound adds e = eps sigma_max^2 per product, and a Cholesky factorisation that
#     succeeds proves positive definiteness up to the same e (in tests it fails within 0.5 e).
#
# * sigma_max: in exact arithmetic s <= sigma_max (a Rayleigh quotient) and some eigenvalue lies
#   within r of rho; if it is the largest, sigma_max <= sqrt(rho + r + e + 2 drho).
#   sigma_max_error = max(that - s, ds). That it is the largest rests on Lanczos from a random
#   start (a second random start after any breakdown, linalg.py's Note [breakdown]) and on the
#   Ritz value having stopped rising over SETTLE_STEPS steps (Note [settling]: with a cluster at
#   the top, an early Ritz value passed the residual test 2.5e-7 below sigma_max);
#   conv_spectral_norm_bound is a certified upper bound when one is needed.
# * sigma_min: sigma_min <= ||M v|| <= s + ds (min over unit vectors; the Gram is the smaller one,
#   so all its eigenvalues are squared singular values of M). The lower end is certified by a
#   second factorisation, whatever Lanczos did:
#   - Temple: if Gram - beta I + gamma v v^T factorises (Note [banded plus rank one]), the Gram is
#     positive definite above beta on the complement of v, so lambda_2 >= beta - e (Courant-
#     Fischer), and Temple's inequality gives lambda_1 >= rho - drho - (r + e + drho)^2 /
#     (beta - e - rho - drho). The residual enters squared: with a gap, this certifies sigma_min
#     far below sqrt(eps) sigma_max. beta is halfway to the second Ritz value.
#   - Weyl, when Temple cannot (lambda_1 repeated: the Ritz value then sits on a cluster): if
#     Gram - tau I factorises with tau = rho - r - e, lambda_1 > tau - e. If it does not, an
#     eigenvalue that Lanczos missed lies below tau, and tau is lowered (tau / 4, tau / 64), down
#     to 0 (the Gram is PSD).
#   sigma_min_error = max(s - sqrt(certified lower end), ds).
#
# Through Weyl the relative accuracy tol on sigma_min is reachable only while r + 2e <= 2 tol rho,
# i.e. sigma_min / sigma_max >= about sqrt(eps / tol) (1.5e-5 for tol = 1e-6); Temple goes further
# when sigma_min is not repeated. Otherwise `converged` is False and sigma_min_error is the
# absolute accuracy (never more than s itself: sigma_min is then known to lie in [0, s + ds]).
# A sigma_min whose whole interval [0, s + sigma_min_error] lies below ROUNDING_FLOOR eps
# sigma_max + ds is 0 to float64 rounding (as the dense SVD reports it) and counts as converged;
# a small but nonzero sigma_min (say 1e-10 sigma_max) does not: relative accuracy there is out of
# reach of float64 for every route, and the absolute bound is what is reported.


def _conv_workspace(geom: ConvGeometry) -> int:
    """Bytes one product with ``M`` or ``M^T`` needs beyond its input and output (unfolded taps)."""
    taps = math.prod(geom.kernel_size)
    unfold = taps * max(geom.in_channels, geom.out_channels) * max(
        math.prod(geom.output_size), math.prod(geom.input_size))
    return 8 * (unfold + 2 * (geom.n_in + geom.n_out))


class _Bracket:
    """The bounds of Note [iterative error bounds] for one unit vector ``v`` of the Gram side."""

    def __init__(self, first: Callable, second: Callable):
        self.first, self.second = first, second  # v -> M v, and M v -> M^T M v

    def __call__(self, v: torch.Tensor) -> Tuple[float, float, float]:
        y = self.first(v)
        s = float(y.norm())
        g = self.second(y)
        rho = s * s
        r = float((g - rho * v).norm())
        return s, rho, r


def _iterative(
    wg: torch.Tensor,
    geom: ConvGeometry,
    which: str,
    tol: float,
    max_bytes: int,
    max_products: int,
    generator: torch.Generator,
    progress: Optional[bool],
) -> ConvSpectrum:
    weight = wg.reshape(-1, *wg.shape[2:])  # (h, g / G, *k), grouped layout of nn.Conv*d
    wgs, geom1 = _group_weights(weight, geom)
    tall = _tall(geom1)
    counts = {"products": 0, "solves": 0, "factorizations": 0}
    shape_in = (geom.in_channels, *geom.input_size)
    shape_out = (geom.out_channels, *geom.output_size)
    dim = math.prod(shape_in if tall else shape_out)
    workspace = _conv_workspace(geom)

    with _work(None, "spectrum (iterative)", progress,
               "conv_singular_values(method='iterative')") as work:

        def fwd(x):  # x: (g, *N) -> (h, *P)
            counts["products"] += 1
            work.update(1)
            return conv_forward(x[None], weight, geom)[0]

        def adj(y):
            counts["products"] += 1
            work.update(1)
            return conv_adjoint(y[None], weight, geom)[0]

        def first(v):
            return fwd(v.reshape(shape_in)) if tall else adj(v.reshape(shape_out))

        def second(y):
            return (adj(y) if tall else fwd(y)).reshape(-1)

        def gram(v):
            return second(first(v))

        bracket = _Bracket(first, second)
        found = {}

        ds = _product_rounding(wgs, geom1, tall)

        def verify_max(y):
            s, rho, r = bracket(y[0])
            drho = 2 * s * ds + ds * ds
            upper = math.sqrt(rho + r + _EPS * rho + 2 * drho)
            err = max(upper - s, ds)
            found.update(s=s, err=err)
            return (torch.tensor([rho], dtype=torch.float64),
                    torch.tensor([r], dtype=torch.float64), err <= tol * s)

        top = lanczos_largest(
            gram, dim, tol=tol, max_steps=max(1, max_products // 2 - 2), max_bytes=max_bytes,
            reserved_bytes=workspace, generator=generator, verify=verify_max, max_basis=300,
            settle=SETTLE_STEPS,
        )
        sigma_max, sigma_max_error = found["s"], found["err"]
        converged = top.converged
        if converged:
            # Prove the upper end: at the Lanczos bound, or, when that margin is below what a
            # factorisation can resolve, at half the tolerance (still converged).
            certified = _certify_max(wgs, geom1, tall, sigma_max + sigma_max_error, max_bytes,
                                     counts, work)
            if certified is False and 0.5 * tol * sigma_max > sigma_max_error:
                certified = _certify_max(wgs, geom1, tall, sigma_max * (1 + 0.5 * tol),
                                         max_bytes, counts, work)
                if certified:
                    sigma_max_error = 0.5 * tol * sigma_max
            if certified is False:
                # Lanczos missed the top of a cluster: the tightest of a few larger bounds that
                # a factorisation proves, else a bound read off the kernel.
                converged = False
                widened = _product_scale(wgs, geom1, tall)
                for f in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
                    trial = sigma_max * (1 + f)
                    if trial <= sigma_max + sigma_max_error or trial >= widened:
                        continue
                    if _certify_max(wgs, geom1, tall, trial, max_bytes, counts, work):
                        widened = math.sqrt(trial * trial * (1 + _EPS))
                        break
                sigma_max_error = max(sigma_max_error, widened - sigma_max)
                warnings.warn(
                    f"the certificate found an eigenvalue of the Gram operator above the Lanczos "
                    f"value (sigma_max {sigma_max:.9g} + {found['err']:.2g}): Lanczos missed "
                    "the top of a cluster; the error bound of sigma_max is widened to "
                    f"{sigma_max_error:.2g}", stacklevel=3)
            elif certified:
                upper = math.sqrt((sigma_max + sigma_max_error) ** 2
                                  + _EPS * (sigma_max + sigma_max_error) ** 2)
                sigma_max_error = upper - sigma_max
        sigma_min = sigma_min_error = None
        if which == "extremes":
            sigma_min, sigma_min_error, ok = _sigma_min(
                wgs, geom1, tall, sigma_max + sigma_max_error, tol, max_bytes, max_products,
                generator, counts, work,
            )
            converged = converged and ok
    if not converged:
        parts = [f"sigma_max {sigma_max:.6g} +{sigma_max_error:.2g}"]
        if sigma_min is not None:
            parts.append(f"sigma_min {sigma_min:.6g} -{sigma_min_error:.2g}")
        warnings.warn(
            f"the iterative spectrum did not reach tol={tol} ({', '.join(parts)}: see "
            "ConvSpectrum.converged and *_error); raise max_products, or use method='dense' "
            "(a sigma_min below about sqrt(eps / tol) sigma_max cannot reach tol through the "
            "Gram operator)",
            stacklevel=3,
        )
    return ConvSpectrum(
        sigma_max=sigma_max, sigma_min=sigma_min, values=None, method="iterative",
        exact=converged, converged=converged, n_products=counts["products"],
        n_solves=counts["solves"], tol=tol, sigma_max_error=sigma_max_error,
        sigma_min_error=sigma_min_error, n_factorizations=counts["factorizations"],
    )


def _sigma_min(wgs, geom1, tall, smax_upper, tol, max_bytes, max_products, generator, counts,
               work) -> Tuple[float, float, bool]:
    """``(sigma_min, sigma_min_error, converged)`` over the groups (min of minima).

    Note [iterative error bounds]. Per group: shift-and-invert Lanczos with the block-banded
    factor of ``Gram + shift I`` when it fits in ``max_bytes`` next to the Lanczos basis, then a
    certificate factorisation; otherwise (with a warning) Lanczos on ``sigma_max^2 I - Gram``,
    slow for clustered small singular values and not certified.
    """
    lam_max = smax_upper**2
    if lam_max == 0:
        return 0.0, 0.0, True  # a zero kernel: every singular value is 0
    e = _EPS * lam_max
    ds = _product_rounding(wgs, geom1, tall)
    floor = ROUNDING_FLOOR * _EPS * smax_upper + ds  # 0 to rounding: [0, s + err] below it
    plan = _plan_factor(wgs[0], geom1)
    swap, need = plan.swap, plan.need
    axes = geom1.axes[::-1] if swap else geom1.axes
    workspace = _conv_workspace(geom1)
    sizes = [ax.size if tall else ax.out_size for ax in axes]
    best_s, best_lower = math.inf, math.inf
    warned = False
    for gi in range(wgs.shape[0]):
        wgi = wgs[gi]  # (h', g', k1, k2)
        if _structurally_singular(wgi, geom1, tall):
            return 0.0, 0.0, True
        wt = wgi.transpose(-1, -2) if swap else wgi  # (h', g', *k)

        def fwd(x, wgi=wgi):
            counts["products"] += 1
            work.update(1)
            return conv_forward(x[None], wgi, geom1)[0]

        def adj(y, wgi=wgi):
            counts["products"] += 1
            work.update(1)
            return conv_adjoint(y[None], wgi, geom1)[0]

        def to_conv(v):  # (i, j..., a) layout of Note [banded Gram] -> (a, i, j...) of F.conv
            x = v.reshape(*sizes, -1)
            return x.permute(2, 1, 0) if swap else x.movedim(-1, 0)

        def from_conv(g):
            return (g.permute(2, 1, 0) if swap else g.movedim(0, -1)).reshape(-1)

        def first(v, fwd=fwd, adj=adj):
            x = to_conv(v)
            return fwd(x) if tall else adj(x)

        def second(y, fwd=fwd, adj=adj):
            return from_conv(adj(y) if tall else fwd(y))

        def gram(v, first=first, second=second):
            return second(first(v))

        bracket = _Bracket(first, second)
        found = {}

        def verify(y, bracket=bracket, found=found, temple=True):
            s, rho, r = bracket(y[0])
            drho = 2 * s * ds + ds * ds
            found.update(s=s, rho=rho, r=r, v=y[0], beta=None, drho=drho)
            lower = rho - r - 2 * e  # Weyl, once certified
            if len(y) > 1 and temple:  # Temple, once lambda_2 >= beta is certified
                _, rho2, r2 = bracket(y[1])
                # Some eigenvalue lies above rho2 - r2: if it is lambda_2, beta is halfway.
                beta = (rho + rho2 - r2) / 2
                if beta - e > rho + drho:
                    found["beta"] = beta
                    lower = max(lower, _temple(rho, r, e, beta, drho))
            ok = _within(s, max(s - math.sqrt(max(lower, 0.0)), ds), tol, floor)
            values = torch.tensor([rho], dtype=torch.float64)
            return values, torch.tensor([r], dtype=torch.float64), ok

        dim = wgi.shape[1 if tall else 0] * math.prod(sizes)
        try:
            lanczos_capacity(dim, max_bytes, 2, need + workspace)
            fits = True
        except ValueError:
            fits = False
        if fits:
            shift = 1e-12 * lam_max
            while True:
                chol = _factor(wt, axes, tall, plan, shift, on_block=work.update)
                counts["factorizations"] += 1
                if chol.ok or shift > 1e-3 * lam_max:
                    break
                shift *= 100
            if not chol.ok:  # pragma: no cover - Gram + 1e-3 lambda_max I is well conditioned
                raise RuntimeError("the shifted Gram operator could not be factorised")

            def solve(v, chol=chol):
                counts["solves"] += 1
                work.update(1)
                return chol.solve(v)

            steps = max(50, max_products // 4)
            lanczos_smallest(
                gram, solve, dim, shift=-shift, tol=tol, max_steps=steps, max_bytes=max_bytes,
                reserved_bytes=need + workspace, generator=generator, verify=verify,
                max_basis=64, extra=1,
            )

            def good(lo: float) -> bool:
                err = max(found["s"] - math.sqrt(max(lo, 0.0)), ds)
                return _within(found["s"], err, tol, floor)

            lower = 0.0
            if not good(found["rho"] - found["r"] - 2 * e):  # the residual alone is not enough
                lower = _certify_temple(wt, axes, tall, plan, found, e, lam_max, counts, work)
            if not good(lower):
                if not good(found["rho"] - found["r"] - 2 * e):
                    # Temple did not certify (lambda_1 repeated, or a cluster): iterate on until
                    # the residual alone (Weyl) is within tol or at its rounding floor.
                    lanczos_smallest(
                        gram, solve, dim, shift=-shift, tol=tol / 10, max_steps=steps,
                        max_bytes=max_bytes, reserved_bytes=need + workspace,
                        generator=generator, v0=found["v"], max_basis=64,
                        verify=lambda y: verify(y[:1], temple=False),
                    )
                lower = max(lower, _certify_weyl(wt, axes, tall, plan, found, e, lower, counts,
                                                 work))
            del chol, solve
            s = found["s"]
        else:
            if not warned:
                warned = True
                warnings.warn(
                    f"the banded Gram factorisation would need {need / 2**20:.0f} MiB (above "
                    f"max_bytes={max_bytes} with the Lanczos basis); sigma_min falls back to "
                    "plain Lanczos on lambda_max I - Gram, which converges slowly for clustered "
                    "small singular values and is not certified",
                    stacklevel=4,
                )
            c = lam_max * (1 + 1e-6)

            def flipped(v, gram=gram):
                return c * v - gram(v)

            lanczos_largest(
                flipped, dim, tol=tol * 1e-3, max_steps=max(1, max_products // 2),
                max_bytes=max_bytes, reserved_bytes=workspace, generator=generator,
                verify=verify, max_basis=300, extra=1, settle=SETTLE_STEPS,
            )
            s = found["s"]
            # Uncertified: assumes the eigenvalue near rho is the smallest (and, for Temple,
            # that the second Ritz value bounds lambda_2 from above... so Weyl only).
            lower = max(0.0, found["rho"] - found["r"] - e)
        best_s, best_lower = min(best_s, s), min(best_lower, lower)
    err = max(best_s - math.sqrt(max(best_lower, 0.0)), ds)
    return best_s, err, _within(best_s, err, tol, floor)


def _within(s: float, err: float, tol: float, floor: float) -> bool:
    """``s`` (with error bound ``err``) is within relative ``tol``, or 0 to float64 rounding."""
    return err <= tol * s or s + err <= floor


def _certify_max(wgs, geom1, tall, upper: float, max_bytes: int, counts, work) -> Optional[bool]:
    """Is ``sigma_max <= upper`` proven? Factorise ``tau I - Gram`` per group (``tau = upper^2``):
    success for every group proves ``lambda_max(Gram) < tau + e`` (``e = eps tau`` for the
    rounding of the factorisation: Note [iterative error bounds]); ``False``: some eigenvalue
    lies above ``tau`` (Lanczos missed it); ``None``: the factorisation does not fit in
    ``max_bytes`` (the Lanczos settling rule is then all there is)."""
    if not upper > 0:  # a zero operator to rounding: nothing a factorisation can add
        return None
    plan = _plan_factor(wgs[0], geom1)
    if plan.need_once > max_bytes:
        return None
    axes = geom1.axes[::-1] if plan.swap else geom1.axes
    tau = upper * upper
    for gi in range(wgs.shape[0]):
        wt = wgs[gi].transpose(-1, -2) if plan.swap else wgs[gi]
        chol = _factor(wt, axes, tall, plan, tau, on_block=work.update, keep=False, negate=True)
        counts["factorizations"] += 1
        if not chol.ok:
            return False
    return True


def _temple(rho: float, r: float, e: float, beta: float, drho: float) -> float:
    """Temple's lower bound on ``lambda_1`` given ``lambda_2 >= beta - e > rho + drho``.

    The true Rayleigh quotient is within ``drho`` of the computed ``rho = s^2`` and the true
    residual at most ``r + e + drho`` (the Gram product's rounding): Temple's inequality
    ``lambda_1 >= rho - r^2 / (lambda_2 - rho)`` with those worst cases.
    """
    return rho - drho - (r + e + drho) ** 2 / (beta - e - rho - drho)


def _certify_temple(wt, axes, tall, plan, found, e, lam_max, counts, work) -> float:
    """Temple's certified lower bound on ``lambda_1(Gram)``, or 0 (Note [iterative error bounds]).

    If ``Gram - beta I`` is positive definite on the complement of the Ritz vector ``v`` (a
    banded-plus-rank-one Cholesky of ``Gram - beta I + (lambda_max + beta) v v^T``; with nested
    dissection, an ``LDL^T`` of ``Gram - beta I`` with at most one negative pivot), then
    ``lambda_2 >= beta - e`` and ``lambda_1 >= rho - (r + 2e)^2 / (beta - e - rho)``: the
    residual enters squared. ``beta`` is halfway to the second Ritz value (less its residual);
    if ``lambda_1`` is repeated (or ``beta`` too high) the factorisation fails and this is 0.
    """
    rho, r, v, beta, drho = found["rho"], found["r"], found["v"], found["beta"], found["drho"]
    if beta is None or beta - e <= rho + drho:
        return 0.0
    if plan.nested:  # Sylvester: at most one eigenvalue of Gram - beta I below 0
        (z1, z2), c = _gram_parts(wt, axes, tall)
        r1, r2 = (_row_reach(ax, tall) for ax in axes)
        ldl = NestedCholesky(z1, z2, c, r1, r2, -beta, keep=False, inertia=True,
                             on_front=work.update)
        ok = ldl.ok and ldl.negatives <= 1
    else:
        ok = _BandedCholesky(wt, axes, tall, plan.rows, -beta, on_block=work.update,
                             rank_one=(lam_max + beta, v)).ok
    counts["factorizations"] += 1
    return max(0.0, _temple(rho, r, e, beta, drho)) if ok else 0.0


def _certify_weyl(wt, axes, tall, plan, found, e, lower, counts, work) -> float:
    """Weyl's certified lower bound on ``lambda_1(Gram)``: if ``Gram - tau I`` factorises,
    ``lambda_1 > tau - e``; ``tau = rho - r - e``, then ``tau / 4`` and ``tau / 64`` (an
    eigenvalue that Lanczos missed lies below); else ``lower`` (0: the Gram is PSD)."""
    tau = found["rho"] - found["r"] - e
    for t in (tau, tau / 4, tau / 64):
        if t <= e or t - e <= lower:
            break
        chol = _factor(wt, axes, tall, plan, -t, on_block=work.update, keep=False)
        counts["factorizations"] += 1
        if chol.ok:
            return t - e
        warnings.warn(
            f"the certificate found an eigenvalue of the Gram operator below {t:.6g}, under the "
            "Lanczos value: the error bound of sigma_min is widened to match",
            stacklevel=5,
        )
    return lower


def _product_rounding(wgs: torch.Tensor, geom1: ConvGeometry, tall: bool) -> float:
    """A bound on ``||fl(M v) - M v||`` for a unit ``v`` (``M^T`` if the Gram is on the output
    side), for the grouped weight ``(G, h', g', k1, k2)``.

    Each entry of ``M v`` is a sum of at most ``L`` products, computed in any order:
    ``|fl(y) - y| <= gamma_L (|M| |v|)`` entrywise (``gamma_L = L u / (1 - L u)``, ``u = eps / 2``;
    Higham, "Accuracy and Stability of Numerical Algorithms", Sec. 3.1), and
    ``|| |M| ||_2 <= sqrt(|| |M| ||_1 || |M| ||_inf)``, both read off the kernel.
    """
    return _gamma(_product_terms(wgs, geom1)) * _product_scale(wgs, geom1, tall)


def _tap_repeats(geom1: ConvGeometry) -> int:
    """Most outputs that one tap reads one input position from (1 unless circular wrap)."""
    out = 1
    for ax in geom1.axes:
        x = ax.tap_positions()
        out *= max([int(np.bincount(row[row >= 0]).max()) for row in x if (row >= 0).any()] or [1])
    return max(out, 1)


def _product_terms(wgs: torch.Tensor, geom1: ConvGeometry) -> int:
    _, hg, gg, *ks = wgs.shape
    taps = math.prod(ks)
    return max(gg * taps, hg * taps * _tap_repeats(geom1))


def _product_scale(wgs: torch.Tensor, geom1: ConvGeometry, tall: bool) -> float:
    """``sqrt(|| |M| ||_1 || |M| ||_inf)`` >= ``|| |M| ||_2`` >= ``sigma_max``, over the groups."""
    a = wgs.abs()  # (G, h', g', k1, k2)
    spatial = tuple(range(3, a.dim()))
    rows = float(a.sum((2, *spatial)).max())  # an output row reads each (input channel, tap) once
    cols = float(a.sum((1, *spatial)).max()) * _tap_repeats(geom1)
    return math.sqrt(rows * cols)


def _gamma(terms: int) -> float:
    u = _EPS / 2
    return terms * u / (1 - terms * u)


def _structurally_singular(w: torch.Tensor, geom1: ConvGeometry, tall: bool) -> bool:
    """True if ``M`` (one group, ``w`` of shape ``(h', g', k1, k2)``) has an exactly zero column
    (tall) or row (wide) on the Gram's side.

    A column of a tall ``M`` (input channel ``a`` at ``(x1, x2)``) is zero when no tap with a
    nonzero kernel slice ``K[:, a, p, q]`` reads that position, e.g. rows a stride skips; a row
    of a wide ``M`` when every tap of that output falls in the zero padding or has a zero slice.
    Then ``sigma_min = 0`` exactly (the Gram is singular), with no rounding to bound: an
    iterative estimate of it is only ``eps sigma_max^2 / sigma_2`` accurate. Positions are
    grouped by which taps reach them (a few patterns per axis), so this is ``O(k N)``.
    """
    patterns = []
    for ax in geom1.axes:
        x = ax.tap_positions()  # (k, P)
        if tall:  # reads[p, x]: tap p reads input x from some output
            reads = np.zeros((ax.kernel, ax.size), dtype=bool)
            for p in range(ax.kernel):
                reads[p, x[p][x[p] >= 0]] = True
        else:  # reads[p, y]: tap p of output y lands inside the input
            reads = x >= 0
        patterns.append(torch.as_tensor(np.unique(reads.T, axis=0), dtype=torch.float64))
    slices = (w != 0).any(dim=0 if tall else 1).to(torch.float64)  # (c, k1, k2)
    pos, taps = "ijk"[: len(patterns)], "pqr"[: len(patterns)]
    spec = ",".join(pos[i] + taps[i] for i in range(len(patterns)))
    used = torch.einsum(f"{spec},a{taps}->a{pos}", *patterns, slices)
    return bool((used == 0).any())


# --------------------------------------------------------------------------------------------
# Public API


def conv_singular_values(
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
    which: str = "all",
    method: str = "auto",
    tol: float = 1e-6,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_products: int = 20000,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> ConvSpectrum:
    """Singular values of the operator ``M`` of ``nn.Conv2d`` on a ``g x N1 x N2`` input.

    ``M`` is the ``(h P1 P2) x (g N1 N2)`` matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride,
    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)``
    with ``weight`` of shape ``(h, g // groups, k1, k2)`` (see :func:`convspec.conv_operator`).
    Its singular values are the ``min(h P1 P2, g N1 N2)`` values of the SVD; with groups ``M`` is
    block diagonal and they are the union of the blocks' (``sigma_max`` is the max of the
    blocks' maxima, ``sigma_min`` the min of their minima).

    ``which``: ``'all'`` (every singular value, descending, in ``.values``), ``'extremes'``
    (``sigma_max`` and ``sigma_min``) or ``'max'`` (``sigma_max`` only). ``method``:

    * ``'dense'``: SVD of each group's dense operator in float64; exact to float64 rounding
      (``*_error == 0.0``: a backward-stable SVD, absolute accuracy a small multiple of
      ``eps * sigma_max``); ``O(G (h' P^2)(g' N^2) min(...))`` time, ``O(h' g' P^2 N^2)`` memory
      (``h' = h/G``), refused above ``max_bytes``.
    * ``'fft'``: circular padding with ``P * stride == N`` on both axes (padding totalling
      ``dilation * (k - 1)``, stride dividing ``N``); exact to float64 rounding as ``'dense'``.
      One SVD (LAPACK ``gesdd`` through numpy) of an ``h' x (g' s1 s2)`` transfer matrix per
      group and conjugate pair of frequencies ``{w, -w}`` (a real kernel's ``T(-w)`` is
      ``conj(T(w))``, with the same singular values, which then count twice): about
      ``N1 N2 / (2 s1 s2)`` SVDs per group (514 for ``N1' = N2' = 32``),
      ``O(G N1 N2 / (s1 s2) h' g' min(h', g' s1 s2))`` time, in chunks of bounded memory; for
      ``which`` ``'extremes'``/``'max'`` streamed, for ``'all'`` refused when the values exceed
      ``max_bytes``. ``ValueError`` if not applicable. At ``g = h = 64``, ``N = 32`` (one torch
      thread) it took half the time of Sedghi et al.'s ``np.fft.fft2`` plus ``np.linalg.svd``
      over every frequency, with the same values to ``1e-12`` of ``sigma_max``
      (``benchmarks/fft.py``).
    * ``'iterative'``: any padding, ``which`` ``'extremes'`` or ``'max'``; never forms ``M``.
      ``sigma_max``: thick-restart Lanczos (full reorthogonalisation, :mod:`convspec.linalg`) on
      ``M^T M`` (or ``M M^T`` if ``M`` is wide) applied by ``F.conv2d`` /
      ``F.conv_transpose2d``: 70 to 400 products in the benchmarks; its basis holds at most
      ``max_bytes / (8 n)`` vectors (``ValueError`` with the estimate if not even a few fit).
      ``sigma_min``: shift-and-invert Lanczos on the smaller Gram operator, whose Cholesky
      factor is assembled from the kernel: block-banded (``O(N1 r^2 N2^3 c^3)`` time,
      ``O(N1 r N2^2 c^2)`` memory, ``r = dilation (k - 1)``, ``c`` the channels of the Gram's
      side) or, for 2-D layers where it is cheaper, by nested dissection (``O((r N c)^3)`` time,
      2.8x fewer flops and 1.6x less memory than the band at ``c = 160``, ``N = 32``), then
      certified by a second factorisation (for Temple's bound: ``Gram - beta I + gamma v v^T``,
      or with nested dissection an ``LDL^T`` inertia count of ``Gram - beta I``; or of
      ``Gram - tau I``): about 10 solves and 2 factorisations per group.
      If the factor does not fit in ``max_bytes`` it falls back (with a warning) to Lanczos on
      ``sigma_max^2 I - Gram``, slow (thousands of products) when the small singular values
      cluster, and not certified. Each value is ``||M v||`` of a Ritz vector ``v`` (a Rayleigh
      quotient: below ``sigma_max``, above ``sigma_min``, up to rounding) with an absolute error
      bound (``sigma_max_error``, ``sigma_min_error``; :class:`ConvSpectrum`) from residuals
      recomputed with fresh products. ``.converged`` (and ``.exact``) is ``True`` only if both
      bounds are within relative ``tol`` (or ``sigma_min`` is 0 to float64 rounding); else a
      warning. When ``sigma_min`` is repeated, the relative ``tol`` on it is reachable only while
      ``sigma_min / sigma_max >= sqrt(eps / tol)`` (about 1.5e-5 for ``tol = 1e-6``: the Gram
      squares the condition number); otherwise ``sigma_min_error`` states the absolute accuracy,
      about ``eps sigma_max^2 / sigma_min`` (``'dense'`` is more accurate for small operators).
    * ``'auto'``: ``'fft'`` when applicable, else ``'dense'`` when each group's operator has
      at most ``AUTO_DENSE_MAX_N`` (1024) rows and columns, else ``'iterative'``.

    All routes compute in float64 on the CPU, whatever the weight's dtype and device, on the
    weight scaled by a power of two (exact; any finite kernel works, e.g. entries of 1e80 or
    1e-80). ``seed`` fixes Lanczos' random start vectors, so results are deterministic;
    ``max_products`` caps the products of ``'iterative'``. ``progress``: ``None`` shows a
    progress bar only when stderr is a terminal and the call has run for 2 s (and warns when a
    route without a visible bar is estimated to need more than 10 minutes); ``True`` always,
    ``False`` never.

    Returns a :class:`ConvSpectrum`. Raises ``ValueError`` for bad shapes, geometry, NaN/Inf or
    non-floating weights, ``which``, ``method``, ``tol``, a method that does not apply, or a
    route whose memory would exceed ``max_bytes`` (the message gives the estimate).

    >>> w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> fft = conv_singular_values(w, 8, padding=1, padding_mode='circular', method='fft')
    >>> dense = conv_singular_values(w, 8, padding=1, padding_mode='circular', method='dense')
    >>> fft.values.shape, bool(torch.allclose(fft.values, dense.values))
    (torch.Size([192]), True)
    >>> it = conv_singular_values(w, 8, which='extremes', method='iterative')
    >>> zd = conv_singular_values(w, 8, method='dense')
    >>> abs(it.sigma_min / zd.sigma_min - 1) < 1e-6, it.converged
    (True, True)
    >>> it.sigma_min_error <= 1e-6 * it.sigma_min
    True

    References: H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers",
    ICLR 2019 (FFT route, Theorem 6); C. Lanczos (1950) and B. N. Parlett, "The Symmetric
    Eigenvalue Problem" (1998), Ch. 10 and 13 (residual bounds, Lanczos, shift-and-invert);
    K. Wu, H. Simon, SIAM J. Matrix Anal. Appl. 22 (2000) (thick restart); P.-C. Guo,
    arXiv:1907.11235 (the operator ``M``).
    """
    _check_which_method(which, method, tol)
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < 10:
        raise ValueError(f"max_products must be an int >= 10, got {max_products!r}")
    _check_max_bytes(max_bytes)
    auto_progress(progress)
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    check_weight(weight)
    w, scale = _scale_weight(weight.detach().to(torch.float64).cpu())
    w, geom = _canonical(w, geom)
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
        res = _iterative(wg, _without_idle_wrap(geom), which, tol, max_bytes, max_products, gen,
                         progress)
        return _rescale(res, scale)
    if method == "fft":
        values, smax, smin = _fft_spectrum(wg, geom1, which, max_bytes, progress)
    else:
        values = _dense_values(wg, geom1, max_bytes)
        smax, smin = float(values[0]), float(values[-1])
    res = ConvSpectrum(
        sigma_max=smax,
        sigma_min=None if which == "max" else smin,
        values=values if which == "all" else None,
        method=method, exact=True, converged=True, tol=None,
        sigma_max_error=0.0, sigma_min_error=None if which == "max" else 0.0,
    )
    return _rescale(res, scale)


def estimated_flops(conv, input_size: IntTuple, which: str = "extremes") -> float:
    """A rough flop count of ``conv_singular_values(conv, input_size, which=which)`` (``method
    'auto'``): what a progress bar over many layers weighs each layer by. Dense: an SVD of each
    group's operator; FFT: a small SVD per frequency; iterative: three factorisations of each
    group's Gram (``_plan_factor``) and about 300 operator products (the typical count)."""
    weight, geom = resolve(conv, input_size)
    w, geom = _canonical(weight.detach().to(torch.float64).cpu(), geom)
    wg, geom1 = _group_weights(w, geom)
    groups = wg.shape[0]
    n_in, n_out = geom1.n_in, geom1.n_out
    if _fft_applicable(geom) is None:
        freqs = math.prod(geom1.input_size)
        return float(groups * freqs * 10 * geom1.in_channels * geom1.out_channels
                     * min(geom1.in_channels, geom1.out_channels))
    if max(n_in, n_out) <= AUTO_DENSE_MAX_N or which == "all":
        return float(groups * 10 * max(n_in, n_out) * min(n_in, n_out) ** 2)
    product = 2.0 * groups * n_out * geom1.in_channels * math.prod(geom1.kernel_size)
    flops = 300 * product
    if which == "extremes":
        geom2 = _without_idle_wrap(geom)
        flops += 3 * groups * _plan_factor(wg[0], _group_weights(w, geom2)[1]).flops
    return flops


def _check_max_bytes(max_bytes) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")


def conv_spectral_norm_bound(
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
    n_iter: int = 6,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Optional[bool] = None,
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
    matrices]), each bounded by ``n_iter`` steps of Gram iteration
    (:func:`convspec.linalg.gram_iteration_bound`): ``||T||_2 <= ||G_t||_F^(1 / 2^t)``,
    ``G_0 = T``, ``G_{i+1} = G_i^H G_i`` (rescaled), which overestimates ``||T||_2`` by at most
    ``rank^(1 / 2^(t+1))`` (1.044 for rank 256 and ``t = 6``). Cost
    ``O(G N'1 N'2 n_iter c^3)`` for ``c = min(h', g' s1 s2)``, over one frequency of each
    conjugate pair (Note [conjugate pairs]) in chunks of at most ``min(128 MiB,
    max_bytes / 8)``: memory does not grow with ``N``, and time
    grows as ``N'1 N'2`` (a progress bar as in :func:`conv_singular_values` with ``progress``,
    and a warning when the estimate exceeds 10 minutes without one). No ``O(N^2)``-sized matrix,
    and no convergence test: at ``g = h = 256``, ``N = 32`` it took 11.6 s on 2 CPU cores, within
    0.1% of ``sigma_max`` (the iterative ``sigma_max`` took 9.1 s there;
    ``benchmarks/spectrum.py``). A relative margin of ``1e-12`` covers float64 rounding; the
    weight is scaled by a power of two (exact), so any finite kernel works.

    >>> w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> bound = conv_spectral_norm_bound(w, 10)
    >>> exact = conv_singular_values(w, 10, which='max', method='dense').sigma_max
    >>> exact <= bound < 1.2 * exact
    True

    References: B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023; H. Sedghi,
    V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019.
    """
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 0 <= n_iter <= 30:
        raise ValueError(f"n_iter must be an int in [0, 30], got {n_iter!r}")
    _check_max_bytes(max_bytes)
    auto_progress(progress)
    check_weight(weight)
    w, scale = _scale_weight(weight.detach().to(torch.float64).cpu())
    w, geom = _canonical(w, geom)
    wg, geom1 = _group_weights(w, geom)
    axes, factor = _bound_axes(geom)
    chunk = _chunk_bytes(max_bytes)
    total = _n_chunks(wg, axes, True, chunk)
    best = 0.0
    with _work(total, "spectral norm bound", progress, "conv_spectral_norm_bound") as work:
        for i, (t, _) in enumerate(_transfer_chunks(wg, axes, True, chunk)):
            best = max(best, float(gram_iteration_bound(t, n_iter).max()))
            work.update(1)
            work.estimate(i + 1, total)
    return _ldexp(best * factor * (1 + 1e-12), scale)


def _bound_axes(geom: ConvGeometry) -> Tuple[Tuple[AxisGeometry, ...], float]:
    """``(axes, factor)``: the circular geometry whose transfer matrices bound ``||M||_2``, and
    the factor for the padding's copies or the stride's repeated rows (Note [bound])."""
    factor = 1.0
    if _fft_applicable(geom) is None:
        axes = geom.axes
    elif geom.padding_mode != "circular":
        # M = C_valid P: P pads (zeros, or copies for reflect / replicate: ||P||^2 is the most
        # copies of one input position, per axis), C_valid reads only padded positions and is
        # a row selection of the circular convolution on the padded size (Note [bound]).
        axes = []
        for ax in geom.axes:
            src = ax.sources()
            copies = np.bincount(src[src >= 0]).max() if (src >= 0).any() else 1
            factor *= float(copies)
            size = max(ax.size + ax.pad_lo + ax.pad_hi, 1)
            size = -(-size // ax.stride) * ax.stride
            axes.append(AxisGeometry(size, ax.kernel, ax.stride, ax.dilation, 0, 0, "circular"))
        factor = math.sqrt(factor)
    else:
        axes = []
        for ax in geom.axes:
            rows = np.bincount((ax.stride * np.arange(ax.out_size)) % ax.size)
            factor *= float(rows.max())
            axes.append(replace(ax, stride=1))
        factor = math.sqrt(factor)
    return tuple(axes), factor


def abs_operator_bound(weight: torch.Tensor, geom: Optional[ConvGeometry]) -> float:
    """An upper bound on ``|| |M| ||_2`` (``M``'s entries in absolute value), from the kernel:
    ``sqrt(max row sum * max column sum)`` (``geom=None``: ``weight`` is a matrix)."""
    a = weight.detach().abs().to(torch.float64)
    if geom is None:
        return math.sqrt(float(a.sum(1).max()) * float(a.sum(0).max()))
    w, geom = _canonical(a, geom)
    wg, geom1 = _group_weights(w, geom)
    return _product_scale(wg.cpu(), geom1, _tall(geom1))


def certified_norm_tensor(weight: torch.Tensor, geom: Optional[ConvGeometry],
                          n_iter: int = 6) -> torch.Tensor:
    """The bound of :func:`conv_spectral_norm_bound` as a differentiable tensor (float64, on
    ``weight``'s device), for ``operator_spectral_norm(bound='certified')``; ``geom=None``: the
    weight is a matrix (``nn.Linear``) and this bounds its spectral norm. Certified: at least
    ``||M||_2``, with a relative margin of ``1e-12`` for float64 rounding."""
    if geom is None:
        return gram_iteration_bound(weight.to(torch.float64), n_iter) * (1 + 1e-12)
    w, geom = _canonical(weight, geom)
    wg, _ = _group_weights(w, geom)
    axes, factor = _bound_axes(geom)
    best = None
    for t, _ in _transfer_chunks(wg, axes, True):
        top = gram_iteration_bound(t, n_iter).max()
        best = top if best is None else torch.maximum(best, top)
    return best * (factor * (1 + 1e-12))


def extreme_singular_values(
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
    method: str = "auto",
    tol: float = 1e-6,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Optional[bool] = None,
) -> Tuple[float, float]:
    """``(sigma_max, sigma_min)`` of the convolution operator ``M``.

    ``M`` is the ``(h P1 P2) x (g N1 N2)`` matrix of ``nn.Conv2d(g, h, (k1, k2), stride=stride,
    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, bias=False)`` on a
    ``g x N1 x N2`` input (see :func:`conv_operator`). ``sigma_min`` is the smallest of the
    ``min(h P1 P2, g N1 N2)`` singular values of ``M``: it is 0 only if ``M`` is rank deficient
    beyond its shape (a wide ``M`` with ``g > h`` has ``h P1 P2`` singular values, not 0s for the
    missing ones).

    A thin call to :func:`conv_singular_values` with ``which='extremes'``: exact up to float64
    rounding for the dense and FFT routes; for ``'iterative'`` within relative ``tol`` when it
    warns of nothing (``sigma_min`` reaches ``tol`` only while ``sigma_min / sigma_max >=
    sqrt(eps / tol)``). Call :func:`conv_singular_values` for the error bounds and
    ``converged`` flag (``'auto'`` picks the cheapest exact route; see there for costs).

    >>> w = torch.zeros(3, 3, 3, 3); w[:, :, 1, 1] = 2 * torch.eye(3)
    >>> extreme_singular_values(w, 8)          # 2 * identity
    (2.0, 2.0)

    References: P.-C. Guo, arXiv:1907.11235, Section 4 (sigma_max and sigma_min of M);
    H. Sedghi, V. Gupta, P. M. Long, ICLR 2019.
    """
    res = conv_singular_values(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
        which="extremes", method=method, tol=tol, max_bytes=max_bytes,
        progress=progress,
    )
    return res.sigma_max, res.sigma_min


#: Kept for callers of the former private name; the helper lives in :mod:`convspec.linalg`.
_gram_iteration_bound = gram_iteration_bound


def _gram_extremes(m: torch.Tensor) -> Tuple[float, float]:
    """``(sigma_max, sigma_min)`` of a dense ``m`` from the eigenvalues of its smaller Gram matrix.

    About twice as fast as ``svdvals`` for the sizes of Algorithm 3.1's records, and as accurate
    except for ``sigma_min`` below about ``1e-8 * sigma_max`` (the Gram squares the condition
    number), where it returns a value near 0 instead.
    """
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    e = torch.linalg.eigvalsh(gram)
    return float(e[-1].clamp(min=0).sqrt()), float(e[0].clamp(min=0).sqrt())
