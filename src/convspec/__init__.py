"""convspec: exact control of the singular values of convolutional layers in PyTorch."""

__version__ = "0.1.0"

from .operator import conv_operator
from .penalty import frobenius_penalty, frobenius_penalty_grad_reference, frobenius_penalty_reference
from .spectrum import extreme_singular_values
from .descent import DescentResult, paper_step_size, penalty_descent
from ._geometry import ConvGeometry, conv_geometry

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "DescentResult",
    "paper_step_size",
    "penalty_descent",
    "extreme_singular_values",
    "conv_operator",
    "frobenius_penalty",
    "frobenius_penalty_reference",
    "frobenius_penalty_grad_reference",
]
