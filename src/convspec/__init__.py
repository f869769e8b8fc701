"""convspec: exact control of the singular values of convolutional layers in PyTorch."""

__version__ = "0.1.0"

from .operator import conv_operator
from .penalty import frobenius_penalty, frobenius_penalty_reference, frobenius_penalty_grad_reference
from .bounding import LayerBound, SVBReport, SingularValueBounding, bbn_, bound_singular_values, svb_
from .init import delta_orthogonal_, orthogonal_

__all__ = [
    "conv_operator",
    "frobenius_penalty",
    "frobenius_penalty_reference",
    "frobenius_penalty_grad_reference",
    "svb_",
    "bbn_",
    "bound_singular_values",
    "SingularValueBounding",
    "SVBReport",
    "LayerBound",
    "orthogonal_",
    "delta_orthogonal_",
]
