"""The Gram route against a float64 SVD: accuracy, band-edge decisions, and its fallbacks."""

import math

import pytest
import torch
from torch import nn

from convspec import bound_singular_values, bounding, svb_
from convspec.bounding.layers import _all_finite

EPS = 0.05
LO, HI = 1 / (1 + EPS), 1 + EPS
EPS32 = torch.finfo(torch.float32).eps


def with_spectrum(m, n, s, seed=0):
    """A float32 m x n matrix with (approximately, after rounding) singular values ``s``."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))
    return ((u * torch.as_tensor(s, dtype=torch.float64)) @ v.T).float()


def reference(w):
    """Algorithm 1 on the float32 matrix, by float64 SVD."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u * s.clamp(LO, HI)) @ vh, s


def rel_err(new, ref):
    """Relative Frobenius error in units of float32 epsilon (rounding ref to float32: ~0.2)."""
    return float((new.double() - ref).norm() / ref.norm()) / EPS32


def run(w, method):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    report = svb_(lin, EPS, method=method)
    return lin.weight.detach(), report.layers[0]


SPECTRA = {
    "init-like": lambda r: torch.linspace(0.35, 0.8, r),  # all below the band
    "straddles": lambda r: torch.linspace(0.5, 2.0, r),
    "kappa-1e3": lambda r: torch.logspace(-3, 0, r) * 2,
    "kappa-5e3": lambda r: torch.logspace(0, -3.7, r),  # just inside the accuracy threshold
    "near-edges": lambda r: torch.tensor([LO, HI] * (r // 2)) * (1 + 1e-5 * (-1) ** torch.arange(r)),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(24, 200), (200, 24), (96, 864), (864, 96)])
def test_gram_route_matches_svd_to_float32_precision(spectrum, shape):
    # (96, 864) has >= 2**16 entries: its last product runs in float32 where rho allows.
    m, n = shape
    w = with_spectrum(m, n, SPECTRA[spectrum](min(m, n)), seed=m + n)
    ref, s = reference(w)
    new, row = run(w, "gram")
    assert row.route == "gram"
    # The exact result rounded to float32 is off by ~0.2 eps32; the float32 SVD loop by 5-1000.
    assert rel_err(new, ref) <= 2
    # The clip decisions (which values lie outside the band) are the SVD's, edges included.
    assert row.n_clipped == int(((s < LO) | (s > HI)).sum())
    new_svd, row_svd = run(w, "svd")  # the float64 SVD route: as accurate
    assert row_svd.route == "svd"
    assert rel_err(new_svd, ref) <= 2


@pytest.mark.parametrize("shape", [(24, 200), (96, 864)])
def test_ill_conditioned_falls_back_to_svd(shape):
    m, n = shape
    s = torch.logspace(0, -6, min(m, n))  # kappa = 1e6 > ~7e3: Gram would lose accuracy
    w = with_spectrum(m, n, s, seed=3)
    ref, _ = reference(w)
    new, row = run(w, "gram")
    assert row.route == "svd"
    assert rel_err(new, ref) <= 2


def test_gram_really_is_less_accurate_beyond_the_threshold():
    # The check guards a real loss: forced at kappa = 1e6, the Gram formula is off by ~40 eps32
    # (Note [Gram route accuracy] predicts growth like kappa^2; the threshold, kappa ~7e3, is
    # conservative: at kappa = 1e5 the error is still below 1 eps32).
    w = with_spectrum(24, 200, torch.logspace(0, -6, 24), seed=3)
    ref, _ = reference(w)
    new, _, _, ok = bounding._gram_route(w[None], LO, HI, torch.float64, min_ratio=0.0)
    assert bool(ok.all())
    assert rel_err(new[0], ref) > 10
    assert not bool(bounding._gram_route(w[None], LO, HI, torch.float64,
                                         bounding._gram_allowed(torch.float32, torch.float64))[3])


def test_rank_deficient_and_zero_matrices_take_svd():
    s = torch.cat([torch.linspace(0.5, 2, 10), torch.zeros(6)])
    w = with_spectrum(16, 40, s, seed=4)
    ref, _ = reference(w)
    new, row = run(w, "auto")
    assert row.route == "svd"
    sv = torch.linalg.svdvals(new.double())
    assert bool((sv >= LO * (1 - 1e-6)).all() and (sv <= HI * (1 + 1e-6)).all())
    new0, row0 = run(torch.zeros(5, 9), "auto")
    assert row0.route == "svd" and row0.n_clipped == 5
    assert torch.allclose(torch.linalg.svdvals(new0.double()), torch.full((5,), LO, dtype=torch.float64))


def test_large_ill_conditioned_apply_runs_in_float64():
    # sigma_min = 1e-2 is stretched ~95x: rho >> APPLY_RHO, so the last product is float64 and
    # the result is still float32-accurate.
    s = torch.cat([torch.full((90,), 1.0), torch.linspace(0.01, 3, 6)])
    w = with_spectrum(96, 864, s, seed=5)
    ref, _ = reference(w)
    new, row = run(w, "gram")
    assert row.route == "gram"
    assert rel_err(new, ref) <= 2


def test_auto_route_and_batching_of_equal_shapes():
    torch.manual_seed(6)
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, bias=False) for _ in range(5)], nn.Linear(8, 3))
    report = svb_(model, EPS)
    assert {r.route for r in report.layers} == {"gram"}
    # Batched over the five equal shapes, the result equals layer-by-layer bounding.
    for conv in model[:5]:
        single = nn.Conv2d(8, 8, 3, bias=False)
        with torch.no_grad():
            single.weight.copy_(conv.weight)
        svb_(single, EPS)
        assert torch.allclose(single.weight, conv.weight, rtol=0, atol=1e-6)
    assert svb_(model, EPS, method="svd").layers[0].route == "svd"
    # Bounded, every layer has kappa <= (1 + eps)^2: the float32 pass takes the float32 Gram route.
    assert {r.route for r in svb_(model, EPS, dtype=torch.float32).layers} == {"gram"}


