"""Extreme eigenpairs of symmetric operators given as callbacks, with verified residuals.

Nothing here knows about convolutions: an operator is a function ``apply(v)`` on flat float64
vectors of length ``n`` (and, for the smallest eigenvalues, a function ``solve(v)`` applying
``(A - shift I)^{-1}``). The callers in :mod:`convspec.spectrum` wrap the convolution.

* :func:`lanczos_largest`: the ``k`` largest eigenpairs of a symmetric operator.
* :func:`lanczos_smallest`: the ``k`` smallest, by Lanczos on the shift-and-invert operator.
* :func:`lanczos_capacity`: how many basis vectors fit in a memory budget (``ValueError`` with
  the estimate if not even the minimum does).
* :func:`gram_iteration_bound`: a certified upper bound on the spectral norms of a batch of
  matrices (Gram iteration).

Note [thick-restart Lanczos]: Lanczos with full reorthogonalisation (classical Gram-Schmidt,
repeated while a pass removes more than ``1 - 1/sqrt(2)`` of the vector: Daniel, Gragg, Kaufman
and Stewart 1976) builds an orthonormal basis ``V`` and the projected matrix ``H = V^T A V``
explicitly from the reorthogonalisation coefficients, so ``H`` stays exact when the basis is
restarted. When the basis is full, it keeps the ``keep`` wanted Ritz vectors ``Y`` and the
last residual direction ``f``; ``A Y = Y Theta + f b^T`` makes ``H`` an arrowhead, and the next
columns are again computed by projection (Wu and Simon 2000). The basis never exceeds the
capacity the caller's memory budget allows.

A Ritz pair ``(theta, V s)`` has residual ``||A V s - theta V s|| = beta |s_last|`` in exact
arithmetic. That estimate only decides when to *try* to stop: every returned pair is checked with
a fresh application of the operator (``verify``), and only that check sets ``converged``.
A small residual proves an eigenvalue near ``theta``, not that it is the largest: with a cluster
at the top (eigenvalues within the residual of each other, common for convolutions), a Ritz
value can pass while still rising toward the cluster's top. Note [settling]: callers who want the
extreme eigenvalue ask for ``settle`` steps over which the Ritz value must not have moved more
than the tolerance; the top Ritz value only rises with more steps (interlacing), so a value that
stopped rising has stopped short of nothing the Krylov space can see.

Note [breakdown]: a ``beta`` at rounding level (below ``1e-13 ||A v||`` after
reorthogonalisation) means the basis spans an invariant subspace: the next direction is numerical
noise, and normalising it used to produce a basis that was no longer orthogonal and Ritz values
below every eigenvalue they claimed. (A larger threshold is wrong too: with shift-and-invert the
operator's scale spans many orders of magnitude, and ``beta = 1e-11 ||A v||`` there is the
direction that refines a near-null vector.) Instead, the next vector is a random one orthogonalised
against the basis (the neglected ``beta`` is added to every residual estimate), and the Krylov
sequence started by it must itself converge its top Ritz value before the solver stops: an
independent second start, so that the answer never rests on one start vector that happened to
lie in an invariant subspace. When the basis spans the whole space, the Ritz values are the
eigenvalues (still verified).

References: C. Lanczos (1950); B. N. Parlett, "The Symmetric Eigenvalue Problem" (1998),
Ch. 13; K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
problems", SIAM J. Matrix Anal. Appl. 22 (2000); J. W. Daniel, W. B. Gragg, L. Kaufman,
G. W. Stewart, Math. Comp. 30 (1976) (reorthogonalisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]
#: ``verify(Y)`` gets the candidate Ritz vectors ``(k, n)`` (unit norm) and returns
#: ``(values, residuals, ok)``: per vector its value and residual norm from fresh operator
#: applications, and whether all of them meet the caller's accuracy.
Verifier = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, bool]]

#: Work vectors of length ``n`` that the solver holds besides its basis (the new direction,
#: its product, a restart chunk and the ``k`` Ritz vectors are counted on top).
WORK_VECTORS = 4
#: A ``beta`` below this fraction of ``||A v||`` is a breakdown (Note [breakdown]): rounding noise
#: of the reorthogonalisation (about ``sqrt(m) eps``), not a direction of the operator.
BREAKDOWN = 1e-13
_EPS = torch.finfo(torch.float64).eps


@dataclass
class Eigenpairs:
    """Result of :func:`lanczos_largest` / :func:`lanczos_smallest`.

    ``values`` (k,) and ``residuals`` (k,) come from the last verification (fresh applications
    of the operator, see ``verify``), ``vectors`` (k, n) are the unit Ritz vectors; ``values``
    are ordered from the extreme inwards. ``converged`` is ``True`` only if the verification
    accepted every pair. ``steps`` counts applications of the Lanczos operator (``apply``, or
    ``solve`` for shift-and-invert), ``restarts`` thick restarts, ``breakdowns`` invariant
    subspaces met.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    steps: int
    restarts: int = 0
    breakdowns: int = 0


