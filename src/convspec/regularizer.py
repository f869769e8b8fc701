"""A model-level Frobenius penalty: the exact ``||M^T M - alpha I||_F^2`` summed over all layers."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import reduce
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ._geometry import (
    CONV_TYPES, TRANSPOSED_TYPES, check_finite, check_real, check_weight, check_weight_dtype,
    conv_geometry, geometry_of, is_conv,
)
from ._precision import compute_dtype, no_autocast, to_weight_dtype
from .penalty import _constants, _frobenius_value, _gram_terms, _rows, _side

#: Module attribute where the forward pre-hook records the input sizes a convolution has seen.
SIZES_ATTR = "_convspec_input_sizes"
#: A layer seen at more distinct input sizes than this triggers a warning (each size costs a term).
MANY_SIZES = 16

_NDIM = {**{t: i + 1 for i, t in enumerate(CONV_TYPES)},
         **{t: i + 1 for i, t in enumerate(TRANSPOSED_TYPES)}}


def _spatial_ndim(module: nn.Module) -> int:
    for t, d in _NDIM.items():
        if isinstance(module, t):
            return d
    raise ValueError(f"not a convolution: {type(module).__name__}")


# Note [size hook]: the hook is a module-level function and the sizes live on the module itself
# (a plain dict, keys in the order first seen). Nothing in the model then refers to the
# regularizer: torch.save(model) pickles the hook by name and the sizes as data, and a deepcopy of
# the model (an EMA copy) records into its own copy of the dict, never into the original's.
def record_input_size(module: nn.Module, args) -> None:
    """Forward pre-hook: add the spatial size of the layer's input to ``module``'s record."""
    d = _spatial_ndim(module)
    size = tuple(int(n) for n in args[0].shape[-d:])
    sizes = module.__dict__.get(SIZES_ATTR)
    if sizes is None:
        sizes = {}
        module.__dict__[SIZES_ATTR] = sizes
    if size not in sizes:
        sizes[size] = None


# Note [batched penalty]: a training step calls the regularizer once, so its Python overhead
# counts as much as its arithmetic for small layers. Everything that depends only on the layers'
# shapes, geometries and recorded input sizes (validation, ``geometry_of``, the constants of
# Note [pair layout]) is computed once into a plan and reused while the ``_signature`` of the
# model is unchanged (a new input size, ``reset_sizes``, a changed weight shape, dtype, device or
# hyperparameter gives a new signature and a new plan). Layers whose Gram problems are identical
# up to the weight (same side, axes, channel counts, compute dtype and device) form one group,
# and their rows are stacked along the leading (batch) dimension of ``_GramSquaredNorm``, which
# already sums over conv groups: one batched call per group instead of one per layer. The stack
# is cut into chunks of at most ``_chunk_bytes`` of pair-layout Gram (Note [pair layout]): on the
# CPU a batched call saves Python overhead (~0.15 ms per call) but its temporaries leave the
# cache; measured per 3 x 3 layer (forward + backward, 1 thread): 16 channels, 0.15 ms stacked
# by 6 vs 0.24-0.37 ms alone; 64 channels, 3.1 ms stacked by 6 vs 1.8 ms alone. With 1 MiB,
# layers of up to ~32 channels share calls (332 KiB each) and larger ones run alone. On an
# accelerator the limit is 256 MiB, in practice one call per group (not measured: no GPU here).
# The plan holds modules (which the regularizer holds anyway) and geometry constants, never a
# weight, so nothing in it goes stale when a weight is replaced and nothing refers back from the
# model.


@dataclass(frozen=True)
class _Member:
    """One layer (at one input size) of a :class:`_Group`."""

    name: str
    module: nn.Module
    linear: bool


@dataclass(frozen=True)
class _Group:
    """Layers sharing batched ``_GramSquaredNorm`` calls, one per chunk ``[start, stop)`` of
    members; ``offset`` is ``alpha^2 sum g N``."""

    members: Tuple[_Member, ...]
    side: str
    groups: Tuple[int, ...]
    chunks: Tuple[Tuple[int, int], ...]
    consts: tuple
    dtype: torch.dtype
    offset: float
    scale: float


def _chunk_bytes(device: torch.device) -> int:
    """Largest pair-layout Gram of one batched call on ``device`` (Note [batched penalty])."""
    return 2**20 if device.type == "cpu" else 256 * 2**20


def _chunks(sizes: List[int], limit: int) -> Tuple[Tuple[int, int], ...]:
    """Consecutive ``[start, stop)`` runs of ``sizes`` summing to at most ``limit`` (>= 1 each)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            out.append((start, i))
            start, total = i, 0
        total += size
    out.append((start, len(sizes)))
    return tuple(out)


