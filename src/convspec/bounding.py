"""Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN), as training-time tools.

Jia et al. (CVPR 2017) keep every layer close to orthogonal during training: every ``T``
iterations, each weight matrix ``W = U diag(s) V^T`` is replaced by ``U diag(clip(s)) V^T`` with
``clip`` into ``[1/(1+eps), 1+eps]`` (Algorithm 1), and each BatchNorm's scale ``gamma`` is
bounded relative to its mean (Algorithm 2).

**What is bounded.** The singular values of the *reshaped kernel*, not of the convolution
operator: a ``Linear`` weight ``(out, in)`` is bounded as it is, a convolution weight
``(out, in // groups, *kernel_size)`` is split into ``groups`` matrices of shape
``(out // groups) x (in // groups * prod(kernel_size))`` (one per group, each bounded on its own).
The convolution operator ``M`` of :func:`convspec.conv_operator` has different singular values
(they depend on the input size, padding and stride, and can exceed those of the reshaped kernel by
up to a factor ``sqrt(kh * kw)``); SVB does not control them.

Three layers, each usable alone: :func:`bound_singular_values` (a tensor in, a tensor out),
:func:`svb_` and :func:`bbn_` (in place on a model, DDP-safe), and :class:`SingularValueBounding`
(the schedule, called after ``optimizer.step()``).

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithms 1 and 2.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ._geometry import check_weight_dtype
from ._precision import no_autocast

#: Layer types whose weight ``svb_`` knows how to reshape (transposed convolutions are not:
#: their weight is ``(in, out // groups, *k)``).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorm types ``bbn_`` acts on.
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
METHODS = ("auto", "svd", "gram")
BBN_MODES = ("bbn", "rel")

#: ``method='auto'`` takes the Gram route for matrices at least this elongated
#: (``max(m, n) / min(m, n)``), when the accuracy check of Note [Gram route accuracy] passes.
#: Set from ``benchmarks/svb.py``: on CPU the Gram route (one float64 GEMM, a ``min(m, n)``
#: eigendecomposition and one GEMM back) beat the float64 SVD for every shape measured, square ones
#: included, so the threshold is 1.
GRAM_MIN_ASPECT = 1.0

#: Matrices of one shape are decomposed together in batches of at most this many elements.
_BATCH_ELEMENTS = 1 << 25

Skip = Union[None, Callable[[str, nn.Module], bool], Iterable[Union[str, nn.Module]]]


# --------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class LayerBound:
    """What one bounding pass did to one layer (a row of :class:`SVBReport`).

    For a weight layer the values are the singular values of its reshaped weight (all groups
    together); for a BatchNorm they are the ratios that Algorithm 2 bounds (see :func:`bbn_`).
    ``route`` says how they were computed: ``'svd'``, ``'gram'`` (or ``'gram+svd'`` when the
    groups of a layer went different ways), ``'bbn'`` or ``'rel'``.
    """

    name: str
    shape: Tuple[int, ...]
    groups: int
    route: str
    n_values: int
    n_clipped: int
    min_before: float
    max_before: float
    min_after: float
    max_after: float


@dataclass
class SVBReport:
    """Per-layer record of one :func:`svb_` / :func:`bbn_` pass; ``str()`` gives a table.

    ``layers`` holds the weight layers (singular values), ``batchnorms`` the BatchNorm layers
    (bounded ratios); ``eps`` / ``bbn_eps`` are the widths used (``None`` when that part did not
    run).
    """

    eps: Optional[float] = None
    layers: List[LayerBound] = field(default_factory=list)
    bbn_eps: Optional[float] = None
    bbn_mode: Optional[str] = None
    batchnorms: List[LayerBound] = field(default_factory=list)

    @property
    def n_clipped(self) -> int:
        """Number of singular values clipped, over all weight layers."""
        return sum(row.n_clipped for row in self.layers)

    @property
    def n_bn_clipped(self) -> int:
        """Number of BatchNorm scales changed, over all BatchNorm layers."""
        return sum(row.n_clipped for row in self.batchnorms)

    def __getitem__(self, name: str) -> LayerBound:
        for row in self.layers + self.batchnorms:
            if row.name == name:
                return row
        raise KeyError(name)

    def __str__(self) -> str:
        lines = []
        for rows, eps, title in (
            (self.layers, self.eps, "SVB"),
            (self.batchnorms, self.bbn_eps, f"BBN (mode={self.bbn_mode!r})"),
        ):
            if eps is None:
                continue
            lo, hi = _band(eps)
            total = sum(r.n_values for r in rows)
            clipped = sum(r.n_clipped for r in rows)
            lines.append(
                f"{title} eps={eps:g}, band [{lo:.4g}, {hi:.4g}]: {len(rows)} layers, "
                f"{clipped} of {total} values clipped"
            )
            if not rows:
                continue
            header = ("layer", "shape", "route", "before [min, max]", "after [min, max]", "clipped")
            table = [header] + [
                (
                    r.name or "<model>",
                    "x".join(map(str, r.shape)) + (f" g{r.groups}" if r.groups > 1 else ""),
                    r.route,
                    f"[{r.min_before:.4g}, {r.max_before:.4g}]",
                    f"[{r.min_after:.4g}, {r.max_after:.4g}]",
                    f"{r.n_clipped}/{r.n_values}",
                )
                for r in rows
            ]
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for row in table:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        return "\n".join(lines) if lines else "SVBReport (nothing bounded)"


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


def _check_layers(layers) -> Tuple[type, ...]:
    if isinstance(layers, type):
        layers = (layers,)
    try:
        layers = tuple(layers)
    except TypeError:
        raise ValueError(f"layers must be a tuple of layer classes, got {layers!r}") from None
    for cls in layers:
        if not (isinstance(cls, type) and issubclass(cls, SUPPORTED_LAYERS)):
            raise ValueError(
                f"layers must be subclasses of nn.Linear or nn.Conv1d/2d/3d, got {cls!r} "
                "(transposed convolutions are not supported: their weight is (in, out/groups, ...))"
            )
    if not layers:
        raise ValueError("layers must name at least one layer class")
    return layers


def _iter_named_modules(modules) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` for a model or an iterable of modules, each module once."""
    if isinstance(modules, nn.Module):
        roots = [("", modules)]
    else:
        if isinstance(modules, (str, bytes, torch.Tensor)):
            raise ValueError(
                f"modules must be an nn.Module or an iterable of nn.Module, got "
                f"{type(modules).__name__}"
            )
        try:
            items = list(modules)
        except TypeError:
            raise ValueError(
                f"modules must be an nn.Module or an iterable of nn.Module, got "
                f"{type(modules).__name__}"
            ) from None
        for i, item in enumerate(items):
            if not isinstance(item, nn.Module):
                raise ValueError(
                    f"modules must be an nn.Module or an iterable of nn.Module; item {i} is a "
                    f"{type(item).__name__}"
                )
        roots = [(str(i), item) for i, item in enumerate(items)]
    seen = set()
    out = []
    for prefix, root in roots:
        for name, module in root.named_modules(prefix=prefix):
            if id(module) not in seen:
                seen.add(id(module))
                out.append((name, module))
    return out


