"""The 2-norm penalty ||M^T M - alpha I||_2 (Guo & Ye): value and gradient vs the dense operator."""

import pytest
import torch

from convspec import conv_operator, penalty_descent, spectral_penalty


def dense_penalty(w, n, alpha, **kw):
    """Largest |eigenvalue| of M^T M - alpha I from the dense operator; differentiable."""
    m = conv_operator(w, n, **kw)
    e = torch.linalg.eigvalsh(m.T @ m)
    return torch.maximum(e[-1] - alpha, alpha - e[0])


def rand(h, gg, k, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(h, gg, k, k, dtype=torch.float64, generator=g)


CASES = [
    # (h, g, n, alpha, scale, geometry): top branch, bottom branch, wide, stride, groups+circular
    (3, 2, 4, 0.1, 1.0, {}),
    (3, 2, 4, 1.0, 0.15, {}),               # sigma_max^2 < alpha: the bottom term dominates
    (2, 3, 4, 1.0, 1.0, {}),                # wide M: lambda_min(M^T M) = 0
    (2, 3, 4, 40.0, 0.3, {}),               # wide M, alpha itself is the penalty
    (4, 4, 5, 1.0, 0.5, dict(stride=2, padding=1)),
    (4, 2, 5, 1.0, 0.4, dict(groups=2, padding_mode="circular")),
]


@pytest.mark.parametrize("h,g,n,alpha,scale,kw", CASES)
def test_value_and_gradient_match_dense(h, g, n, alpha, scale, kw):
    w = rand(h, g // kw.get("groups", 1), 3, seed=h + 10 * g, scale=scale).requires_grad_(True)
    ref = dense_penalty(w, n, alpha, **kw)
    (gref,) = torch.autograd.grad(ref, w)
    state = {}
    got = spectral_penalty(w, n, alpha, n_power_iterations=3000, state=state, **kw)
    (grad,) = torch.autograd.grad(got, w)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    # (atol: the wide case with alpha dominant has an exactly zero gradient.)
    torch.testing.assert_close(grad, gref, rtol=1e-6, atol=1e-8 * max(1.0, float(gref.abs().max())))


def test_bottom_branch_is_exercised():
    # The second case of CASES must actually be decided by sigma_min (else it tests nothing new).
    w = rand(3, 2, 3, seed=23, scale=0.15)
    m = conv_operator(w, 4)
    e = torch.linalg.eigvalsh(m.T @ m)
    assert 1.0 - e[0] > e[-1] - 1.0


def test_vectors_persist_between_calls():
    # Two calls of 2 iterations continue where the first stopped: exactly one call of 4.
    data = rand(4, 3, 3, seed=5, scale=0.3)

    def conv():
        c = torch.nn.Conv2d(3, 4, 3, bias=False).double()
        with torch.no_grad():
            c.weight.copy_(data)
        return c

    c1, c2 = conv(), conv()
    torch.manual_seed(1)
    spectral_penalty(c1, 6, n_power_iterations=2)      # vectors in buffers of the module
    twice = spectral_penalty(c1, 6, n_power_iterations=2)
    torch.manual_seed(1)
    once = spectral_penalty(c2, 6, n_power_iterations=4)
    assert float(twice.detach()) == float(once.detach())
    # The same with a state dict that the caller owns; a different geometry has its own vectors.
    torch.manual_seed(1)
    state = {}
    spectral_penalty(data, 6, n_power_iterations=2, state=state)
    assert float(spectral_penalty(data, 6, n_power_iterations=2, state=state)) == float(once.detach())
    assert state["u"].shape == (3, 6, 6)
    assert spectral_penalty(c1, 7, n_power_iterations=0).shape == ()


def test_vectors_are_buffers_of_the_module():
    """state_dict, .to(), deepcopy see them; nothing is kept for a bare tensor."""
    import copy

    torch.manual_seed(2)
    c = torch.nn.Conv2d(3, 4, 3, padding=1)
    spectral_penalty(c, 6, n_power_iterations=3)
    sd = c.state_dict()
    assert sd["spectral_penalty_u"].shape == (3, 6, 6)
    assert sd["spectral_penalty_v"].shape == (3, 6, 6)
    u = sd["spectral_penalty_u"].clone()
    twin = copy.deepcopy(c)
    assert torch.equal(twin.spectral_penalty_u, u)
    c.double()
    assert c.spectral_penalty_u.dtype == torch.float64
    fresh = torch.nn.Conv2d(3, 4, 3, padding=1)
    spectral_penalty(fresh, 6, n_power_iterations=0)
    fresh.load_state_dict(twin.state_dict())  # the same vectors, and the same penalty
    assert torch.equal(fresh.spectral_penalty_u, u)
    assert float(spectral_penalty(fresh, 6, n_power_iterations=0)) == float(
        spectral_penalty(twin, 6, n_power_iterations=0))
    from convspec import penalty

    assert not hasattr(penalty, "_POWER_STATE")  # no module-level cache keyed by id()
    w = torch.nn.Parameter(rand(4, 3, 3, seed=5, scale=0.3))
    torch.manual_seed(3)
    a = float(spectral_penalty(w, 6, n_power_iterations=1))
    torch.manual_seed(3)
    b = float(spectral_penalty(w, 6, n_power_iterations=1))
    assert a == b  # a bare tensor starts afresh every call


def test_two_iterations_per_call_converge_over_calls():
    c = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    with torch.no_grad():
        c.weight.copy_(rand(4, 3, 3, seed=5, scale=0.3))
    ref = float(dense_penalty(c.weight.detach(), 6, 1.0))
    first = float(spectral_penalty(c, 6, n_power_iterations=2).detach())
    for _ in range(1500):
        last = float(spectral_penalty(c, 6, n_power_iterations=2).detach())
    assert abs(last - ref) < 0.1 * abs(first - ref)
    assert last == pytest.approx(ref, rel=1e-4)


def test_value_is_a_lower_bound_before_convergence():
    w = rand(4, 4, 3, seed=6, scale=0.3)
    ref = float(dense_penalty(w, 6, 1.0))
    assert float(spectral_penalty(w, 6, n_power_iterations=1, state={})) <= ref * (1 + 1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=float("nan")), "alpha"),
    (dict(n_power_iterations=-1), "n_power_iterations"),
    (dict(state=[1]), "state"),
    (dict(padding_mode="mirror"), "padding_mode"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_penalty(rand(2, 2, 3, seed=0), 5, **kwargs)


def test_nan_weight_raises():
    w = rand(2, 2, 3, seed=0)
    w[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        spectral_penalty(w, 5)


def test_descent_on_the_spectral_penalty():
    w = rand(3, 3, 3, seed=7, scale=0.5)
    res = penalty_descent(w, 5, steps=25, step_rule="armijo", penalty="spectral")
    before = float(dense_penalty(w, 5, 1.0))
    after = float(dense_penalty(res.weight, 5, 1.0))
    assert after < 0.5 * before
    # The recorded penalty is the power-iteration value, which tracks the dense one.
    assert res.penalty[0] == pytest.approx(before, rel=1e-3)
    assert res.sigma_max[-1] ** 2 - 1 <= before and 1 - res.sigma_min[-1] ** 2 <= before
