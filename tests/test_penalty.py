import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tol
from convspec import (
    conv_geometry,
    conv_operator,
    extreme_singular_values,
    frobenius_penalty,
    frobenius_penalty_grad_reference,
    frobenius_penalty_reference,
)


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    g = groups * draw(st.integers(1, 4 // groups if groups <= 4 else 1))
    h = groups * draw(st.integers(1, 4 // groups if groups <= 4 else 1))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    n = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "circular"]))
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                             st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = (1, 1)
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0]))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    return (h, g // groups, *k), n, alpha, kw


def _valid(shape, n, kw):
    try:
        conv_geometry(shape, n, **kw)
        return True
    except ValueError:
        return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(geometries())
def test_exact_penalty_equals_dense_float64(case):
    shape, n, alpha, kw = case
    if not _valid(shape, n, kw):
        return
    w = torch.randn(*shape, dtype=torch.float64)
    exact = frobenius_penalty(w, n, alpha, **kw)
    dense = frobenius_penalty_reference(w, n, alpha, **kw)
    assert abs(exact - dense) <= tol(torch.float64) * abs(dense), (shape, n, kw)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, "same", 1), (2, 1, 1), (3, 2, 2), (1, 0, 2)])
@pytest.mark.parametrize("g,h,groups", [(1, 1, 1), (3, 2, 1), (2, 4, 2), (4, 1, 1)])
def test_exact_penalty_grid(mode, stride, padding, dilation, g, h, groups):
    for k, n in itertools.product([(1, 1), (2, 3), (3, 3), (4, 2), (5, 5)], [(1, 1), (3, 7), (9, 4)]):
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
        shape = (h, g // groups, *k)
        if not _valid(shape, n, kw):
            continue
        w = torch.randn(*shape, dtype=torch.float64)
        dense = frobenius_penalty_reference(w, n, 1.0, **kw)
        exact = frobenius_penalty(w, n, 1.0, **kw)
        assert abs(exact - dense) <= tol(torch.float64) * abs(dense), (k, n)


def test_exact_penalty_float32_within_dtype_tolerance():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    dense = frobenius_penalty_reference(w, 8, 1.0, padding="same")
    exact = frobenius_penalty(w.float(), 8, 1.0, padding="same")
    assert exact.dtype == torch.float32
    assert abs(exact.double() - dense) <= tol(torch.float32) * dense


def test_exact_for_large_inputs_by_affine_extrapolation():
    # For fixed N2, ||M^T M - aI||^2 is affine in N1 once N1 exceeds the boundary zone, so the
    # dense values at N1 = 10, 11 pin the exact value at N1 = 4096 (where M would be ~1e11 entries).
    for kw in (dict(), dict(padding_mode="circular"), dict(stride=2, padding=1),
               dict(dilation=2, padding=1, padding_mode="circular")):
        w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        f10, f11, f12 = (frobenius_penalty_reference(w, (n, 5), 0.7, **kw) for n in (10, 11, 12))
        if kw.get("stride", 1) == 2:  # affine in the number of output rows: step 2 in N1
            f10, f11 = frobenius_penalty_reference(w, (10, 5), 0.7, **kw), f12
            slope = (f11 - f10) / 2
            want = f10 + slope * (4096 - 10)
        else:
            assert torch.isclose(f12 - f11, f11 - f10, rtol=1e-10)  # affine already
            want = f10 + (f11 - f10) * (4096 - 10)
        got = frobenius_penalty(w, (4096, 5), 0.7, **kw)
        assert torch.isclose(got, want, rtol=1e-10), kw


def test_gradcheck_small_cases():
    for shape, n, kw in [
        ((2, 3, 3, 3), 4, dict()),
        ((3, 2, 2, 3), (3, 5), dict(stride=2, padding=1, padding_mode="circular")),
        ((4, 1, 3, 3), 5, dict(groups=2, dilation=2, padding=2)),
    ]:
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w: frobenius_penalty(w, n, 0.8, **kw), (w,))


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_theorem_3_1_gradient_equals_autograd(mode):
    for shape, n, kw in [
        ((1, 1, 3, 3), 5, dict()),          # Theorem 2.1: one channel
        ((3, 2, 3, 3), 6, dict()),          # Theorem 3.1: several channels
        ((2, 3, 2, 4), (4, 6), dict(padding=1)),
        ((4, 2, 3, 3), 5, dict(stride=2, padding=1, dilation=2, groups=2)),
    ]:
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        frobenius_penalty(w, n, 0.9, padding_mode=mode, **kw).backward()
        closed = frobenius_penalty_grad_reference(w.detach(), n, 0.9, padding_mode=mode, **kw)
        torch.testing.assert_close(closed, w.grad, rtol=1e-10, atol=1e-10)


def test_one_by_one_conv_is_the_channel_matrix():
    # M = W (x) I_{N1 N2}: R = N1 N2 ||W^T W - a I||^2.
    for h, g in [(3, 5), (5, 3), (4, 4)]:
        w = torch.randn(h, g, 1, 1, dtype=torch.float64)
        mat = w[:, :, 0, 0]
        want = 6 * 7 * (mat.T @ mat - 0.5 * torch.eye(g, dtype=torch.float64)).square().sum()
        for mode in ("zeros", "circular"):
            got = frobenius_penalty(w, (6, 7), 0.5, padding_mode=mode, padding="same")
            assert torch.isclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_delta_kernel_with_orthogonal_tap_has_zero_penalty(mode, k):
    c = 4
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    w = torch.zeros(c, c, k, k, dtype=torch.float64)
    w[:, :, k // 2, k // 2] = q
    n = 7
    got = frobenius_penalty(w, n, 1.0, padding_mode=mode, padding="same")
    assert abs(got) <= 1e-12 * c * n * n
    assert abs(frobenius_penalty_reference(w, n, 1.0, padding_mode=mode, padding="same")) <= 1e-12 * c * n * n
    smax, smin = extreme_singular_values(w, n, padding_mode=mode, padding="same")
    assert abs(smax - 1) < 1e-12 and abs(smin - 1) < 1e-12


def test_single_channel_circular_conv_matches_fft():
    # Circular convolution is diagonalised by the 2-D DFT: singular values = |FFT of the kernel|.
    for k, n in [(3, 8), (2, 5), (5, 6)]:
        w = torch.randn(1, 1, k, k, dtype=torch.float64)
        emb = torch.zeros(n, n, dtype=torch.float64)
        emb[:k, :k] = w[0, 0]
        mags = torch.fft.fft2(emb).abs().reshape(-1)
        m = conv_operator(w, n, padding_mode="circular", padding="same")
        torch.testing.assert_close(torch.linalg.svdvals(m).sort().values, mags.sort().values,
                                   rtol=1e-10, atol=1e-10)
        want = (mags.square() - 1.3).square().sum()
        got = frobenius_penalty(w, n, 1.3, padding_mode="circular", padding="same")
        assert torch.isclose(got, want, rtol=1e-10)
        smax, smin = extreme_singular_values(w, n, padding_mode="circular", padding="same")
        assert abs(smax - mags.max()) < 1e-10 and abs(smin - mags.min()) < 1e-10


def test_sigma_min_counts_only_min_rows_cols_values():
    # A wide operator (g > h) has h*P1*P2 singular values; none of the "missing" zeros count.
    w = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    s = torch.linalg.svdvals(conv_operator(w, 6, padding="same"))
    assert s.numel() == 36
    smax, smin = extreme_singular_values(w, 6, padding="same")
    assert smin > 0 and abs(smin - s.min()) < 1e-12 and abs(smax - s.max()) < 1e-12
