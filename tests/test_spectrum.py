"""Exact singular values of convolution operators: FFT, iterative and bound vs the dense SVD."""

import random

import pytest
import torch
from torch import nn

from convspec import (
    conv_geometry,
    conv_operator,
    conv_singular_values,
    conv_spectral_norm_bound,
    extreme_singular_values,
    spectrum_report,
)


def dense_values(w, n, **kw):
    """The reference: every singular value of the dense float64 operator, descending."""
    m = conv_operator(w.double(), n, **kw)
    return torch.linalg.svdvals(m)


def rand(h, gg, k, seed, k2=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, gg, k, k if k2 is None else k2, dtype=torch.float64, generator=g)


# ------------------------------------------------------------------------------------ FFT


FFT_CASES = [
    # (h, g, k, N, stride, dilation, groups, padding)
    (3, 2, 3, 6, 1, 1, 1, 1),
    (2, 5, 3, 7, 1, 1, 1, 1),
    (4, 4, 5, 8, 1, 1, 1, 2),
    (3, 3, 1, 5, 1, 1, 1, 0),
    (2, 3, 2, 6, 1, 1, 1, "same"),      # even kernel: asymmetric padding (0, 1)
    (3, 2, 3, 9, 1, 2, 1, 2),           # dilation 2
    (4, 2, 3, 8, 2, 1, 1, 1),           # stride 2: polyphase
    (2, 6, 3, 8, 2, 1, 1, 1),
    (5, 3, 4, 8, 2, 1, 1, 1),           # stride 2, padding 2 = k - 2 total: still P * s == N
    (4, 4, 3, 10, 2, 2, 2, 2),          # stride, dilation and groups together
    (6, 4, 3, 6, 1, 1, 2, 1),
    (3, 3, 2, 8, 2, 1, 1, 0),           # padding 0, k = s: P * s == N
]