def _skip_predicate(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip) and not isinstance(skip, nn.Module):
        return skip
    items = [skip] if isinstance(skip, (str, nn.Module)) else skip
    try:
        items = list(items)
    except TypeError:
        raise ValueError(
            f"skip must be None, a callable (name, module) -> bool, or an iterable of names or "
            f"modules, got {skip!r}"
        ) from None
    names, ids = set(), set()
    for item in items:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, nn.Module):
            ids.update(id(m) for m in item.modules())
        else:
            raise ValueError(f"skip items must be layer names or modules, got {item!r}")

    def predicate(name: str, module: nn.Module) -> bool:
        if id(module) in ids:
            return True
        return any(name == s or name.startswith(s + ".") for s in names)

    return predicate


def _weight_of(name: str, module: nn.Module) -> torch.nn.Parameter:
    label = name or "<model>"
    if nn.utils.parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"layer {label!r} has a parametrized weight (e.g. spectral_norm); its weight is "
            "computed, not stored, and cannot be bounded in place"
        )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(
            f"layer {label!r}: weight is a {type(weight).__name__}, not an nn.Parameter "
            "(a weight_norm hook or a custom module?); refusing to overwrite it"
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {label!r} is lazy and not initialised yet (run a forward first)")
    check_weight_dtype(weight, f"layer {label!r}: weight")
    return weight


@dataclass
class _Layer:
    index: int
    name: str
    module: nn.Module
    weight: torch.nn.Parameter
    groups: int

    def matrices(self) -> torch.Tensor:
        """The weight as ``(groups, out // groups, in // groups * prod(k))``, a view."""
        w = self.weight.detach()
        return w.reshape(self.groups, w.shape[0] // self.groups, -1)


def _collect_layers(modules, layers, skip) -> List[_Layer]:
    layers = _check_layers(layers)
    skipped = _skip_predicate(skip)
    found: List[_Layer] = []
    seen_weights = set()
    for name, module in _iter_named_modules(modules):
        if not isinstance(module, layers) or skipped(name, module):
            continue
        weight = _weight_of(name, module)
        if id(weight) in seen_weights:  # tied weights: bound once
            continue
        seen_weights.add(id(weight))
        groups = getattr(module, "groups", 1)
        expected = 2 if isinstance(module, nn.Linear) else 2 + len(module.kernel_size)
        if weight.dim() != expected or weight.shape[0] % groups != 0 or weight.numel() == 0:
            raise ValueError(
                f"layer {name or '<model>'!r}: weight has shape {tuple(weight.shape)}, expected "
                f"{expected} dimensions with out_channels divisible by groups={groups}"
            )
        found.append(_Layer(len(found), name, module, weight, groups))
    return found


def _first_nonfinite(tensors: Sequence[torch.Tensor]) -> int:
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            return i
    return -1


# --------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class _Dist:
    group: Optional[object]
    rank: int
    world: int

    @property
    def active(self) -> bool:
        return self.world > 1

    def src(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` in this group (what ``dist.broadcast`` wants)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce_min(self, values: List[int], device) -> List[int]:
        t = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t.tolist()


def _dist_context(distributed: Optional[bool], process_group) -> _Dist:
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    elif not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
    if not distributed:
        return _Dist(None, 0, 1)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialized")
    return _Dist(
        process_group,
        dist.get_rank(group=process_group),
        dist.get_world_size(group=process_group),
    )


def _comm_device(tensors: Sequence[torch.Tensor], ctx: _Dist) -> torch.device:
    """Where collectives run: the tensors' device, but CUDA for NCCL even for CPU models."""
    backend = dist.get_backend(ctx.group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensors[0].device if tensors else torch.device("cpu")


def _check_consistent(ctx: _Dist, values: List[int], device) -> List[int]:
    """All-reduce small integer facts so that every rank takes the same decision.

    ``values`` = [n_layers, -n_layers, bad_index_or_big, ...]: returns the minima. A mismatch in
    the layer count between ranks is reported on every rank instead of deadlocking later.
    """
    return ctx.all_reduce_min(values, device)


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
# ||E|| <~ u ||A||^2 = u s_max^2. The error of h(G + E) A in the eigenbasis of G is
# h[l_i, l_j] E_ij s_j, with h[.,.] the divided difference of h. h is flat (= 1) inside the band
# and |h'| is largest just above 0: the bad terms are the singular values far *below* the band,
# which get stretched up to 1/(1+eps): for s_i, s_j both small the term is
# (lo / 2 s^3) * u s_max^2 * s = (lo / 2) u kappa^2 with kappa = s_max / s_min. Values near the
# band edges (the only ones whose clip decision matters) are accurate to u s_max^2 / s, which is
# tiny; values far above the band are shrunk, where h' -> 0 and errors are damped. So the Gram
# route loses about kappa^2 u relative to the SVD, and we take it only where
#
#     u * kappa^2 <= GRAM_TOLERANCE * eps(weight dtype),   i.e.  l_min >= l_max * u / (tol * eps_w)
#
# (checked per matrix on the computed eigenvalues; failures are redone by SVD). In float64 and a
# float32 weight this allows kappa up to ~7e3; a float64 weight never passes, so float64 weights
# always take the SVD route. Rank-deficient matrices (s_min = 0: the singular vector that the clip
# needs is not determined by G) fail the check too. tests/test_svb_routes.py compares both routes
# against a float64 SVD on spectra up to and beyond the threshold.
#
# The last product, D = (h(G) - I) A, is the only O(m n min(m, n)) step after G. For large
# float32 matrices it is formed in float32: its rounding error is about eps32 * ||h(G) - I|| *
# ||A||, i.e. eps32 * rho relative to ||A'|| with rho = max|f| s_max / max(s'), and writing A'
# back in float32 costs one eps32 anyway. We do so only where rho <= APPLY_RHO (a few ulps at
# most; rho ~ 1 for freshly initialised layers), else in float64.
GRAM_TOLERANCE = 0.1
APPLY_RHO = 4.0
#: Matrices with at least this many entries are processed one by one (batching does not help a
#: CPU LAPACK call that size and stacking costs copies); smaller ones are stacked by shape.
_LARGE = 1 << 16
#: Row-block size of the lower-triangle Gram product (eigh reads the lower triangle only).
_GRAM_BLOCK = 160


def _gram_allowed(weight_dtype: torch.dtype, dtype: torch.dtype) -> float:
    """Smallest ``l_min / l_max`` for which the Gram route is accurate; > 1 when never."""
    return torch.finfo(dtype).eps / (GRAM_TOLERANCE * torch.finfo(weight_dtype).eps)


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

    Entries with ``ok[i] == False`` failed the accuracy check and hold garbage.
    """
    wide = a.shape[-2] <= a.shape[-1]
    a64 = a.to(dtype)
    x = a64 if wide else a64.mT  # (B, r, n'), r = min(m, n)
    lam, q = _per_item(lambda g: torch.linalg.eigh(g, UPLO="L"), _lower_gram(x))  # ascending
    ok = (lam[:, 0] >= min_ratio * lam[:, -1]) & (lam[:, -1] > 0) & torch.isfinite(lam).all(-1)
    s = lam.clamp_min(torch.finfo(dtype).tiny).sqrt()
    s_new = s.clamp(lo, hi)
    f = torch.where(ok[:, None], s_new / s - 1, torch.zeros_like(s))  # 0 exactly when in band
    h = (q * f.unsqueeze(-2)) @ q.mT  # h(G) - I, (B, r, r)
    if a.dtype != dtype and a[0].numel() >= _LARGE:
        # Note [Gram route accuracy], last paragraph: D in the weight's dtype where rho allows.
        rho = f.abs().amax(-1) * s[:, -1] / s_new[:, -1]
        new = torch.empty_like(a)
        for i in range(a.shape[0]):
            work = torch.promote_types(a.dtype, torch.float32) if rho[i] <= APPLY_RHO else dtype
            ai, hi_ = a[i].to(work), h[i].to(work)
            out = torch.addmm(ai, hi_, ai) if wide else torch.addmm(ai, ai, hi_)
            new[i] = out.to(a.dtype)
    else:
        delta = h @ a64 if wide else a64 @ h
        new = (a64 + delta).to(a.dtype)
    return new, s.flip(-1), s_new.flip(-1), ok


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
    out_new = [torch.empty_like(m) for m in mats]
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
            for j, (i, g) in enumerate(chunk):
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

    ``weight`` is a ``Linear`` weight ``(out, in)`` or a convolution weight
    ``(out, in // groups, *kernel_size)``. It is read as ``groups`` matrices of shape
    ``(out // groups) x (in // groups * prod(kernel_size))`` and each ``W = U diag(s) V^T`` is
    replaced by ``U diag(clip(s, 1/(1+eps), 1+eps)) V^T`` (Jia et al., Algorithm 1, lines 4-6).
    These are the singular values of the reshaped kernel, **not** of the convolution operator
    (see :func:`convspec.conv_operator`), which are different. Matrices whose values are all in
    the band come back bit-identical. Not in place, not differentiable.

    The decomposition runs in ``dtype`` (float64 by default) with ``torch.autocast`` off; the
    result has ``weight``'s dtype, which must be float16, bfloat16, float32 or float64 (anything
    else raises ``ValueError`` naming the dtype).
    ``method``: ``'svd'`` (``torch.linalg.svd``), ``'gram'`` (eigendecomposition of the smaller
    Gram matrix, only where it is as accurate as the weight's dtype, else SVD: see Note [Gram
    route accuracy] in the source) or ``'auto'`` (Gram for matrices at least
    ``GRAM_MIN_ASPECT`` times wider than tall, or taller than wide). Cost per group:
    ``O(m n min(m, n))``.

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
        raise ValueError(f"out_channels ({weight.shape[0]}) is not divisible by groups ({groups})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf values")
    lo, hi = _band(eps)
    w = weight.detach()
    mats = w.reshape(groups, w.shape[0] // groups, -1)
    try:
        ((new, _, _, _),) = _bound_matrices([mats], lo, hi, dtype, method)
    except _DecompositionError as err:
        raise RuntimeError(f"decomposition of the weight failed: {err.cause}") from err.cause
    return new.reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# Module layer: svb_


class _Plan:
    """Everything computed, nothing written: ``commit()`` writes (all or nothing before it)."""

    def __init__(self, writes: List[Tuple[torch.Tensor, torch.Tensor]], report: SVBReport):
        self.writes = writes
        self.report = report

    def commit(self) -> None:
        with torch.no_grad():
            for target, value in self.writes:
                target.copy_(value)


def _stats_row(name, weight, groups, route, s, s_new) -> LayerBound:
    clipped = int((s != s_new).sum())
    return LayerBound(
        name=name,
        shape=tuple(weight.shape),
        groups=groups,
        route=route,
        n_values=int(s.numel()),
        n_clipped=clipped,
        min_before=float(s.min()),
        max_before=float(s.max()),
        min_after=float(s_new.min()),
        max_after=float(s_new.max()),
    )


_ROUTE_CODES = {"svd": 0, "gram": 1, "gram+svd": 2}
_ROUTE_NAMES = {v: k for k, v in _ROUTE_CODES.items()}


def _plan_svb(modules, eps, *, layers, skip, dtype, method, distributed, process_group) -> _Plan:
    eps = _check_eps(eps)
    dtype = _check_dtype(dtype)
    method = _check_method(method)
    lo, hi = _band(eps)
    found = _collect_layers(modules, layers, skip)
    ctx = _dist_context(distributed, process_group)
    report = SVBReport(eps=eps)

    bad = _first_nonfinite([layer.weight.detach() for layer in found])
    if ctx.active:
        device = _comm_device([layer.weight for layer in found], ctx)
        big = len(found) + 1
        n_min, neg_n_min, bad_min = _check_consistent(
            ctx, [len(found), -len(found), bad if bad >= 0 else big], device
        )
        if n_min != -neg_n_min:
            raise ValueError(
                f"svb_: ranks see different numbers of layers ({n_min} to {-neg_n_min}); "
                "every rank must call svb_ on the same model"
            )
        bad = bad_min if bad_min < big else -1
    if bad >= 0:
        raise ValueError(
            f"svb_: layer {found[bad].name or '<model>'!r} has NaN or Inf in its weight; "
            "no weight was changed"
        )

    mine = [layer for layer in found if layer.index % ctx.world == ctx.rank]
    failure, cause = -1, None
    try:
        results = _bound_matrices([layer.matrices() for layer in mine], lo, hi, dtype, method)
    except _DecompositionError as err:
        failure, cause = mine[err.index].index, err.cause
        results = []
    if ctx.active:
        big = len(found) + 1
        (fail_min,) = _check_consistent(ctx, [failure if failure >= 0 else big], device)
        failure = fail_min if fail_min < big else -1
    if failure >= 0:
        msg = f"svb_: decomposing the weight of layer {found[failure].name or '<model>'!r} failed"
        if cause is not None:
            raise RuntimeError(f"{msg}: {cause}; no weight was changed") from cause
        raise RuntimeError(f"{msg} on another rank; no weight was changed")

    computed: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]] = {
        layer.index: res for layer, res in zip(mine, results)
    }
    if ctx.active:
        computed = _exchange(found, computed, ctx, device)

    writes = []
    for layer in found:
        new, s, s_new, route = computed[layer.index]
        report.layers.append(_stats_row(layer.name, layer.weight, layer.groups, route, s, s_new))
        if ctx.active or bool((s != s_new).any()):
            writes.append((layer.weight, new.reshape(layer.weight.shape)))
    return _Plan(writes, report)


def _exchange(found: List[_Layer], computed, ctx: _Dist, device) -> Dict[int, tuple]:
    """Broadcast every layer's result from its owner (rank ``index % world``) to all ranks.

    One flat buffer per (owner, dtype) for the weights and one float64 buffer per owner for the
    singular values and the route, so the number of collectives does not grow with the layers.
    """
    out = {}
    for owner in range(ctx.world):
        owned = [layer for layer in found if layer.index % ctx.world == owner]
        if not owned:
            continue
        src = ctx.src(owner)
        by_dtype: Dict[torch.dtype, List[_Layer]] = {}
        for layer in owned:
            by_dtype.setdefault(layer.weight.dtype, []).append(layer)
        news: Dict[int, torch.Tensor] = {}
        for wdtype, group in by_dtype.items():
            sizes = [layer.weight.numel() for layer in group]
            if owner == ctx.rank:
                buf = torch.cat([computed[layer.index][0].reshape(-1) for layer in group])
                buf = buf.to(device)
            else:
                buf = torch.empty(sum(sizes), dtype=wdtype, device=device)
            dist.broadcast(buf, src=src, group=ctx.group)
            for layer, part in zip(group, buf.split(sizes)):
                news[layer.index] = part.to(layer.weight.device).reshape(layer.weight.shape)
        counts = [layer.groups * min(layer.matrices().shape[1:]) for layer in owned]
        if owner == ctx.rank:
            parts = []
            for layer in owned:
                _, s, s_new, route = computed[layer.index]
                parts += [s, s_new, torch.tensor([float(_ROUTE_CODES[route])], dtype=torch.float64)]
            stats = torch.cat(parts).to(device)
        else:
            stats = torch.empty(sum(2 * c + 1 for c in counts), dtype=torch.float64, device=device)
        dist.broadcast(stats, src=src, group=ctx.group)
        stats = stats.cpu()
        pos = 0
        for layer, c in zip(owned, counts):
            s, s_new = stats[pos : pos + c], stats[pos + c : pos + 2 * c]
            route = _ROUTE_NAMES[int(stats[pos + 2 * c])]
            pos += 2 * c + 1
            out[layer.index] = (news[layer.index], s, s_new, route)
    return out


def svb_(
    modules,
    eps: float,
    *,
    layers: Sequence[type] = (nn.Conv2d, nn.Linear),
    skip: Skip = None,
    dtype: torch.dtype = torch.float64,
    method: str = "auto",
    distributed: Optional[bool] = None,
    process_group=None,
) -> SVBReport:
    """Singular Value Bounding, in place: clip the singular values of every layer's weight matrix.

    For every module of ``modules`` (a model, e.g. a ``DistributedDataParallel`` one, or an
    iterable of modules; each module and each tied weight once) that is an instance of
    ``layers`` and not excluded by ``skip``, the weight is read as matrices and each
    ``W = U diag(s) V^T`` becomes ``U diag(clip(s, 1/(1+eps), 1+eps)) V^T``, same singular
    vectors (Jia et al., Algorithm 1, lines 4-6). Bias, buffers and other parameters are untouched.

    **What is bounded:** a ``Linear`` weight ``(out, in)`` as it is; a convolution weight
    ``(out, in // groups, kh, kw)`` as ``groups`` matrices ``(out // groups) x
    (in // groups * kh * kw)``, each on its own (the authors' released code ignores groups). These
    are the singular values of the *reshaped kernel*, not of the convolution operator
    (:func:`convspec.conv_operator`), whose singular values are different and not bounded by this.

    ``layers`` must be subclasses of ``nn.Linear`` or ``nn.Conv1d/2d/3d``. ``skip`` is a callable
    ``(name, module) -> bool``, or names (a name skips that module and everything under it) and
    modules. Decompositions run in ``dtype`` (float64 by default) and the result is written in the
    weight's dtype; ``method`` chooses SVD or the Gram route as in :func:`bound_singular_values`;
    equal-shaped matrices are decomposed in one batch.

    **Safety:** everything is computed before anything is written. Non-finite ``eps`` or
    ``eps <= 0``, a NaN/Inf weight, a weight that is not float16/bfloat16/float32/float64, an
    unsupported layer type or a parametrized weight raise ``ValueError`` naming the layer; a failed decomposition raises ``RuntimeError``; in every
    case no weight has changed.

    **Distributed:** when ``torch.distributed`` is initialized (or ``distributed=True``) this is
    a collective: every rank of ``process_group`` (default: the world) must call it on the same
    model. Layer ``i`` (in module order) is decomposed on rank ``i % world_size`` only and the
    results are broadcast from their owner, so every rank ends with identical weights and the
    work per rank falls with the number of ranks. ``distributed=False`` computes everything
    locally without communication.

    Returns an :class:`SVBReport`: per layer the singular value range before and after and how
    many values were clipped.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8 * 30 * 30, 10))
    >>> report = svb_(model, eps=0.05)
    >>> [row.name for row in report.layers]
    ['0', '2']
    >>> s = torch.linalg.svdvals(model[0].weight.reshape(8, -1).double())
    >>> bool((s >= 1 / 1.05 - 1e-6).all() and (s <= 1.05 + 1e-6).all())
    True

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithm 1.
    """
    plan = _plan_svb(
        modules,
        eps,
        layers=layers,
        skip=skip,
        dtype=dtype,
        method=method,
        distributed=distributed,
        process_group=process_group,
    )
    plan.commit()
    return plan.report


# --------------------------------------------------------------------------------------------
# Bounded Batch Normalization

# Note [BBN signs]: Algorithm 2 assumes gamma > 0 and bounds (gamma_i / sigma_i) / alpha with
# alpha the mean of gamma_i / sigma_i. With mixed signs that mean can be ~0 or negative and the
# ratios meaningless, so we bound magnitudes: r_i = |gamma_i| / sigma_i ('bbn') or |gamma_i|
# ('rel'), alpha = mean of r_i over the channels with gamma_i != 0, and the new
# gamma_i = sign(gamma_i) * sigma_i * alpha * clip(r_i / alpha) (sigma_i = 1 for 'rel'). For
# positive gammas this is Algorithm 2 exactly. A negative gamma keeps its sign (flipping it would
# flip the channel); a zero gamma stays zero and is left out of alpha: zero scales are usually
# deliberate (e.g. zero-initialised last BatchNorm of residual blocks), and bounding them up to
# alpha / (1+eps) would switch those channels on. alpha is computed before clipping, as in the
# paper, so the ratios to the *new* mean may lie slightly outside the band.
#
# Note [BBN zero variance]: a channel whose running_var is (near) zero -- a dead channel, or a
# constant input -- has sigma_i ~ sqrt(bn.eps) (3e-3 for the default 1e-5), so its ratio
# |gamma_i| / sigma_i is hundreds of times the others' and dominates alpha. Algorithm 2 as written
# then raises every other gamma to about alpha / (1+eps): with one such channel among C (default
# bn.eps, gamma ~ 1, running_var ~ 1) the others grew 10-21x for C = 16, 3-9x for C = 64. We keep
# the algorithm (it is what the paper specifies) and warn, naming the layer and the channels with
# running_var <= bn.eps and gamma != 0, whenever they lift alpha above (1+eps) times the mean
# ratio of the other channels (so a zero-variance channel that changes nothing, e.g. with a
# large bn.eps or a tiny gamma, stays quiet). bn.eps itself must be positive and finite: with
# eps <= 0 a zero-variance channel gives sigma = 0 (or NaN) and the write would be NaN/Inf, so
# that is refused before anything is written.


def _check_bn_eps(label: str, bn: nn.Module) -> float:
    value = bn.eps
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(
            f"bbn_: BatchNorm {label!r} has eps={value!r}; mode='bbn' divides by "
            "sigma = sqrt(running_var + eps), which needs a positive finite eps; nothing was written"
        )
    return float(value)


def _collect_batchnorms(modules, skip) -> List[Tuple[str, nn.Module]]:
    skipped = _skip_predicate(skip)
    found = []
    seen = set()
    for name, module in _iter_named_modules(modules):
        if not isinstance(module, BATCHNORMS) or skipped(name, module):
            continue
        if module.weight is None:  # affine=False: no gamma to bound
            continue
        weight = _weight_of(name, module)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        found.append((name, module))
    return found


def _warn_zero_variance(label, bn_eps, flat, r, nonzero, alpha, hi) -> None:
    """Warn when channels with ``running_var <= bn.eps`` (``flat``) lift ``alpha`` by more than
    the band's factor over the mean of the other channels (Note [BBN zero variance])."""
    rest = nonzero & ~flat
    if not bool(flat.any()) or not bool(rest.any()) or float(alpha) <= hi * float(r[rest].mean()):
        return
    channels = flat.nonzero().flatten().tolist()
    shown = ", ".join(map(str, channels[:10])) + (", ..." if len(channels) > 10 else "")
    warnings.warn(
        f"bbn_: BatchNorm {label!r}: channel(s) {shown} have (near-)zero running_var "
        f"(<= eps={bn_eps:g}), so |gamma| / sigma there dominates the mean of Algorithm 2 and "
        "the other channels' gammas are scaled up (Note [BBN zero variance] in "
        "convspec/bounding.py); consider mode='rel' or skipping this layer",
        RuntimeWarning,
        stacklevel=4,
    )


def _plan_bbn(modules, eps, *, mode, skip, distributed, process_group) -> _Plan:
    eps = _check_eps(eps)
    if mode not in BBN_MODES:
        raise ValueError(f"mode must be one of {BBN_MODES}, got {mode!r}")
    lo, hi = _band(eps)
    found = _collect_batchnorms(modules, skip)
    ctx = _dist_context(distributed, process_group)
    report = SVBReport(bbn_eps=eps, bbn_mode=mode)
    if mode == "bbn":  # all layers checked before any work (Note [BBN zero variance])
        for name, bn in found:
            _check_bn_eps(name or "<model>", bn)

    rows, news = [], []
    for name, bn in found:
        label = name or "<model>"
        gamma = bn.weight.detach()
        if mode == "bbn" and bn.running_var is None:
            raise ValueError(
                f"bbn_: BatchNorm {label!r} has no running_var (track_running_stats=False); "
                "mode='bbn' needs it, mode='rel' does not"
            )
        if not bool(torch.isfinite(gamma).all()):
            raise ValueError(f"bbn_: BatchNorm {label!r} has NaN or Inf in its weight (gamma)")
        g = gamma.double()
        if mode == "bbn":
            var = bn.running_var.detach().double()
            if not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
                raise ValueError(f"bbn_: BatchNorm {label!r} has a non-finite or negative running_var")
            sigma = (var + bn.eps).sqrt()
        else:
            sigma = torch.ones_like(g)
        r = g.abs() / sigma
        nonzero = g != 0
        if bool(nonzero.any()):
            alpha = r[nonzero].mean()
            if mode == "bbn" and ctx.rank == 0:  # rank 0's result is the one written
                _warn_zero_variance(label, bn.eps, nonzero & (var <= bn.eps), r, nonzero, alpha, hi)
            ratio = r / alpha
            ratio_new = ratio.clamp(lo, hi)
            clipped = nonzero & (ratio_new != ratio)
            g_new = torch.where(clipped, g.sign() * sigma * alpha * ratio_new, g)
            new = torch.where(clipped, g_new.to(gamma.dtype), gamma)
            before, after = ratio[nonzero], (g_new.abs() / sigma / alpha)[nonzero]
        else:  # every gamma zero: nothing to bound
            clipped = nonzero
            new = gamma.clone()
            before = after = torch.ones(1, dtype=torch.float64)
        rows.append(
            LayerBound(
                name=name,
                shape=tuple(gamma.shape),
                groups=1,
                route=mode,
                n_values=int(nonzero.sum()),
                n_clipped=int(clipped.sum()),
                min_before=float(before.min()),
                max_before=float(before.max()),
                min_after=float(after.min()),
                max_after=float(after.max()),
            )
        )
        news.append(new)

    if ctx.active and found:
        # Running statistics differ between ranks after a forward pass under DDP (each rank
        # updates them with its own batch), so rank 0's result is broadcast to everyone.
        device = _comm_device(news, ctx)
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, t in enumerate(news):
            by_dtype.setdefault(t.dtype, []).append(i)
        for wdtype, idx in by_dtype.items():
            buf = torch.cat([news[i].reshape(-1) for i in idx]).to(device)
            dist.broadcast(buf, src=ctx.src(0), group=ctx.group)
            for i, part in zip(idx, buf.split([news[i].numel() for i in idx])):
                news[i] = part.to(news[i].device)
        if ctx.rank != 0:
            # The report describes rank 0's computation too.
            stats = torch.zeros(len(rows) * 6, dtype=torch.float64, device=device)
        else:
            stats = torch.tensor(
                [v for r in rows for v in (r.n_values, r.n_clipped, r.min_before, r.max_before,
                                           r.min_after, r.max_after)],
                dtype=torch.float64,
                device=device,
            )
        dist.broadcast(stats, src=ctx.src(0), group=ctx.group)
        values = stats.cpu().view(-1, 6).tolist()
        rows = [
            LayerBound(r.name, r.shape, 1, mode, int(v[0]), int(v[1]), *v[2:])
            for r, v in zip(rows, values)
        ]

    for (name, _), new in zip(found, news):  # e.g. a float16 gamma overflowing (same on all ranks)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(
                f"bbn_: the bounded gamma of BatchNorm {name or '<model>'!r} is not finite in "
                f"{new.dtype}; nothing was written"
            )
    report.batchnorms = rows
    writes = [(bn.weight, new) for (_, bn), new in zip(found, news)]
    if not ctx.active:
        writes = [(t, v) for (t, v), row in zip(writes, rows) if row.n_clipped]
    return _Plan(writes, report)


def bbn_(
    modules,
    eps: float,
    *,
    mode: str = "bbn",
    skip: Skip = None,
    distributed: Optional[bool] = None,
    process_group=None,
) -> SVBReport:
    """Bounded Batch Normalization, in place: bound every BatchNorm's scale ``gamma`` (Algorithm 2).

    For every ``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` with ``affine=True`` in ``modules``
    (a model or an iterable of modules), with ``sigma_i = sqrt(running_var_i + bn.eps)``:

    * ``mode='bbn'`` (Algorithm 2): ``r_i = |gamma_i| / sigma_i`` is bounded so that
      ``r_i / alpha`` lies in ``[1/(1+eps), 1+eps]``, ``alpha`` the mean of ``r_i``;
    * ``mode='rel'`` (what the authors' code defaults to): ``|gamma_i| / mean |gamma|`` is bounded
      into the same band.

    Only ``gamma`` changes (beta and running statistics are untouched); channels already inside
    the band keep their value bit for bit. **Signs** (the paper assumes ``gamma > 0``): magnitudes
    are bounded and each ``gamma_i`` keeps its sign; a zero ``gamma_i`` stays zero and is left out
    of ``alpha`` (see Note [BBN signs] in the source). ``alpha`` is computed before clipping, as in
    the paper. ``mode='bbn'`` needs running statistics (``track_running_stats=True``).

    Bad ``eps``, ``mode``, NaN/Inf gamma or running_var, and (``mode='bbn'``) a BatchNorm whose
    own ``eps`` is ``<= 0`` or not finite raise ``ValueError`` naming the layer before anything is
    written; so does a bounded gamma that would overflow the weight's dtype. **Zero variance:** a
    channel with ``running_var <= bn.eps`` (a dead or constant channel) has ``sigma_i ~ sqrt(eps)``
    and dominates ``alpha``, so Algorithm 2 scales every other gamma up (10-21x measured with one
    such channel among 16); the algorithm is kept and a ``RuntimeWarning`` names the layer and
    channels (see Note [BBN zero variance]). **Distributed:** a collective like :func:`svb_`; rank 0's result (its running
    statistics differ from the other ranks' after a DDP forward) is broadcast to all ranks.

    Returns an :class:`SVBReport` whose ``batchnorms`` rows give the ratio ``r_i / alpha``
    (non-zero gammas only) before and after.

    >>> bn = torch.nn.BatchNorm2d(4)
    >>> with torch.no_grad():
    ...     _ = bn.weight.copy_(torch.tensor([0.5, 1.0, 1.0, 2.5]))
    >>> report = bbn_(bn, eps=0.5, mode='rel')   # mean 1.25: band [1.25/1.5, 1.25*1.5]
    >>> [round(v, 4) for v in bn.weight.tolist()]
    [0.8333, 1.0, 1.0, 1.875]
    >>> report.n_bn_clipped
    2

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithm 2.
    """
    plan = _plan_bbn(
        modules, eps, mode=mode, skip=skip, distributed=distributed, process_group=process_group
    )
    plan.commit()
    return plan.report


# --------------------------------------------------------------------------------------------
# Training harness


class SingularValueBounding:
    """Apply :func:`svb_` (and optionally :func:`bbn_`) every ``every`` optimizer steps.

    Call :meth:`step` once after each ``optimizer.step()``; on the ``every``-th, ``2*every``-th,
    ... call it bounds the model and returns the :class:`SVBReport` (else ``None``). SVB and BBN
    are computed together before either is written, so an error leaves the model unchanged.
    ``state_dict()`` / ``load_state_dict()`` save and restore the step counter and the numeric
    configuration (``eps``, ``every``, ``bbn_eps``, ``bbn_mode``), so a resumed run bounds at the
    same iterations. ``layers``, ``skip``, ``dtype``, ``method``, ``distributed`` and
    ``process_group`` are passed to :func:`svb_` / :func:`bbn_` (see there; under
    ``torch.distributed`` every rank must call :meth:`step`).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> svb = SingularValueBounding(model, eps=0.05, every=2, bbn_eps=0.2)
    >>> svb.step() is None        # step 1
    True
    >>> report = svb.step()       # step 2: bounds
    >>> report.eps, len(report.layers), len(report.batchnorms)
    (0.05, 1, 1)
    >>> svb.state_dict()['step']
    2

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithms 1 and 2.
    """

    def __init__(
        self,
        model,
        eps: float,
        *,
        every: int,
        bbn_eps: Optional[float] = None,
        bbn_mode: str = "bbn",
        layers: Sequence[type] = (nn.Conv2d, nn.Linear),
        skip: Skip = None,
        dtype: torch.dtype = torch.float64,
        method: str = "auto",
        distributed: Optional[bool] = None,
        process_group=None,
    ):
        self.model = model
        self._configure(eps, every, bbn_eps, bbn_mode)
        self.layers = _check_layers(layers)
        self.skip = skip
        self.dtype = _check_dtype(dtype)
        self.method = _check_method(method)
        self.distributed = distributed
        self.process_group = process_group
        self.step_count = 0
        self.last_report: Optional[SVBReport] = None

    def _configure(self, eps, every, bbn_eps, bbn_mode) -> None:
        eps = _check_eps(eps)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if bbn_eps is not None:
            bbn_eps = _check_eps(bbn_eps, "bbn_eps")
        if bbn_mode not in BBN_MODES:
            raise ValueError(f"bbn_mode must be one of {BBN_MODES}, got {bbn_mode!r}")
        self.eps, self.every, self.bbn_eps, self.bbn_mode = eps, every, bbn_eps, bbn_mode

    def apply(self) -> SVBReport:
        """Bound now (whatever the counter says) and return the report."""
        common = dict(distributed=self.distributed, process_group=self.process_group)
        plan = _plan_svb(
            self.model,
            self.eps,
            layers=self.layers,
            skip=self.skip,
            dtype=self.dtype,
            method=self.method,
            **common,
        )
        report = plan.report
        plans = [plan]
        if self.bbn_eps is not None:
            bbn = _plan_bbn(self.model, self.bbn_eps, mode=self.bbn_mode, skip=self.skip, **common)
            plans.append(bbn)
            report.bbn_eps, report.bbn_mode = bbn.report.bbn_eps, bbn.report.bbn_mode
            report.batchnorms = bbn.report.batchnorms
        for p in plans:
            p.commit()
        self.last_report = report
        return report

    def step(self) -> Optional[SVBReport]:
        """Count one optimizer step; bound and return the report every ``every`` steps."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            return self.apply()
        return None

    def state_dict(self) -> Dict[str, object]:
        return {
            "step": self.step_count,
            "eps": self.eps,
            "every": self.every,
            "bbn_eps": self.bbn_eps,
            "bbn_mode": self.bbn_mode,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        missing = {"step", "eps", "every", "bbn_eps", "bbn_mode"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict step must be an int >= 0, got {step!r}")
        self._configure(state["eps"], state["every"], state["bbn_eps"], state["bbn_mode"])
        self.step_count = step

    def __repr__(self) -> str:
        bbn = f", bbn_eps={self.bbn_eps}, bbn_mode={self.bbn_mode!r}" if self.bbn_eps else ""
        return (
            f"SingularValueBounding(eps={self.eps}, every={self.every}{bbn}, "
            f"step={self.step_count})"
        )


__all__ = [
    "LayerBound",
    "SVBReport",
    "SingularValueBounding",
    "bbn_",
    "bound_singular_values",
    "svb_",
]
