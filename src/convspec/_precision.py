"""Working precision of the penalties: float32 or better inside, the weight's dtype outside.

Note [working precision]: the penalty ``||M^T M||^2 - 2a ||M||^2 + a^2 g N1 N2`` is a difference
of terms of size ~``g N1 N2``, each a sum of ~``k^4 c^2`` products. Computed in the weight's own
float16 the terms overflow (65504) long before the penalty does: a near-orthogonal 16-channel
kernel at N = 64 gave NaN for a penalty of 18.4. In bfloat16 (8-bit significand) the same case
gave 0.0, and random kernels were up to 1% off. So every penalty casts a float16/bfloat16 weight
to float32 (a differentiable cast: the gradient comes back in the weight's dtype), computes with
autocast disabled (under ``torch.autocast`` the GEMMs would otherwise run in the low-precision
dtype, and a custom ``autograd.Function`` would see mixed dtypes in backward), and rounds the
result once to the weight's dtype. The value returned is the float32 value correctly rounded:
relative error at most ``finfo(dtype).eps / 2`` (float16: 4.9e-4, bfloat16: 3.9e-3) on top of
the float32 cancellation error ``~eps32 * g N1 N2`` absolute; measured on random kernels: 3.7e-4
(float16) and 2.4e-3 (bfloat16). float16 cannot hold more than 65504: a larger penalty comes back
as ``inf`` with a warning (pass ``weight.float()`` to get it in float32; the gradient still
reaches the float16 weight). PyTorch runs built-in backward formulas under the autocast state
of the code that calls ``backward()``; the custom Function of ``frobenius_penalty`` turns
autocast off in its backward too, so its gradient is the float32 one even when ``backward()`` is
called inside an autocast region (the dense references are not protected that way).
tests/test_precision.py checks these bounds against float64 on the
same rounded weights, and forward and backward under CPU (and, where available, CUDA) autocast.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a penalty of a ``dtype`` weight is computed in: float32 or float64."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device):
    """A context in which ``torch.autocast`` is off for ``device`` (ops run in their inputs' dtype)."""
    # (Entering torch.autocast costs ~10 us of Python; skip it when autocast is off anyway.)
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def to_weight_dtype(value: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Round ``value`` (computed in float32+) once to ``dtype``; warn if it overflows there."""
    if value.dtype == dtype:
        return value
    out = value.to(dtype)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(value).all()):
        warnings.warn(
            f"{what}: the value {float(value.detach().abs().max()):.6g} exceeds the range of "
            f"{dtype} (max {torch.finfo(dtype).max:g}) and is returned as inf; compute it on "
            "weight.float() to get a float32 value (gradients still reach the weight)",
            RuntimeWarning,
            stacklevel=3,
        )
    return out
