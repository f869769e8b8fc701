"""The Gram route against a float64 SVD: accuracy, band-edge decisions, and its fallbacks."""

import pytest
import torch
from torch import nn

from convspec import bounding, svb_

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
    assert svb_(model, EPS, dtype=torch.float32).layers[0].route == "svd"  # Gram needs float64
