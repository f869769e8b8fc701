"""Geometry of every convolution PyTorch has, exactly as its module applies it.

Every other module describes a convolution through :class:`ConvGeometry`: the weight's channel
counts and kernel size, the input size, and per spatial axis the stride, dilation, the padding on
each side and the padding mode. Conv1d/2d/3d and ConvTranspose1d/2d/3d (and their ``Lazy*`` forms
once initialised) all map to one geometry; validation lives here, so every public function rejects
bad input with the same ``ValueError`` messages, and :func:`geometry_of` is the one place where a
module is unpacked into its arguments.

Note [conv view]: a geometry always describes a *convolution* ``C`` (pad, then
``F.conv{1,2,3}d``) with weight ``(out, in // groups, *k)``. For a convolution layer the layer's
operator is ``M = C``. A transposed layer with weight ``(in, out // groups, *k)``, stride ``s``,
padding ``p``, output padding ``o`` and dilation ``d`` computes the adjoint of the convolution that
uses the *same* weight tensor as-is, reads an input of the transposed layer's *output* size
``L = (N - 1) s - 2 p + d (k - 1) + o + 1`` and pads it by ``p`` below and ``p - o`` above (a
negative pad crops: the last ``o`` output positions of the transposed layer receive no input). So
``M = C^T``: its singular values are those of ``C``, ``||M^T M||_F = ||C^T C||_F`` and the
identity of the penalty has the transposed layer's input dimension. ``geom.transposed`` records
which; ``layer_*`` properties and :func:`layer_forward` speak of the layer, the rest of ``C``.

Per spatial axis, output position ``y`` of ``C`` reads the unpadded input position

    t = stride * y - pad_lo + dilation * p,        p = 0, ..., k - 1,

redirected to the input position :meth:`AxisGeometry.source` gives: dropped outside ``[0, N)``
for ``'zeros'``, ``t mod N`` for ``'circular'``, mirrored without repeating the edge for
``'reflect'`` (``-t``, ``2 (N - 1) - t``), clamped to ``[0, N - 1]`` for ``'replicate'``. Each
mode is linear, so ``C`` is a matrix whatever the mode.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IntTuple = Union[int, Sequence[int]]
IntPair = IntTuple  # kept for the 2-D signatures
Padding = Union[str, int, Sequence[int]]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")

#: Convolution modules whose geometry :func:`geometry_of` reads (``Lazy*`` forms subclass them).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _Unset:
    """Sentinel for keyword arguments a module supplies (see :func:`resolve`)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):
        return (_Unset, ())


