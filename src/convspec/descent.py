"""Algorithm 3.1 of Guo (2019): gradient descent on a convolution kernel alone."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from ._geometry import UNSET, IntTuple, check_real, check_weight, resolve
from ._progress import progress_bar
from .operator import dense_operator
from .penalty import _frobenius_value, _spectral_value
from .spectrum import _gram_extremes

STEP_RULES = ("paper", "constant", "armijo")
PENALTIES = ("frobenius", "spectral")

#: Power iterations of the spectral penalty: on the initial kernel, then per evaluation.
SPECTRAL_WARMUP_ITERATIONS = 200
SPECTRAL_STEP_ITERATIONS = 5


def paper_step_size(iteration: int) -> float:
    """The step schedule of Guo (2019), Section 4: 1e-5 for ``iteration < 10``, 1e-4 for
    ``iteration < 20``, 1e-3 after; applied to ``G = (1/2) dR/dK`` (eq. 3.2).

    >>> [paper_step_size(i) for i in (0, 9, 10, 19, 20, 299)]
    [1e-05, 1e-05, 0.0001, 0.0001, 0.001, 0.001]
    """
    if iteration < 10:
        return 1e-5
    if iteration < 20:
        return 1e-4
    return 1e-3


@dataclass
class DescentResult:
    """What :func:`penalty_descent` records, one entry per iteration (0 = the initial kernel).

    ``grad_norm`` is the Frobenius norm of ``dR/dK`` at that iteration; ``step_size`` the step
    taken from it along ``-G`` with ``G = (1/2) dR/dK`` (``nan`` on the last entry).
    ``stopped`` says why the loop ended early (``None`` if it ran all steps).
    """

    weight: torch.Tensor
    iteration: List[int] = field(default_factory=list)
    penalty: List[float] = field(default_factory=list)
    sigma_max: List[float] = field(default_factory=list)
    sigma_min: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    step_size: List[float] = field(default_factory=list)
    stopped: Optional[str] = None

    def history(self) -> dict:
        """The recorded lists as a JSON-ready dict (without the weight)."""
        d = asdict(self)
        d.pop("weight")
        return d


def _scatter_plan(weight: torch.Tensor, geom):
    """Where each weight entry sits in the dense ``M`` (``(mask, index)``: ``M[mask] =
    weight.flatten()[index]``), so that ``M`` is rebuilt by one gather per iteration; None when an
    entry of ``M`` may be a sum of several weights (circular, reflect or replicate padding) or
    ``M`` would not fit in memory."""
    if any(ax.mode != "zeros" for ax in geom.axes):
        return None
    ids = torch.arange(1, weight.numel() + 1, dtype=torch.float64).reshape(weight.shape)
    try:
        m = dense_operator(ids, geom)  # zero padding: each entry is one weight or 0
    except ValueError:  # too large for a dense M; extremes() raises the same error
        return None
    mask = m != 0
    return mask, m[mask].round().long() - 1


def penalty_descent(
    conv,
    input_size: IntTuple,
    alpha: float = 1.0,
    *,
    steps: int = 300,
    step_rule: str = "paper",
    lr: float = 1e-3,
    penalty: str = "frobenius",
    track_spectrum: bool = True,
    armijo_c: float = 1e-4,
    armijo_shrink: float = 0.5,
    stride=UNSET,
    padding=UNSET,
    dilation=UNSET,
    groups=UNSET,
    padding_mode=UNSET,
    transposed=UNSET,
    output_padding=UNSET,
    progress: bool = False,
    callback: Optional[Callable[[int, DescentResult], None]] = None,
) -> DescentResult:
    """Algorithm 3.1 of Guo (2019): minimise ``R(K) = ||M^T M - alpha I||_F^2`` over ``K`` alone.

    With ``penalty='spectral'`` it minimises the 2-norm penalty ``R(K) = ||M^T M - alpha I||_2``
    of Guo & Ye instead (:func:`convspec.spectral_penalty`): its power-iteration vectors run
    ``SPECTRAL_WARMUP_ITERATIONS`` (200) steps on the initial kernel, then persist across
    iterations with ``SPECTRAL_STEP_ITERATIONS`` (5) steps per evaluation, so the recorded
    penalty is the power-iteration value (exact as the vectors converge) and the gradient that of
    the extreme eigenvalues it tracks.

    ``conv`` is a convolution module (any ``nn.Conv*d`` / ``nn.ConvTranspose*d``; its geometry is
    read from it) or a weight tensor with the keywords of ``nn.Conv*d`` and their defaults
    (``padding=0``; the paper's experiments use ``padding='same'``); ``M`` is the operator the
    layer applies to an input of ``input_size`` (see :func:`convspec.conv_operator`). By default ``R`` is the exact penalty of :func:`frobenius_penalty`, its gradient exact
    (autograd through the structured formula, equal to the closed form of Theorem 3.1).
    The layer's weight is not modified: the descent runs on a float64 copy, returned in the result
    (the weight may be float16, bfloat16, float32 or float64; other dtypes, NaN/Inf entries and
    non-finite ``alpha``, ``lr``, ``armijo_c``, ``armijo_shrink`` raise ``ValueError``).

    Step rules, each along ``-G`` with ``G = (1/2) dR/dK`` as eq. (3.2) defines it:

    * ``'paper'``: the paper's schedule (:func:`paper_step_size`). The curvature of ``R`` grows
      like ``N1 N2``, so this schedule suits inputs near the paper's 20 x 20 only.
    * ``'constant'``: ``lr`` at every step.
    * ``'armijo'``: backtracking line search that needs no tuning: start from twice the last
      accepted step and multiply by ``armijo_shrink`` until
      ``R(K - t G) <= R(K) - armijo_c * t * ||G||_F^2``. Each trial costs one exact penalty.

    Per iteration it records the penalty, the norm of ``dR/dK`` and, if ``track_spectrum``, the
    exact ``sigma_max`` and ``sigma_min`` of ``M`` (eigenvalues of the dense ``M^T M`` or ``M M^T``,
    whichever is smaller: accurate unless ``sigma_min < 1e-8 sigma_max``; this dominates the cost).

    >>> w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> res = penalty_descent(w, 6, steps=30, step_rule='armijo', padding='same')
    >>> res.penalty[-1] < res.penalty[0] / 10
    True
    >>> abs(res.sigma_max[-1] - 1) < abs(res.sigma_max[0] - 1)
    True

    References: P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to
    avoid unstable gradient problem", arXiv:1907.11235, Algorithm 3.1 and Section 4;
    P.-C. Guo, Q. Ye, "On the regularization of convolutional kernel tensors in neural
    networks", Linear and Multilinear Algebra (2022) (the 2-norm penalty).
    """
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not check_real(lr, "lr") > 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    alpha = check_real(alpha, "alpha")
    if not (0 < check_real(armijo_c, "armijo_c") < 1
            and 0 < check_real(armijo_shrink, "armijo_shrink") < 1):
        raise ValueError("armijo_c and armijo_shrink must lie in (0, 1)")
    weight, geom = resolve(
        conv, input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )  # validate before any work
    check_weight(weight)

    power_state: dict = {}

    scatter = _scatter_plan(weight, geom)

    def extremes(k: torch.Tensor) -> Tuple[float, float]:
        """Exact sigma_max and sigma_min of M from the eigenvalues of its smaller dense Gram."""
        if scatter is None:
            return _gram_extremes(dense_operator(k, geom))
        mask, index = scatter
        m = torch.zeros(mask.shape, dtype=k.dtype)
        m[mask] = k.reshape(-1)[index]
        return _gram_extremes(m)

    def value(k: torch.Tensor) -> torch.Tensor:
        if penalty == "spectral":
            iters = SPECTRAL_STEP_ITERATIONS if power_state else SPECTRAL_WARMUP_ITERATIONS
            return _spectral_value(k, geom, alpha, iters, power_state)
        return _frobenius_value(k, geom, alpha)

    def value_and_grad(k: torch.Tensor):
        k = k.detach().requires_grad_(True)
        r = value(k)
        (g,) = torch.autograd.grad(r, k)
        return r.detach(), g

    k = weight.detach().to(torch.float64).clone()
    result = DescentResult(weight=k)
    last_step = 1.0
    with progress_bar(steps, "Algorithm 3.1", enabled=progress) as bar:
        for it in range(steps + 1):
            r, g = value_and_grad(k)
            gnorm = float(g.norm())
            result.iteration.append(it)
            result.penalty.append(float(r))
            result.grad_norm.append(gnorm)
            if track_spectrum:
                smax, smin = extremes(k)
                result.sigma_max.append(smax)
                result.sigma_min.append(smin)
            if not math.isfinite(float(r)):
                result.stopped = f"penalty became non-finite at iteration {it}"
                warnings.warn(result.stopped + "; use a smaller step or step_rule='armijo'")
                result.step_size.append(float("nan"))
                break
            if it == steps:
                result.step_size.append(float("nan"))
                break
            half = g / 2  # G of eq. (3.2)
            if step_rule == "paper":
                t = paper_step_size(it)
            elif step_rule == "constant":
                t = lr
            else:
                t = min(2 * last_step, 1e6)
                target = armijo_c * float(half.square().sum())
                while float(value(k - t * half)) > float(r) - t * target:
                    t *= armijo_shrink
                    if t < 1e-30:
                        break
                if t < 1e-30:
                    result.stopped = f"line search found no decrease at iteration {it}"
                    result.step_size.append(float("nan"))
                    break
                last_step = t
            result.step_size.append(t)
            k = k - t * half
            result.weight = k
            if callback is not None:
                callback(it, result)
            bar.update(1)
            if track_spectrum:
                bar.set_postfix_str(
                    f"R={float(r):.3g} smax={smax:.3f} smin={smin:.3f}", refresh=False
                )
    result.weight = k
    return result