# ------------------------------------------------------------------------------ float32 route
# Note [Gram route accuracy], dtype=float32: G, eigh and the products in float32, taken where
# kappa^2 <= GRAM_TOLERANCE_FLOAT32 * eps_w / eps32 (kappa <= sqrt(2) for a float32 weight), and
# there as accurate as the per-matrix float32 SVD loop, which is the standard for dtype=float32.


def svd32_loop(w):
    """What the naive float32 loop writes: float32 SVD, clamp, float32 product."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u * s.clamp(LO, HI)) @ vh


def bound32(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    report = svb_(lin, EPS, dtype=torch.float32)
    return lin.weight.detach(), report.layers[0]


SPECTRA32 = {  # kappa <= 1.4, as SVB keeps layers; each straddles, or lies beside, the band
    "below": lambda r: torch.linspace(0.6, 0.8, r),
    "above": lambda r: torch.linspace(1.1, 1.5, r),
    "straddles": lambda r: torch.linspace(0.85, 1.2, r),
    "kappa-1.4": lambda r: torch.logspace(0, 0.146, r),
    # values 1e-4 inside and outside both edges: the clip decisions must be the SVD's
    "near-edges": lambda r: torch.tensor([LO, LO, HI, HI] * (r // 4))
    * (1 + 1e-4 * torch.tensor([1.0, -1.0, 1.0, -1.0] * (r // 4))),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA32))
@pytest.mark.parametrize("shape", [(4, 40), (24, 200), (200, 24), (96, 864), (864, 96)])
def test_float32_gram_route_is_as_accurate_as_the_float32_svd(spectrum, shape):
    # (96, 864) has >= 2**16 entries: the large-matrix path (one by one, in float32).
    m, n = shape
    w = with_spectrum(m, n, SPECTRA32[spectrum](min(m, n)), seed=m + n)
    ref, s = reference(w)
    new, row = bound32(w)
    assert row.route == "gram"
    err, err_svd = rel_err(new, ref), rel_err(svd32_loop(w), ref)
    # Measured: at most 0.62x the float32 loop's error over these shapes and spectra; both grow
    # with m (about 0.3 eps at m = 2 up to ~5 / ~13 eps at m = 300).
    assert err <= err_svd or err <= 1.0
    assert row.n_clipped == int(((s < LO) | (s > HI)).sum())


def test_float32_threshold_is_kappa_sqrt2_for_float32_weights():
    limit = bounding._gram_allowed(torch.float32, torch.float32)
    assert limit == pytest.approx(1 / bounding.GRAM_TOLERANCE_FLOAT32) == pytest.approx(0.5)
    for kappa, route in ((1.40, "gram"), (1.43, "svd")):
        w = with_spectrum(24, 200, torch.linspace(1 / kappa, 1, 24), seed=7)
        ref, _ = reference(w)
        new, row = bound32(w)
        assert row.route == route, kappa
        assert rel_err(new, ref) <= max(rel_err(svd32_loop(w), ref), 1.0)
    # A float16 weight's ulp is 2**13 float32 ulps: kappa up to 128 is still float16-accurate.
    w16 = with_spectrum(24, 200, torch.logspace(0, -2, 24), seed=8).half()  # kappa ~ 100
    ref16, _ = reference(w16.float())
    new16 = bound_singular_values(w16, EPS, dtype=torch.float32)
    assert bool(bounding._gram_route(w16[None], LO, HI, torch.float32,
                                     bounding._gram_allowed(torch.float16, torch.float32))[3])
    eps16 = torch.finfo(torch.float16).eps
    assert float((new16.double() - ref16).norm() / ref16.norm()) <= eps16


def test_float32_gram_really_is_less_accurate_beyond_the_threshold():
    # Forced at kappa = 64 (m = 160), float32 G and eigh are ~8x worse than the float32 SVD
    # (~365 against ~44 eps32 measured): the kappa^2 growth of the Note is real, so the check
    # guards a real loss.
    w = with_spectrum(160, 1440, torch.logspace(0, -math.log10(64), 160), seed=160)
    ref, _ = reference(w)
    new, _, _, ok = bounding._gram_route(w[None], LO, HI, torch.float32, min_ratio=0.0)
    assert bool(ok.all())
    assert rel_err(new[0], ref) > 3 * rel_err(svd32_loop(w), ref)
    _, row = bound32(w)
    assert row.route == "svd"


@pytest.mark.parametrize("shape", [(24, 200), (96, 864)])
def test_float32_ill_conditioned_and_rank_deficient_take_the_float32_svd(shape):
    m, n = shape
    w = with_spectrum(m, n, torch.logspace(0, -6, m), seed=3)  # kappa = 1e6
    ref, _ = reference(w)
    new, row = bound32(w)
    assert row.route == "svd"
    assert rel_err(new, ref) <= rel_err(svd32_loop(w), ref) + 1.0
    s = torch.cat([torch.linspace(0.9, 1.1, m - 6), torch.zeros(6)])  # rank m - 6
    w = with_spectrum(m, n, s, seed=4)
    new, row = bound32(w)
    assert row.route == "svd"
    sv = torch.linalg.svdvals(new.double())
    assert bool((sv >= LO * (1 - 1e-5)).all() and (sv <= HI * (1 + 1e-5)).all())


# ------------------------------------------------------------------------------ last product


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(96, 864), (864, 96)])
def test_few_out_of_band_values_use_only_their_eigenvectors(dtype, shape):
    # 10 of 96 values out of band: D = Q_k diag(f_k) Q_k^T A with k = 10 < 96 / 2.
    m, n = shape
    r = min(m, n)
    s = torch.cat([torch.linspace(0.97, 1.03, r - 10), torch.linspace(0.88, 0.92, 5),
                   torch.linspace(1.08, 1.2, 5)])  # kappa 1.36: float32 takes the Gram route too
    w = with_spectrum(m, n, s, seed=9)
    ref, sv = reference(w)
    lin = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    row = svb_(lin, EPS, dtype=dtype).layers[0]
    assert row.route == "gram" and row.n_clipped == 10 == int(((sv < LO) | (sv > HI)).sum())
    err = rel_err(lin.weight.detach(), ref)
    assert err <= (2 if dtype == torch.float64 else max(rel_err(svd32_loop(w), ref), 1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_matrix_in_band_comes_back_bit_identical_and_not_aliased(dtype):
    w = with_spectrum(96, 864, torch.linspace(0.97, 1.03, 96), seed=10)
    new = bound_singular_values(w, EPS, dtype=dtype)
    assert torch.equal(new, w)
    new.add_(1)  # the result is not a view of the input
    assert not torch.equal(new, w)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    big = torch.full((1000,), 3e38)  # finite entries whose float32 sum overflows
    assert _all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[17] = bad
        assert not _all_finite(t)
    t = torch.zeros(4, dtype=torch.float16)
    t[1] = float("inf")
    assert not _all_finite(t) and _all_finite(torch.full((10,), 6e4, dtype=torch.float16))
