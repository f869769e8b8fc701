"""convspec: exact control of the singular values of convolutional layers in PyTorch."""

__version__ = "0.1.0"

from ._geometry import ConvGeometry, conv_geometry
from .bounding import LayerBound, SingularValueBounding, SVBReport, bbn_, bound_singular_values, svb_
from .descent import DescentResult, paper_step_size, penalty_descent
from .init import delta_orthogonal_, orthogonal_
from .operator import conv_operator
from .penalty import (
    frobenius_penalty,
    frobenius_penalty_grad_reference,
    frobenius_penalty_reference,
    spectral_penalty,
)
from .regularizer import FrobeniusRegularizer
from .spectrum import (
    ConvSpectrum,
    conv_singular_values,
    conv_spectral_norm_bound,
    extreme_singular_values,
)
from .report import LayerSpectrum, spectrum_report
from . import linalg  # eigensolvers on operator callbacks (convspec.linalg.lanczos_largest, ...)

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "conv_operator",
    "frobenius_penalty",
    "frobenius_penalty_reference",
    "frobenius_penalty_grad_reference",
    "extreme_singular_values",
    "spectral_penalty",
    "ConvSpectrum",
    "conv_singular_values",
    "conv_spectral_norm_bound",
    "LayerSpectrum",
    "spectrum_report",
    "linalg",
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
