"""Nested-dissection (multifrontal) factorisation of the Gram operator of a 2-D convolution.

The Gram ``M^T M`` (or ``M M^T``) of a zero-padded 2-D convolution is a block matrix on the pixel
grid with dense ``c x c`` blocks that couple pixels at most ``r1`` rows and ``r2`` columns apart
(``r = d (k - 1)`` on the input side: a 5 x 5-pixel stencil for a 3 x 3 kernel). The block-banded
factorisation of ``spectrum.py`` (Note [banded Gram]) costs ``O(R1 (R2 c)^3 r1^2)``; for a
WRN-28-10 layer (``c = 160``, 32 x 32) that is about 2e13 flops and 14 GB.

Note [nested dissection]: split the pixel rectangle by a band of ``r1`` rows (or ``r2``
columns, whichever is the smaller separator) into two halves that do not couple, recursively,
down to small leaves; eliminate the leaves first and each separator after both of its halves
(George, "Nested dissection of a regular finite element mesh", SIAM J. Numer. Anal. 10, 1973).
Each node of this tree has a *front*: its separator ``S`` and the pixels ``U`` outside its
rectangle within reach of it, all of which lie on separators of its ancestors. The front matrix
holds the Gram entries of ``S`` with ``S`` and ``U`` plus the update matrices its two children
passed up (the multifrontal method; Duff & Reid, ACM TOMS 9, 1983); eliminating ``S`` is one
dense Cholesky of ``S x S``, one triangular solve for the ``U x S`` block and one GEMM for the
update ``U x U`` passed to the parent (lower triangle only). The top separator has ``r N c``
unknowns (10240 for every stage of WRN-28-10), but the fronts below it carry rings of about
``2 (r + 1) N / 2`` pixels, and their Schur updates dominate: at ``c = 160``, ``N = 32`` the
factorisation costs 1.3e13 flops and 15 GB with the factor kept, against 3.6e13 and 23 GB for
the band (``nested_cost``; measured 1.7-2.3x faster than the band at ``c = 16..32``,
``benchmarks/model_scale.py``). Only the two-axis case is handled here: one axis is already a
band (the banded route is optimal), and three axes merge into a dense second axis.

Every entry is the float64 Gram entry (no approximation): a successful Cholesky is the same
proof of positive definiteness (to rounding) as the banded one, and ``solve`` is the exact
inverse to rounding. ``inertia=True`` factorises with Bunch-Kaufman ``LDL^T`` instead and counts
the negative eigenvalues (Sylvester's law of inertia; the inertia of a matrix is that of a
pivot block plus that of its Schur complement, Haynsworth), for indefinite shifts.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

#: A rectangle with at most this many pixels is a leaf (eliminated in one front).
LEAF_PIXELS = 4

#: Flops that the Python and indexing work of one front costs in time (about 1 ms at about
#: 1e10 flop/s on one core, measured against the band at c = 4..16, N = 16..32): with it the
#: plan keeps the band for small grids, where the many small fronts do not pay off.
NODE_OVERHEAD_FLOPS = 1e7

#: Rows per GEMM of the lower-triangle update (``_syrk_lower_``).
_SYRK_BLOCK = 512


def _syrk_lower_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c -= a b^T`` on and below the diagonal only, one GEMM per block of rows:
    ``u (u + block) s`` flops instead of ``2 u^2 s`` (the Schur update is symmetric)."""
    for lo in range(0, c.shape[0], _SYRK_BLOCK):
        hi = min(lo + _SYRK_BLOCK, c.shape[0])
        c[lo:hi, :hi].addmm_(a[lo:hi], b[:hi].T, alpha=-1)


class _Node:
    __slots__ = ("sep", "upd", "children")

    def __init__(self, sep: np.ndarray, upd: np.ndarray, children: List[int]):
        self.sep, self.upd, self.children = sep, upd, children


