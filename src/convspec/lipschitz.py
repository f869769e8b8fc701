"""An upper bound on the Lipschitz constant (l2 to l2) of a whole network, from the exact
operator norms of its layers.

Note [Lipschitz propagation]: the model is traced with ``torch.fx`` and, for each tensor of the
graph, a bound ``L`` on the Lipschitz constant of the map from the network input to that tensor
is propagated: ``L(input) = 1``; a module or function ``f`` applied to ``x`` gives
``Lip(f) L(x)`` (a module's bound at the input size of *that* call: a module applied at two
sizes is bounded at each); ``a + b`` (and ``a - b``, ``alpha`` included) gives
``L(a) + L(b)``, each term times ``sqrt`` of how often broadcasting repeats its values (a
residual block ``x + f(x)``: ``(1 + Lip(f)) L(x)``); concatenation, and several outputs, give
``sqrt(sum L^2)``; a reshape, flatten, permutation or basic slice keeps ``L`` (indexing that
can repeat values is refused); multiplication by a constant ``c`` gives ``|c| L``; an in-place
operation on a tensor that something else also reads is refused. The graph is traced and its
shapes propagated (``ShapeProp``) in eval mode, the map the model computes at inference. Every
``Lip(f)`` is an upper bound: the exact operator norm of a linear layer plus its certified error,
a BatchNorm in eval mode as its diagonal scale, the known constant of an activation. A module or
function with no known bound is *named* in ``unsupported`` and the network bound is then
``None``: nothing is ever treated as 1-Lipschitz by default. The product is a bound, usually
loose for deep networks (it ignores how the layers' top singular vectors align).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
import torch.nn.functional as F
from torch import nn

from ._geometry import is_conv
from .spectrum import conv_singular_values, conv_spectral_norm_bound

#: Lipschitz constants of elementwise activations (the sup of |derivative|).
_ACTIVATIONS = {
    nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Hardtanh: 1.0, nn.Softsign: 1.0,
    nn.Sigmoid: 0.25, nn.Softplus: 1.0, nn.Identity: 1.0, nn.Dropout: 1.0, nn.Flatten: 1.0,
    nn.Unflatten: 1.0, nn.Mish: 1.089, nn.SiLU: 1.0999, nn.GELU: 1.1290, nn.Hardswish: 1.5,
    nn.Hardsigmoid: 1 / 6, nn.Tanhshrink: 1.0, nn.Softshrink: 1.0,
}
_FUNCTIONS = {
    torch.relu: 1.0, F.relu: 1.0, torch.tanh: 1.0, torch.sigmoid: 0.25, F.relu6: 1.0,
    F.gelu: 1.1290, F.silu: 1.0999,
}
#: Shape-only operations: the values are a subset or rearrangement, ``L`` is unchanged.
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                    torch.unsqueeze, torch.narrow}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                  "contiguous", "narrow", "clone", "detach"}
#: Operations that split a tensor into a tuple of disjoint pieces: the tuple keeps ``L``.
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split, torch.hsplit,
                    torch.vsplit, torch.dsplit}
_SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit",
                  "split_with_sizes"}
#: Queries whose value depends on the input's shape only (constants of the traced map).
_SHAPE_QUERIES = {"shape", "dtype", "device", "ndim", "size", "dim", "numel", "ndimension",
                  "nelement", "get_device", "is_contiguous", "is_floating_point"}


@dataclass
class LayerLipschitz:
    """One module of the traced graph: its name, type, input size, and the upper bound on its
    Lipschitz constant that the network bound uses (``bound``); ``sigma_max`` is the exact
    operator norm where the module is linear (conv, linear, pooling), with ``method`` the route
    that computed it (``'dense'``, ``'fft'``, ``'iterative'``, ``'svd'``, ``'closed form'``)."""

    name: str
    layer_type: str
    input_size: Tuple[int, ...]
    bound: float
    sigma_max: Optional[float] = None
    method: str = ""
    note: str = ""


@dataclass
class LipschitzReport:
    """:func:`lipschitz_report`'s result. ``bound`` is an upper bound on the network's l2
    Lipschitz constant, or ``None`` when ``unsupported`` names modules or functions without a
    known bound; ``product`` is the plain product of the layer bounds (equal to ``bound`` for a
    chain without residual additions)."""

    layers: List[LayerLipschitz]
    bound: Optional[float]
    unsupported: List[str] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| layer | type | input | exact sigma_max | bound used | route |",
                "|---|---|---|---|---|---|"]
        for r in self.layers:
            s = "" if r.sigma_max is None else f"{r.sigma_max:.6g}"
            rows.append(f"| {r.name} | {r.layer_type} | {'x'.join(map(str, r.input_size))} | "
                        f"{s} | {r.bound:.6g} | {r.method or r.note} |")
        end = ("network: not bounded (unsupported: " + ", ".join(self.unsupported) + ")"
               if self.bound is None else f"network Lipschitz constant <= {self.bound:.6g}")
        return "\n".join(rows) + "\n\n" + end


def _conv_bound(module: nn.Module, size: Tuple[int, ...], tol: float) -> Tuple[float, float, str]:
    spec = conv_singular_values(module, size, which="max", tol=tol, progress=False)
    if not spec.converged:  # the error bound is then not certified: the Gram-iteration bound is
        return spec.sigma_max, conv_spectral_norm_bound(module, size, progress=False), \
            f"{spec.method} (not converged; bound: Gram iteration)"
    err = spec.sigma_max_error or 0.0
    # float64 rounding of the dense / FFT routes: a relative margin far above it
    upper = (spec.sigma_max + err) * (1 + 1e-12)
    return spec.sigma_max, upper, spec.method


def _pool_operator_norm(module: nn.Module, size: Tuple[int, ...], tol: float):
    """An average pooling as the depthwise convolution it is (one channel: all are alike)."""
    d = len(size)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        out = module.output_size
        out = (out,) * d if isinstance(out, int) else tuple(
            n if o is None else o for o, n in zip(out, size))
        if any(n % o for n, o in zip(size, out)):
            return None
        kernel = tuple(n // o for n, o in zip(size, out))
        stride, padding, include = kernel, (0,) * d, True
    else:
        def tup(v):
            return (v,) * d if isinstance(v, int) else tuple(v)
        kernel, stride = tup(module.kernel_size), tup(module.stride or module.kernel_size)
        padding, include = tup(module.padding), module.count_include_pad
        if getattr(module, "ceil_mode", False) or getattr(module, "divisor_override", None) \
                or (not include and any(padding)):
            return None
    if math.prod(kernel) == 1 and stride == kernel:
        return 1.0, 1.0 * (1 + 1e-12), "closed form"
    w = torch.full((1, 1, *kernel), 1.0 / math.prod(kernel), dtype=torch.float64)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](1, 1, kernel, stride=stride, padding=padding,
                                                     bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    return _conv_bound(conv, size, tol)


def _module_bound(module: nn.Module, size: Tuple[int, ...], tol: float):
    """``(sigma_max or None, bound, route)`` for a leaf module, or ``None`` if unknown."""
    if is_conv(module):
        return _conv_bound(module, size, tol)
    if isinstance(module, nn.Linear):
        s = float(torch.linalg.matrix_norm(module.weight.detach().to(torch.float64), 2))
        return s, s * (1 + 1e-12), "svd"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_var is None:
            return None  # batch statistics: not a fixed map of the input
        scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
        if module.affine:
            scale = scale * module.weight.detach().double().abs()
        s = float(scale.max())
        return s, s * (1 + 1e-12), "diagonal scale"
    for cls, lip in _ACTIVATIONS.items():
        if type(module) is cls:
            return None, lip, "constant"
    if type(module) in (nn.LeakyReLU,):
        return None, max(1.0, abs(module.negative_slope)), "constant"
    if type(module) is nn.ELU:
        return None, max(1.0, abs(module.alpha)), "constant"
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        d = len(size)

        def tup(v):
            return (v,) * d if isinstance(v, int) else tuple(v)
        k, s, dil = tup(module.kernel_size), tup(module.stride or module.kernel_size), \
            tup(module.dilation)
        # an input lies in at most prod(ceil(span / stride)) windows; max is 1-Lipschitz per window
        windows = math.prod(-(-(dd * (kk - 1) + 1) // ss) for kk, ss, dd in zip(k, s, dil))
        return None, math.sqrt(windows), "windows"
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                           nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return _pool_operator_norm(module, size, tol)
    return None


def lipschitz_report(model: nn.Module, example_input: torch.Tensor, *,
                     tol: float = 1e-6) -> LipschitzReport:
    """Exact per-layer operator norms of ``model`` and an upper bound on its Lipschitz constant.

    The model is run once on ``example_input`` (eval mode, no gradient; each module's training
    flag is restored) to record the size each module sees, and traced with ``torch.fx``. Per
    module: for every ``nn.Conv*d`` / ``nn.ConvTranspose*d`` the exact ``sigma_max`` of its operator
    ``M`` at that input size (its own stride, padding, dilation, groups, padding mode;
    :func:`convspec.conv_singular_values` with ``which='max'``, within relative ``tol``) and,
    as its bound, ``sigma_max`` plus its error bound; ``nn.Linear``: the matrix 2-norm;
    average pooling: the norm of the equivalent depthwise convolution; max pooling: ``sqrt`` of
    the windows an input can fall in; BatchNorm: ``max |gamma| / sqrt(running_var + eps)``
    (the model is bounded as in eval mode, the map it computes at inference; a BatchNorm
    without running statistics is unsupported); activations: their known
    Lipschitz constants (ReLU 1, sigmoid 1/4, GELU 1.129, ...). These are combined through
    the graph (Note [Lipschitz propagation]): sums for residual additions ``x + f(x)``,
    products along chains. The result is an *upper bound* on the network's l2 Lipschitz
    constant (exact only in the rare case that the per-layer maxima align), or ``None`` with
    the unsupported modules and functions named: no module is assumed 1-Lipschitz.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(8, 10))
    >>> rep = lipschitz_report(net, torch.randn(1, 3, 8, 8))
    >>> [r.layer_type for r in rep.layers][:3], rep.bound > 0
    (['Conv2d', 'ReLU', 'Conv2d'], True)
    >>> abs(rep.bound - math.prod(r.bound for r in rep.layers)) < 1e-9 * rep.bound  # a chain
    True

    References: C. Szegedy et al., "Intriguing properties of neural networks", ICLR 2014 (the
    product bound); H. Sedghi, V. Gupta, P. M. Long, ICLR 2019 (exact conv operator norms).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
    modules = dict(model.named_modules())
    # each module's own flag: model.train(flag) would unfreeze a BatchNorm kept in eval mode
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()  # the map the model computes at inference (and what the trace follows)
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported, not hidden
            raise ValueError(
                f"lipschitz_report: the model cannot be traced by torch.fx ({type(exc).__name__}: "
                f"{exc}); the bound needs its graph (sequential chains and x + f(x) blocks)"
            ) from exc
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)  # each node's shape: sizes, broadcasting
        return _propagate(gm.graph, modules, tol)
    finally:
        for m, flag in was_training.items():
            m.training = flag


