"""A model-wide spectrum report: every convolution, reshaped kernel vs true operator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ._geometry import geometry_of, is_conv
from ._progress import progress_bar
from .spectrum import (
    AUTO_DENSE_MAX_N, _canonical, _fft_applicable, _group_weights, conv_singular_values,
    estimated_flops,
)


@dataclass
class LayerSpectrum:
    """One convolution of a model as :func:`spectrum_report` sees it.

    ``reshaped_*`` are the extreme singular values of the reshaped kernel, ``groups`` matrices
    ``(weight.shape[0] // groups) x (weight.shape[1] * prod(kernel))`` (for a transposed layer
    ``(in // groups) x (out // groups * prod(kernel))``; what SVB and ``torch.nn.utils.spectral_norm``
    act on; max of maxima, min of minima over groups); ``sigma_max`` / ``sigma_min`` those of the
    true operator ``M`` on the layer's input size, from :func:`convspec.conv_singular_values`
    (``method``, ``exact``, ``converged``, ``n_products`` and the absolute error bounds
    ``sigma_max_error`` / ``sigma_min_error`` as in :class:`convspec.ConvSpectrum`: ``0.0`` for
    the dense and FFT routes means float64 rounding only). ``values`` / ``reshaped_values`` hold
    all singular values (descending) where computed; ``padding`` is ``(lo, hi)`` per spatial
    axis, flattened; ``layer_type`` the module's class name; ``note`` anything the row does not
    say by itself, else ``""``.
    """

    name: str
    weight_shape: Tuple[int, ...]
    input_size: Tuple[int, ...]
    output_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    padding_mode: str
    reshaped_sigma_max: float
    reshaped_sigma_min: float
    sigma_max: Optional[float] = None
    sigma_min: Optional[float] = None
    method: Optional[str] = None
    exact: bool = False
    n_products: int = 0
    note: str = ""
    layer_type: str = ""
    converged: bool = False
    sigma_max_error: Optional[float] = None
    sigma_min_error: Optional[float] = None
    reshaped_values: Optional[torch.Tensor] = field(default=None, repr=False)
    values: Optional[torch.Tensor] = field(default=None, repr=False)

    def as_dict(self, with_values: bool = False) -> dict:
        """JSON-ready fields; the singular value lists only if ``with_values``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("values", "reshaped_values")}
        for k in ("weight_shape", "input_size", "output_size", "stride", "padding", "dilation"):
            d[k] = list(d[k])
        if with_values:
            for k in ("values", "reshaped_values"):
                v = getattr(self, k)
                d[k] = None if v is None else [float(x) for x in v]
        return d


