"""convspec: exact control of the singular values of convolutional layers in PyTorch."""

__version__ = "0.1.0"

from ._geometry import ConvGeometry, conv_geometry
from .bounding import LayerBound, SingularValueBounding, SVBReport, bbn_, bound_singular_values, svb_
from .descent import DescentResult, paper_step_size, penalty_descent
from .init import delta_orthogonal_, orthogonal_
from .operator import conv_operator
from .penalty import frobenius_penalty, frobenius_penalty_grad_reference, frobenius_penalty_reference
from .regularizer import FrobeniusRegularizer
from .spectrum import extreme_singular_values

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "conv_operator",
    "frobenius_penalty",
    "frobenius_penalty_reference",
    "frobenius_penalty_grad_reference",
    "extreme_singular_values",
    "DescentResult",
    "paper_step_size",
    "penalty_descent",
    "FrobeniusRegularizer",
    "svb_",
    "bbn_",
    "bound_singular_values",
    "SingularValueBounding",
    "SVBReport",
    "LayerBound",
    "orthogonal_",
    "delta_orthogonal_",
]
