"""The two Gram routes of the exact Frobenius penalty (Note [pair layout] in convspec/penalty.py).

Layers below ``TRIANGLE_MIN`` channels take the square route (one GEMM ``A A^T``), larger ones
the triangle route (``K`` GEMMs over the block triangle, the other half by transposition); every
other test in the suite runs on small layers, so here each route is forced on every layer type
and compared with the dense operator built from the module itself, ``gradcheck``-ed through the
custom backward, batched inside the regularizer, compiled, and measured in float32 against
float64.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

import convspec
from _compile_check import assert_compiled_step_matches_eager, assert_grads_match_per_layer
from _dense import random_axes
import convspec.penalty
import convspec.regularizer
from convspec._geometry import conv_geometry
from convspec.penalty import _axis_q, _constants, _GramSquaredNorm, _rows, _side

from _dense import dense_penalty, random_layer

ROUTES = {"square": 10**9, "triangle": 0}


@pytest.fixture(params=sorted(ROUTES))
def route(request, monkeypatch):
    monkeypatch.setattr(convspec.penalty, "TRIANGLE_MIN", ROUTES[request.param])
    return request.param


@pytest.mark.parametrize("seed", range(3))
def test_both_routes_exact_on_random_layers(route, seed):
    # Conv1d/2d/3d and ConvTranspose1d/2d/3d, every padding mode, strides, dilation, groups,
    # 'same', output_padding (tests/_dense.py): value against the dense M, gradient against the
    # closed form of Theorem 3.1 (built from M as well).
    rng = random.Random(300 + seed)
    for _ in range(15):
        m, n = random_layer(rng)
        alpha = rng.choice((0.5, 1.0, 2.0))
        m.zero_grad()
        exact = convspec.frobenius_penalty(m, n, alpha)
        assert float(exact.detach()) == pytest.approx(dense_penalty(m, n, alpha), rel=1e-10,
                                                      abs=1e-9), (m, n)
        exact.backward()
        grad_ref = convspec.frobenius_penalty_grad_reference(m, n, alpha)
        scale = float(grad_ref.abs().max()) + 1
        assert torch.allclose(m.weight.grad, grad_ref, rtol=1e-8, atol=1e-9 * scale), (m, n)


@pytest.mark.parametrize("shape,n,kw", [
    ((3, 2, 3, 3), 5, dict(padding=1)),                                   # 2-D, 'in' side
    ((2, 3, 3, 2), (4, 6), dict(stride=2, padding=1, dilation=(2, 1),     # strided, dilated,
                                padding_mode="circular")),                # circular, 'out'
    ((4, 1, 3), 7, dict(groups=2, padding=1, padding_mode="reflect")),    # 1-D grouped
    ((2, 2, 2, 3, 2), (3, 4, 3), dict(padding=1, padding_mode="replicate")),  # 3-D
])
def test_gram_function_gradcheck(route, shape, n, kw):
    # The custom backward (one GEMM, dA = 2 G A) against finite differences, both outputs,
    # on a batch of two problems (what the regularizer stacks).
    geom = conv_geometry(shape, n, **kw)
    w = torch.randn(*shape, dtype=torch.float64)
    side = _side(w, geom.groups)
    qs, d, lower, upper = _constants(geom.axes, side, torch.float64, w.device)
    rows = torch.cat([_rows(w, geom.groups, side), _rows(torch.randn_like(w), geom.groups, side)])
    b, kk, c, m = rows.shape
    a = rows.reshape(b, kk * c, m).clone().requires_grad_(True)
    ks = tuple(d.shape[::2])
    assert torch.autograd.gradcheck(
        lambda a: _GramSquaredNorm.apply(a, qs, d, lower, upper, c, ks), (a,))


def test_axis_constants_are_symmetric_and_swap_invariant():
    # What the one-GEMM backward of _GramSquaredNorm assumes of each Q_i (Note [pair layout]).
    for ax in random_axes(random.Random(7), 300, max_n=20):
        k = ax.kernel
        swap = np.arange(k * k).reshape(k, k).T.reshape(-1)  # (p, p') -> (p', p)
        for side in ("in", "out"):
            q = _axis_q(ax, side)
            np.testing.assert_array_equal(q, q.T)
            np.testing.assert_array_equal(q[swap][:, swap], q)


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1),
        nn.Conv2d(5, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1),
        nn.Conv2d(5, 5, 3, padding=1, groups=5),
        nn.Conv2d(5, 4, 2, stride=2, padding_mode="circular"),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.Linear(6, 6),
    ).double()


def test_regularizer_batches_the_triangle_route(route, monkeypatch):
    # One call per group (equal layers stacked): the sum and its gradient are those of the
    # per-layer penalties, which are those of the dense operator.
    monkeypatch.setattr(convspec.regularizer, "_chunk_bytes", lambda device: 2**30)
    model = _model()
    reg = convspec.FrobeniusRegularizer(model, 0.6)
    model(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    total = reg()
    assert max(stop - start for g in reg._plan[1] for start, stop in g.chunks) == 3
    dense = sum(dense_penalty(conv, size, 0.6) for name, conv in reg.convs.items()
                for size in reg.input_sizes[name])
    for lin in reg.linears.values():
        w = lin.weight.detach()
        dense += float((w.T @ w - 0.6 * torch.eye(w.shape[1], dtype=w.dtype)).square().sum())
    assert float(total) == pytest.approx(dense, rel=1e-10)
    assert_grads_match_per_layer(model, reg, total)


def test_triangle_route_compiles_without_graph_break(monkeypatch):
    monkeypatch.setattr(convspec.penalty, "TRIANGLE_MIN", 0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    assert_compiled_step_matches_eager(model, torch.randn(2, 3, 6, 6))


def _near_orthogonal(c):
    w = torch.zeros(c, c, 3, 3, dtype=torch.float64)
    w[:, :, 1, 1] = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    return w + 0.01 * torch.randn_like(w)


@pytest.mark.parametrize("kind", ["random", "near-orthogonal"])
def test_float32_penalty_and_gradient_vs_float64(route, kind):
    # Note [pair layout], accuracy: <T, QT> is a dot product of terms of both signs. Measured
    # (c = 16, 64, 128 at N = 28, 7, 16; both routes): value within 3e-6 of max(R, g N)
    # relative, gradient within 2e-6 relative (norm), where the joint route had 1e-4 and 6e-7.
    # The bounds below leave a factor of 5-10; the reference is float64 on the same
    # float32-rounded weights.
    for c, n in ((16, 28), (64, 7)):
        w = torch.randn(c, c, 3, 3, dtype=torch.float64) / (9 * c) ** 0.5
        if kind == "near-orthogonal":
            w = _near_orthogonal(c)
        w = w.float().double()
        w64 = w.clone().requires_grad_(True)
        ref = convspec.frobenius_penalty(w64, n, padding=1)
        ref.backward()
        w32 = w.float().requires_grad_(True)
        val = convspec.frobenius_penalty(w32, n, padding=1)
        val.backward()
        scale = max(float(ref), c * n * n)  # the three-term cancellation: error ~ eps g N
        assert abs(float(val) - float(ref)) <= 3e-5 * scale, (c, float(val), float(ref))
        err = float((w32.grad.double() - w64.grad).norm() / w64.grad.norm())
        assert err <= 1e-5, (c, err)