UNSET = _Unset()


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of a convolution: input size, kernel size, stride, dilation, padding.

    ``pad_hi`` may be negative (the conv view of a transposed layer with output padding: the
    last ``-pad_hi`` input positions are never read).
    """

    size: int
    kernel: int
    stride: int
    dilation: int
    pad_lo: int
    pad_hi: int
    mode: str = "zeros"

    @property
    def circular(self) -> bool:
        return self.mode == "circular"

    @property
    def out_size(self) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return (self.size + self.pad_lo + self.pad_hi - span) // self.stride + 1

    def tap(self, y: int, p: int) -> int:
        """Unpadded input position ``t`` read by output ``y`` through kernel offset ``p``."""
        return self.stride * y - self.pad_lo + self.dilation * p

    def source(self, t: int) -> Optional[int]:
        """The input position a padded position ``t`` copies (``None``: a zero)."""
        n = self.size
        if 0 <= t < n:
            return t
        if self.mode == "zeros":
            return None
        if self.mode == "circular":
            return t % n
        if self.mode == "replicate":
            return 0 if t < 0 else n - 1
        return -t if t < 0 else 2 * (n - 1) - t  # reflect (pads < n, checked on construction)

    def sources(self) -> np.ndarray:
        """``source(t)`` for every padded position ``t = -pad_lo, ..., N + pad_hi - 1`` (-1: zero).

        Vectorised: ``O(N + pad)`` without a Python loop over positions.
        """
        t = np.arange(-self.pad_lo, self.size + self.pad_hi, dtype=np.int64)
        n = self.size
        if self.mode == "zeros":
            return np.where((t >= 0) & (t < n), t, -1)
        if self.mode == "circular":
            return np.mod(t, n)
        if self.mode == "replicate":
            return np.clip(t, 0, n - 1)
        return np.where(t < 0, -t, np.where(t >= n, 2 * (n - 1) - t, t))  # reflect

    def tap_positions(self) -> np.ndarray:
        """``(k, P)``: the input position output ``y`` reads through tap ``p`` (-1: a zero).

        ``O(k P)``, unlike the ``(k, P, N)`` :meth:`tap_matrices`: usable at any ``N``.
        """
        t = (self.stride * np.arange(self.out_size)[None, :]
             + self.dilation * np.arange(self.kernel)[:, None])  # padded index t + pad_lo
        return self.sources()[t]

    def preimages(self, x: int) -> Tuple[int, ...]:
        """Every padded position ``t`` whose :meth:`source` is the input position ``x``."""
        lo, hi, n = -self.pad_lo, self.size + self.pad_hi, self.size
        if self.mode == "zeros":
            cands = [x]
        elif self.mode == "circular":
            cands = [x + m * n for m in range(-((x - lo) // n) - 1, (hi - x) // n + 2)]
        elif self.mode == "reflect":
            cands = [x, -x, 2 * (n - 1) - x]
        else:  # replicate
            cands = [x]
            if x == 0:
                cands += list(range(lo, 0))
            if x == n - 1:
                cands += list(range(n, hi))
        return tuple(sorted({t for t in cands if lo <= t < hi and self.source(t) == x}))

    def safe_range(self) -> Tuple[int, int]:
        """``(lo, hi)``: input positions ``lo <= x <= hi`` copied by no padded position but ``x``."""
        n = self.size
        if self.mode == "zeros":
            return 0, n - 1
        if self.mode == "circular":
            return max(self.pad_hi, 0), n - 1 - self.pad_lo
        if self.mode == "reflect":
            return self.pad_lo + 1, n - 2 - max(self.pad_hi, 0)
        return (1 if self.pad_lo else 0), (n - 2 if self.pad_hi > 0 else n - 1)

    def tap_matrices(self) -> np.ndarray:
        """``A_p`` as an array ``(k, P, N)``: ``A_p[y, x]`` = 1 iff output ``y`` reads ``x`` via ``p``."""
        a = np.zeros((self.kernel, self.out_size, self.size))
        for p in range(self.kernel):
            for y in range(self.out_size):
                x = self.source(self.tap(y, p))
                if x is not None:
                    a[p, y, x] += 1
        return a


@dataclass(frozen=True)
class ConvGeometry:
    """A validated convolution ``C`` (Note [conv view]): weight ``(out, in // groups, *k)``.

    ``transposed`` marks the conv view of a transposed layer, whose operator is ``C^T``.
    """

    out_channels: int
    in_channels: int
    groups: int
    axes: Tuple[AxisGeometry, ...]
    padding_mode: str
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(ax.kernel for ax in self.axes)

    @property
    def input_size(self) -> Tuple[int, ...]:
        return tuple(ax.size for ax in self.axes)

    @property
    def output_size(self) -> Tuple[int, ...]:
        return tuple(ax.out_size for ax in self.axes)

    @property
    def n_in(self) -> int:
        """Number of columns of ``C``: ``in_channels * prod(input_size)``."""
        return self.in_channels * math.prod(self.input_size)

    @property
    def n_out(self) -> int:
        """Number of rows of ``C``: ``out_channels * prod(output_size)``."""
        return self.out_channels * math.prod(self.output_size)

    @property
    def pad(self) -> Tuple[int, ...]:
        """Padding in ``F.pad`` order (last axis first): ``(lo_d, hi_d, ..., lo_1, hi_1)``."""
        out: Tuple[int, ...] = ()
        for ax in reversed(self.axes):
            out += (ax.pad_lo, ax.pad_hi)
        return out

    # The layer's own view (Note [conv view]).
    @property
    def layer_in_channels(self) -> int:
        return self.out_channels if self.transposed else self.in_channels

    @property
    def layer_out_channels(self) -> int:
        return self.in_channels if self.transposed else self.out_channels

    @property
    def layer_input_size(self) -> Tuple[int, ...]:
        return self.output_size if self.transposed else self.input_size

    @property
    def layer_output_size(self) -> Tuple[int, ...]:
        return self.input_size if self.transposed else self.output_size

    @property
    def layer_n_in(self) -> int:
        """Columns of the layer's operator ``M`` (its input dimension)."""
        return self.n_out if self.transposed else self.n_in

    @property
    def layer_n_out(self) -> int:
        """Rows of the layer's operator ``M`` (its output dimension)."""
        return self.n_in if self.transposed else self.n_out

    def grouped(self) -> "ConvGeometry":
        """The geometry of one group (``groups=1``, channels divided by ``groups``)."""
        G = self.groups
        return ConvGeometry(self.out_channels // G, self.in_channels // G, 1, self.axes,
                            self.padding_mode, self.transposed)


def _tuple(value, name: str, minimum: int, ndim: int) -> Tuple[int, ...]:
    what = "an int" if ndim == 1 else f"an int or a tuple of {ndim} ints"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Integral):
        out = (int(value),) * ndim
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be {what}, got {value!r}") from None
        if len(out) != ndim or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in out
        ):
            raise ValueError(f"{name} must be {what}, got {value!r}")
        out = tuple(int(v) for v in out)
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    return _tuple(value, name, minimum, 2)  # type: ignore[return-value]


