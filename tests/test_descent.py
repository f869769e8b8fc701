import pytest
import torch

from convspec import extreme_singular_values, frobenius_penalty, paper_step_size, penalty_descent


@pytest.mark.parametrize("rule,kw", [("paper", {}), ("armijo", {}), ("constant", {"lr": 1e-3})])
def test_descent_lowers_penalty_and_moves_sigma_max_toward_one(rule, kw):
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = w.clone()
    res = penalty_descent(w, 6, steps=40, step_rule=rule, padding="same", **kw)
    assert torch.equal(w, before)  # the input is not modified
    assert len(res.iteration) == len(res.penalty) == len(res.sigma_max) == len(res.sigma_min) == 41
    assert res.penalty[-1] < 0.5 * res.penalty[0]
    assert abs(res.sigma_max[-1] - 1) < 0.5 * abs(res.sigma_max[0] - 1)
    # The records describe the returned kernel.
    assert res.penalty[-1] == pytest.approx(float(frobenius_penalty(res.weight, 6, padding="same")), rel=1e-12)
    smax, smin = extreme_singular_values(res.weight, 6, padding="same")
    assert res.sigma_max[-1] == pytest.approx(smax, rel=1e-9)
    assert res.sigma_min[-1] == pytest.approx(smin, rel=1e-6)


def test_armijo_decreases_monotonically_and_reaches_the_floor():
    # For g != h the floor of R is a^2 |g - h| N1 N2 (rank deficiency), not 0.
    w = torch.randn(1, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = penalty_descent(w, 5, steps=150, step_rule="armijo", track_spectrum=False, padding="same")
    assert all(b <= a for a, b in zip(res.penalty, res.penalty[1:]))
    floor = 2 * 25
    assert floor <= res.penalty[-1] < 1.05 * floor


def test_paper_schedule():
    assert [paper_step_size(i) for i in (0, 9, 10, 19, 20, 299)] == [1e-5, 1e-5, 1e-4, 1e-4, 1e-3, 1e-3]
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    res = penalty_descent(w, 4, steps=25, track_spectrum=False, padding="same")
    assert res.step_size[:25] == [paper_step_size(i) for i in range(25)]


def test_constant_step_that_diverges_stops_with_a_warning():
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64) * 10
    with pytest.warns(UserWarning, match="non-finite"):
        res = penalty_descent(w, 6, steps=50, step_rule="constant", lr=10.0, track_spectrum=False, padding="same")
    assert res.stopped and len(res.penalty) < 51


@pytest.mark.parametrize("kw,msg", [
    (dict(step_rule="newton"), "step_rule"),
    (dict(penalty="nuclear"), "penalty"),
    (dict(steps=-1), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(padding_mode="mirror"), "padding_mode"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        penalty_descent(torch.randn(2, 2, 3, 3), 4, **kw)


@pytest.mark.parametrize("kw", [
    dict(padding="same"),
    dict(padding=(2, 1), stride=(2, 1), dilation=(1, 2)),
    dict(padding=1, groups=2),
    dict(padding=1, padding_mode="circular"),
])
def test_tracked_spectrum_is_the_dense_operators(kw):
    """The per-iteration sigma_max / sigma_min (the gather-built dense M) equal svdvals of M."""
    from convspec import conv_operator
    from convspec.descent import penalty_descent

    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = penalty_descent(w, 7, steps=3, step_rule="armijo", progress=False, **kw)
    again = penalty_descent(w, 7, steps=2, step_rule="armijo", progress=False, track_spectrum=False, **kw)
    s = torch.linalg.svdvals(conv_operator(again.weight, 7, **kw))
    assert res.sigma_max[2] == pytest.approx(float(s[0]), rel=1e-12)
    assert res.sigma_min[2] == pytest.approx(float(s[-1]), rel=1e-9)
