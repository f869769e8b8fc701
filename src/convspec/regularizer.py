"""A model-level Frobenius penalty: the exact ``||M^T M - alpha I||_F^2`` summed over all layers."""

from __future__ import annotations

from functools import reduce
from typing import Dict, Tuple

import torch
from torch import nn

from ._geometry import PADDING_MODES, check_real, check_weight, check_weight_dtype, conv_geometry
from ._precision import to_weight_dtype
from .penalty import _frobenius_value


class FrobeniusRegularizer:
    """Sum of the exact Frobenius penalties of every conv and linear layer of ``model``.

    For each ``nn.Conv2d`` the term is :func:`frobenius_penalty` of its weight with the layer's
    own ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode``, on the input size
    the layer last saw (recorded by a forward pre-hook: run one forward pass before the first
    call). For each ``nn.Linear`` (``W`` of shape ``out x in``) it is ``||W^T W - alpha I||_F^2``,
    eq. (1.2) of Guo (2019). With ``normalize=True`` each term is divided by the dimension of its
    identity (``g N1 N2`` for a conv, ``in`` for a linear layer), so that one weight suits layers
    of any size. Every term is exact and costs nothing that grows with the image size.

    Every term is computed in float32 or better with ``torch.autocast`` disabled, so the
    regularizer works in mixed-precision training (call it inside or outside the autocast region;
    forward and backward give the values and gradients of the float32 computation). The sum is
    accumulated in that precision and rounded once to the weights' promoted dtype (bfloat16 for
    a bfloat16 model, float32 for a float32 model under autocast): accuracy as in
    :func:`frobenius_penalty`. Weights must be float16, bfloat16, float32 or float64 and ``alpha``
    finite, else ``ValueError`` (naming the layer for a bad dtype).

    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(8 * 16 * 16, 10))
    >>> reg = FrobeniusRegularizer(model, normalize=True)
    >>> _ = model(torch.randn(2, 3, 16, 16))      # records each conv's input size
    >>> loss = reg()                               # add weight * loss to the training loss
    >>> loss.backward()
    >>> sorted(reg.input_sizes.values())
    [(16, 16)]

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
        self.convs: Dict[str, nn.Conv2d] = {}
        self.linears: Dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                if module.padding_mode not in PADDING_MODES:
                    raise ValueError(
                        f"layer {name!r} uses padding_mode={module.padding_mode!r}; "
                        f"the exact penalty supports {PADDING_MODES}"
                    )
                check_weight_dtype(module.weight, f"layer {name!r}: weight")
                self.convs[name] = module
            elif isinstance(module, nn.Linear) and include_linear:
                check_weight_dtype(module.weight, f"layer {name!r}: weight")
                self.linears[name] = module
        if not self.convs and not self.linears:
            raise ValueError("model has no nn.Conv2d or nn.Linear layer to regularise")
        self.input_sizes: Dict[str, Tuple[int, int]] = {}
        self._hooks = [
            conv.register_forward_pre_hook(self._recorder(name)) for name, conv in self.convs.items()
        ]

    def _recorder(self, name: str):
        def hook(module, args):
            self.input_sizes[name] = tuple(args[0].shape[-2:])

        return hook

    def _terms(self) -> Dict[str, Tuple[torch.Tensor, torch.dtype]]:
        """Per layer: the term in float32 or better (autocast off) and its weight's dtype."""
        missing = [n for n in self.convs if n not in self.input_sizes]
        if missing:
            raise RuntimeError(
                f"no input size recorded for conv layer(s) {missing[:3]}: run a forward pass "
                "of the model before computing the penalty"
            )
        out: Dict[str, Tuple[torch.Tensor, torch.dtype]] = {}
        for name, conv in self.convs.items():
            size = self.input_sizes[name]
            geom = conv_geometry(
                conv.weight,
                size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                padding_mode=conv.padding_mode,
            )
            check_weight(conv.weight, f"layer {name!r}: weight")
            term = _frobenius_value(conv.weight, geom, self.alpha)
            if self.normalize:
                term = term / (conv.in_channels * size[0] * size[1])
            out[name] = (term, conv.weight.dtype)
        for name, lin in self.linears.items():
            check_weight_dtype(lin.weight, f"layer {name!r}: weight")
            # W (out x in) is the operator of a 1x1 convolution on a 1x1 input, so the same
            # computation (Gram on the smaller side, autocast-proof backward) gives
            # ||W^T W - aI||^2 = ||W W^T||^2 - 2a ||W||^2 + a^2 in.
            w = lin.weight
            geom = conv_geometry((w.shape[0], w.shape[1], 1, 1), 1, padding=0)
            term = _frobenius_value(w.reshape(*w.shape, 1, 1), geom, self.alpha)
            out[name] = (term / w.shape[1] if self.normalize else term, w.dtype)
        return out

    def penalties(self) -> Dict[str, torch.Tensor]:
        """The term of each layer, by module name, in that layer's weight dtype (differentiable)."""
        return {
            name: to_weight_dtype(term, dtype, f"FrobeniusRegularizer term {name!r}")
            for name, (term, dtype) in self._terms().items()
        }

    def __call__(self) -> torch.Tensor:
        """The sum of all terms (differentiable), accumulated in float32 or better and rounded
        once to the promoted dtype of the weights."""
        terms = self._terms().values()
        total = sum(term for term, _ in terms)
        dtype = reduce(torch.promote_types, (dtype for _, dtype in terms))
        return to_weight_dtype(total, dtype, "FrobeniusRegularizer")

    def remove(self) -> None:
        """Remove the forward pre-hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (
            f"FrobeniusRegularizer({len(self.convs)} conv, {len(self.linears)} linear, "
            f"alpha={self.alpha}, normalize={self.normalize})"
        )