def _shape(node) -> Optional[Tuple[int, ...]]:
    """The node's tensor shape, ``None`` if its value is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _basic_index(index) -> bool:
    """An index that selects a sub-block (ints, slices, None, Ellipsis): never repeats a value."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


_VIEW_ATTRIBUTES = {"data", "T", "mT", "H", "mH"}


def _shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size(1)``, ...: a value that does not change with the input's values."""
    if node.op == "call_method":
        return node.target in _SHAPE_QUERIES
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_QUERIES


def _view_of(node: fx.Node, modules) -> Optional[fx.Node]:
    """The node whose tensor ``node``'s value may share memory with (a view of it, or the same
    tensor modified in place), else ``None``."""
    if node.op == "call_module":
        m = modules[node.target]
        aliasing = bool(getattr(m, "inplace", False)) or isinstance(
            m, (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd))
    elif node.op == "call_method":
        aliasing = (node.target in (_SHAPE_METHODS - {"clone"}) | _SPLIT_METHODS
                    | {"view_as", "reshape_as"} or _in_place(node, modules))
    elif node.op == "call_function":
        aliasing = (node.target in _SHAPE_FUNCTIONS | _SPLIT_FUNCTIONS
                    or node.target in (operator.getitem, getattr) or _in_place(node, modules))
    else:
        aliasing = False
    src = node.args[0] if node.args else None
    return src if aliasing and isinstance(src, fx.Node) else None


