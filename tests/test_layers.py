"""Every convolution PyTorch has, module first: geometry, operator, exact penalty and gradient.

References are built from the module itself applied to unit impulses (tests/_dense.py), in
float64, over randomised geometries: Conv1d/2d/3d and ConvTranspose1d/2d/3d, every padding mode,
rectangular inputs and kernels, even kernels, 'same', strides that skip inputs, groups,
output_padding.
"""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import convspec
from convspec._geometry import axis_pair_sums, geometry_of, layer_adjoint, layer_forward

from _dense import CONV, CONV_T, MODES, dense_penalty, module_operator, random_axes, random_layer


def _brute_pair_sums(ax):
    a = ax.tap_matrices()
    e = np.einsum("pyx,qzx->pqyz", a, a)
    k = ax.kernel
    return np.einsum("pqyz,rsyz->pqrs", e, e).reshape(k * k, k * k), np.einsum("pqyy->pq", e)


@pytest.mark.parametrize("mode", MODES)
def test_axis_pair_sums_match_brute_force(mode):
    for ax in random_axes(random.Random(hash(mode) % 1000), 250, mode=mode, max_n=30):
        q, dd = axis_pair_sums(ax)
        qb, db = _brute_pair_sums(ax)
        np.testing.assert_allclose(q, qb, atol=1e-12)
        np.testing.assert_allclose(dd, db, atol=1e-12)


def _layers(seed, count, **kw):
    rng = random.Random(seed)
    return [random_layer(rng, **kw) for _ in range(count)]


@pytest.mark.parametrize("seed", range(6))
def test_forward_adjoint_operator_match_the_module(seed):
    for m, n in _layers(seed, 25):
        geom = geometry_of(m, n)
        x = torch.randn(2, geom.layer_in_channels, *n, dtype=torch.float64)
        with torch.no_grad():
            ref = m(x)
        y = layer_forward(x, m.weight.detach(), geom)
        assert y.shape == ref.shape and torch.allclose(y, ref), m
        v = torch.randn_like(ref)
        lhs = (v * ref).sum()
        rhs = (layer_adjoint(v, m.weight.detach(), geom) * x).sum()
        assert torch.allclose(lhs, rhs), m
        dense = module_operator(m, n)
        assert torch.allclose(convspec.conv_operator(m, n).detach(), dense), m
        assert dense.shape == (geom.layer_n_out, geom.layer_n_in)


@pytest.mark.parametrize("seed", range(6))
def test_penalty_and_gradient_are_exact_on_random_layers(seed):
    rng = random.Random(100 + seed)
    for m, n in _layers(seed, 20):
        alpha = rng.choice((0.5, 1.0, 2.0))
        m.zero_grad()
        exact = convspec.frobenius_penalty(m, n, alpha)
        ref = dense_penalty(m, n, alpha)
        assert float(exact.detach()) == pytest.approx(ref, rel=1e-10, abs=1e-9), (m, n)
        exact.backward()
        grad_ref = convspec.frobenius_penalty_grad_reference(m, n, alpha)
        scale = float(grad_ref.abs().max()) + 1
        assert torch.allclose(m.weight.grad, grad_ref, rtol=1e-8, atol=1e-9 * scale), (m, n)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_penalty_cost_is_independent_of_n(d, mode):
    # The same layer on a small and a huge input: the geometry constants of each axis have the
    # same size, and the value grows only through the interior (checked exactly on small sizes).
    m = CONV[d](3, 4, 3, padding=1, padding_mode=mode, bias=False).double()
    big = 10**6 if d == 1 else (4096 if d == 2 else 256)
    v = convspec.frobenius_penalty(m, big)
    assert torch.isfinite(v)
    sizes = [7, 8, 9] if d < 3 else [5, 6, 7]
    vals = [float(convspec.frobenius_penalty(m, n).detach()) for n in sizes]
    refs = [dense_penalty(m, n) for n in sizes]
    assert vals == pytest.approx(refs, rel=1e-10)


def test_transposed_penalty_uses_the_layers_own_identity():
    up = nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False).double()
    # M (3*8*8 x 2*4*4) of the transposed layer; the identity is 32 x 32.
    m = module_operator(up, 4)
    ref = float((m.T @ m - torch.eye(32, dtype=torch.float64)).square().sum())
    assert float(convspec.frobenius_penalty(up, 4)) == pytest.approx(ref, rel=1e-12)
    # The same weight read as a convolution describes a different operator.
    as_conv = float(convspec.frobenius_penalty(up.weight, 8, stride=2))
    assert as_conv != pytest.approx(ref, rel=1e-3)


def test_functional_defaults_are_those_of_nn_conv():
    conv = nn.Conv2d(3, 5, 3, bias=False).double()  # padding 0, as nn.Conv2d
    assert float(convspec.frobenius_penalty(conv.weight, 8)) == pytest.approx(
        float(convspec.frobenius_penalty(conv, 8)), rel=1e-14)
    assert float(convspec.frobenius_penalty(conv, 8)) == pytest.approx(dense_penalty(conv, 8), rel=1e-10)


def test_module_plus_keywords_refused():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with pytest.raises(ValueError, match="defines its own geometry"):
        convspec.frobenius_penalty(conv, 8, padding=1)
    with pytest.raises(ValueError, match="convolution module"):
        convspec.frobenius_penalty(nn.Linear(3, 3), 8)