def lanczos_capacity(n: int, max_bytes: int, k: int = 1, reserved_bytes: int = 0) -> int:
    """Basis vectors (length ``n``, float64) that fit in ``max_bytes`` besides ``reserved_bytes``.

    The solver also holds ``WORK_VECTORS + k`` vectors of length ``n``. At least ``k + 2`` basis
    vectors are needed (the Ritz vectors kept at a restart, the residual direction and one new
    vector); ``ValueError`` with the estimate if they do not fit. Never more than ``n``.

    >>> lanczos_capacity(1000, 10**6)
    120
    """
    per = 8 * n
    need_min = min(n, k + 2)
    cap = (max_bytes - reserved_bytes) // per - WORK_VECTORS - k
    if cap < need_min:
        least = reserved_bytes + per * (need_min + WORK_VECTORS + k)
        raise ValueError(
            f"the Lanczos basis needs at least {need_min + WORK_VECTORS + k} vectors of {n} "
            f"float64 ({least / 2**20:.1f} MiB"
            + (f", of which {reserved_bytes / 2**20:.1f} MiB for the operator" if reserved_bytes
               else "")
            + f"), above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); pass a larger "
            "max_bytes"
        )
    return int(min(cap, n))


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``w`` minus its projection on the rows of ``basis`` (orthonormal); the coefficients.

    Classical Gram-Schmidt, repeated while a pass shrinks ``w`` below ``1/sqrt(2)`` of its norm
    (at most 4 passes): the result is orthogonal to working precision relative to its own norm.
    """
    coef = torch.zeros(basis.shape[0], dtype=w.dtype)
    norm = float(w.norm())
    for _ in range(4):
        c = basis @ w
        w = w - basis.T @ c
        coef += c
        new = float(w.norm())
        if new > norm / math.sqrt(2) or new == 0:
            break
        norm = new
    return w, coef


def _random_orthogonal(n: int, basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector orthogonal to the rows of ``basis`` (which must not span R^n)."""
    while True:
        v = torch.randn(n, dtype=torch.float64, generator=generator)
        v, _ = _orthogonalise(v, basis)
        nv = float(v.norm())
        if nv > 1e-8:
            return v / nv


def _residual_verifier(apply: Operator, tol: float, atol: float, counter: List[int],
                       k: int) -> Verifier:
    """The default check: ``rho = y^T A y``, ``||A y - rho y|| <= max(tol |rho|, atol)`` for the
    first ``k`` vectors (the others are the ``extra`` ones)."""

    def verify(y: torch.Tensor):
        values, residuals = [], []
        for v in y:
            av = apply(v)
            counter[0] += 1
            rho = float(torch.dot(v, av))
            values.append(rho)
            residuals.append(float((av - rho * v).norm()))
        values_t = torch.tensor(values, dtype=torch.float64)
        residuals_t = torch.tensor(residuals, dtype=torch.float64)
        ok = bool((residuals_t <= torch.clamp(tol * values_t.abs(), min=atol))[:k].all())
        return values_t, residuals_t, ok

    return verify