def _in_place(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False)) or node.target in (
            operator.iadd, operator.isub, operator.imul)
    return False


def _propagate(graph: fx.Graph, modules, tol) -> LipschitzReport:
    lip: Dict[fx.Node, float] = {}
    layers: List[LayerLipschitz] = []
    unsupported: List[str] = []
    seen: Dict[Tuple[str, Tuple[int, ...]], float] = {}

    def tensors(args):
        return [a for a in _flat(args) if isinstance(a, fx.Node) and a in lip]

    def refuse(node, why):
        unsupported.append(f"{node.name} ({why})")
        lip[node] = math.inf

    for node in graph.nodes:
        if node.op == "placeholder":
            lip[node] = 1.0
            continue
        if node.op in ("get_attr", "output"):
            continue
        ins = tensors((node.args, node.kwargs))
        if not ins or _shape_query(node):
            continue  # a constant, or a size: neither changes with the input's values
        first = lip[ins[0]]
        if _in_place(node, modules) and _shared(ins[0], modules):
            refuse(node, "an in-place operation on a tensor that is used elsewhere")
            continue
        if _shape(node) is None:
            # Note [values that are not one tensor]: a value computed from the input (a tuple
            # of tensors, a Python number) must carry a bound, or every sum that reads it would
            # silently drop a term. Splits into disjoint pieces keep L; the rest is refused.
            if "tensor_meta" in node.meta and len(ins) == 1 and (
                    node.op == "call_function" and node.target in _SPLIT_FUNCTIONS
                    or node.op == "call_method" and node.target in _SPLIT_METHODS):
                lip[node] = first
            else:
                refuse(node, f"{node.op} {_what(node, modules)} gives no single tensor")
            continue
        out_numel = math.prod(_shape(node))

        def spread(a):  # broadcasting repeats each value numel(out) / numel(a) times
            shape = _shape(a)
            return math.sqrt(out_numel / max(1, math.prod(shape))) if shape else 1.0

        target = node.target
        if node.op == "call_module":
            module = modules[target]
            size = tuple(_shape(ins[0])[2:])
            key = (target, size)
            if key not in seen:
                got = _module_bound(module, size, tol)
                if got is None:
                    seen[key] = math.inf
                    unsupported.append(f"{target} ({type(module).__name__})")
                else:
                    sigma, bound, route = got
                    layers.append(LayerLipschitz(target, type(module).__name__, size, bound,
                                                 sigma, route))
                    seen[key] = bound
            lip[node] = seen[key] * first
        elif node.op == "call_function" and target in (operator.add, torch.add, operator.sub,
                                                       torch.sub, operator.iadd, operator.isub):
            if set(node.kwargs) - {"alpha"}:
                refuse(node, f"{getattr(target, '__name__', target)} with {sorted(node.kwargs)}")
                continue
            alpha = abs(float(node.kwargs.get("alpha", 1.0)))
            total = 0.0
            for i, a in enumerate(node.args):  # alpha scales the second operand, ``other``
                if isinstance(a, fx.Node) and a in lip:
                    total += (alpha if i == 1 else 1.0) * spread(a) * lip[a]
            lip[node] = total
        elif node.op == "call_function" and target in (torch.cat, torch.stack):
            lip[node] = math.sqrt(sum(lip[a] ** 2 for a in ins))
        elif node.op == "call_function" and target in (operator.mul, torch.mul) \
                and len(ins) == 1 and not node.kwargs \
                and any(isinstance(a, (int, float)) for a in node.args):
            c = next(a for a in node.args if isinstance(a, (int, float)))
            lip[node] = abs(c) * first
        elif node.op == "call_function" and target in _FUNCTIONS and len(ins) == 1 \
                and set(node.kwargs) <= {"inplace"}:
            lip[node] = _FUNCTIONS[target] * first
        elif node.op == "call_function" and target is operator.getitem and len(ins) == 1:
            if _basic_index(node.args[1]):
                lip[node] = first
            else:
                refuse(node, "indexing that can repeat values")
        elif node.op == "call_function" and target is getattr and len(ins) == 1:
            if node.args[1] in _VIEW_ATTRIBUTES:
                lip[node] = first
            else:
                refuse(node, f"attribute {node.args[1]!r}")
        elif (node.op == "call_function" and target in _SHAPE_FUNCTIONS
              or node.op == "call_method" and target in _SHAPE_METHODS) and len(ins) == 1:
            lip[node] = first
        elif node.op == "call_method" and target in ("view_as", "reshape_as"):
            if node.args[0] in lip:  # else a constant; the other tensor gives only a shape
                lip[node] = lip[node.args[0]]
        elif node.op == "call_method" and target in ("relu", "tanh") and len(ins) == 1:
            lip[node] = first
        else:
            refuse(node, f"{node.op} {_what(node, modules)}")
    outs = [n for n in _flat([node.args for node in graph.nodes if node.op == "output"])
            if isinstance(n, fx.Node) and n in lip]
    # several outputs are one vector: the concatenation's bound
    bound = math.sqrt(sum(lip[n] ** 2 for n in outs)) if outs and not unsupported else None
    return LipschitzReport(layers, bound, unsupported)


def _shared(node: fx.Node, modules) -> bool:
    """Whether the tensor of ``node``, or one it is a view of, is also read elsewhere."""
    while node is not None:
        if len(node.users) > 1:
            return True
        node = _view_of(node, modules)
    return False


def _what(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _flat(item)]
    return [x]