def reshaped_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Singular values (float64, descending) of ``weight`` read as ``groups`` matrices
    ``(out // groups) x (in // groups * prod(kernel))``: the reshaped kernel SVB bounds."""
    h = weight.shape[0]
    mats = weight.detach().to(torch.float64).cpu().reshape(groups, h // groups, -1)
    return torch.sort(torch.linalg.svdvals(mats).reshape(-1), descending=True).values


def record_input_sizes(model: nn.Module, example_input: torch.Tensor, modules,
                       size_of=lambda module, x: tuple(int(n) for n in x.shape[2:])):
    """``(sizes, repeated)``: the input size ``size_of(module, input)`` each of ``modules``
    (``(name, module)`` pairs) first sees in one forward pass of ``example_input`` (eval mode, no
    gradient; the training flag is restored, the hooks removed), and the names seen at more than
    one size. A module the pass does not reach is absent from ``sizes``."""
    sizes: Dict[str, Tuple[int, ...]] = {}
    repeated: Set[str] = set()

    def record(name):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                size = size_of(module, inputs[0])
                if sizes.setdefault(name, size) != size:
                    repeated.add(name)
            # returns None: inputs unchanged

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes, repeated


def spectrum_report(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    tol: float = 1e-6,
    keep_values: bool = True,
    progress: bool = False,
) -> List[LayerSpectrum]:
    """Extreme singular values of every convolution of ``model``: reshaped kernel and operator.

    Every ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (initialised ``Lazy*`` included),
    every padding mode.

    One forward pass of ``example_input`` (in eval mode, without gradient; the training flag is
    restored) with forward pre-hooks records each convolution's input size; then for each layer,
    in module order, the reshaped kernel's singular values (SVD of ``groups`` small matrices) and
    the ``sigma_max`` / ``sigma_min`` of the operator ``M`` that the layer applies to
    that input (its own ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``),
    through :func:`convspec.conv_singular_values` with ``method='auto'`` (FFT for circular
    padding, dense for small operators, else iterative (zeros, reflect, replicate padding) to relative ``tol``, with error bounds
    and a ``converged`` flag per row: an iterative ``sigma_min`` below about
    ``sqrt(eps / tol) sigma_max`` comes with its absolute accuracy instead, see
    :func:`convspec.conv_singular_values`). A layer seen at several input sizes is reported at
    the first, with a warning naming it; a layer the forward pass does not reach is named in a
    warning and left out. With
    ``keep_values``, all operator singular values are kept where an exact route is cheap (FFT,
    or each group's operator at most ``AUTO_DENSE_MAX_N`` rows and columns).

    Cost: the forward pass plus one spectrum per layer (see
    :func:`convspec.conv_singular_values`; the iterative route dominates for large inputs).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
    ...                     nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode='circular'))
    >>> rows = spectrum_report(net, torch.randn(1, 3, 8, 8))
    >>> [(r.name, r.input_size, r.method) for r in rows]
    [('0', (8, 8), 'dense'), ('2', (8, 8), 'fft')]

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving Training of Deep Neural Networks via
    Singular Value Bounding", CVPR 2017 (reshaped kernels, Figure 1); H. Sedghi, V. Gupta,
    P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019 (operator spectra).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
    convs = [(name, m) for name, m in model.named_modules() if is_conv(m)]
    if not convs:
        raise ValueError("model has no convolution layer (nn.Conv*d or nn.ConvTranspose*d)")
    sizes, repeated = record_input_sizes(
        model, example_input, convs, lambda m, x: tuple(int(n) for n in x.shape[-len(m.kernel_size):]))
    missed = [name for name, _ in convs if name not in sizes]
    if missed:
        warnings.warn(f"spectrum_report: conv layer(s) {missed} were not reached by the forward "
                      "pass and are left out", stacklevel=2)
    if repeated:
        warnings.warn(f"spectrum_report: conv layer(s) {sorted(repeated)} saw several input "
                      "sizes; each is reported at the first one", stacklevel=2)
    rows = []
    # The bar counts estimated work (Gflop), not layers: one large layer can cost more than all
    # the others together, so the time left is read off the work done, with the current layer.
    work = {name: round(estimated_flops(conv, sizes[name]) / 1e9, 3) if name in sizes else 0.0
            for name, conv in convs}
    with progress_bar(sum(work.values()), "spectrum (estimated work)",
                      enabled=progress, unit="Gflop") as bar:
        for i, (name, conv) in enumerate(convs):
            if name not in sizes:
                continue  # not reached by the forward pass
            bar.set_postfix_str(f"layer {i + 1}/{len(convs)}: {name} "
                                f"{tuple(conv.weight.shape)} at {sizes[name]}")
            w = conv.weight
            reshaped = reshaped_values(w, conv.groups)
            geom = geometry_of(conv, sizes[name])
            row = LayerSpectrum(
                name=name, weight_shape=tuple(w.shape), input_size=tuple(sizes[name]),
                output_size=geom.layer_output_size, stride=tuple(conv.stride),
                padding=tuple(v for ax in geom.axes for v in (ax.pad_lo, ax.pad_hi)),
                dilation=tuple(conv.dilation), groups=conv.groups,
                padding_mode=conv.padding_mode, layer_type=type(conv).__name__,
                reshaped_sigma_max=float(reshaped[0]),
                reshaped_sigma_min=float(reshaped[-1]), reshaped_values=reshaped,
            )
            if geom.transposed:
                row.note = "transposed: padding is that of the convolution it is the adjoint of"
            wc, gc = _canonical(w.detach(), geom)
            _, geom1 = _group_weights(wc, gc)
            small = max(geom1.n_in, geom1.n_out) <= AUTO_DENSE_MAX_N
            cheap = _fft_applicable(gc) is None or small
            which = "all" if keep_values and cheap else "extremes"
            # Re-issued with the layer's name: a warning about "the iterative spectrum" is of
            # no use in a report of fifty layers unless it says which one.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                spec = conv_singular_values(
                    conv, sizes[name], which=which, tol=tol,
                    progress=False if progress else None,
                )
            for w_ in caught:
                warnings.warn_explicit(f"layer {name!r}: {w_.message}", w_.category,
                                       w_.filename, w_.lineno)
            row.sigma_max, row.sigma_min = spec.sigma_max, spec.sigma_min
            row.method, row.exact, row.n_products = spec.method, spec.exact, spec.n_products
            row.converged = spec.converged
            row.sigma_max_error, row.sigma_min_error = spec.sigma_max_error, spec.sigma_min_error
            row.values = spec.values
            rows.append(row)
            bar.update(work[name])
    return rows
