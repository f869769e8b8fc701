"""A model-level Frobenius penalty: the exact ``||M^T M - alpha I||_F^2`` summed over all layers."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ._geometry import PADDING_MODES
from .penalty import frobenius_penalty


class FrobeniusRegularizer:
    """Sum of the exact Frobenius penalties of every conv and linear layer of ``model``.

    For each ``nn.Conv2d`` the term is :func:`frobenius_penalty` of its weight with the layer's
    own ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode``, on the input size
    the layer last saw (recorded by a forward pre-hook: run one forward pass before the first
    call). For each ``nn.Linear`` (``W`` of shape ``out x in``) it is ``||W^T W - alpha I||_F^2``,
    eq. (1.2) of Guo (2019). With ``normalize=True`` each term is divided by the dimension of its
    identity (``g N1 N2`` for a conv, ``in`` for a linear layer), so that one weight suits layers
    of any size. Every term is exact and costs nothing that grows with the image size.

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
        self.alpha = float(alpha)
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
                self.convs[name] = module
            elif isinstance(module, nn.Linear) and include_linear:
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

    def penalties(self) -> Dict[str, torch.Tensor]:
        """The term of each layer, by module name (differentiable)."""
        missing = [n for n in self.convs if n not in self.input_sizes]
        if missing:
            raise RuntimeError(
                f"no input size recorded for conv layer(s) {missing[:3]}: run a forward pass "
                "of the model before computing the penalty"
            )
        out: Dict[str, torch.Tensor] = {}
        for name, conv in self.convs.items():
            size = self.input_sizes[name]
            term = frobenius_penalty(
                conv.weight,
                size,
                self.alpha,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                padding_mode=conv.padding_mode,
            )
            if self.normalize:
                term = term / (conv.in_channels * size[0] * size[1])
            out[name] = term
        for name, lin in self.linears.items():
            w = lin.weight
            # ||W^T W - aI||^2 = ||W W^T||^2 - 2a ||W||^2 + a^2 in: Gram on the smaller side.
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            term = gram.square().sum() - 2 * self.alpha * w.square().sum() + self.alpha**2 * w.shape[1]
            out[name] = term / w.shape[1] if self.normalize else term
        return out

    def __call__(self) -> torch.Tensor:
        """The sum of all terms (differentiable)."""
        return torch.stack(list(self.penalties().values())).sum()

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
