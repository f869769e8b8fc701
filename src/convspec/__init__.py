"""convspec: exact control of the singular values of convolutional layers in PyTorch."""

__version__ = "0.1.0"

from .operator import conv_operator
from .penalty import frobenius_penalty, frobenius_penalty_reference, frobenius_penalty_grad_reference

__all__ = [
    "conv_operator",
    "frobenius_penalty",
    "frobenius_penalty_reference",
    "frobenius_penalty_grad_reference",
]
