"""Which modules SVB acts on, and the matrices it reads from their weights.

Walks a model (or an iterable of modules) once, applies ``layers`` and ``skip``, validates each
weight (stored, initialised, floating point) and views it as a stack of per-group matrices
(Note [the bounded matrix of each layer type]). :func:`convspec.svb_`, :func:`convspec.orthogonal_`
and :func:`convspec.delta_orthogonal_` all read weights through here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .._geometry import check_weight_dtype

# Note [the bounded matrix of each layer type]: SVB bounds, per group j, the matrix that the layer
# applies to one patch of its input, which is a reshape of group j's block of the weight (rows
# j * r .. (j+1) * r - 1 of ``weight.reshape(weight.shape[0], -1)``, r = weight.shape[0] / groups):
#
#   Linear           (out, in)               W itself, out x in.
#   Conv{1,2,3}d     (out, in/g, *k)         W_j, (out/g) x (in/g * prod k): output channels of
#                                             group j against its input channels x taps.
#   ConvTranspose    (in, out/g, *k)         W_j, (in/g) x (out/g * prod k): input channels of
#   {1,2,3}d                                  group j against its output channels x taps.
#
# For a convolution, W_j is Jia et al.'s reshaped kernel: every output position is W_j times the
# flattened (in/g, *k) input patch (im2col), so the operator is (I (x) W) after im2col; on an
# input exactly one patch large (padding 0) the operator *is* block-diag_j(W_j).
#
# A transposed convolution is the adjoint of the convolution (out -> in channels) that has the same
# weight tensor (``F.conv_transpose`` is the input-gradient of ``F.conv``), so its operator is
# M_conv^T = col2im after (I (x) W^T): every input position's (in/g) channel vector x becomes the
# (out/g, *k) output patch W_j^T x, added into the output. So W_j^T is the transposed layer's
# per-patch matrix (on a one-pixel input with padding 0 its operator *is* block-diag_j(W_j^T)),
# W_j is the reshaped kernel of the convolution it is the adjoint of, and the two have the same
# singular values: bounding W_j is the analogue of Jia's reshaped kernel. It is also a view of the
# weight (no permutation). The other reshape, (out/g) x (in/g * prod k) through the output
# channels (the reshaped kernel of the stride-1 forward convolution with flipped taps that equals
# the layer at stride 1), has different singular values and is not used: at stride > 1 that
# forward convolution runs on a zero-stuffed input, so no output position sees all its columns,
# and when patches do not overlap (stride == kernel_size, dilation 1, padding 0) the operator is
# block-diag(W_j^T), whose singular values are those of W_j, not of the other reshape (both tested
# against the dense operator in tests/test_bounding_layers.py).

#: Convolutions (and their ``Lazy*`` forms, which are subclasses) whose weight is
#: ``(out, in // groups, *k)``.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Transposed convolutions (and ``Lazy*`` forms), whose weight is ``(in, out // groups, *k)``.
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layer types whose weight ``svb_`` and ``orthogonal_`` read as matrices (the default
#: ``layers``), see Note [the bounded matrix of each layer type].
SUPPORTED_LAYERS = (nn.Linear,) + CONVS + TRANSPOSED_CONVS

Skip = Union[None, Callable[[str, nn.Module], bool], Iterable[Union[str, nn.Module]]]


def _matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` as ``(groups, weight.shape[0] // groups, -1)``: group j's block of rows, a view
    where the layout allows (the one reshape every SVB and init path goes through)."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


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
                f"layers must be subclasses of nn.Linear, nn.Conv1d/2d/3d or "
                f"nn.ConvTranspose1d/2d/3d, got {cls!r}"
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
        raise ValueError(
            f"layer {label!r} ({type(module).__name__}) is lazy and not initialised yet: it has no "
            "weight to read; run a forward pass first, or exclude it with skip="
        )
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
        """The weight as ``(groups, rows, cols)``, a view (Note [the bounded matrix ...]).

        ``rows x cols`` is ``out x in`` (Linear), ``(out // groups) x (in // groups * prod(k))``
        (convolution) or ``(in // groups) x (out // groups * prod(k))`` (transposed convolution).
        """
        return _matrices(self.weight.detach(), self.groups)


def _collect_layers(
    modules, layers, skip, caller: str = "svb_", stacklevel: int = 4
) -> List[_Layer]:
    """The layers of ``modules`` that are instances of ``layers`` and not skipped, validated.

    Raises ``ValueError`` naming the layer for anything that cannot be read (parametrized,
    not a Parameter, lazy and uninitialised, not floating point, wrong shape). A convolution
    that is none of the types above (a custom ``_ConvNd`` subclass) is named in a
    ``RuntimeWarning``, not skipped silently.
    """
    layers = _check_layers(layers)
    skipped = _skip_predicate(skip)
    found: List[_Layer] = []
    unknown: List[str] = []
    seen_weights = set()
    for name, module in _iter_named_modules(modules):
        if not isinstance(module, layers):
            if isinstance(module, _ConvNd) and not isinstance(module, SUPPORTED_LAYERS):
                if not skipped(name, module):
                    unknown.append(f"{name or '<model>'!r} ({type(module).__name__})")
            continue
        if skipped(name, module):
            continue
        weight = _weight_of(name, module)
        if id(weight) in seen_weights:  # tied weights: bound once
            continue
        seen_weights.add(id(weight))
        groups = getattr(module, "groups", 1)
        expected = 2 if isinstance(module, nn.Linear) else 2 + len(module.kernel_size)
        if weight.dim() != expected or weight.shape[0] % groups != 0 or weight.numel() == 0:
            first = "in_channels" if getattr(module, "transposed", False) else "out_channels"
            raise ValueError(
                f"layer {name or '<model>'!r}: weight has shape {tuple(weight.shape)}, expected "
                f"{expected} dimensions with {first} divisible by groups={groups}"
            )
        found.append(_Layer(len(found), name, module, weight, groups))
    if unknown:
        warnings.warn(
            f"{caller}: layer(s) {', '.join(unknown)}: a convolution type convspec does not "
            "know, left unchanged; supported: nn.Linear, nn.Conv1d/2d/3d, "
            "nn.ConvTranspose1d/2d/3d (pass skip= to silence this)",
            RuntimeWarning,
            stacklevel=stacklevel,  # the caller of svb_ (via _plan_svb) or of orthogonal_
        )
    return found


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf, in one reduction: a sum is finite only if every entry
    is (NaN and Inf propagate; Inf - Inf is NaN), and ``torch.isfinite(t).all()`` costs three
    passes and a mask (126 ms against 5 ms for a 33M-entry float32 weight on one CPU thread).
    A sum that overflows although every entry is finite is rechecked entry by entry."""
    if bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)))):
        return True
    return bool(torch.isfinite(t).all())


def _first_nonfinite(tensors: Sequence[torch.Tensor]) -> int:
    for i, t in enumerate(tensors):
        if not _all_finite(t):
            return i
    return -1


__all__ = ["CONVS", "SUPPORTED_LAYERS", "Skip", "TRANSPOSED_CONVS"]
