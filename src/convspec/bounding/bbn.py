"""Bounded Batch Normalization (Jia et al., Algorithm 2): :func:`bbn_` bounds every gamma in place.

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithm 2.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .distributed import _comm_device, _dist_context
from .layers import Skip, _iter_named_modules, _skip_predicate, _weight_of
from .matrices import _band, _check_eps
from .svb import LayerBound, SVBReport, _Plan

#: BatchNorm types ``bbn_`` acts on.
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
BBN_MODES = ("bbn", "rel")


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
        "convspec/bounding/bbn.py); consider mode='rel' or skipping this layer",
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



__all__ = ["BATCHNORMS", "BBN_MODES", "bbn_"]