def _signature(reg: "FrobeniusRegularizer") -> tuple:
    """What the plan depends on, read cheaply from the modules (Note [batched penalty])."""
    out = [reg.alpha, reg.normalize]
    for conv in reg.convs.values():
        w = conv.weight
        if isinstance(w, nn.parameter.UninitializedParameter):
            return None  # never matches: the plan is built (and raises) on every call
        out.append((tuple(conv.__dict__.get(SIZES_ATTR, ())), tuple(w.shape), w.dtype, w.device,
                    conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
                    getattr(conv, "output_padding", None)))
    for lin in reg.linears.values():
        w = lin.weight
        if isinstance(w, nn.parameter.UninitializedParameter):
            return None
        out.append((tuple(w.shape), w.dtype, w.device))
    return tuple(out)


class FrobeniusRegularizer:
    """Sum of the exact Frobenius penalties of every convolution and linear layer of ``model``.

    Every ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (and their ``Lazy*`` forms) is
    included, with its own geometry and padding mode (:func:`frobenius_penalty` of the module),
    at **every input size it has seen**: a forward pre-hook records the distinct spatial sizes
    of each layer's input (run one forward pass before the first call), and each size
    contributes its own exact term (a layer that sees 32 x 32 and 64 x 64 inputs is penalised
    at both; :meth:`reset_sizes` forgets them). For each ``nn.Linear`` (``W`` of shape
    ``out x in``) the term is ``||W^T W - alpha I||_F^2``, eq. (1.2) of Guo (2019). With
    ``normalize=True`` each term is divided by the dimension of its identity (``g N`` for a conv,
    ``in`` for a linear layer), so that one weight suits layers of any size. Every term is exact
    and costs nothing that grows with the image size.

    The model is left as it behaves without the regularizer: the hook is a module-level function
    and the sizes are stored on each layer (attribute ``_convspec_input_sizes``), so
    ``torch.save(model)`` works with the regularizer attached, and a ``deepcopy`` of the model
    (e.g. an EMA copy) records into its own layers, not into this regularizer. The hook works
    under ``torch.compile``; :meth:`remove` detaches it.

    Every term is computed in float32 or better with ``torch.autocast`` disabled, so the
    regularizer works in mixed-precision training (call it inside or outside the autocast region;
    forward and backward give the values and gradients of the float32 computation). The sum is
    accumulated in that precision and rounded once to the weights' promoted dtype (bfloat16 for
    a bfloat16 model, float32 for a float32 model under autocast): accuracy as in
    :func:`frobenius_penalty`. Weights must be float16, bfloat16, float32 or float64 and ``alpha``
    finite, else ``ValueError`` (naming the layer for a bad dtype).

    >>> model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(8 * 16, 10))
    >>> reg = FrobeniusRegularizer(model, normalize=True)
    >>> _ = model(torch.randn(2, 3, 16))           # records each conv's input size
    >>> loss = reg()                               # add weight * loss to the training loss
    >>> loss.backward()
    >>> reg.input_sizes
    {'0': [(16,)]}

    References: P.-C. Guo, arXiv:1907.11235, eqs. (1.2), (1.3) and Section 5.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 1.0,
        *,
        normalize: bool = False,
        include_linear: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.alpha = check_real(alpha, "alpha")
        self.normalize = normalize
        self.convs: Dict[str, nn.Module] = {}
        self.linears: Dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if is_conv(module):
                if not isinstance(module.weight, nn.parameter.UninitializedParameter):
                    check_weight_dtype(module.weight, f"layer {name!r}: weight")
                self.convs[name] = module
            elif isinstance(module, nn.Linear) and include_linear:
                if not isinstance(module.weight, nn.parameter.UninitializedParameter):
                    check_weight_dtype(module.weight, f"layer {name!r}: weight")
                self.linears[name] = module
        if not self.convs and not self.linears:
            raise ValueError("model has no convolution or nn.Linear layer to regularise")
        self._hooks = []
        for conv in self.convs.values():
            conv.__dict__.setdefault(SIZES_ATTR, {})
            self._hooks.append(conv.register_forward_pre_hook(record_input_size))
        self._warned_many: set = set()
        self._plan: Optional[Tuple[tuple, Tuple[_Group, ...]]] = None

    @property
    def input_sizes(self) -> Dict[str, List[Tuple[int, ...]]]:
        """The distinct input sizes each conv layer has seen, in the order first seen."""
        return {name: list(conv.__dict__.get(SIZES_ATTR, {})) for name, conv in self.convs.items()}

    def reset_sizes(self) -> None:
        """Forget the recorded input sizes (e.g. after a warm-up at another resolution)."""
        for conv in self.convs.values():
            conv.__dict__[SIZES_ATTR] = {}

    def _terms(self) -> Dict[str, Tuple[torch.Tensor, torch.dtype]]:
        """Per layer: the term in float32 or better (autocast off) and its weight's dtype."""
        sizes = self.input_sizes
        self._check_sizes(sizes, stacklevel=4)
        out: Dict[str, Tuple[torch.Tensor, torch.dtype]] = {}
        for name, conv in self.convs.items():
            check_weight(conv.weight, f"layer {name!r}: weight")
            total = None
            for size in sizes[name]:
                geom = geometry_of(conv, size)
                term = _frobenius_value(conv.weight, geom, self.alpha)
                if self.normalize:
                    term = term / geom.layer_n_in
                total = term if total is None else total + term
            out[name] = (total, conv.weight.dtype)
        for name, lin in self.linears.items():
            check_weight_dtype(lin.weight, f"layer {name!r}: weight")
            # W (out x in) is the operator of a 1x1 convolution on a length-1 input, so the same
            # computation (Gram on the smaller side, autocast-proof backward) gives
            # ||W^T W - aI||^2 = ||W W^T||^2 - 2a ||W||^2 + a^2 in.
            w = lin.weight
            geom = conv_geometry((w.shape[0], w.shape[1], 1), 1)
            term = _frobenius_value(w.unsqueeze(-1), geom, self.alpha)
            out[name] = (term / w.shape[1] if self.normalize else term, w.dtype)
        return out
    def penalties(self) -> Dict[str, torch.Tensor]:
        """The term of each layer, by module name, in that layer's weight dtype (differentiable)."""
        return {
            name: to_weight_dtype(term, dtype, f"FrobeniusRegularizer term {name!r}")
            for name, (term, dtype) in self._terms().items()
        }

    def _check_sizes(self, sizes: Dict[str, List[Tuple[int, ...]]], stacklevel: int) -> None:
        missing = [n for n in self.convs if not sizes[n]]
        if missing:
            raise RuntimeError(
                f"no input size recorded for conv layer(s) {missing[:3]}: run a forward pass "
                "of the model before computing the penalty"
            )
        for name in self.convs:
            if len(sizes[name]) > MANY_SIZES and name not in self._warned_many:
                self._warned_many.add(name)
                warnings.warn(
                    f"FrobeniusRegularizer: layer {name!r} has seen {len(sizes[name])} input "
                    "sizes and is penalised at each; call reset_sizes() to forget them",
                    stacklevel=stacklevel,
                )

    def _build_plan(self) -> Tuple[_Group, ...]:
        """The groups of Note [batched penalty], from the current layers and sizes."""
        sizes = self.input_sizes
        self._check_sizes(sizes, stacklevel=6)
        problems: Dict[tuple, list] = {}
        layers = [(n, m, False, geometry_of(m, s)) for n, m in self.convs.items()
                  for s in sizes[n]]
        for name, lin in self.linears.items():
            w = lin.weight
            layers.append((name, lin, True, conv_geometry((w.shape[0], w.shape[1], 1), 1)))
        for name, module, linear, geom in layers:
            w = module.weight
            check_weight_dtype(w, f"layer {name!r}: weight")
            h, gg = w.shape[:2]
            hg = h // geom.groups
            side = _side(w, geom.groups)
            dtype = compute_dtype(w.dtype)
            n_in = geom.layer_n_in
            key = (side, geom.axes, hg, gg, dtype, w.device, n_in if self.normalize else None)
            problems.setdefault(key, []).append((_Member(name, module, linear), geom.groups, n_in))
        groups = []
        for (side, axes, hg, gg, dtype, device, _), entries in problems.items():
            consts = _constants(axes, side, dtype, device)
            n_in = entries[0][2]
            c = gg if side == "in" else hg
            kk = math.prod([ax.kernel for ax in axes])
            size = (kk * c) ** 2 * torch.finfo(dtype).bits // 8  # one conv group's Gram, bytes
            # (lists, not generator expressions: Dynamo traces this under torch.compile)
            groups.append(_Group(
                members=tuple([e[0] for e in entries]), side=side,
                groups=tuple([e[1] for e in entries]),
                chunks=_chunks([e[1] * size for e in entries], _chunk_bytes(device)),
                consts=consts, dtype=dtype,
                offset=self.alpha**2 * sum([e[2] for e in entries]),
                scale=1.0 / n_in if self.normalize else 1.0,
            ))
        return tuple(groups)

    def _groups(self) -> Tuple[_Group, ...]:
        """The cached plan, rebuilt when the signature changes (Note [batched penalty])."""
        if torch.compiler.is_compiling():
            return self._build_plan()  # traced once into the graph; nothing to cache
        signature = _signature(self)
        if self._plan is None or self._plan[0] != signature or signature is None:
            self._plan = None
            self._plan = (signature, self._build_plan())
        return self._plan[1]

    def __call__(self) -> torch.Tensor:
        """The sum of all terms (differentiable), accumulated in float32 or better and rounded
        once to the promoted dtype of the weights."""
        total = None
        dtype = None
        for group in self._groups():
            weights = [m.module.weight for m in group.members]
            dtype = reduce(torch.promote_types, (w.dtype for w in weights),
                           dtype or weights[0].dtype)
            with no_autocast(weights[0].device):
                rows = [_rows(w.to(group.dtype), g, group.side)
                        for w, g in zip(weights, group.groups)]
                term = group.offset
                for start, stop in group.chunks:
                    # Note [batched penalty]: one batched call per chunk of the group.
                    a = rows[start] if stop - start == 1 else torch.cat(rows[start:stop])
                    gram_sq, fro_sq = _gram_terms(a, group.consts)
                    term = term + (gram_sq - 2 * self.alpha * fro_sq)
                # A non-finite weight makes the term non-finite: one check per group, then name
                # the layer (a term that overflows from finite weights is returned as inf).
                if not torch.compiler.is_compiling() and not torch.isfinite(term):
                    for m, w in zip(group.members, weights):
                        check_finite(w, f"layer {m.name!r}: weight")
                if group.scale != 1.0:
                    term = term * group.scale
            total = term if total is None else total + term
        return to_weight_dtype(total, dtype, "FrobeniusRegularizer")

    def remove(self) -> None:
        """Remove the forward pre-hooks (the recorded sizes stay on the layers)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (
            f"FrobeniusRegularizer({len(self.convs)} conv, {len(self.linears)} linear, "
            f"alpha={self.alpha}, normalize={self.normalize})"
        )