def _ring(a: int, b: int, c: int, d: int, r1: int, r2: int, R1: int, R2: int) -> np.ndarray:
    """Pixels within ``r1`` rows and ``r2`` columns of ``[a, b) x [c, d)``, outside it."""
    i = np.arange(max(0, a - r1), min(R1, b + r1))
    j = np.arange(max(0, c - r2), min(R2, d + r2))
    ii, jj = np.meshgrid(i, j, indexing="ij")
    out = ~((ii >= a) & (ii < b) & (jj >= c) & (jj < d))
    return (ii[out] * R2 + jj[out]).astype(np.int64)


def _rect(a: int, b: int, c: int, d: int, R2: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(a, b), np.arange(c, d), indexing="ij")
    return (i * R2 + j).reshape(-1).astype(np.int64)


def dissection_tree(R1: int, R2: int, r1: int, r2: int, leaf: int = LEAF_PIXELS) -> List[_Node]:
    """The nodes of Note [nested dissection] in elimination (post-) order; the last is the root.

    Pixels are numbered ``i * R2 + j``. Every pixel is in exactly one separator.
    """
    nodes: List[_Node] = []

    def split(a: int, b: int, c: int, d: int) -> int:
        h, w = b - a, d - c
        # (a reach of 0 splits with an empty separator: the halves do not couple at all)
        can_rows, can_cols = h >= r1 + 2, w >= r2 + 2
        if h * w <= leaf or not (can_rows or can_cols):
            nodes.append(_Node(_rect(a, b, c, d, R2), _ring(a, b, c, d, r1, r2, R1, R2), []))
            return len(nodes) - 1
        # the smaller separator: r1 rows of w pixels, or r2 columns of h pixels
        by_rows = can_rows and (not can_cols or r1 * w < r2 * h or (r1 * w == r2 * h and h >= w))
        if by_rows:
            m = a + (h - r1) // 2
            kids = [split(a, m, c, d), split(m + r1, b, c, d)]
            sep = _rect(m, m + r1, c, d, R2)
        else:
            m = c + (w - r2) // 2
            kids = [split(a, b, c, m), split(a, b, m + r2, d)]
            sep = _rect(a, b, m, m + r2, R2)
        nodes.append(_Node(sep, _ring(a, b, c, d, r1, r2, R1, R2), kids))
        return len(nodes) - 1

    split(0, R1, 0, R2)
    # U in elimination order: a child's U then maps into its parent's front (S, then U)
    # monotonically, so lower triangles map to lower triangles (only those are computed).
    rank = np.empty(R1 * R2, dtype=np.int64)
    rank[np.concatenate([node.sep for node in nodes])] = np.arange(R1 * R2)
    for node in nodes:
        node.upd = node.upd[np.argsort(rank[node.upd], kind="stable")]
    return nodes


def nested_cost(R1: int, R2: int, r1: int, r2: int, c: int) -> Tuple[float, int, int]:
    """``(flops, bytes, bytes_once)``: flops of the factorisation, and its peak memory with the
    factor kept for solves and without (a factorisation that only proves definiteness)."""
    flops, kept, peak, peak_once, pending = 0.0, 0, 0, 0, []
    for node in dissection_tree(R1, R2, r1, r2):
        s, u = len(node.sep) * c, len(node.upd) * c
        flops += s**3 / 3 + s * s * u + s * u * (u + _SYRK_BLOCK) + NODE_OVERHEAD_FLOPS
        for _ in node.children:
            pending.pop()
        # the front, its copy of the update, and the updates waiting for their parent
        work = 8 * ((s + u) ** 2 + u * u) + sum(pending)
        kept += 8 * (s * s + s * u)
        peak, peak_once = max(peak, kept + work), max(peak_once, work)
        pending.append(8 * u * u)
    return flops, peak, peak_once


