"""convspec: exact control of the singular values of convolutional layers in PyTorch.

Every function that takes a convolution accepts the module itself (``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d``, initialised ``Lazy*`` forms; every padding mode) and reads its
geometry from it, or a weight tensor with the keywords and defaults of ``nn.Conv*d``.

Where each paper item lives:

P.-C. Guo, "A Frobenius norm regularization method for convolutional kernels to avoid unstable
gradient problem", arXiv:1907.11235 (2019):

* eq. (2.1), the operator ``M`` of a convolution ........ :func:`conv_operator`
* eq. (1.3), ``R_a(K) = ||M^T M - a I||_F^2`` ........... :func:`frobenius_penalty` (exact, never
  forms ``M``), :func:`frobenius_penalty_reference` (through the dense ``M``)
* eq. (1.2), the same penalty of a linear layer ......... :class:`FrobeniusRegularizer`
* Theorems 2.1 and 3.1, eq. (3.2), the gradient ......... :func:`frobenius_penalty_grad_reference`
* Algorithm 3.1 and its step-size schedule .............. :func:`penalty_descent`,
  :func:`paper_step_size`
* Figure 4.1 ............................................ ``convspec.experiments.guo_fig41``
  (``convspec reproduce guo-fig41``)
* Section 5, the penalty in a network's training loss ... :class:`FrobeniusRegularizer`

P.-C. Guo, Q. Ye, "On the regularization of convolutional kernel tensors in neural networks",
Linear and Multilinear Algebra (2022): the 2-norm penalty ``||M^T M - a I||_2`` by power
iteration ...................................... :func:`spectral_penalty`,
``penalty_descent(penalty='spectral')``

K. Jia, D. Tao, S. Gao, X. Xu, "Improving Training of Deep Neural Networks via Singular Value
Bounding", CVPR 2017:

* orthogonal initialisation ............................. :func:`orthogonal_`
* Algorithm 1, Singular Value Bounding every ``T_svb`` iterations .... :func:`svb_`,
  :class:`SingularValueBounding`, :func:`bound_singular_values`
* Algorithm 2, Bounded Batch Normalization .............. :func:`bbn_`
* Figure 1, singular values of reshaped kernels ......... :func:`spectrum_report` (beside the
  true operator's)
* Table I and Figure 2 .................................. ``convspec compare`` (``convspec.train``)

Beyond them: exact spectra of ``M`` (dense, FFT for circular padding after H. Sedghi, V. Gupta,
P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019, matrix-free for anything):
:func:`conv_singular_values`, :func:`extreme_singular_values`; a certified upper bound on
``sigma_max`` by Gram iteration (B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, ICML 2023):
:func:`conv_spectral_norm_bound`; delta-orthogonal initialisation (L. Xiao et al., ICML 2018):
:func:`delta_orthogonal_`; layers normalised by their true operator norm (the parametrization
of T. Miyato et al., ICLR 2018, applied to ``M`` instead of the reshaped kernel):
:func:`operator_spectral_norm`; an upper bound on a network's Lipschitz constant from exact
per-layer operator norms: :func:`lipschitz_report`.
"""

__version__ = "0.1.0"

from ._geometry import ConvGeometry, conv_geometry, geometry_of
from .bounding import LayerBound, SingularValueBounding, SVBReport, bbn_, bound_singular_values, svb_
from .descent import DescentResult, paper_step_size, penalty_descent
from .init import delta_orthogonal_, orthogonal_
from .operator import conv_operator
from .parametrizations import operator_spectral_norm
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
from .lipschitz import LayerLipschitz, LipschitzReport, lipschitz_report
from . import linalg  # eigensolvers on operator callbacks (convspec.linalg.lanczos_largest, ...)

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "geometry_of",
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
    "operator_spectral_norm",
    "lipschitz_report",
    "LipschitzReport",
    "LayerLipschitz",
]
