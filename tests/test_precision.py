"""Dtypes, reduced precision and autocast: penalties, regularizer, descent, SVB and initialisers.

Note [working precision] (convspec/_precision.py): float16/bfloat16 weights are computed in
float32 with autocast off and the result is rounded once to the weight's dtype; non-floating
weights and non-finite hyperparameters raise ValueError.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convspec import (
    FrobeniusRegularizer,
    bbn_,
    bound_singular_values,
    conv_operator,
    delta_orthogonal_,
    frobenius_penalty,
    frobenius_penalty_grad_reference,
    frobenius_penalty_reference,
    orthogonal_,
    penalty_descent,
    spectral_penalty,
    svb_,
)

LOW = [torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]


def rand(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def near_orthogonal(c=16, seed=0, noise=1e-3):
    """A delta-orthogonal kernel plus noise: ||M^T M||^2, ||M||^2 and g N^2 nearly cancel."""
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    delta_orthogonal_(conv, generator=torch.Generator().manual_seed(seed))
    return conv.weight.detach().double() + rand(c, c, 3, 3, seed=seed + 1, scale=noise)


def as_dtype(w, dtype):
    """``w`` cast to ``dtype`` (any dtype, including int, bool and complex)."""
    if dtype == torch.bool:
        return w > 0
    if dtype.is_complex:
        return w.to(dtype)
    return (10 * w).round().to(dtype) if not dtype.is_floating_point else w.to(dtype)


# ------------------------------------------------------------------------------ bad dtypes


TENSOR_FUNCTIONS = {
    "frobenius_penalty": lambda w: frobenius_penalty(w, 5, padding="same"),
    "frobenius_penalty_reference": lambda w: frobenius_penalty_reference(w, 5, padding="same"),
    "frobenius_penalty_grad_reference": lambda w: frobenius_penalty_grad_reference(w, 5, padding="same"),
    "spectral_penalty": lambda w: spectral_penalty(w, 5, state={}, padding="same"),
    "penalty_descent": lambda w: penalty_descent(w, 5, steps=1, track_spectrum=False, padding="same"),
    "bound_singular_values": lambda w: bound_singular_values(w, 0.1),
}


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("fn", list(TENSOR_FUNCTIONS), ids=str)
def test_non_floating_weight_raises_naming_the_dtype(fn, dtype):
    w = as_dtype(rand(3, 2, 3, 3), dtype)
    with pytest.raises(ValueError, match=str(dtype).replace(".", r"\.")):
        TENSOR_FUNCTIONS[fn](w)


def conv_with_weight(dtype):
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    conv.weight = nn.Parameter(as_dtype(conv.weight.detach(), dtype), requires_grad=False)
    return conv


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_non_floating_module_weight_raises_naming_layer_and_dtype(dtype):
    pattern = rf"'1'.*{str(dtype).replace('.', '[.]')}"
    model = nn.Sequential(nn.Conv2d(2, 2, 1), conv_with_weight(dtype))
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=pattern):
        FrobeniusRegularizer(model)
    with pytest.raises(ValueError, match=pattern):
        svb_(model, 0.1)
    with pytest.raises(ValueError, match=pattern):
        orthogonal_(model)
    with pytest.raises(ValueError, match=str(dtype).replace(".", "[.]")):
        delta_orthogonal_(model[1])
    bn = nn.BatchNorm2d(3)
    bn.weight = nn.Parameter(as_dtype(torch.ones(3), dtype), requires_grad=False)
    with pytest.raises(ValueError, match=rf"'1'.*{str(dtype).replace('.', '[.]')}"):
        bbn_(nn.Sequential(nn.Identity(), bn), 0.1, mode="rel")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


def test_regularizer_rejects_a_weight_whose_dtype_changed_after_construction():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    reg = FrobeniusRegularizer(model)
    model(torch.randn(1, 2, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "complex modules are a new feature"
        model[2].to(torch.complex64)
    with pytest.raises(ValueError, match=r"'2'.*torch\.complex64"):
        reg()


# ------------------------------------------------------------------------------ hyperparameters


NONFINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", NONFINITE + [True, "1.0", None, 1j], ids=repr)
def test_non_finite_or_non_real_alpha_raises(bad):
    w = rand(3, 2, 3, 3)
    for fn in (frobenius_penalty, frobenius_penalty_reference, frobenius_penalty_grad_reference,
               spectral_penalty):
        with pytest.raises(ValueError, match="alpha"):
            fn(w, 5, bad)
    with pytest.raises(ValueError, match="alpha"):
        penalty_descent(w, 5, bad, steps=1, padding="same")
    with pytest.raises(ValueError, match="alpha"):
        FrobeniusRegularizer(nn.Conv2d(2, 2, 3), bad)


@pytest.mark.parametrize("bad", NONFINITE + ["0.1", None], ids=repr)
def test_non_finite_descent_and_init_hyperparameters_raise(bad):
    w = rand(2, 2, 3, 3)
    for name in ("lr", "armijo_c", "armijo_shrink"):
        with pytest.raises(ValueError, match=name):
            penalty_descent(w, 4, steps=1, step_rule="armijo", **{name: bad})
    for init in (orthogonal_, delta_orthogonal_):
        with pytest.raises(ValueError, match="gain"):
            init(nn.Conv2d(2, 2, 3), bad)


def test_alpha_as_a_numpy_or_tensor_scalar_still_works():
    np = pytest.importorskip("numpy")
    w = rand(3, 2, 3, 3)
    want = frobenius_penalty(w, 5, 0.5, padding="same")
    assert torch.equal(frobenius_penalty(w, 5, np.float64(0.5), padding="same"), want)
    assert torch.equal(frobenius_penalty(w, 5, torch.tensor(0.5), padding="same"), want)


# ------------------------------------------------------------------------------ float16 / bfloat16


def bound(dtype, ref, n_in):
    """Documented accuracy: one rounding to ``dtype`` after a float32 computation whose
    cancellation error is ~eps32 * g N1 N2 absolute."""
    return torch.finfo(dtype).eps / 2 * abs(ref) + 2 * EPS32 * n_in


CASES = [  # (weight in float64, input size, alpha, geometry)
    (lambda: rand(6, 4, 3, 3, seed=1, scale=0.3), 8, 1.0, {}),
    (lambda: rand(4, 8, 3, 3, seed=2, scale=0.2), (9, 7), 0.5,
     dict(stride=2, padding=1, dilation=2, padding_mode="circular")),
    (lambda: rand(8, 4, 3, 3, seed=3, scale=0.2), 10, 1.0, dict(groups=2)),
    # g N^2 = 65536: in float16 the three terms overflow although the penalty is ~18.
    (lambda: near_orthogonal(16), 64, 1.0, {}),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_low_precision_penalty_is_float32_accurate(dtype, case):
    make, n, alpha, kw = CASES[case]
    w = make().to(dtype)  # the rounded weight; the reference sees exactly the same numbers
    n_in = w.shape[1] * kw.get("groups", 1) * (n * n if isinstance(n, int) else n[0] * n[1])
    ref = float(frobenius_penalty(w.double(), n, alpha, **kw))
    w = w.requires_grad_(True)
    got = frobenius_penalty(w, n, alpha, **kw)
    assert got.dtype == dtype and torch.isfinite(got)
    assert abs(float(got.detach()) - ref) <= bound(dtype, ref, n_in), (float(got.detach()), ref)
    got.backward()
    assert w.grad.dtype == dtype and bool(torch.isfinite(w.grad).all())
    gref = frobenius_penalty_grad_reference(w.detach().double(), n, alpha, **kw) \
        if n_in <= 1024 else None
    if gref is None:  # too large for the dense reference: the float64 autograd gradient
        w64 = w.detach().double().requires_grad_(True)
        frobenius_penalty(w64, n, alpha, **kw).backward()
        gref = w64.grad
    err = (w.grad.double() - gref).abs().max() / gref.abs().max()
    assert err <= torch.finfo(dtype).eps, float(err)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_dense_references(dtype):
    w = rand(4, 3, 3, 3, seed=4, scale=0.4).to(dtype)
    ref = frobenius_penalty_reference(w.double(), 5, 0.7, padding="same")
    got = frobenius_penalty_reference(w, 5, 0.7, padding="same")
    assert got.dtype == dtype and abs(float(got) - float(ref)) <= bound(dtype, float(ref), 75)
    gref = frobenius_penalty_grad_reference(w.double(), 5, 0.7, padding="same")
    grad = frobenius_penalty_grad_reference(w, 5, 0.7, padding="same")
    assert grad.dtype == dtype
    assert float((grad.double() - gref).abs().max()) <= torch.finfo(dtype).eps * float(gref.abs().max())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_spectral_penalty(dtype):
    w = rand(3, 2, 3, 3, seed=5, scale=0.5).to(dtype).requires_grad_(True)
    m = conv_operator(w.detach().double(), 4, padding="same")
    e = torch.linalg.eigvalsh(m.T @ m)
    ref = float(torch.maximum(e[-1] - 1, 1 - e[0]))
    state = {}
    got = spectral_penalty(w, 4, n_power_iterations=3000, state=state, padding="same")
    assert got.dtype == dtype and state["u"].dtype == torch.float32
    assert abs(float(got.detach()) - ref) <= torch.finfo(dtype).eps / 2 * abs(ref) + 1e-5
    got.backward()
    assert w.grad.dtype == dtype and bool(torch.isfinite(w.grad).all())


def test_float16_overflow_of_the_value_warns_and_float32_works():
    w = rand(8, 8, 3, 3, seed=6).half().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="exceeds the range of torch.float16"):
        r = frobenius_penalty(w, 32, padding="same")
    assert r.dtype == torch.float16 and torch.isinf(r)
    r32 = frobenius_penalty(w.float(), 32, padding="same")  # the documented way out
    ref = float(frobenius_penalty(w.detach().double(), 32, padding="same"))
    assert r32.dtype == torch.float32 and abs(float(r32.detach()) - ref) <= 1e-5 * ref
    r32.backward()
    assert w.grad.dtype == torch.float16


def test_regularizer_on_a_bfloat16_model_rounds_once():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).to(torch.bfloat16)
    reg = FrobeniusRegularizer(model, 0.5)
    model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))
    total = reg()
    assert total.dtype == torch.bfloat16
    model64 = copy.deepcopy(model).double()
    reg64 = FrobeniusRegularizer(model64, 0.5)
    model64(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    ref = float(reg64().detach())
    assert abs(float(total.detach()) - ref) <= torch.finfo(torch.bfloat16).eps / 2 * ref + 1e-4
    assert all(t.dtype == torch.bfloat16 for t in reg.penalties().values())
    total.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


def test_descent_accepts_low_precision_weights():
    w = rand(3, 3, 3, 3, seed=7, scale=0.5)
    res = penalty_descent(w.to(torch.bfloat16), 5, steps=3, step_rule="armijo",
                          track_spectrum=False, padding="same")
    ref = penalty_descent(w.to(torch.bfloat16).double(), 5, steps=3, step_rule="armijo",
                          track_spectrum=False, padding="same")
    assert res.penalty == ref.penalty and res.weight.dtype == torch.float64


# ------------------------------------------------------------------------------ autocast

AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    # No GPU in CI: these run where CUDA is available.
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")),
]


def value_and_grad(fn, w, *, autocast=None, backward_inside=False):
    w = w.detach().clone().requires_grad_(True)
    if autocast is None:
        r = fn(w)
        r.backward()
        return r.detach(), w.grad
    with torch.autocast(*autocast):
        r = fn(w)
        if backward_inside:
            r.backward()
    if not backward_inside:
        r.backward()
    return r.detach(), w.grad


@pytest.mark.parametrize("device,dtype", AUTOCAST)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_penalties_forward_and_backward_under_autocast(device, dtype, backward_inside):
    w = rand(6, 4, 3, 3, seed=8, scale=0.3, dtype=torch.float32).to(device)
    state = {}
    spectral_penalty(w, 6, n_power_iterations=50, state=state, padding="same")  # warm vectors, then copies
    fns = {
        "frobenius": lambda k: frobenius_penalty(k, 6, stride=2, padding=1),
        "spectral": lambda k: spectral_penalty(
            k, 6, n_power_iterations=2, state={key: v.clone() for key, v in state.items()}, padding="same"),
        "reference": lambda k: frobenius_penalty_reference(k, 6, stride=2, padding=1),
    }
    if backward_inside:  # PyTorch runs built-in backward formulas (the dense GEMMs) under it
        del fns["reference"]
    for name, fn in fns.items():
        want, gwant = value_and_grad(fn, w)
        got, grad = value_and_grad(fn, w, autocast=(device, dtype), backward_inside=backward_inside)
        assert got.dtype == torch.float32 and grad.dtype == torch.float32, name
        # Autocast is off inside: the same float32 computation, up to float32 rounding.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(grad, gwant, rtol=1e-5, atol=1e-5 * float(gwant.abs().max()),
                                   msg=name)
    with torch.autocast(device, dtype=dtype):
        g = frobenius_penalty_grad_reference(w, 6, padding="same")
    torch.testing.assert_close(g, frobenius_penalty_grad_reference(w, 6, padding="same"), rtol=1e-5, atol=1e-4)


def make_model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    ).to(device)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_regularizer_training_step_under_autocast(device, dtype):
    x = torch.randn(16, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    grads, reg_grads = {}, {}
    for autocast in (False, True):
        model = make_model(device)
        reg = FrobeniusRegularizer(model, normalize=True)
        model(x)  # records the input sizes
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            reg().backward()  # backward inside the autocast region
        reg_grads[autocast] = {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = model(x)
            penalty = reg()
            loss = F.cross_entropy(out, y) + 0.1 * penalty
        assert penalty.dtype == torch.float32
        loss.backward()
        grads[autocast] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(bool(torch.isfinite(g).all()) for g in grads[autocast].values())
        opt.step()  # the step itself works
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    rtol = 16 * torch.finfo(dtype).eps  # the task loss is in low precision under autocast
    scale = max(float(g.norm()) for g in grads[False].values())  # (0.bias: zero, BN follows)
    for name, g in grads[False].items():
        assert float((grads[True][name] - g).norm()) <= rtol * max(float(g.norm()), scale / 10), name
    for name, g in reg_grads[False].items():  # the penalty is not
        torch.testing.assert_close(reg_grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_svb_is_not_lowered_by_autocast(device, dtype):
    w = rand(16, 8, 3, 3, seed=9, scale=0.5, dtype=torch.float32).to(device)
    for method in ("svd", "gram"):
        want = bound_singular_values(w, 0.05, dtype=torch.float32, method=method)
        with torch.autocast(device, dtype=dtype):
            got = bound_singular_values(w, 0.05, dtype=torch.float32, method=method)
        assert torch.equal(got, want), method