class NestedCholesky:
    """Factor of ``Gram + shift I`` (or ``shift I - Gram`` with ``negate``), Note [nested dissection].

    ``z1, z2``: the per-axis ``(E_p E_p'^T)[i, i']`` of shape ``(k, k, R, R)``; ``c``: the
    channel matrices ``(k1, k2, c, c')`` of ``spectrum._gram_parts``. ``ok`` is ``False`` when a
    pivot block is not positive definite (Cholesky) or is singular (``inertia``); with
    ``inertia=True``, ``negatives`` is the number of negative eigenvalues. Vectors are in the
    ``(i, j, a)`` layout of Note [banded Gram].
    """

    def __init__(self, z1: torch.Tensor, z2: torch.Tensor, c: torch.Tensor, r1: int, r2: int,
                 shift: float, *, negate: bool = False, keep: bool = True,
                 inertia: bool = False, on_front: Optional[Callable[[int], None]] = None):
        k1, k2, cc, _ = c.shape
        R1, R2 = z1.shape[-1], z2.shape[-1]
        self.channels, self.pixels = cc, R1 * R2
        # CC[(p, q, p', q'), (a, b)] = (C_pq C_p'q'^T)[a, b]
        gram_cc = torch.einsum("pqab,rscb->pqrsac", c, c).reshape(k1 * k2 * k1 * k2, cc * cc)
        z1p = z1.permute(2, 3, 0, 1)  # (R1, R1, k1, k1)
        z2p = z2.permute(2, 3, 0, 1)
        nz1 = (z1p.abs().sum((2, 3)) != 0).numpy()
        nz2 = (z2p.abs().sum((2, 3)) != 0).numpy()
        nodes = dissection_tree(R1, R2, r1, r2)
        where = np.full(R1 * R2, -1, dtype=np.int64)
        offsets = [(di, dj) for di in range(-r1, r1 + 1) for dj in range(-r2, r2 + 1)]
        self.nodes = nodes
        self.factors: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = []
        self.ok, self.negatives = True, 0
        pending: List[torch.Tensor] = []
        biggest = max(len(node.sep) + len(node.upd) for node in nodes) * cc
        buffer = torch.empty(biggest * biggest, dtype=torch.float64)  # every front, in turn
        for node in nodes:
            front_px = np.concatenate([node.sep, node.upd])
            ns, nf = len(node.sep), len(front_px)
            where[front_px] = np.arange(nf)
            s = ns * cc
            f = buffer[: (nf * cc) ** 2].view(nf * cc, nf * cc).zero_()
            # The Gram entries of S with S and U (those of U with U belong to ancestors).
            xs = np.repeat(node.sep, len(offsets))
            ix, jx = xs // R2, xs % R2
            iy = ix + np.tile([o[0] for o in offsets], ns)
            jy = jx + np.tile([o[1] for o in offsets], ns)
            inside = (iy >= 0) & (iy < R1) & (jy >= 0) & (jy < R2)
            ix, jx, iy, jy = ix[inside], jx[inside], iy[inside], jy[inside]
            keep_pair = nz1[ix, iy] & nz2[jx, jy]
            ix, jx, iy, jy = ix[keep_pair], jx[keep_pair], iy[keep_pair], jy[keep_pair]
            px, py = where[ix * R2 + jx], where[iy * R2 + jy]
            # pixels of S couple to S, to U, and to pixels of this node's subtree, whose
            # entries their own (earlier) fronts held as their U: the latter are skipped.
            mine = py >= 0
            ix, jx, iy, jy, px, py = (a[mine] for a in (ix, jx, iy, jy, px, py))
            coef = torch.einsum("npr,nqs->npqrs", z1p[ix, iy], z2p[jx, jy]).reshape(
                len(ix), gram_cc.shape[0])
            blocks = (coef @ gram_cc).reshape(-1, cc, cc)  # (pairs, c, c)
            if negate:
                blocks = -blocks
            f4 = f.view(nf, cc, nf, cc)
            tpx, tpy = torch.as_tensor(px), torch.as_tensor(py)
            # Only the lower triangle is used: S x S (both orders) and U x S.
            low = torch.as_tensor(py <= px)
            f4[tpx[low], :, tpy[low], :] = blocks[low]
            up = ~low
            f4[tpy[up], :, tpx[up], :] = blocks[up].transpose(1, 2)
            f.diagonal()[:s].add_(shift)
            # Extend-add of the children's updates (their U lies in this front).
            for child in node.children[::-1]:
                upd = pending.pop()
                pos = where[nodes[child].upd]
                idx = torch.as_tensor((pos[:, None] * cc + np.arange(cc)).reshape(-1))
                for lo in range(0, len(idx), 1024):
                    rows = idx[lo:lo + 1024]
                    sub = f.index_select(0, rows)
                    sub.index_add_(1, idx, upd[lo:lo + 1024])
                    f.index_copy_(0, rows, sub)
                del upd
            where[front_px] = -1
            fss, fus = f[:s, :s], f[s:, :s]
            if s == 0:  # an empty separator (reach 0): the children's updates pass through
                upd = f
                if keep:
                    self.factors.append(None)
            elif inertia:
                fss.copy_(fss.tril() + fss.tril(-1).T)  # only the lower triangle was formed
                ld, piv, info = torch.linalg.ldl_factor_ex(fss)
                if int(info) != 0:
                    self.ok = False
                    break
                self.negatives += _negatives(ld, piv)
                x = torch.linalg.ldl_solve(ld, piv, fus.T.contiguous())  # F_SS^-1 F_SU
                upd = f[s:, s:]
                _syrk_lower_(upd, fus, x.T)
                del ld, x
            else:
                lss, info = torch.linalg.cholesky_ex(fss)
                if int(info) != 0:
                    self.ok = False
                    break
                lus = torch.linalg.solve_triangular(lss.T, fus, upper=True, left=False)
                upd = f[s:, s:]
                _syrk_lower_(upd, lus, lus)
                if keep:
                    self.factors.append((lss, lus))
            pending.append(upd.clone())
            del f, fss, fus, upd
            if on_front is not None:
                on_front(1)
        if not self.ok or not keep or inertia:
            self.factors = []

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``(Gram + shift I)^-1 b`` for ``b`` in the ``(i, j, a)`` layout."""
        cc = self.channels
        x = b.reshape(self.pixels, cc).clone()
        for node, factor in zip(self.nodes, self.factors):
            if factor is None:
                continue
            lss, lus = factor
            sep, upd = torch.as_tensor(node.sep), torch.as_tensor(node.upd)
            y = torch.linalg.solve_triangular(lss, x[sep].reshape(-1, 1), upper=False)
            x[sep] = y.reshape(-1, cc)
            if len(upd):
                x.index_add_(0, upd, (lus @ y).reshape(-1, cc), alpha=-1)
        for node, factor in zip(self.nodes[::-1], self.factors[::-1]):
            if factor is None:
                continue
            lss, lus = factor
            sep, upd = torch.as_tensor(node.sep), torch.as_tensor(node.upd)
            rhs = x[sep].reshape(-1, 1)
            if len(upd):
                rhs = rhs - lus.T @ x[upd].reshape(-1, 1)
            x[sep] = torch.linalg.solve_triangular(lss.T, rhs, upper=True).reshape(-1, cc)
        return x.reshape(-1)


def _negatives(ld: torch.Tensor, piv: torch.Tensor) -> int:
    """Negative eigenvalues of ``D`` in a Bunch-Kaufman ``L D L^T`` (LAPACK ``sytrf``, lower):
    a positive pivot is a 1 x 1 block, two equal negative pivots a 2 x 2 block."""
    d = ld.diagonal().tolist()
    sub = ld.diagonal(-1).tolist()
    p = piv.tolist()
    count, i, n = 0, 0, len(d)
    while i < n:
        if p[i] > 0:
            count += d[i] < 0
            i += 1
        else:
            a, b, e = d[i], sub[i], d[i + 1]
            det = a * e - b * b
            count += 1 if det < 0 else (2 if a + e < 0 else 0)
            i += 2
    return int(count)
