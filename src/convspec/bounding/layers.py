"""Which modules SVB acts on, and the matrices it reads from their weights.

Walks a model (or an iterable of modules) once, applies ``layers`` and ``skip``, validates each
weight (stored, initialised, floating point) and views it as a stack of per-group matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

from .._geometry import check_weight_dtype

#: Layer types whose weight ``svb_`` knows how to reshape (transposed convolutions are not:
#: their weight is ``(in, out // groups, *k)``).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Skip = Union[None, Callable[[str, nn.Module], bool], Iterable[Union[str, nn.Module]]]


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


__all__ = ["SUPPORTED_LAYERS", "Skip"]