def _shape_of(weight) -> Tuple[int, ...]:
    if isinstance(weight, torch.Tensor):
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                "the weight is an uninitialised lazy parameter: run one forward pass first"
            )
        return tuple(weight.shape)
    if isinstance(weight, torch.Size) or isinstance(weight, (tuple, list)):
        return tuple(int(v) for v in weight)
    raise ValueError(f"weight must be a tensor or a shape, got {type(weight).__name__}")


_AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def conv_geometry(
    weight,
    input_size: IntTuple,
    *,
    stride: IntTuple = 1,
    padding: Padding = 0,
    dilation: IntTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: IntTuple = 0,
) -> ConvGeometry:
    """Validate a convolution's arguments (``nn.Conv{1,2,3}d`` names and defaults) into a geometry.

    ``weight`` is the kernel tensor (or its shape): ``(out, in // groups, *k)`` with 1, 2 or 3
    spatial axes, or for ``transposed=True`` the ``nn.ConvTranspose*d`` weight
    ``(in, out // groups, *k)``. ``input_size`` is the layer's input size (an int or one entry per
    axis). ``padding`` is an int, a tuple, ``'same'`` (stride 1 only; an odd total pad puts the
    extra row on the high side, as PyTorch does) or ``'valid'``; transposed layers take ints and
    ``padding_mode='zeros'`` only, as PyTorch's do. Raises ``ValueError`` naming the argument at
    fault. See Note [conv view] for what a transposed geometry holds.

    >>> g = conv_geometry(torch.empty(8, 4, 3, 3), 32, padding=1)
    >>> g.output_size, g.n_in, g.n_out
    ((32, 32), 4096, 8192)
    >>> t = conv_geometry(torch.empty(4, 8, 3), 10, stride=2, padding=1, output_padding=1,
    ...                   transposed=True)
    >>> t.layer_input_size, t.layer_output_size
    ((10,), (20,))
    """
    shape = _shape_of(weight)
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            "weight must have 1, 2 or 3 spatial axes: (out_channels, in_channels // groups, "
            f"*kernel_size) with 3 to 5 dimensions, got shape {shape}"
        )
    if min(shape) < 1:
        raise ValueError(f"weight has an empty dimension: shape {shape}")
    ndim = len(shape) - 2
    names = _AXIS_NAMES[ndim]
    out_ch, in_per_group, *ks = shape
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
    if out_ch % groups != 0:
        what = "in_channels" if transposed else "out_channels"
        raise ValueError(
            f"{what} ({out_ch}) of the weight is not divisible by groups ({groups})"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed must be True or False, got {transposed!r}")
    n = _tuple(input_size, "input_size", 1, ndim)
    s = _tuple(stride, "stride", 1, ndim)
    d = _tuple(dilation, "dilation", 1, ndim)

    if transposed:
        if padding_mode != "zeros":
            raise ValueError(
                f"transposed convolutions support only padding_mode='zeros' (as in PyTorch), "
                f"got {padding_mode!r}"
            )
        if isinstance(padding, str):
            raise ValueError(f"transposed convolutions take integer padding, got {padding!r}")
        p = _tuple(padding, "padding", 0, ndim)
        op = _tuple(output_padding, "output_padding", 0, ndim)
        axes = []
        for name, ni, k, si, di, pi, oi in zip(names, n, ks, s, d, p, op):
            if oi >= max(si, di):
                raise ValueError(
                    f"output_padding {oi} along the {name} must be smaller than the stride {si} "
                    f"or the dilation {di} (as in PyTorch)"
                )
            size = (ni - 1) * si - 2 * pi + di * (k - 1) + oi + 1
            if size < 1:
                raise ValueError(
                    f"input {name} {ni} is too small for a transposed kernel of size {k} with "
                    f"stride {si}, dilation {di} and padding {pi}: the output would be empty"
                )
            ax = AxisGeometry(size, k, si, di, pi, pi - oi, "zeros")
            assert ax.out_size == ni, (ax, ni)
            axes.append(ax)
        return ConvGeometry(out_ch, in_per_group * groups, groups, tuple(axes), "zeros", True)

    if not (isinstance(output_padding, numbers.Integral) and output_padding == 0):
        if _tuple(output_padding, "output_padding", 0, ndim) != (0,) * ndim:
            raise ValueError("output_padding applies to transposed convolutions only")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * ndim
        elif padding == "same":
            if any(si != 1 for si in s):
                raise ValueError(
                    "padding='same' is not supported with stride > 1 (as in nn.Conv2d)"
                )
            pads = [(t // 2, t - t // 2) for t in (di * (k - 1) for di, k in zip(d, ks))]
        else:
            raise ValueError(
                f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}"
            )
    else:
        pads = [(v, v) for v in _tuple(padding, "padding", 0, ndim)]

    axes = []
    for name, ni, k, si, di, (lo, hi) in zip(names, n, ks, s, d, pads):
        if padding_mode == "circular" and max(lo, hi) > ni:
            raise ValueError(
                f"circular padding of {max(lo, hi)} exceeds the input {name} {ni} "
                "(it would wrap around more than once)"
            )
        if padding_mode == "reflect" and max(lo, hi) >= ni:
            raise ValueError(
                f"reflect padding of {max(lo, hi)} must be smaller than the input {name} {ni} "
                "(as in PyTorch)"
            )
        ax = AxisGeometry(ni, k, si, di, lo, hi, padding_mode)
        if ax.out_size < 1:
            raise ValueError(
                f"input {name} {ni} is too small for a kernel of size {k} with dilation {di} "
                f"and padding ({lo}, {hi}): the output would be empty"
            )
        axes.append(ax)
    return ConvGeometry(out_ch, in_per_group * groups, groups, tuple(axes), padding_mode, False)


def is_conv(module) -> bool:
    """True for every convolution module :func:`geometry_of` reads (incl. initialised ``Lazy*``)."""
    return isinstance(module, CONV_TYPES + TRANSPOSED_TYPES)


def geometry_of(module: nn.Module, input_size: IntTuple) -> ConvGeometry:
    """The geometry of ``module`` (any ``nn.Conv*d`` or ``nn.ConvTranspose*d``) on ``input_size``.

    The one place where a module is unpacked into its arguments. ``input_size`` is the spatial
    size of the layer's input (an int, or one entry per spatial axis). A ``Lazy*`` module must
    have run a forward pass; a transposed module uses its ``output_padding`` attribute (not an
    ``output_size`` passed to its ``forward``).

    >>> geometry_of(nn.ConvTranspose1d(4, 2, 3, stride=2), 5).layer_output_size
    (11,)
    """
    if not is_conv(module):
        raise ValueError(
            f"expected a convolution module (nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d), "
            f"got {type(module).__name__}"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{type(module).__name__} is an uninitialised lazy module: run one forward pass first"
        )
    return conv_geometry(module.weight, input_size, **module_keywords(module))


def module_keywords(module: nn.Module) -> dict:
    """The geometry keywords of a convolution module (``stride`` ... ``output_padding``), as
    :func:`conv_geometry` takes them: what :func:`geometry_of` reads, for callers that keep
    them without the module (a parametrization of the module's weight)."""
    transposed = isinstance(module, TRANSPOSED_TYPES)
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups, padding_mode=module.padding_mode, transposed=transposed,
                output_padding=module.output_padding if transposed else 0)


def resolve(conv, input_size: IntTuple, *, stride=UNSET, padding=UNSET, dilation=UNSET,
            groups=UNSET, padding_mode=UNSET, transposed=UNSET, output_padding=UNSET):
    """``(weight, geometry)`` from a module, or from a weight and keywords (``nn.Conv*d`` defaults).

    A module supplies its own geometry: restating it in keywords raises ``ValueError`` (a
    mismatch would silently describe another operator).
    """
    given = {k: v for k, v in dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    ).items() if v is not UNSET}
    if isinstance(conv, nn.Module):
        if given:
            raise ValueError(
                f"{type(conv).__name__} defines its own geometry; do not pass "
                f"{', '.join(sorted(given))} with a module (pass module.weight to override)"
            )
        return conv.weight, geometry_of(conv, input_size)
    if not isinstance(conv, torch.Tensor):
        raise ValueError(
            f"expected a convolution module or a weight tensor, got {type(conv).__name__}"
        )
    return conv, conv_geometry(conv, input_size, **given)