def _thick_restart(
    op: Operator,
    n: int,
    k: int,
    tol: float,
    verify: Verifier,
    capacity: int,
    max_steps: int,
    generator: torch.Generator,
    v0: Optional[torch.Tensor],
    on_step: Optional[Callable[[int], None]],
    extra: int = 0,
    settle: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int, int, int]:
    """Largest ``k`` eigenpairs of ``op`` (Note [thick-restart Lanczos], Note [breakdown]),
    plus ``extra`` further Ritz pairs that are returned but need not converge."""
    k = min(k, n)
    extra = max(0, min(extra, n - k))
    cap = max(min(capacity, n), min(n, k + extra + 2))
    keep_max = max(k + extra, min(cap - 2, max(k + extra + 1, cap // 2)))
    basis = torch.empty(cap, n, dtype=torch.float64)
    h = torch.zeros(cap, cap, dtype=torch.float64)
    if v0 is None:
        v0 = torch.randn(n, dtype=torch.float64, generator=generator)
    v0 = v0.reshape(-1).to(torch.float64)
    if float(v0.norm()) == 0:
        v0 = torch.randn(n, dtype=torch.float64, generator=generator)
    basis[0] = v0 / v0.norm()
    size, done = 1, 0  # vectors in the basis; of them, columns of h computed (size == done + 1)
    steps = restarts = breakdowns = 0
    scale = 0.0  # largest ||A v|| seen: the operator's scale
    dropped = 0.0  # sum of the betas neglected at breakdowns (Note [breakdown])
    active: Optional[int] = None  # start of the Krylov sequence begun after a breakdown
    est_tol = tol
    best_residual = math.inf
    stalls = 0
    history: List[Tuple[int, List[float]]] = []  # (steps, wanted Ritz values) at recent checks

    while True:
        w = op(basis[done]).reshape(-1)
        steps += 1
        if on_step is not None:
            on_step(1)
        wnorm = float(w.norm())
        scale = max(scale, wnorm)
        w, coef = _orthogonalise(w, basis[:size])
        h[:size, done] = coef
        h[done, :size] = coef
        done += 1
        beta = float(w.norm())
        broke = beta <= BREAKDOWN * wnorm
        exhausted = size == n
        full = size == cap
        # At a first breakdown the basis is invariant and its Ritz values are exact, but a start
        # vector inside an invariant subspace never sees the rest: no stopping until a second,
        # random start has found its top too (Note [breakdown]). At a later breakdown the
        # second sequence has become invariant itself: its top is exact, so it is confirmed.
        confirm_first = broke and not exhausted and active is None
        if broke and active is not None:
            active = None
        if confirm_first:
            pass
        elif done <= 20 or done % 5 == 0 or broke or exhausted or full or steps >= max_steps:
            t = h[:done, :done]
            theta, s = torch.linalg.eigh((t + t.T) / 2)
            theta, s = theta.flip(0), s.flip(1)  # descending
            est = beta * s[-1].abs() + dropped
            floor_k = est_tol * theta[:k].abs().clamp(min=_EPS * scale)
            want = est[:k] <= floor_k
            ready = bool(want.all()) or exhausted
            if settle:  # (plain floats: small tensors kept in a list pin far more memory)
                history.append((steps, theta[:k].tolist()))
                history = history[-(settle + 2):]
            if ready and settle and not exhausted:
                # Note [settling]: a Ritz value still moving is not converged, whatever its
                # residual says (a cluster at the top: the residual bounds the distance to *an*
                # eigenvalue of the cluster, not to the largest).
                old = [t for st, t in history if st <= steps - settle and len(t) == k]
                if old:
                    moved = (theta[:k] - torch.tensor(old[-1], dtype=theta.dtype)).abs()
                    ready = bool((moved <= floor_k).all())
                else:
                    ready = False
            if ready and active is not None and active < done:
                # The sequence begun after a breakdown must also have found its top.
                ta = t[active:, active:]
                _, sa = torch.linalg.eigh((ta + ta.T) / 2)
                esta = beta * float(sa[-1, -1].abs()) + dropped
                if esta <= est_tol * max(abs(float(theta[0])), _EPS * scale) or exhausted:
                    active = None
                else:
                    ready = False
            if ready or steps >= max_steps:
                y = s[:, : min(k + extra, done)].T @ basis[:done]  # (k + extra, n)
                y = y / y.norm(dim=1, keepdim=True)
                values, residuals, ok = verify(y)
                if ok or steps >= max_steps or exhausted:
                    return values, y, residuals, ok, steps, restarts, breakdowns
                # The estimate was optimistic (rounding, lost orthogonality): ask for more.
                worst = float(residuals.max())
                stalls = stalls + 1 if worst > 0.5 * best_residual else 0
                best_residual = min(best_residual, worst)
                if stalls >= 3:  # residuals no longer fall: at the rounding floor
                    return values, y, residuals, ok, steps, restarts, breakdowns
                est_tol /= 10
        if broke:
            breakdowns += 1
            dropped += beta
            w = _random_orthogonal(n, basis[:size], generator)
            beta = 1.0
            if confirm_first:
                active = size if not full else None  # after a restart: set below
        if full:
            # Thick restart: keep the largest Ritz vectors and the residual direction.
            t = h[:done, :done]
            theta, s = torch.linalg.eigh((t + t.T) / 2)
            theta, s = theta.flip(0), s.flip(1)
            keep = min(keep_max, done - 1) if done > 1 else 1
            sk = s[:, :keep]
            if active is not None or confirm_first:
                # Ritz vectors decoupled from the residual (|b| tiny) came from invariant
                # subspaces; put them first and let the new sequence start after them.
                b = (0.0 if broke else beta) * s[-1, :keep].abs()
                closed = b <= BREAKDOWN * scale
                order = torch.cat([torch.nonzero(closed).flatten(),
                                   torch.nonzero(~closed).flatten()])
                sk, theta_k = sk[:, order], theta[:keep][order]
                active = int(closed.sum())
                if active == 0 and not confirm_first:
                    active = None
            else:
                theta_k = theta[:keep]
            _restart_basis(basis, sk, done)
            h.zero_()
            h[:keep, :keep] = torch.diag(theta_k)
            size = done = keep
            restarts += 1
            if size >= n:  # pragma: no cover - keep < cap <= n
                size = n
        basis[size] = w / beta
        size += 1


def _restart_basis(basis: torch.Tensor, s: torch.Tensor, done: int, chunk: int = 1 << 16) -> None:
    """``basis[:keep] = s^T basis[:done]`` in place, by column chunks (no second basis)."""
    keep = s.shape[1]
    st = s.T.contiguous()
    for c0 in range(0, basis.shape[1], chunk):
        c1 = min(basis.shape[1], c0 + chunk)
        basis[:keep, c0:c1] = st @ basis[:done, c0:c1]


def lanczos_largest(
    apply: Operator,
    n: int,
    *,
    k: int = 1,
    tol: float = 1e-8,
    atol: float = 0.0,
    max_steps: int = 1000,
    max_bytes: int = 2 * 1024**3,
    reserved_bytes: int = 0,
    generator: Optional[torch.Generator] = None,
    v0: Optional[torch.Tensor] = None,
    verify: Optional[Verifier] = None,
    on_step: Optional[Callable[[int], None]] = None,
    max_basis: Optional[int] = None,
    extra: int = 0,
    settle: int = 0,
) -> Eigenpairs:
    """The ``k`` largest eigenpairs of a symmetric operator ``apply`` on ``R^n`` (float64).

    Like every Krylov method it finds one copy of a multiple eigenvalue (a second copy only by
    rounding or a restart): with ``k > 1`` the values are the ``k`` largest *distinct* ones.

    Thick-restart Lanczos with full reorthogonalisation (Note [thick-restart Lanczos]); the
    basis holds at most :func:`lanczos_capacity` ``(n, max_bytes, k, reserved_bytes)`` vectors.
    It stops when every wanted Ritz pair passes ``verify`` (default: ``rho = y^T A y`` and
    ``||A y - rho y|| <= max(tol |rho|, atol)``, computed with a fresh ``apply``), or after
    ``max_steps`` applications, or when the residuals stop falling (rounding floor); then
    ``converged`` is ``False``. ``verify`` may be any check of the caller's (e.g. on another
    operator with the same eigenvectors); it is called only when Lanczos' own estimate says
    the pairs converged, so it costs little. ``extra`` further Ritz pairs (the next largest)
    are returned and verified too but need not converge (e.g. a gap estimate for Temple's
    bound); ``verify`` decides what to require of them. With ``settle``, the wanted Ritz values
    must also have moved by less than ``tol`` (relative) over the last ``settle`` applications
    before the verification (Note [settling]).

    >>> a = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = lanczos_largest(lambda v: a @ v, 100, k=2, generator=torch.Generator().manual_seed(0))
    >>> [round(float(x), 9) for x in r.values], r.converged
    ([100.0, 99.0], True)
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    capacity = min(lanczos_capacity(n, max_bytes, k + extra, reserved_bytes), max_steps + 1,
                   max_basis if max_basis is not None else n)
    counter = [0]
    check = verify if verify is not None else _residual_verifier(apply, tol, atol, counter, k)
    values, vectors, residuals, ok, steps, restarts, breakdowns = _thick_restart(
        apply, n, k, tol, check, capacity, max_steps, generator, v0, on_step, extra, settle,
    )
    return Eigenpairs(values, vectors, residuals, ok, steps, restarts, breakdowns)


def lanczos_smallest(
    apply: Operator,
    solve: Operator,
    n: int,
    *,
    shift: float = 0.0,
    k: int = 1,
    tol: float = 1e-8,
    atol: float = 0.0,
    max_steps: int = 1000,
    max_bytes: int = 2 * 1024**3,
    reserved_bytes: int = 0,
    generator: Optional[torch.Generator] = None,
    v0: Optional[torch.Tensor] = None,
    verify: Optional[Verifier] = None,
    on_step: Optional[Callable[[int], None]] = None,
    max_basis: Optional[int] = None,
    extra: int = 0,
    settle: int = 0,
) -> Eigenpairs:
    """The ``k`` smallest eigenpairs of ``apply`` by shift-and-invert Lanczos.

    ``solve(v)`` must apply ``(A - shift I)^{-1}`` with ``shift`` below the smallest eigenvalue
    (e.g. by a Cholesky factor of ``A - shift I``); Lanczos runs on it (its largest eigenvalues
    ``1 / (lambda - shift)`` are the wanted ones, well separated even when the smallest
    ``lambda`` cluster) and every returned pair is verified on ``apply`` itself, as in
    :func:`lanczos_largest` (``steps`` counts solves; ``verify`` applies ``apply`` once per
    pair). Pairs smallest first (the largest ``1 / (lambda - shift)`` first).

    >>> a = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = lanczos_smallest(lambda v: a @ v, lambda v: v / torch.diagonal(a), 100)
    >>> round(float(r.values[0]), 9), r.converged
    (1.0, True)
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    capacity = min(lanczos_capacity(n, max_bytes, k + extra, reserved_bytes), max_steps + 1,
                   max_basis if max_basis is not None else n)
    counter = [0]
    check = verify if verify is not None else _residual_verifier(apply, tol, atol, counter, k)
    values, vectors, residuals, ok, steps, restarts, breakdowns = _thick_restart(
        solve, n, k, tol, check, capacity, max_steps, generator, v0, on_step, extra, settle,
    )
    return Eigenpairs(values, vectors, residuals, ok, steps, restarts, breakdowns)


def gram_iteration_bound(t: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Per-matrix upper bound on the spectral norm of a batch ``t`` ``(..., a, b)``.

    Gram iteration: ``||T||_2 <= ||G_t||_F^(1 / 2^t)`` with ``G_0 = T``, ``G_{i+1} = G_i^H G_i``,
    each rescaled by its Frobenius norm (accumulated in logs, so no overflow); it overestimates
    ``||T||_2`` by at most ``rank^(1 / 2^(t+1))``. Exact for a zero matrix (0).

    >>> m = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> 3.0 <= float(gram_iteration_bound(m, 6)) < 3.0001
    True

    References: B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023.
    """
    log_bound = torch.zeros(t.shape[:-2], dtype=torch.float64, device=t.device)
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


__all__ = [
    "Eigenpairs", "lanczos_capacity", "lanczos_largest", "lanczos_smallest",
    "gram_iteration_bound",
]