def test_lazy_modules():
    lazy = nn.LazyConv2d(4, 3, padding=1, padding_mode="reflect").double()
    with pytest.raises(ValueError, match="lazy"):
        convspec.frobenius_penalty(lazy, 6)
    lazy(torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    assert float(convspec.frobenius_penalty(lazy, 6)) == pytest.approx(dense_penalty(lazy, 6), rel=1e-10)


def test_bad_transposed_and_mode_arguments():
    w = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="output_padding"):
        convspec.frobenius_penalty(w, 5, stride=2, transposed=True, output_padding=2)
    with pytest.raises(ValueError, match="output_padding applies"):
        convspec.frobenius_penalty(w, 5, output_padding=1)
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        convspec.frobenius_penalty(w, 5, transposed=True, padding_mode="circular")
    with pytest.raises(ValueError, match="reflect padding"):
        convspec.frobenius_penalty(w, 3, padding=3, padding_mode="reflect")
    with pytest.raises(ValueError, match="spatial axes"):
        convspec.frobenius_penalty(torch.randn(2, 2, 1, 1, 1, 1), 3)


# ---------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("seed", range(4))
def test_spectra_of_random_layers_match_the_module(seed):
    import warnings

    for m, n in _layers(200 + seed, 12):
        sv = torch.linalg.svdvals(module_operator(m, n))
        smax, smin = float(sv[0]), float(sv[-1])
        dense = convspec.conv_singular_values(m, n, method="dense")
        assert torch.allclose(dense.values, sv, atol=1e-10 * max(smax, 1)), (m, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a non-converged result is allowed; a wrong one not
            it = convspec.conv_singular_values(m, n, which="extremes", method="iterative")
        if it.converged:
            assert abs(it.sigma_max - smax) <= 1.001 * it.sigma_max_error + 1e-6 * smax, (m, n)
            assert abs(it.sigma_min - smin) <= 1.001 * it.sigma_min_error + 1e-9 * smax, (m, n)
        assert convspec.conv_spectral_norm_bound(m, n) >= smax * (1 - 1e-9), (m, n)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fft_route_on_circular_layers_of_every_dimension(d):
    rng = random.Random(d)
    checked = 0
    while checked < 4:
        m, n = random_layer(rng, ndim=d, transposed=False, mode="circular")
        try:
            fft = convspec.conv_singular_values(m, n, method="fft")
        except ValueError as e:
            assert "does not apply" in str(e)
            continue
        sv = torch.linalg.svdvals(module_operator(m, n))
        assert torch.allclose(fft.values, sv, atol=1e-9 * max(float(sv[0]), 1)), (m, n)
        ext = convspec.conv_singular_values(m, n, which="extremes", method="fft")
        assert ext.sigma_max == pytest.approx(float(sv[0]), rel=1e-10)
        checked += 1
    # Strided circular layers: the polyphase transfer matrices, 3-D included.
    conv = CONV[d](2, 3, 3, stride=2, padding=1, padding_mode="circular", bias=False).double()
    size = 8 if d < 3 else 4
    sv = torch.linalg.svdvals(module_operator(conv, size))
    fft = convspec.conv_singular_values(conv, size, method="fft")
    assert torch.allclose(fft.values, sv[: len(fft.values)], atol=1e-10)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_fft_refuses_reflect_and_replicate_but_dense_and_iterative_work(mode):
    conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode=mode, bias=False).double()
    with pytest.raises(ValueError, match=f"circulant.*|{mode}"):
        convspec.conv_singular_values(conv, 6, method="fft")
    sv = torch.linalg.svdvals(module_operator(conv, 6))
    smax, smin = convspec.extreme_singular_values(conv, 6, method="iterative")
    assert smax == pytest.approx(float(sv[0]), rel=1e-6)
    assert smin == pytest.approx(float(sv[-1]), rel=1e-6)
    assert convspec.conv_singular_values(conv, 6, method="auto").method == "dense"


def test_transposed_spectrum_equals_its_operator():
    up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, bias=False).double()
    sv = torch.linalg.svdvals(module_operator(up, 5))
    res = convspec.conv_singular_values(up, 5)
    assert torch.allclose(res.values, sv, atol=1e-12)
    it = convspec.conv_singular_values(up, 5, which="extremes", method="iterative")
    assert it.converged and it.sigma_max == pytest.approx(float(sv[0]), rel=1e-6)


def test_spectrum_keywords_default_to_nn_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False).double()  # padding 0
    assert convspec.extreme_singular_values(conv.weight, 8) == pytest.approx(
        convspec.extreme_singular_values(conv, 8), rel=1e-9)
    sv = torch.linalg.svdvals(module_operator(conv, 8))
    assert convspec.extreme_singular_values(conv, 8)[1] == pytest.approx(float(sv[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="defines its own geometry"):
        convspec.conv_singular_values(conv, 8, padding=1)


def test_spectrum_report_covers_every_layer_type():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode="replicate"),
        nn.Unflatten(2, (2, 4)),
        nn.ConvTranspose2d(4, 3, 2, stride=2),
        nn.Unflatten(2, (1, 4)),
        nn.Conv3d(3, 2, (1, 3, 3), padding=(0, 1, 1), padding_mode="reflect"),
        nn.LazyConv3d(2, 1),
    ).double()
    rows = convspec.spectrum_report(net, torch.randn(1, 2, 8, dtype=torch.float64))
    assert [r.name for r in rows] == ["0", "2", "4", "5"]
    assert [r.layer_type for r in rows] == ["Conv1d", "ConvTranspose2d", "Conv3d", "Conv3d"]  # a Lazy module becomes its class
    for r in rows:
        m = net.get_submodule(r.name)
        sv = torch.linalg.svdvals(module_operator(m, r.input_size))
        assert r.sigma_max == pytest.approx(float(sv[0]), rel=1e-9)
        assert r.sigma_min == pytest.approx(float(sv[-1]), rel=1e-9)
        mats = m.weight.detach().reshape(m.groups, m.weight.shape[0] // m.groups, -1)
        assert r.reshaped_sigma_max == pytest.approx(float(torch.linalg.svdvals(mats).max()), rel=1e-12)
