"""Geometry of a 2-D convolution, exactly as ``nn.Conv2d`` applies it.

Every other module describes a convolution through :class:`ConvGeometry`: the weight's channel
counts and kernel size, the input size, and per spatial axis the stride, dilation and the padding
on each side. Validation lives here so that every public function rejects bad input with the same
``ValueError`` messages.

Per spatial axis, output position ``y`` reads the (unpadded) input position

    x = stride * y - pad_lo + dilation * p,        p = 0, ..., k - 1,

which is dropped when it falls outside ``[0, N)`` for ``padding_mode='zeros'`` and taken modulo
``N`` for ``padding_mode='circular'``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IntPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]

PADDING_MODES = ("zeros", "circular")


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of a convolution: input size, kernel size, stride, dilation, padding."""

    size: int
    kernel: int
    stride: int
    dilation: int
    pad_lo: int
    pad_hi: int
    circular: bool

    @property
    def out_size(self) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return (self.size + self.pad_lo + self.pad_hi - span) // self.stride + 1

    def tap(self, y: int, p: int) -> int:
        """Unwrapped input position read by output ``y`` through kernel offset ``p``."""
        return self.stride * y - self.pad_lo + self.dilation * p


@dataclass(frozen=True)
class ConvGeometry:
    """A validated 2-D convolution: ``weight`` of shape ``(out, in // groups, k1, k2)``."""

    out_channels: int
    in_channels: int
    groups: int
    axes: Tuple[AxisGeometry, AxisGeometry]
    padding_mode: str

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return (self.axes[0].kernel, self.axes[1].kernel)

    @property
    def input_size(self) -> Tuple[int, int]:
        return (self.axes[0].size, self.axes[1].size)

    @property
    def output_size(self) -> Tuple[int, int]:
        return (self.axes[0].out_size, self.axes[1].out_size)

    @property
    def n_in(self) -> int:
        """Number of columns of the operator: ``in_channels * N1 * N2``."""
        return self.in_channels * self.axes[0].size * self.axes[1].size

    @property
    def n_out(self) -> int:
        """Number of rows of the operator: ``out_channels * P1 * P2``."""
        return self.out_channels * self.axes[0].out_size * self.axes[1].out_size

    @property
    def pad(self) -> Tuple[int, int, int, int]:
        """Padding in ``F.pad`` order: (left, right, top, bottom)."""
        a, b = self.axes
        return (b.pad_lo, b.pad_hi, a.pad_lo, a.pad_hi)


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _shape_of(weight) -> Tuple[int, ...]:
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    if isinstance(weight, torch.Size) or isinstance(weight, (tuple, list)):
        return tuple(int(v) for v in weight)
    raise ValueError(f"weight must be a tensor or a shape, got {type(weight).__name__}")


def conv_geometry(
    weight,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: Padding = "same",
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """Validate a convolution's arguments (``nn.Conv2d`` names and semantics) into a geometry.

    ``weight`` is the kernel tensor (or its shape) ``(out, in // groups, k1, k2)``. ``padding`` is
    an int, a pair, ``'same'`` (stride 1 only; an odd total pad puts the extra row on the high
    side, as PyTorch does) or ``'valid'`` (no padding). Raises ``ValueError`` naming the argument
    at fault.

    >>> g = conv_geometry(torch.empty(8, 4, 3, 3), 32)
    >>> g.output_size, g.n_in, g.n_out
    ((32, 32), 4096, 8192)
    """
    shape = _shape_of(weight)
    if len(shape) != 4:
        raise ValueError(
            f"weight must be 4-D (out_channels, in_channels // groups, kH, kW), got shape {shape}"
        )
    if min(shape) < 1:
        raise ValueError(f"weight has an empty dimension: shape {shape}")
    out_ch, in_per_group, k1, k2 = shape
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if out_ch % groups != 0:
        raise ValueError(
            f"out_channels ({out_ch}) of the weight is not divisible by groups ({groups})"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r} "
            "(reflect and replicate padding are not supported)"
        )
    n1, n2 = _pair(input_size, "input_size", 1)
    s1, s2 = _pair(stride, "stride", 1)
    d1, d2 = _pair(dilation, "dilation", 1)

    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0), (0, 0))
        elif padding == "same":
            if (s1, s2) != (1, 1):
                raise ValueError("padding='same' is not supported with stride > 1 (as in nn.Conv2d)")
            pads = tuple(
                (total // 2, total - total // 2) for total in (d1 * (k1 - 1), d2 * (k2 - 1))
            )
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pa, pb = _pair(padding, "padding", 0)
        pads = ((pa, pa), (pb, pb))

    axes = []
    for name, n, k, s, d, (lo, hi) in (
        ("height", n1, k1, s1, d1, pads[0]),
        ("width", n2, k2, s2, d2, pads[1]),
    ):
        if padding_mode == "circular" and max(lo, hi) > n:
            raise ValueError(
                f"circular padding of {max(lo, hi)} exceeds the input {name} {n} "
                "(it would wrap around more than once)"
            )
        ax = AxisGeometry(n, k, s, d, lo, hi, padding_mode == "circular")
        if ax.out_size < 1:
            raise ValueError(
                f"input {name} {n} is too small for a kernel of size {k} with dilation {d} "
                f"and padding ({lo}, {hi}): the output would be empty"
            )
        axes.append(ax)
    return ConvGeometry(out_ch, in_per_group * groups, groups, (axes[0], axes[1]), padding_mode)


def check_finite(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise ``ValueError`` if ``weight`` holds NaN or Inf."""
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what} contains NaN or Inf values")


#: Weight dtypes the library accepts. float16 and bfloat16 weights are computed in float32.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weight_dtype(weight, what: str = "weight") -> None:
    """Raise ``ValueError`` naming the dtype unless ``weight`` is a real floating-point tensor.

    Integer and bool weights would be silently rounded (geometry constants cast to their dtype),
    complex ones give complex "penalties"; float8 types have no arithmetic to speak of.

    >>> check_weight_dtype(torch.ones(2, dtype=torch.int64))
    Traceback (most recent call last):
    ...
    ValueError: weight must be a real floating-point tensor (float16, bfloat16, float32 or float64), got dtype torch.int64
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be a real floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {weight.dtype}"
        )


def check_weight(weight, what: str = "weight") -> None:
    """:func:`check_weight_dtype`, then :func:`check_finite`: what every weight goes through."""
    check_weight_dtype(weight, what)
    check_finite(weight, what)


def check_real(value, name: str) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite real number.

    Accepts Python and NumPy numbers and one-element real floating tensors (not bool).
    """
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and value.dtype in FLOAT_DTYPES
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        out = float(value)
        if math.isfinite(out):
            return out
    raise ValueError(f"{name} must be a finite real number, got {value!r}")


def conv2d(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Apply the convolution described by ``geom`` exactly as ``nn.Conv2d`` does (no bias)."""
    a, b = geom.axes
    mode = "circular" if geom.padding_mode == "circular" else "constant"
    if any(geom.pad):
        x = F.pad(x, geom.pad, mode=mode)
    return F.conv2d(
        x, weight, stride=(a.stride, b.stride), dilation=(a.dilation, b.dilation), groups=geom.groups
    )


__all__ = [
    "AxisGeometry", "ConvGeometry", "conv_geometry", "conv2d", "check_finite", "check_real",
    "check_weight", "check_weight_dtype",
]
