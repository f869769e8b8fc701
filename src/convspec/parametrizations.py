"""Layers normalised by their true operator norm: a drop-in for ``spectral_norm``.

``torch.nn.utils.parametrizations.spectral_norm`` divides a convolution's weight by the largest
singular value of the weight *reshaped* to ``out x (in k k)``, which is not the norm of the map
the layer applies: at N = 16 a conv under it measured operator ``sigma_max`` 1.55.
:func:`operator_spectral_norm` divides by the norm of the operator ``M`` itself (the layer's
stride, padding, dilation, groups and input size), by power iteration with the layer and its
adjoint; ``bound='certified'`` divides by a certified upper bound instead, so the layer is
provably at most 1-Lipschitz.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._geometry import (
    ConvGeometry, conv_geometry, is_conv, layer_adjoint, layer_forward, module_keywords,
)
from ._precision import compute_dtype, no_autocast

#: Power-iteration steps when a layer's vectors are (re)initialised for an input size (PyTorch's
#: ``spectral_norm`` runs 15 on the small reshaped matrix; the top of a conv operator's spectrum
#: clusters, so more are run, once).
INIT_ITERATIONS = 100

#: Vectors in the power iteration's block (Note [locally optimal power step]).
BLOCK = 4

BOUNDS = ("estimate", "certified")


def _compiling() -> bool:
    """Whether torch.compile is tracing (the eval cache's tensor versions are not traced)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    try:  # torch < 2.3
        from torch._dynamo import is_compiling
    except ImportError:  # pragma: no cover
        return False
    return bool(is_compiling())


class _OperatorSpectralNorm(nn.Module):
    """The parametrization ``W -> W / ||M(W)||_2`` (see :func:`operator_spectral_norm`).

    Buffers (in ``state_dict``, moved by ``.to()``, broadcast by DDP, copied by ``deepcopy``):
    ``_u`` (a unit vector of the layer's input space), ``_q`` (the rest of the power iteration's
    block, Note [locally optimal power step]), ``_v`` (of its output space) and
    ``input_size`` (the spatial size they are for; empty until known). Their shapes follow the
    input size; they are resized in place, so that references held elsewhere (DDP) stay valid.
    """

    def __init__(self, weight: torch.Tensor, keywords: Optional[dict], n_power_iterations: int,
                 eps: float, bound: str, ndim: int):
        super().__init__()
        self.keywords = keywords  # None: nn.Linear
        self.n_power_iterations, self.eps, self.bound, self.ndim = (
            n_power_iterations, eps, bound, ndim)
        dtype = compute_dtype(weight.dtype)
        kw = dict(dtype=dtype, device=weight.device)
        self.register_buffer("_u", torch.empty(0, **kw))
        self.register_buffer("_v", torch.empty(0, **kw))
        # the rest of the block: Note [locally optimal power step]
        self.register_buffer("_q", torch.empty(0, **kw))
        self.register_buffer("input_size", torch.empty(0, dtype=torch.long, device=weight.device))
        self._size: Optional[Tuple[int, ...]] = None
        self._geoms: Dict[Tuple, ConvGeometry] = {}
        if keywords is None:
            self._retarget((), weight)

    # -- geometry and the operator -------------------------------------------------------

    def _geometry(self, weight: torch.Tensor,
                  size: Optional[Tuple[int, ...]] = None) -> Optional[ConvGeometry]:
        """The layer's geometry at ``size`` (default: the current one); raises for a bad size."""
        if self.keywords is None:
            return None
        size = self._size if size is None else size
        key = (size, tuple(weight.shape))
        geom = self._geoms.get(key)
        if geom is None:
            geom = self._geoms[key] = conv_geometry(weight, size, **self.keywords)
        return geom

    def _apply_m(self, x: torch.Tensor, w: torch.Tensor, geom) -> torch.Tensor:
        if geom is None:
            return w @ x
        return layer_forward(x[None], w, geom)[0]

    def _apply_mt(self, y: torch.Tensor, w: torch.Tensor, geom) -> torch.Tensor:
        if geom is None:
            return w.T @ y
        return layer_adjoint(y[None], w, geom)[0]

    def _gram(self, x: torch.Tensor, w: torch.Tensor, geom) -> torch.Tensor:
        """``M^T M`` on a batch of flattened inputs ``x`` (n, k)."""
        if geom is None:
            return w.T @ (w @ x)
        shape = (geom.layer_in_channels, *geom.layer_input_size)
        batch = x.T.reshape(-1, *shape)
        out = layer_adjoint(layer_forward(batch, w, geom), w, geom)
        return out.reshape(x.shape[1], -1).T

    # Note [locally optimal power step]: plain power iteration converges like
    # (sigma_2 / sigma_1)^(2k), and the top of a zero-padded conv operator's spectrum clusters
    # (sigma_2 / sigma_1 = 0.9987 measured on a trained Conv1d: 1000s of steps to 1e-3). Each
    # step here is instead a Rayleigh-Ritz on span{X, R, P}: X a block of BLOCK orthonormal
    # vectors (u, the top one, and the next ones, buffer _q), R their residuals
    # M^T M X - X (X^T M^T M X), P the previous step's directions (within one call): block LOBPCG
    # (A. Knyazev, SIAM J. Sci. Comput. 23, 2001), whose rate is that of a Chebyshev iteration.
    # The block is what keeps the estimate within 1e-3 while the weight moves: near a cluster an
    # optimiser step turns the top singular *vector* by about |dW| / gap, far out of span{u, r},
    # while the span of the top BLOCK directions (with the larger gap below them) barely moves.
    # Measured after 5-10 steps of SGD (momentum 0.9, learning rate 0.1-0.3) or Adam (1e-2) on
    # small Conv1d/Conv2d/Linear layers: error up to 1e-2 with one vector, 1.3e-3 with a block
    # of 3, 1.8e-4 with 4, 8e-6 with 6. A step costs two batched products with M^T M, of BLOCK
    # and 2 BLOCK vectors (P only from a call's second step: across forwards the weight has
    # moved, and it measured no gain there).
    # In eval mode the buffers are not touched, but the weight the optimiser changed after the
    # last training forward is normalised for what it is now: sigma is the top Ritz value of
    # one such step taken on a copy, cached while the weight and the buffers are unchanged (a
    # cache hit costs one product of one vector, as a training forward's sigma does).

    def _block(self) -> torch.Tensor:
        """The stored block ``[u, q_1, ...]`` as orthonormal columns, ``(n, b)``."""
        n = self._u.numel()
        return torch.cat([self._u.reshape(1, n), self._q.reshape(self._q.shape[0], n)]).T

    def _ritz_step(self, x: torch.Tensor, p: Optional[torch.Tensor], w: torch.Tensor, geom):
        """One Rayleigh-Ritz step on ``span{x, residuals, p}``: the top ``b`` Ritz vectors
        (largest first) and the new directions ``p``."""
        b = x.shape[1]
        gx = self._gram(x, w, geom)
        cols = [x, gx - x @ (x.T @ gx)] + ([p] if p is not None else [])
        q, rr = torch.linalg.qr(torch.cat(cols, 1))
        d = rr.diagonal().abs()
        keep = d > 1e-6 * d.max()
        keep[:b] = True  # x itself (orthonormal) always stays: b Ritz vectors are needed
        q = q[:, keep]
        h = q.T @ self._gram(q, w, geom)
        _, vecs = torch.linalg.eigh((h + h.T) / 2)
        y = vecs[:, -b:].flip(1)
        return q @ y, (q[:, b:] @ y[b:] if q.shape[1] > b else None)

    @torch.no_grad()
    def _power(self, w: torch.Tensor, geom, steps: int) -> None:
        x, p = self._block(), None
        for _ in range(steps):
            x, p = self._ritz_step(x, p, w, geom)
        self._u.copy_(x[:, 0].reshape(self._u.shape))
        self._q.copy_(x[:, 1:].T.reshape(self._q.shape))
        v = nn.functional.normalize(self._apply_m(self._u, w, geom).reshape(-1), dim=0,
                                    eps=self.eps)
        self._v.copy_(v.reshape(self._v.shape))

    @torch.no_grad()
    def _eval_vector(self, w: torch.Tensor, geom) -> torch.Tensor:
        """The top Ritz vector of one step from the stored block, for the weight ``w``; the
        buffers are not touched (Note [locally optimal power step])."""
        key = None
        if not _compiling():
            # the weight by value (it may be a fresh tensor each call: a converted copy, or the
            # output of an earlier parametrization), the buffers by identity and version
            key = (self._u.data_ptr(), self._u._version, self._q._version, self._size)
            hit = self.__dict__.get("_eval_cache")
            if (hit is not None and hit[0] == key and hit[1].shape == w.shape
                    and hit[1].dtype == w.dtype and hit[1].device == w.device
                    and torch.equal(hit[1], w)):
                return hit[2]
        x, _ = self._ritz_step(self._block(), None, w, geom)
        u = x[:, 0].reshape(self._u.shape)
        if key is not None:
            self.__dict__["_eval_cache"] = (key, w.clone(), u)
        return u

    @torch.no_grad()
    def _retarget(self, size: Tuple[int, ...], weight: torch.Tensor) -> None:
        """Vectors for input ``size`` (random, then ``INIT_ITERATIONS`` power steps)."""
        size = tuple(int(n) for n in size)
        w = weight.detach().to(self._u.dtype)
        if self.keywords is None:
            in_shape, out_shape = (w.shape[1],), (w.shape[0],)
        else:
            geom = self._geometry(weight, size)  # a size the layer cannot take: nothing changed
            in_shape = (geom.layer_in_channels, *geom.layer_input_size)
            out_shape = (geom.layer_out_channels, *geom.layer_output_size)
        self._size = size
        self.input_size.resize_(len(self._size)).copy_(torch.tensor(self._size))
        # a fixed generator: registering or re-targeting does not draw from the global RNG
        gen = torch.Generator().manual_seed(0)
        b = min(BLOCK, math.prod(in_shape))
        x = torch.linalg.qr(torch.randn(math.prod(in_shape), b, generator=gen,
                                        dtype=torch.float64))[0]
        self._u.resize_(in_shape).copy_(x[:, 0].reshape(in_shape))
        self._q.resize_(b - 1, *in_shape).copy_(x[:, 1:].T.reshape(b - 1, *in_shape))
        self._v.resize_(out_shape).zero_()
        with no_autocast(w.device):
            self._power(w, self._geometry(weight), INIT_ITERATIONS)

    def _apply(self, fn, recurse=True):
        # module.half() / .to(torch.bfloat16) converts buffers too; the vectors stay float32 or
        # better (the computation's dtype, Note [working precision]).
        super()._apply(fn, recurse)
        for name in ("_u", "_v", "_q"):
            buf = self._buffers[name]
            if buf.is_floating_point() and buf.dtype != compute_dtype(buf.dtype):
                self._buffers[name] = buf.to(compute_dtype(buf.dtype))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state_dict saved before the block (one vector and its direction, ``_p``): the
        # vector alone is a block of one.
        if prefix + "_p" in state_dict and prefix + "_q" not in state_dict:
            state_dict = dict(state_dict)
            saved_u = state_dict.pop(prefix + "_p")
            state_dict[prefix + "_q"] = saved_u.new_zeros((0, *saved_u.shape))
        # The vectors' shapes follow the input size: take the saved ones' shapes first.
        for name in ("_u", "_v", "_q", "input_size"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                getattr(self, name).resize_(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.keywords is not None:
            self._size = tuple(self.input_size.tolist()) or None

    # -- the parametrization ---------------------------------------------------------------

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._size is None:
            raise RuntimeError(
                "operator_spectral_norm: the layer's input size is not known yet; run a forward "
                "pass of the module (its size is recorded then), or pass input_size= when "
                "registering")
        geom = self._geometry(weight)
        # the dtype the layer will round the weight to: its own, or autocast's if coarser
        rounded_to = (_coarser(weight.dtype, _autocast_dtype(weight.device))
                      if self.bound == "certified" else weight.dtype)
        with no_autocast(weight.device):
            w = weight.to(self._u.dtype)
            if self.bound == "certified":
                # the margin is for the dtype the result is rounded to, not the working one
                bound = _certified_norm(w, geom)
                sigma = bound * _rounding_margin(w, geom, rounded_to, float(bound.detach()))
                sigma = sigma.to(w.dtype)
            else:
                if self.training:
                    self._power(w.detach(), geom, self.n_power_iterations)
                    # u, v detached (cloned: the in-place steps must not touch the graph).
                    u, v = self._u.clone(), self._v.clone()
                    sigma = (v * self._apply_m(u, w, geom)).sum()
                else:  # no step: Note [locally optimal power step]
                    u = self._eval_vector(w.detach(), geom)
                    sigma = self._apply_m(u, w, geom).norm()
            out = w / sigma.clamp_min(self.eps)
        return out.to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"bound={self.bound!r}, n_power_iterations={self.n_power_iterations}, "
                f"input_size={self._size}")


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts a convolution's weight to on ``device``, or None."""
    kind = device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(kind)
    return (torch.get_autocast_cpu_dtype() if kind == "cpu"  # pragma: no cover - torch < 2.4
            else torch.get_autocast_gpu_dtype())


def _coarser(a: torch.dtype, b: Optional[torch.dtype]) -> torch.dtype:
    """Of two floating dtypes, the one with the larger rounding unit."""
    if b is None or not b.is_floating_point:
        return a
    return b if torch.finfo(b).eps > torch.finfo(a).eps else a


def _certified_norm(w: torch.Tensor, geom: Optional[ConvGeometry]) -> torch.Tensor:
    """A certified, differentiable upper bound on ``||M||_2`` (Gram iteration), float64."""
    from .spectrum import certified_norm_tensor

    return certified_norm_tensor(w, geom)


def _rounding_margin(w: torch.Tensor, geom: Optional[ConvGeometry],
                     dtype: torch.dtype, bound: float) -> float:
    """``1 + 4 eps (|| |M| ||_2 / ||M||_2 bound)``, ``eps`` that of ``dtype`` (the weight's,
    which the result is rounded to; ``w`` is the float32-or-better working copy): covers rounding
    the bound to ``w``'s dtype, each entry of ``w / sigma``, and rounding that to ``dtype``
    (relative error ``eps / 2`` each, so the computed weight's operator is within
    ``eps || |M| ||_2 / sigma`` of the exact quotient's). ``bound``: the certified
    ``||M||_2`` bound already computed for ``w``."""
    from .spectrum import abs_operator_bound

    with torch.no_grad():
        ratio = abs_operator_bound(w.detach(), geom) / max(bound, 1e-300)
    eps = max(torch.finfo(w.dtype).eps, torch.finfo(dtype).eps)
    return 1 + 4 * eps * max(1.0, ratio)


def _record_input_size(name: str, module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: in training mode, re-target the parametrization when the layer sees a
    new input size; in eval mode only a first size is recorded (the weight stays normalised for
    the size it was trained at, and evaluation runs no power step).

    A plain function of the module (no closure over it), so that ``deepcopy``, ``torch.save``
    and DDP replicas each update their own parametrization; a no-op once the parametrization
    has been removed.
    """
    plist = getattr(module, "parametrizations", None)
    if plist is None or name not in plist:
        return
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return
    value = plist[name].original
    for p in plist[name]:
        if isinstance(p, _OperatorSpectralNorm):
            size = tuple(x.shape[-p.ndim:])
            if size != p._size and (module.training or p._size is None):
                p._retarget(size, value.detach())
            break
        value = p(value)  # what this parametrization receives: the earlier ones' output
    # returns None: the inputs are unchanged


# Note [pickling parametrized modules]: torch.nn.utils.parametrize replaces a module's class
# by a class made at run time (``ParametrizedConv2d``) whose ``__getstate__`` raises, so
# ``torch.save(model)`` fails for every parametrized module, PyTorch's ``spectral_norm``
# included. Users save whole models (and EMA copies), so a module normalised here pickles as
# "the original class, the names of its parametrized tensors, and its ``__dict__``": unpickling
# rebuilds an instance of the original class, re-injects the parametrization's class and
# properties (the same torch functions ``register_parametrization`` uses), then restores the
# state. ``deepcopy`` does the same: parametrize's own ``__deepcopy__`` gives the copy the
# *same* run-time class, so ``remove_parametrizations`` on a copy (an EMA model being exported)
# deleted the ``weight`` property of the original's class too, and the original then failed with
# "has no attribute 'weight'". Each copy gets its own class, as an unpickled module does.


def _reduce_parametrized(self, protocol):
    base = type(self).__bases__[0]
    return _rebuild_parametrized, (base, tuple(self.parametrizations.keys())), self.__dict__


def _deepcopy_parametrized(self, memo):
    replica = memo.get(id(self))
    if replica is not None:
        return replica
    replica = _rebuild_parametrized(type(self).__bases__[0], tuple(self.parametrizations.keys()))
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica


def _own_copies(cls: type) -> None:
    """Note [pickling parametrized modules]: pickling and ``deepcopy`` rebuild the class."""
    cls.__reduce_ex__ = _reduce_parametrized
    if "__deepcopy__" in cls.__dict__:  # parametrize's default (the base class has none)
        cls.__deepcopy__ = _deepcopy_parametrized


def _rebuild_parametrized(base: type, names: Tuple[str, ...]) -> nn.Module:
    obj = base.__new__(base)
    parametrize._inject_new_class(obj)
    for name in names:
        parametrize._inject_property(obj, name)
    _own_copies(type(obj))
    return obj


def _original(module: nn.Module, name: str):
    """``module.<name>``, or what its parametrizations start from (without evaluating them)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name, None)


def operator_spectral_norm(module: nn.Module, name: str = "weight", *,
                           input_size=None, n_power_iterations: int = 1, eps: float = 1e-12,
                           bound: str = "estimate") -> nn.Module:
    """Divide ``module.<name>`` by the spectral norm of the operator the layer applies.

    For ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (any padding mode, stride,
    dilation, groups) the operator is ``M``, the linear map the layer computes on an input of
    its spatial size (bias excluded; :func:`convspec.conv_operator`), so the normalised layer
    has ``||M||_2 = 1`` for that size; for ``nn.Linear`` it is the weight matrix. Registered
    with ``torch.nn.utils.parametrize`` like ``torch.nn.utils.parametrizations.spectral_norm``:
    ``module.weight`` is computed from ``module.parametrizations.weight.original``, and
    ``parametrize.remove_parametrizations(module, 'weight')`` leaves the normalised weight.

    ``bound='estimate'``: ``sigma = <v, M u>`` from power iteration on the true operator (the
    layer and its adjoint), warm-started from vectors kept as buffers (so ``state_dict``,
    ``.to()``, DDP and ``deepcopy`` carry them); ``n_power_iterations`` steps per forward in
    training mode, as PyTorch's. Each step is a block LOBPCG step (Note [locally optimal power
    step]: a Rayleigh-Ritz on a block of ``BLOCK`` vectors, their residuals and the previous
    directions), because the top of a conv operator's spectrum clusters: plain power steps
    stall there, and an optimiser step turns a single top vector out of reach. Eval mode
    changes no buffer, but normalises the current weight by the top Ritz value of one such step
    taken on a copy (cached while the weight and the vectors are unchanged). ``sigma`` is at
    most ``||M||_2`` (a lower bound that is exact once converged), so the normalised operator
    norm is at least 1, approaching 1.
    ``bound='certified'``: divide by a certified upper bound on ``||M||_2`` (Gram iteration on
    the transfer matrices of a circular embedding, B. Delattre et al., ICML 2023;
    :func:`convspec.conv_spectral_norm_bound`), differentiable and with a margin for rounding
    the weight to its dtype (or to autocast's, when the weight is read under
    ``torch.autocast``), so the layer is provably at most 1-Lipschitz. Its slack is
    measured at 0-1% for zero and circular padding at stride 1 and 0.6% at stride 2 (the
    record ``convspec reproduce norm-layers``), but 20-65% for reflect or replicate padding and
    odd strides, where the bound counts copied rows; it costs a batch of small matrix
    products over the frequencies per forward.

    Input size (convolutions; ``nn.Linear`` takes none): ``input_size`` (spatial, an int or one
    per axis), or recorded by the first forward pass (a forward pre-hook). In training mode a
    layer seen at a new size *re-targets*: its vectors are reinitialised for that size (from a
    fixed seed, then ``INIT_ITERATIONS`` steps), so the weight is normalised for the size it is
    trained at; in eval mode it is not (the weight stays normalised for the last training
    size: the norm of a zero-padded operator changes slightly with the size).
    Until a size is known, reading ``module.weight`` raises. The computation runs in float32
    or better with autocast off (the vectors stay float32 when the module is cast to
    float16/bfloat16), and the result is cast back to the weight's dtype; it works under
    ``torch.compile`` and ``torch.save(model)``.

    >>> _ = torch.manual_seed(0)
    >>> conv = operator_spectral_norm(nn.Conv2d(3, 8, 3, padding=1), input_size=16,
    ...                               n_power_iterations=10)
    >>> for _ in range(10):  # training-mode forwards refine the estimate
    ...     _ = conv(torch.randn(2, 3, 16, 16))
    >>> _ = conv.eval()
    >>> from convspec import conv_singular_values
    >>> s = conv_singular_values(conv.weight.detach(), 16, padding=1, which='max').sigma_max
    >>> abs(s - 1) < 1e-3
    True

    References: T. Miyato, T. Kataoka, M. Koyama, Y. Yoshida, "Spectral Normalization for
    Generative Adversarial Networks", ICLR 2018 (the parametrization and its power iteration);
    H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019
    (the operator); B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023 (the bound).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    conv = is_conv(module)
    if not conv and not isinstance(module, nn.Linear):
        raise ValueError(
            "operator_spectral_norm takes nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or "
            f"nn.Linear, got {type(module).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    if parametrize.is_parametrized(module, name) and any(
            isinstance(p, _OperatorSpectralNorm) for p in module.parametrizations[name]):
        raise ValueError(f"{name!r} of this {type(module).__name__} is already normalised")
    weight = _original(module, name)  # for validation (shape, dtype)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {name!r}")
    kernel = _original(module, "weight")
    if name != "weight" and (not isinstance(kernel, torch.Tensor) or weight.shape != kernel.shape):
        raise ValueError(
            f"{name!r} of this {type(module).__name__} has shape {tuple(weight.shape)}, not that "
            "of the layer's weight: the operator normalised is the layer's with this tensor as "
            "its weight")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(module).__name__} is an uninitialised lazy module: run one "
                         "forward pass first")
    if (isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int)
            or n_power_iterations < 1):
        raise ValueError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not \
            math.isfinite(eps):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if not bool(torch.isfinite(weight.detach()).all()):
        raise ValueError(f"{name!r} has NaN or infinite entries")
    ndim = weight.dim() - 2 if conv else 0
    keywords = module_keywords(module) if conv else None
    if not conv and input_size is not None and input_size != ():
        raise ValueError(f"input_size is for convolutions (spatial sizes); nn.Linear has none, got "
                         f"{input_size!r}")
    size = None
    if conv and input_size is not None:
        # Validates the size against the layer (raises before anything is registered).
        size = conv_geometry(weight, input_size, **keywords).layer_input_size
    p = _OperatorSpectralNorm(weight.detach(), keywords, n_power_iterations, float(eps), bound,
                              ndim)
    if size is not None:
        p._retarget(size, weight.detach())
    parametrize.register_parametrization(module, name, p, unsafe=True)
    _own_copies(type(module))  # Note [pickling parametrized modules]
    if conv:
        module.register_forward_pre_hook(functools.partial(_record_input_size, name),
                                         with_kwargs=True)
    return module
