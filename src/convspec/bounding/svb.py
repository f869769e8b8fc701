"""Module layer of SVB: :func:`svb_` bounds a model's weights in place, planned then committed.

:class:`_Plan` is the pattern every in-place operation here follows: compute everything, agree
across ranks, then write. :class:`SVBReport` / :class:`LayerBound` record what a pass did (also
for :func:`convspec.bbn_`).

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithm 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .distributed import _check_consistent, _comm_device, _dist_context, _exchange
from .layers import SUPPORTED_LAYERS, Skip, _collect_layers, _first_nonfinite
from .matrices import (
    _DecompositionError,
    _band,
    _bound_matrices,
    _check_dtype,
    _check_eps,
    _check_method,
)

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


def svb_(
    modules,
    eps: float,
    *,
    layers: Sequence[type] = SUPPORTED_LAYERS,
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

    **What is bounded** (per group, each group on its own; the authors' released code ignores
    groups), for the layers ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (the
    default ``layers``; their ``Lazy*`` forms once initialised):

    * ``Linear``, weight ``(out, in)``: the ``out x in`` matrix itself;
    * convolution, weight ``(out, in // groups, *k)``: group ``j``'s rows
      ``weight[j * out // groups : (j + 1) * out // groups]`` reshaped to
      ``(out // groups) x (in // groups * prod(k))``, Jia's reshaped kernel (each output position
      is this matrix times one input patch);
    * transposed convolution, weight ``(in, out // groups, *k)``: group ``j``'s rows
      ``weight[j * in // groups : (j + 1) * in // groups]`` reshaped to
      ``(in // groups) x (out // groups * prod(k))``. The layer is the adjoint of the
      convolution (``out -> in`` channels) with the same weight tensor, whose reshaped kernel this
      is; the layer maps each input position's channels ``x`` to the output patch ``W_j^T x``,
      and ``W_j^T`` has the same singular values (Note [the bounded matrix of each layer type] in
      ``convspec/bounding/layers.py``).

    These are the singular values of the *reshaped kernel*, not of the operator
    (:func:`convspec.conv_operator`), whose singular values depend on the input size, padding and
    stride and are not bounded by this (they coincide when patches do not overlap:
    ``stride == kernel_size``, ``padding=0``).

    ``layers`` must be subclasses of the types above. ``skip`` is a callable
    ``(name, module) -> bool``, or names (a name skips that module and everything under it) and
    modules. A convolution outside those types (a custom ``_ConvNd`` subclass) is named in a
    ``RuntimeWarning`` and left unchanged. Decompositions run in ``dtype`` (float64 by default)
    and the result is written in the weight's dtype; ``method`` chooses SVD or the Gram route as
    in :func:`bound_singular_values`; equal-shaped matrices are decomposed in one batch.
    ``dtype=torch.float32`` is the fast pass: the result is as accurate as a per-layer float32
    SVD (not ~1 ulp, as with float64) and, on a network SVB keeps near orthogonal, several times
    faster (``benchmarks/svb.py``).

    **Safety:** everything is computed before anything is written. Non-finite ``eps`` or
    ``eps <= 0``, a NaN/Inf weight, a weight that is not float16/bfloat16/float32/float64, an
    unsupported layer type, a parametrized weight or a ``Lazy*`` layer that has not been
    initialised yet (no forward pass: it has no weight; run one or ``skip`` it) raise
    ``ValueError`` naming the layer; a failed decomposition raises ``RuntimeError``; in every
    case no weight has changed.

    **Distributed:** when ``torch.distributed`` is initialized (or ``distributed=True``) this is
    a collective: every rank of ``process_group`` (default: the world) must call it on the same
    model. Layer ``i`` (in module order) is decomposed on rank ``i % world_size`` only and the
    results are broadcast from their owner, so every rank ends with identical weights and the
    work per rank falls with the number of ranks. ``distributed=False`` computes everything
    locally without communication.

    Returns an :class:`SVBReport`: per layer the singular value range before and after and how
    many values were clipped.

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 5), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8 * 28, 4 * 10), torch.nn.Unflatten(1, (4, 10)),
    ...                             torch.nn.ConvTranspose1d(4, 6, 3, groups=2))
    >>> report = svb_(model, eps=0.05)
    >>> [row.name for row in report.layers]
    ['0', '2', '4']
    >>> s = torch.linalg.svdvals(model[0].weight.reshape(8, -1).double())          # 8 x (3 * 5)
    >>> bool((s >= 1 / 1.05 - 1e-6).all() and (s <= 1.05 + 1e-6).all())
    True
    >>> s = torch.linalg.svdvals(model[4].weight.reshape(2, 2, -1).double())       # 2 x (3 * 3)
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



__all__ = ["LayerBound", "SVBReport", "svb_"]