def check_finite(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise ``ValueError`` if ``weight`` holds NaN or Inf.

    Skipped while ``torch.compile`` traces (a data-dependent branch would split the graph, and
    a check would synchronise the device every step): a non-finite weight then gives a
    non-finite result instead of the error.
    """
    if torch.compiler.is_compiling():
        return
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


# --------------------------------------------------------------------------------------------
# Applying C and C^T

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _index(ax: AxisGeometry, device) -> Tuple[torch.Tensor, bool]:
    """Gather index of the padded axis into the input extended by one zero; identity flag."""
    src = ax.sources()
    identity = ax.pad_lo == 0 and ax.pad_hi == 0
    src = np.where(src < 0, ax.size, src)
    return torch.as_tensor(src, device=device), identity


def _pad(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """The padded input: every padded position a copy of its source, or zero (any mode)."""
    for i, ax in enumerate(geom.axes):
        idx, identity = _index(ax, x.device)
        if identity:
            continue
        dim = x.dim() - geom.ndim + i
        if ax.mode == "zeros" and ax.pad_lo >= 0 and ax.pad_hi >= 0:
            pad = [0, 0] * (x.dim() - dim - 1) + [ax.pad_lo, ax.pad_hi]
            x = F.pad(x, pad)
            continue
        zero_shape = list(x.shape)
        zero_shape[dim] = 1
        ext = torch.cat([x, x.new_zeros(zero_shape)], dim=dim)
        x = ext.index_select(dim, idx)
    return x


def _unpad(z: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Adjoint of :func:`_pad`: each padded position's value added onto its source."""
    for i, ax in enumerate(geom.axes):
        idx, identity = _index(ax, z.device)
        if identity:
            continue
        dim = z.dim() - geom.ndim + i
        if ax.mode == "zeros" and ax.pad_lo >= 0 and ax.pad_hi >= 0:
            z = z.narrow(dim, ax.pad_lo, ax.size)
            continue
        shape = list(z.shape)
        shape[dim] = ax.size + 1
        z = z.new_zeros(shape).index_add_(dim, idx, z).narrow(dim, 0, ax.size)
    return z


def conv_forward(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``C x`` for a batch ``x`` of shape ``(B, in, *input_size)`` (no bias), any padding mode."""
    return _CONV[geom.ndim](
        _pad(x, geom), weight, stride=tuple(ax.stride for ax in geom.axes),
        dilation=tuple(ax.dilation for ax in geom.axes), groups=geom.groups,
    )


def conv_adjoint(y: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``C^T y`` for a batch ``y`` of shape ``(B, out, *output_size)``: the adjoint of
    :func:`conv_forward` (a transposed convolution, then the padding folded back)."""
    z = _CONV_T[geom.ndim](
        y, weight, stride=tuple(ax.stride for ax in geom.axes),
        dilation=tuple(ax.dilation for ax in geom.axes), groups=geom.groups,
    )
    # Padded positions beyond the last one any output reads get no gradient: zero-extend.
    extra = []
    for ax, have in zip(reversed(geom.axes), reversed(z.shape[2:])):
        extra += [0, ax.size + ax.pad_lo + ax.pad_hi - have]
    if any(extra):
        z = F.pad(z, extra)
    return _unpad(z, geom)


def layer_forward(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``M x``: what the layer computes (no bias) on a batch of its inputs."""
    return conv_adjoint(x, weight, geom) if geom.transposed else conv_forward(x, weight, geom)


def layer_adjoint(y: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``M^T y`` on a batch of the layer's outputs."""
    return conv_forward(y, weight, geom) if geom.transposed else conv_adjoint(y, weight, geom)


def conv2d(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """:func:`conv_forward` (the name the 2-D code used)."""
    return conv_forward(x, weight, geom)


# --------------------------------------------------------------------------------------------
# Per-axis structure of C (used by the penalty and the spectra alike)

# Note [structure of M]: per spatial axis let A_p (P x N) be the 0/1 matrix with A_p[y, x] = 1
# iff output y reads input x through kernel offset p (AxisGeometry.tap_matrices). Then, with
# K_P = weight[:, :, p_1, ..., p_d] (h x g) for a multi-index P,
#
#     C = sum_P K_P (x) A_{p_1} (x) ... (x) A_{p_d}                 ((x): Kronecker product)
#     ||C C^T||_F^2 = sum_{P,P',R,R'} <K_P K_P'^T, K_R K_R'^T> prod_i Q_i[p_i p_i', r_i r_i']
#
# with Q[pp', rr'] = <A_p A_p'^T, A_r A_r'^T>_F, a k^2 x k^2 PSD matrix per axis that depends on
# the axis geometry only, and ||C||_F^2 = sum_{P,P'} <K_P, K_P'> prod_i D_i[p_i, p_i'] with
# D[p, p'] = trace(A_p A_p'^T) (off-diagonal only when two taps of one output land on one input:
# circular wrap, reflect or replicate).


def axis_pair_sums(ax: AxisGeometry) -> Tuple[np.ndarray, np.ndarray]:
    """Per-axis constants ``(Q, D)`` of Note [structure of M], in time independent of ``N``.

    ``Q`` is ``(k^2, k^2)``: ``sum_{y,y'} e(y,y') e(y,y')^T`` over all pairs of output positions,
    where ``e(y, y')[p, p'] = (A_p A_p'^T)[y, y']`` (1 iff taps ``p`` of ``y`` and ``p'`` of ``y'``
    read the same input); ``D`` is ``(k, k)``: ``D[p, p'] = sum_y e(y, y)[p, p']``.
    """
    k, s, d, P = ax.kernel, ax.stride, ax.dilation, ax.out_size
    offsets = d * np.arange(k)
    reach = d * (k - 1) // s  # |y - y'| beyond which interior outputs share no input

    # Note [boundary classes]: e(y, y + t) depends on y only through where the taps of y and of
    # its partners land. For an "interior" y -- every tap inside the safe range (input positions
    # that no padded position copies but themselves) and y +- reach both outputs -- a partner
    # shares an input only by reading the same unpadded position, so e(y, y + t) depends on t
    # alone and one representative with a multiplicity stands for all of them. The other outputs
    # lie within a distance of either end set by padding, dilation and stride: their number does
    # not grow with N.
    safe_lo, safe_hi = ax.safe_range()
    y_lo = max(reach, -(-(safe_lo + ax.pad_lo) // s))
    y_hi = min(P - 1 - reach, (safe_hi + ax.pad_lo - d * (k - 1)) // s)
    if y_lo <= y_hi:
        reps = [(y, 1) for y in range(0, y_lo)] + [(y_lo, y_hi - y_lo + 1)]
        reps += [(y, 1) for y in range(y_hi + 1, P)]
    else:
        reps = [(y, 1) for y in range(P)]

    q = np.zeros((k * k, k * k), dtype=np.float64)
    diag = np.zeros((k, k), dtype=np.float64)
    for y, w in reps:
        src = np.array([-1 if (x := ax.source(ax.tap(y, p))) is None else x for p in range(k)])
        partners = set()
        for x in set(src[src >= 0].tolist()):
            for t in ax.preimages(x):
                for p2 in range(k):
                    num = t + ax.pad_lo - d * p2
                    if num % s == 0 and 0 <= num // s < P:
                        partners.add(num // s)
        for y2 in partners:
            src2 = np.array(
                [-1 if (x := ax.source(ax.tap(y2, p))) is None else x for p in range(k)]
            )
            e = ((src[:, None] == src2[None, :]) & (src[:, None] >= 0)).astype(np.float64)
            v = e.reshape(-1)
            q += w * np.outer(v, v)
            if y2 == y:
                diag += w * e
    return q, diag


__all__ = [
    "AxisGeometry", "ConvGeometry", "CONV_TYPES", "TRANSPOSED_TYPES", "PADDING_MODES", "UNSET",
    "axis_pair_sums", "check_finite", "check_real", "check_weight", "check_weight_dtype",
    "conv2d", "conv_adjoint", "conv_forward", "conv_geometry", "geometry_of", "is_conv",
    "layer_adjoint", "layer_forward", "resolve",
]
