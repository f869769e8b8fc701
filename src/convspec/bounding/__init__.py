"""Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN), as training-time tools.

Jia et al. (CVPR 2017) keep every layer close to orthogonal during training: every ``T``
iterations, each weight matrix ``W = U diag(s) V^T`` is replaced by ``U diag(clip(s)) V^T`` with
``clip`` into ``[1/(1+eps), 1+eps]`` (Algorithm 1), and each BatchNorm's scale ``gamma`` is
bounded relative to its mean (Algorithm 2).

**What is bounded.** The singular values of the *reshaped kernel*, not of the convolution
operator, for ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (and their ``Lazy*``
forms once initialised): a ``Linear`` weight ``(out, in)`` is bounded as it is, a convolution
weight ``(out, in // groups, *kernel_size)`` is split into ``groups`` matrices of shape
``(out // groups) x (in // groups * prod(kernel_size))``, a transposed convolution weight
``(in, out // groups, *kernel_size)`` into ``groups`` matrices
``(in // groups) x (out // groups * prod(kernel_size))`` (one per group, each bounded on its own;
Note [the bounded matrix of each layer type] in ``layers.py`` says why the transposed one is the
analogue of Jia's reshaped kernel). The operator ``M`` of :func:`convspec.conv_operator` has
different singular values (they depend on the input size, padding and stride, and can exceed those
of the reshaped kernel by up to a factor ``sqrt(prod(kernel_size))``); SVB does not control them.

Three layers, each usable alone: :func:`bound_singular_values` (a tensor in, a tensor out),
:func:`svb_` and :func:`bbn_` (in place on a model, DDP-safe), and :class:`SingularValueBounding`
(the schedule, called after ``optimizer.step()``).

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithms 1 and 2.
"""

# The implementation, along its seams: matrices (the tensor layer: SVD / Gram routes), layers
# (which modules, which matrices), distributed (collectives), svb (svb_, plan/commit, reports),
# bbn (bbn_), schedule (SingularValueBounding). Names imported from convspec.bounding before the
# split (public API, SUPPORTED_LAYERS, _check_layers, _weight_of, _gram_route, ...) stay here.
from .bbn import BATCHNORMS, BBN_MODES, bbn_
from .distributed import _Dist, _dist_context
from .layers import (
    CONVS,
    SUPPORTED_LAYERS,
    TRANSPOSED_CONVS,
    Skip,
    _check_layers,
    _collect_layers,
    _weight_of,
)
from .matrices import (
    APPLY_RHO,
    GRAM_MIN_ASPECT,
    GRAM_TOLERANCE,
    GRAM_TOLERANCE_FLOAT32,
    METHODS,
    _gram_allowed,
    _gram_route,
    bound_singular_values,
)
from .schedule import SingularValueBounding
from .svb import LayerBound, SVBReport, svb_

__all__ = [
    "LayerBound",
    "SVBReport",
    "SingularValueBounding",
    "bbn_",
    "bound_singular_values",
    "svb_",
]