@pytest.mark.parametrize("h,g,k,n,s,d,groups,pad", FFT_CASES)
def test_fft_equals_dense_svd(h, g, k, n, s, d, groups, pad):
    w = rand(h, g // groups, k, seed=h * 100 + g * 10 + k)
    kw = dict(stride=s, dilation=d, groups=groups, padding=pad, padding_mode="circular")
    ref = dense_values(w, n, **kw)
    got = conv_singular_values(w, n, method="fft", **kw)
    assert got.method == "fft" and got.exact
    assert got.values.shape == ref.shape  # min(rows, cols) values
    torch.testing.assert_close(got.values, ref, rtol=0, atol=1e-10 * float(ref[0]))
    assert got.sigma_max == pytest.approx(float(ref[0]), rel=1e-12)
    assert got.sigma_min == pytest.approx(float(ref[-1]), rel=1e-9, abs=1e-12 * float(ref[0]))


def test_fft_rectangular_input():
    w = rand(3, 2, 3, seed=1, k2=2)
    kw = dict(padding=(1, 0), padding_mode="circular", stride=(1, 2))
    ref = dense_values(w, (5, 8), **kw)
    got = conv_singular_values(w, (5, 8), method="fft", **kw)
    torch.testing.assert_close(got.values, ref, rtol=0, atol=1e-10 * float(ref[0]))


def test_single_channel_circular_is_sorted_abs_fft():
    # Closed form: a 1-in 1-out circular convolution has singular values |DFT of the kernel|.
    n = 7
    w = rand(1, 1, 3, seed=3)
    kernel = torch.zeros(n, n, dtype=torch.float64)
    kernel[:3, :3] = w[0, 0]
    expected = torch.sort(torch.fft.fft2(kernel).abs().reshape(-1), descending=True).values
    got = conv_singular_values(w, n, padding_mode="circular", padding=1, method="fft")
    torch.testing.assert_close(got.values, expected, rtol=1e-12, atol=1e-12)


def test_one_by_one_conv_is_channel_matrix():
    # Closed form: a 1x1 convolution is K (x) I, singular values those of K, N^2 times each.
    w = rand(4, 3, 1, seed=4)
    sv = torch.linalg.svdvals(w[:, :, 0, 0])
    for method in ("dense", "fft"):
        got = conv_singular_values(w, 5, padding=0, padding_mode="circular", method=method)
        torch.testing.assert_close(got.values, sv.repeat_interleave(25), rtol=1e-12, atol=1e-12)
    it = conv_singular_values(w, 5, padding=0, which="extremes", method="iterative")
    assert it.sigma_max == pytest.approx(float(sv[0]), rel=1e-6)
    assert it.sigma_min == pytest.approx(float(sv[-1]), rel=1e-6)


# ------------------------------------------------------------------------------ iterative


def _grid(count=26, seed=2024):
    """Deterministic draws over k 1..5, g, h 1..6 unequal, N 3..12, stride, dilation, groups."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        groups = rng.choice([1, 2])
        g, h = rng.randint(1, 6), rng.randint(1, 6)
        if g == h and rng.random() < 0.7:
            continue  # mostly unequal: rank-deficient shapes
        k, n = rng.randint(1, 5), rng.randint(3, 12)
        s, d = rng.randint(1, 2), rng.randint(1, 2)
        pad = rng.choice([0, 1, 2]) if s == 2 else rng.choice(["same", 0, 1, 2])
        if (n + 2 * (pad if isinstance(pad, int) else 0) - d * (k - 1)) < 1 and pad != "same":
            continue
        cases.append((h * groups, g * groups, k, n, s, d, groups, pad))
    return cases


GRID = _grid()


def _check_iterative(w, n, tol=1e-6, **kw):
    ref = dense_values(w, n, **kw)
    got = conv_singular_values(w, n, which="extremes", method="iterative", tol=tol, **kw)
    smax, smin = float(ref[0]), float(ref[-1])
    assert got.method == "iterative" and got.values is None
    assert got.converged and got.exact
    assert got.n_products > 0
    assert abs(got.sigma_max - smax) <= tol * smax
    # Relative to sigma_min; an operator singular by its structure (zero rows or columns) has
    # sigma_min = 0 (to rounding) and is matched at rounding level.
    if smin > 1e-10 * smax:
        assert abs(got.sigma_min - smin) <= tol * smin
    else:
        assert abs(got.sigma_min) <= 1e-9 * smax
    return got, smax, smin


@pytest.mark.parametrize("h,g,k,n,s,d,groups,pad", GRID)
def test_iterative_equals_dense_zero_padding(h, g, k, n, s, d, groups, pad):
    w = rand(h, g // groups, k, seed=n * 1000 + h * 10 + g)
    _check_iterative(w, n, stride=s, dilation=d, groups=groups, padding=pad)


@pytest.mark.parametrize("h,g,k,n,s,pad", [(3, 2, 3, 7, 1, 0), (2, 4, 3, 7, 2, 1), (3, 3, 2, 6, 1, 2)])
def test_iterative_circular_where_fft_does_not_apply(h, g, k, n, s, pad):
    w = rand(h, g, k, seed=7)
    kw = dict(stride=s, padding=pad, padding_mode="circular")
    with pytest.raises(ValueError, match="fft"):
        conv_singular_values(w, n, method="fft", **kw)
    _check_iterative(w, n, **kw)


def test_iterative_nearly_singular_kernel():
    # Centre tap diag(1, 1e-4): the operator is nearly singular; a 1e-7 perturbation elsewhere.
    w = 1e-7 * rand(2, 2, 3, seed=8)
    w[:, :, 1, 1] += torch.diag(torch.tensor([1.0, 1e-4], dtype=torch.float64))
    got, smax, smin = _check_iterative(w, 10)
    assert smin < 2e-4 * smax  # the case is what it claims to be
    assert abs(got.sigma_min - smin) <= 1e-6 * smin


def test_iterative_sigma_min_is_over_min_rows_cols():
    # Wide operator (g > h, stride 2: P < N): sigma_min is the smallest of the h P^2 values,
    # not the 0s that M^T M has.
    w = rand(2, 5, 3, seed=9)
    got, smax, smin = _check_iterative(w, 8, stride=2, padding=1)
    assert smin > 1e-3 * smax


def test_iterative_larger_operator_agrees_with_dense():
    # n = 8 * 14 * 14 = 1568: the banded factorisation has several blocks.
    w = rand(8, 8, 3, seed=10) / 8
    got, _, _ = _check_iterative(w, 14)
    assert got.n_solves > 0


def test_extreme_singular_values_is_a_thin_call():
    w = rand(3, 4, 3, seed=11)
    ref = dense_values(w, 6, padding=1)
    for method in ("auto", "dense", "iterative"):
        smax, smin = extreme_singular_values(w, 6, padding=1, method=method)
        assert smax == pytest.approx(float(ref[0]), rel=1e-6)
        assert smin == pytest.approx(float(ref[-1]), rel=1e-6)


def test_auto_picks_fft_dense_iterative():
    w = rand(4, 4, 3, seed=12)
    assert conv_singular_values(w, 6, padding_mode="circular", padding=1).method == "fft"
    assert conv_singular_values(w, 6).method == "dense"
    assert conv_singular_values(w, 20, which="extremes").method == "iterative"


# --------------------------------------------------------------------------------- groups


def test_groups_combine_max_of_maxima_min_of_minima():
    # 1x1 conv, groups=2: blocks diag(3, 1) and diag(2, 0.5). Max of maxima is 3 and min of
    # minima 0.5; a product of block norms (6) or of minima (0.5 * 1) would differ.
    w = torch.zeros(4, 2, 1, 1, dtype=torch.float64)
    w[0, 0], w[1, 1], w[2, 0], w[3, 1] = 3.0, 1.0, 2.0, 0.5
    for method in ("dense", "fft"):
        res = conv_singular_values(w, 3, padding=0, groups=2, padding_mode="circular",
                                   method=method)
        assert res.sigma_max == pytest.approx(3.0) and res.sigma_min == pytest.approx(0.5)
        expected = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64).repeat_interleave(9)
        torch.testing.assert_close(res.values, expected)
    it = conv_singular_values(w, 3, padding=0, groups=2, which="extremes", method="iterative")
    assert it.sigma_max == pytest.approx(3.0, rel=1e-6)
    assert it.sigma_min == pytest.approx(0.5, rel=1e-6)


def test_groups_random_kernel_union_of_blocks():
    w = rand(4, 3, 3, seed=13)
    res = conv_singular_values(w, 5, groups=2, which="extremes", method="iterative")
    blocks = [dense_values(w[2 * i : 2 * i + 2], 5) for i in range(2)]
    assert res.sigma_max == pytest.approx(max(float(b[0]) for b in blocks), rel=1e-6)
    assert res.sigma_min == pytest.approx(min(float(b[-1]) for b in blocks), rel=1e-6)


# ---------------------------------------------------------------------------------- bound


def _valid(case, mode):
    h, g, k, n, s, d, groups, pad = case
    try:
        conv_geometry((h, g // groups, k, k), n, stride=s, dilation=d, groups=groups,
                      padding=pad, padding_mode=mode)
    except ValueError:  # circular padding wider than the input
        return False
    return True


BOUND_CASES = [
    (mode, *case) for mode in ("zeros", "circular") for case in GRID + FFT_CASES
    if _valid(case, mode)
]


@pytest.mark.parametrize("mode,h,g,k,n,s,d,groups,pad", BOUND_CASES)
def test_bound_is_above_exact_sigma_max(mode, h, g, k, n, s, d, groups, pad):
    w = rand(h, g // groups, k, seed=n + 7 * h + 3 * g)
    kw = dict(stride=s, dilation=d, groups=groups, padding=pad, padding_mode=mode)
    ref = dense_values(w, n, **kw)
    bound = conv_spectral_norm_bound(w, n, **kw)
    assert bound >= float(ref[0])
    assert bound <= 4 * float(ref[0]) + 1e-12  # a bound, but not a vacuous one


def test_bound_tightens_with_iterations():
    w = rand(6, 6, 3, seed=14)
    exact = float(dense_values(w, 8, padding=1, padding_mode="circular")[0])
    loose = conv_spectral_norm_bound(w, 8, padding=1, padding_mode="circular", n_iter=2)
    tight = conv_spectral_norm_bound(w, 8, padding=1, padding_mode="circular", n_iter=10)
    assert exact <= tight < loose
    assert tight <= exact * (1 + 1e-2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(which="some"), "which"),
    (dict(method="svd"), "method"),
    (dict(tol=0), "tol"),
    (dict(tol=2.0), "tol"),
    (dict(method="fft"), "fft.*circular"),
    (dict(method="fft", padding_mode="circular", padding=0), "fft"),
    (dict(method="iterative", which="all"), "iterative"),
    (dict(padding_mode="mirror"), "padding_mode"),
    (dict(stride=0, padding=0), "stride"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv_singular_values(rand(2, 2, 3, seed=0), 5, **kwargs)


def test_bad_weights_raise():
    w = rand(2, 2, 3, seed=0)
    w[0, 0, 0, 0] = float("nan")
    for fn in (conv_singular_values, conv_spectral_norm_bound):
        with pytest.raises(ValueError, match="NaN"):
            fn(w, 5)
    with pytest.raises(ValueError, match="spatial axes"):
        conv_singular_values(torch.zeros(2, 2), 5)
    with pytest.raises(ValueError, match="input"):
        conv_singular_values(rand(2, 2, 5, seed=0), 2, padding=0)
    with pytest.raises(ValueError, match="n_iter"):
        conv_spectral_norm_bound(rand(2, 2, 3, seed=0), 5, n_iter=-1)


# ------------------------------------------------------------------------- spectrum_report


def test_spectrum_report_matches_dense_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),                       # zero padding, stride
        nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode="circular"),
        nn.Conv2d(6, 2, 1),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    )
    net.train()
    rows = spectrum_report(net, torch.randn(2, 3, 8, 8))
    assert net.training  # restored
    assert [r.name for r in rows] == ["0", "3", "4", "5", "6"]
    assert [r.input_size for r in rows] == [(8, 8), (8, 8), (4, 4), (4, 4), (4, 4)]
    for r, idx in zip(rows, (0, 3, 4, 5, 6)):
        conv = net[idx]
        kw = dict(stride=conv.stride, padding=conv.padding, groups=conv.groups,
                  padding_mode=conv.padding_mode)
        ref = dense_values(conv.weight.detach(), r.input_size, **kw)
        assert r.sigma_max == pytest.approx(float(ref[0]), rel=1e-6)
        assert r.sigma_min == pytest.approx(float(ref[-1]), rel=1e-6)
        mats = conv.weight.detach().double().reshape(conv.groups, conv.out_channels // conv.groups, -1)
        sv = torch.linalg.svdvals(mats)
        assert r.reshaped_sigma_max == pytest.approx(float(sv.max()), rel=1e-12)
        assert r.reshaped_sigma_min == pytest.approx(float(sv.min()), rel=1e-12)
        assert r.exact
    assert rows[2].method == "fft"
    assert rows[-1].padding_mode == "reflect" and rows[-1].method == "dense"
    d = rows[0].as_dict(with_values=True)
    assert d["weight_shape"] == [4, 3, 3, 3] and len(d["values"]) == 3 * 64


def test_spectrum_report_bad_input():
    with pytest.raises(ValueError, match="no convolution layer"):
        spectrum_report(nn.Linear(3, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="tensor"):
        spectrum_report(nn.Conv2d(1, 1, 3), [1.0])


def test_iterative_fallback_without_factorisation_warns_and_converges():
    # max_bytes too small for the banded factor (but enough for a Lanczos basis: max_bytes is
    # respected on every route, see test_spectrum_trust.py): Lanczos on sigma_max^2 I - Gram.
    from convspec.spectrum import _plan_banded

    w = rand(3, 2, 3, seed=15)
    ref = dense_values(w, 6, padding=1)
    need = _plan_banded(w, conv_geometry(w, 6, padding=1))[2]
    with pytest.warns(UserWarning, match="falls back"):
        got = conv_singular_values(w, 6, padding=1, which="extremes", method="iterative",
                                   max_bytes=need - 1)
    assert got.converged and got.n_solves == 0
    assert got.sigma_min == pytest.approx(float(ref[-1]), rel=1e-6)


def test_zero_kernel_has_zero_spectrum():
    w = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    for method in ("dense", "iterative"):
        res = conv_singular_values(w, 5, which="extremes", method=method)
        assert (res.sigma_max, res.sigma_min) == (0.0, 0.0)
    assert conv_spectral_norm_bound(w, 5) == 0.0


def test_unconverged_iteration_is_reported():
    w = rand(6, 6, 3, seed=16)
    with pytest.warns(UserWarning, match="did not reach"):
        res = conv_singular_values(w, 9, which="max", method="iterative", tol=1e-12,
                                   max_products=10)
    assert not res.converged and not res.exact
    ref = float(dense_values(w, 9)[0])
    assert res.sigma_max <= ref * (1 + 1e-12)  # a Ritz value never exceeds sigma_max


def test_float32_weight_and_which_max():
    w32 = rand(3, 3, 3, seed=17).float()
    ref = dense_values(w32.double(), 6)  # the float32 weights, exactly, in float64
    for method in ("dense", "iterative"):
        res = conv_singular_values(w32, 6, which="max", method=method)
        assert res.sigma_min is None and res.values is None
        assert res.sigma_max == pytest.approx(float(ref[0]), rel=1e-6)
    res = conv_singular_values(w32, 6, which="extremes")
    assert res.sigma_min == pytest.approx(float(ref[-1]), rel=1e-9)


@pytest.mark.parametrize("h,g,k1,k2,n,stride,dilation,padding", [
    (3, 2, 3, 2, (4, 9), 1, 1, 1),
    (2, 4, 2, 5, (10, 5), 1, (1, 2), (0, 2)),
    (4, 3, 5, 1, (9, 4), (2, 1), 1, (2, 0)),
    (2, 2, 1, 4, (3, 11), 1, 1, "same"),
])
def test_iterative_rectangular_inputs_and_kernels(h, g, k1, k2, n, stride, dilation, padding):
    """Non-square inputs and kernels, where ordering the Gram by the other axis is cheaper."""
    w = rand(h, g, k1, seed=7 * h + g, k2=k2)
    _check_iterative(w, n, stride=stride, dilation=dilation, padding=padding)


@pytest.mark.parametrize("padding", [0, (0, 1)])
def test_iterative_circular_without_padding_on_an_axis(padding):
    """An unpadded circular axis never wraps: it is treated (and banded) as zero padding."""
    w = rand(3, 2, 3, seed=11)
    _check_iterative(w, (8, 7), padding=padding, padding_mode="circular")
    if padding == 0:
        from convspec._geometry import conv_geometry
        from convspec.spectrum import _plan_banded, _without_idle_wrap

        geom = _without_idle_wrap(conv_geometry(w, (8, 7), padding=0, padding_mode="circular"))
        assert geom.padding_mode == "zeros" and _plan_banded(w, geom)[1] < 6  # banded, not dense


def test_spectrum_report_warns_about_unreached_and_reused_convs():
    from torch import nn

    from convspec import spectrum_report

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(2, 2, 3, padding=1)
            self.unused = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.shared(self.shared(x)[..., :4, :4])

    with pytest.warns(UserWarning) as record:
        rows = spectrum_report(Net(), torch.randn(1, 2, 6, 6))
    text = " ".join(str(w.message) for w in record)
    assert "['unused']" in text and "['shared']" in text
    assert [r.name for r in rows] == ["shared"] and rows[0].input_size == (6, 6)
