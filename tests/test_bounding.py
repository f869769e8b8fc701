"""svb_, bbn_, SingularValueBounding: the band holds, vectors are kept, nothing half-written."""

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from convspec import SingularValueBounding, SVBReport, bbn_, bound_singular_values, svb_

ROOT = Path(__file__).resolve().parents[1]


def reshaped(weight, groups=1):
    """The matrices SVB acts on, in float64: (groups, out // groups, in // groups * k...)."""
    w = weight.detach().double()
    return w.reshape(groups, w.shape[0] // groups, -1)


def in_band(weight, eps, groups=1, tol=None):
    s = torch.linalg.svdvals(reshaped(weight, groups))
    if tol is None:  # rounding of the rebuilt weight, relative to the band edge
        tol = 1e-12 if weight.dtype == torch.float64 else 2e-6
    lo, hi = 1 / (1 + eps), 1 + eps
    return bool(((s >= lo * (1 - tol)) & (s <= hi * (1 + tol))).all()), s


def reference_svb(weight, eps, groups=1):
    """Algorithm 1, lines 4-6, per group, by float64 SVD: the independent reference."""
    mats = reshaped(weight, groups)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    out = u @ torch.diag_embed(s.clamp(1 / (1 + eps), 1 + eps)) @ vh
    return out.reshape(weight.shape)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 40, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(40, 10),
    )


# ------------------------------------------------------------------------------ svb_ band


@pytest.mark.parametrize(
    "out_ch, in_ch, k, groups",
    [(8, 3, 3, 1), (4, 16, 3, 1), (64, 4, 1, 1), (12, 6, 3, 3), (6, 6, 3, 6), (16, 8, (1, 5), 2)],
)
@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
def test_svb_conv_band_and_reference(out_ch, in_ch, k, groups, method):
    torch.manual_seed(out_ch * 7 + in_ch)
    conv = nn.Conv2d(in_ch, out_ch, k, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # spread the spectrum across the band
    before = conv.weight.detach().clone()
    eps = 0.2
    report = svb_(conv, eps, method=method)
    ok, _ = in_band(conv.weight, eps, groups)
    assert ok
    expected = reference_svb(before, eps, groups)
    assert torch.allclose(conv.weight.double(), expected, rtol=1e-5, atol=1e-6)
    row = report.layers[0]
    assert row.groups == groups and row.n_values == groups * min(out_ch // groups, before[0].numel())


def test_groups_are_bounded_separately():
    # One group scaled up, one down: bounding the whole (ungrouped) matrix would differ.
    conv = nn.Conv2d(4, 4, 3, groups=2, bias=False)
    torch.manual_seed(1)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[:2] *= 10
        conv.weight[2:] *= 0.01
    before = conv.weight.detach().clone()
    svb_(conv, 0.1)
    assert torch.allclose(conv.weight.double(), reference_svb(before, 0.1, groups=2), atol=1e-6)
    ungrouped = reference_svb(before, 0.1, groups=1)
    assert not torch.allclose(conv.weight.double(), ungrouped, atol=1e-3)


def test_singular_vectors_unchanged():
    torch.manual_seed(2)
    lin = nn.Linear(30, 12)
    with torch.no_grad():
        lin.weight.mul_(4)
    w0 = lin.weight.detach().double().clone()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    svb_(lin, 0.05)
    # U^T W' V must be diagonal with the clipped values: same singular vectors (sign-free test).
    core = u.T @ lin.weight.detach().double() @ vh.T
    assert torch.allclose(core, torch.diag(s.clamp(1 / 1.05, 1.05)), atol=1e-5)


def test_weight_in_band_is_bit_identical():
    torch.manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 20, dtype=torch.float64))
    lin = nn.Linear(20, 40, bias=False)
    scales = torch.linspace(0.97, 1.03, 20, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_((q * scales) @ torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))[0])
    before = lin.weight.detach().clone()
    report = svb_(lin, 0.05)
    assert torch.equal(lin.weight, before)
    assert report.n_clipped == 0


def test_idempotent():
    model = make_cnn()
    svb_(model, 0.1)
    once = snapshot(model)
    report = svb_(model, 0.1)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, once[k], rtol=0, atol=1e-6), k
    # The second pass only touches values a rounding error outside the band.
    for row in report.layers:
        assert row.min_before >= (1 / 1.1) * (1 - 1e-5) and row.max_before <= 1.1 * (1 + 1e-5)


def test_only_weights_change():
    model = make_cnn()
    snap = snapshot(model)
    svb_(model, 0.05)
    for k, v in model.state_dict().items():
        if k.endswith("weight") and not k.startswith(("1.", "4.")):  # BatchNorm is left alone
            continue
        assert torch.equal(v, snap[k]), k


def test_report_contents_and_str():
    model = make_cnn()
    report = svb_(model, 0.05)
    assert isinstance(report, SVBReport)
    assert [r.name for r in report.layers] == ["0", "3", "6", "9"]
    assert report["3"].shape == (16, 4, 3, 3) and report["3"].groups == 2
    for row in report.layers:
        assert row.min_after >= 1 / 1.05 - 1e-6 and row.max_after <= 1.05 + 1e-6
        assert 0 <= row.n_clipped <= row.n_values
        assert row.min_before <= row.max_before
    text = str(report)
    assert "band [0.9524, 1.05]" in text and "16x4x3x3 g2" in text
    assert f"{report.n_clipped} of" in text


@settings(max_examples=15, deadline=None)
@given(
    out_g=st.integers(1, 9),
    in_g=st.integers(1, 5),
    k=st.integers(1, 3),
    groups=st.integers(1, 3),
    scale=st.floats(0.05, 20.0),
    eps=st.floats(0.01, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_bound_singular_values_property(out_g, in_g, k, groups, scale, eps, dtype):
    torch.manual_seed(out_g * 100 + in_g * 10 + k)
    w = scale * torch.randn(out_g * groups, in_g, k, k, dtype=dtype)
    new = bound_singular_values(w, eps, groups=groups)
    assert new.dtype == dtype and new.shape == w.shape
    ok, _ = in_band(new, eps, groups)
    assert ok
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(new.double(), reference_svb(w, eps, groups), rtol=tol, atol=tol * scale)


def test_linear_and_iterable_and_skip():
    torch.manual_seed(4)
    a, b, c = nn.Linear(5, 7), nn.Linear(7, 3), nn.Conv2d(2, 4, 3)
    snap_b = b.weight.detach().clone()
    report = svb_([a, b, c], 0.1, skip=[b])
    assert [r.name for r in report.layers] == ["0", "2"]
    assert torch.equal(b.weight, snap_b)
    assert in_band(a.weight, 0.1)[0] and in_band(c.weight, 0.1)[0]

    model = make_cnn()
    report = svb_(model, 0.1, skip=lambda name, m: isinstance(m, nn.Linear))
    assert [r.name for r in report.layers] == ["0", "3", "6"]
    report = svb_(model, 0.1, layers=(nn.Linear,))
    assert [r.name for r in report.layers] == ["9"]


def test_conv1d_conv3d_by_default_and_layers_restricts():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(3, 6, 5), nn.Conv3d(2, 4, 3, groups=2))
    assert svb_(model, 0.1, layers=(nn.Conv2d, nn.Linear)).layers == []  # the caller's choice
    report = svb_(model, 0.1)  # default: every supported layer type
    assert len(report.layers) == 2
    assert in_band(model[0].weight, 0.1)[0] and in_band(model[1].weight, 0.1, groups=2)[0]


def test_tied_weights_bounded_once():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(svb_(model, 0.1).layers) == 1


def test_ddp_style_wrapper_iterates_modules():
    class Wrapper(nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = make_cnn()
    report = svb_(Wrapper(model), 0.1)
    assert [r.name for r in report.layers] == ["module.0", "module.3", "module.6", "module.9"]


def test_float64_and_half_weights():
    torch.manual_seed(6)
    lin64 = nn.Linear(8, 5).double()
    report = svb_(lin64, 0.1)
    assert report.layers[0].route == "svd"  # Gram never accurate enough for float64 weights
    assert in_band(lin64.weight, 0.1, tol=1e-12)[0]
    lin16 = nn.Linear(16, 8).to(torch.bfloat16)
    svb_(lin16, 0.1)
    assert lin16.weight.dtype == torch.bfloat16
    assert in_band(lin16.weight, 0.1, tol=2e-2)[0]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_bad_eps_raises_and_changes_nothing(eps):
    model = make_cnn()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="eps"):
        svb_(model, eps)
    with pytest.raises(ValueError, match="eps"):
        bbn_(model, eps)
    with pytest.raises(ValueError, match="eps"):
        bound_singular_values(model[0].weight, eps)
    assert_identical(model, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_in_one_layer_changes_nothing(bad):
    model = make_cnn()
    with torch.no_grad():
        model[6].weight[3, 2, 0, 0] = bad
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '6' has NaN or Inf"):
        svb_(model, 0.05)
    for k, v in model.state_dict().items():  # bit-identical, NaN included
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(snap[k])), k
        assert torch.equal(v.isnan(), snap[k].isnan())


def test_failed_decomposition_changes_nothing(monkeypatch):
    model = make_cnn()
    snap = snapshot(model)
    real_svd, real_eigh = torch.linalg.svd, torch.linalg.eigh

    def failing(x, *args, **kwargs):
        if tuple(x.shape[-2:]) in ((16, 16), (40, 16)):  # only layer '6' (40 x 16) has these
            raise torch.linalg.LinAlgError("did not converge (injected)")
        return (real_svd if "full_matrices" in kwargs else real_eigh)(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(RuntimeError, match=r"layer '6' failed.*injected.*no weight was changed"):
        svb_(model, 0.05)
    assert_identical(model, snap)


def test_wrong_types_raise():
    model = make_cnn()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="modules must be an nn.Module"):
        svb_(torch.randn(3, 3), 0.1)
    with pytest.raises(ValueError, match="item 1 is a Tensor"):
        svb_([model, torch.randn(3)], 0.1)
    with pytest.raises(ValueError, match="modules must be"):
        svb_(42, 0.1)
    with pytest.raises(ValueError, match="layers must be subclasses"):
        svb_(model, 0.1, layers=(nn.Module,))
    with pytest.raises(ValueError, match="layers must be subclasses"):
        svb_(model, 0.1, layers=(nn.BatchNorm2d,))
    with pytest.raises(ValueError, match="method must be one of"):
        svb_(model, 0.1, method="qr")
    with pytest.raises(ValueError, match="dtype must be"):
        svb_(model, 0.1, dtype=torch.float16)
    with pytest.raises(ValueError, match="skip items"):
        svb_(model, 0.1, skip=[3])
    with pytest.raises(ValueError, match="distributed=True but torch.distributed is not initialized"):
        svb_(model, 0.1, distributed=True)
    assert_identical(model, snap)


def test_parametrized_and_lazy_layers_rejected():
    sn = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="parametrized weight"):
        svb_(nn.Sequential(nn.Linear(3, 4), sn), 0.1)
    with pytest.raises(ValueError, match="lazy"):
        svb_(nn.Sequential(nn.LazyLinear(3)), 0.1)
    first = nn.Linear(3, 4)
    snap = first.weight.detach().clone()
    with pytest.raises(ValueError):
        svb_(nn.Sequential(first, sn), 0.1)
    assert torch.equal(first.weight, snap)  # the valid layer before it was not written


def test_bound_singular_values_validation():
    with pytest.raises(ValueError, match="NaN or Inf"):
        bound_singular_values(torch.tensor([[1.0, float("nan")]]), 0.1)
    with pytest.raises(ValueError, match="groups"):
        bound_singular_values(torch.randn(6, 2, 3, 3), 0.1, groups=4)
    with pytest.raises(ValueError, match="at least 2"):
        bound_singular_values(torch.randn(6), 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        bound_singular_values(torch.ones(3, 3, dtype=torch.int64), 0.1)


# ------------------------------------------------------------------------------ BBN


def bn_with(gamma, var):
    bn = nn.BatchNorm2d(len(gamma))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.linspace(-1, 1, len(gamma)))
        bn.running_var.copy_(torch.tensor(var))
        bn.running_mean.copy_(torch.linspace(0, 3, len(gamma)))
    return bn


@pytest.mark.parametrize("mode", ["bbn", "rel"])
def test_bbn_band_and_untouched_buffers(mode):
    torch.manual_seed(7)
    gamma = (torch.rand(12) * 3 + 0.05).tolist()
    var = (torch.rand(12) * 4 + 0.01).tolist()
    bn = bn_with(gamma, var)
    snap = snapshot(bn)
    eps = 0.1
    report = bbn_(bn, eps, mode=mode)
    g0 = torch.tensor(gamma, dtype=torch.float64)
    sigma = (torch.tensor(var, dtype=torch.float64) + bn.eps).sqrt()
    if mode == "rel":
        sigma = torch.ones_like(sigma)
    alpha = (g0 / sigma).mean()  # computed before clipping, as in Algorithm 2
    ratio = bn.weight.detach().double() / sigma / alpha
    assert bool(((ratio >= 1 / (1 + eps) - 1e-6) & (ratio <= 1 + eps + 1e-6)).all())
    inside = ((g0 / sigma / alpha) >= 1 / (1 + eps)) & ((g0 / sigma / alpha) <= 1 + eps)
    assert torch.equal(bn.weight[inside], snap["weight"][inside])  # in-band gammas untouched
    assert report.n_bn_clipped == int((~inside).sum()) > 0
    for k in ("bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, k), snap[k]), k


def test_bbn_modes_differ_and_match_hand_computation():
    gamma, var = [1.0, 1.0, 4.0], [0.0, 3.0, 15.0]
    bn = bn_with(gamma, var)
    bn.eps = 1.0  # sigma = [1, 2, 4]
    bbn_(bn, 0.5, mode="bbn")
    # r = gamma / sigma = [1, .5, 1], alpha = 5/6, r / alpha = [1.2, .6, 1.2], band [2/3, 3/2]:
    # only the middle one is raised, to (2/3) * alpha * sigma = 10/9.
    assert torch.allclose(bn.weight, torch.tensor([1.0, 10 / 9, 4.0]))
    assert bn.weight[0] == 1.0 and bn.weight[2] == 4.0
    bn2 = bn_with(gamma, var)
    bbn_(bn2, 0.5, mode="rel")
    # mean gamma = 2: band [4/3, 3] -> [4/3, 4/3, 3]
    assert torch.allclose(bn2.weight, torch.tensor([4 / 3, 4 / 3, 3.0]))


def test_bbn_signs_and_zeros():
    bn = bn_with([-3.0, 0.0, 1.0, 0.5, -0.01], [1.0] * 5)
    bbn_(bn, 0.2, mode="rel")
    g = bn.weight.detach()
    assert g[1] == 0  # zero stays zero
    assert g[0] < 0 and g[4] < 0 and g[2] > 0 and g[3] > 0  # signs kept
    alpha = (3 + 1 + 0.5 + 0.01) / 4  # mean |gamma| over the non-zero ones
    mags = g[[0, 2, 3, 4]].abs() / alpha
    assert bool(((mags >= 1 / 1.2 - 1e-6) & (mags <= 1.2 + 1e-6)).all())
    zero = bn_with([0.0, 0.0], [1.0, 1.0])
    report = bbn_(zero, 0.2)
    assert zero.weight.tolist() == [0.0, 0.0] and report.n_bn_clipped == 0


def test_bbn_rejects_and_skips():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(4, track_running_stats=False))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        bbn_(model, 0.1, mode="abs")
    with pytest.raises(ValueError, match=r"BatchNorm '1' has no running_var"):
        bbn_(model, 0.1, mode="bbn")
    with torch.no_grad():
        model[0].weight[0] = float("nan")
    with pytest.raises(ValueError, match="'0' has NaN or Inf"):
        bbn_(model, 0.1, mode="rel")
    with torch.no_grad():
        model[0].weight[0] = 1.0
    assert_identical(model, snap)
    report = bbn_(nn.Sequential(nn.BatchNorm2d(3, affine=False)), 0.1)
    assert report.batchnorms == []  # no gamma: nothing to bound


def model_with_bn(var_of_channel_3=0.0, bn_eps=1e-5, seed=11):
    """Conv -> (BatchNorm '1.0', ReLU); gamma ~ 1, running_var ~ 1 except channel 3."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    bn = model[1][0]
    bn.eps = bn_eps
    with torch.no_grad():
        model[0].weight.mul_(5)  # far outside any SVB band: svb_ would write it
        bn.weight.copy_(1 + 0.1 * torch.randn(8))
        bn.running_var.copy_(0.5 + torch.rand(8))
        bn.running_var[3] = var_of_channel_3
    return model


@pytest.mark.parametrize("bad", [0.0, -1e-5, float("nan"), float("inf")])
def test_bbn_rejects_a_batchnorm_eps_that_is_not_positive_and_finite(bad):
    model = model_with_bn(bn_eps=bad)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"BatchNorm '1\.0' has eps=.*positive finite"):
        bbn_(model, 0.2)
    assert_identical(model, snap)
    # The scheduler plans SVB first; BBN's refusal must leave the SVB-bound conv unwritten too.
    svb = SingularValueBounding(model, 0.05, every=1, bbn_eps=0.2)
    with pytest.raises(ValueError, match=r"BatchNorm '1\.0' has eps="):
        svb.step()
    assert_identical(model, snap)


def test_bbn_warns_about_zero_variance_channels_and_keeps_algorithm_2():
    model = model_with_bn(var_of_channel_3=0.0)
    bn = model[1][0]
    with torch.no_grad():
        bn.running_var[5] = 1e-9  # near zero counts too (running_var <= bn.eps)
    gamma = bn.weight.detach().double().clone()
    sigma = (bn.running_var.detach().double() + bn.eps).sqrt()
    with pytest.warns(RuntimeWarning, match=r"BatchNorm '1\.0': channel\(s\) 3, 5 have \(near-\)zero"):
        bbn_(model, 0.2)
    # Algorithm 2 as written: alpha includes the zero-variance channels, the others are raised.
    alpha = (gamma / sigma).mean()
    want = sigma * (gamma / sigma / alpha).clamp(1 / 1.2, 1.2) * alpha
    torch.testing.assert_close(bn.weight.detach().double(), want, rtol=1e-6, atol=0)
    others = [0, 1, 2, 4, 6, 7]
    assert bool((bn.weight.detach()[others] > 10 * gamma[others]).all())  # what the warning is for
    # Through the scheduler too.
    model = model_with_bn(var_of_channel_3=0.0)
    with pytest.warns(RuntimeWarning, match=r"'1\.0': channel\(s\) 3 have"):
        SingularValueBounding(model, 0.05, every=1, bbn_eps=0.2).step()


def test_bbn_quiet_without_zero_variance_or_in_rel_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbn_(model_with_bn(var_of_channel_3=1.0), 0.2)
        bbn_(model_with_bn(var_of_channel_3=0.0), 0.2, mode="rel")  # sigma is not used


def test_bbn_refuses_a_gamma_that_overflows_its_dtype():
    bn = nn.BatchNorm1d(4).half()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1000.0, 1.0, 1.0, 1.0]))
        bn.running_var.copy_(torch.tensor([0.0, 1e4, 1e4, 1e4]))
    model = nn.Sequential(bn)
    snap = snapshot(model)
    with pytest.warns(RuntimeWarning, match="zero"), \
            pytest.raises(ValueError, match=r"'0' is not finite in torch\.float16"):
        bbn_(model, 0.2)
    assert_identical(model, snap)


# ------------------------------------------------------------------------------ scheduler


def test_scheduler_in_training_loop_and_state_dict():
    torch.manual_seed(8)
    model = make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    svb = SingularValueBounding(model, eps=0.05, every=3, bbn_eps=0.3, bbn_mode="bbn")
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    applied = []
    for it in range(1, 10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        report = svb.step()
        if it % 3:
            assert report is None
            continue
        applied.append(it)
        assert report is svb.last_report and report.n_clipped > 0
        for name, groups in (("0", 1), ("3", 2), ("6", 1), ("9", 1)):
            ok, _ = in_band(model[int(name)].weight, 0.05, groups)
            assert ok, (it, name)
        assert len(report.batchnorms) == 2
    assert applied == [3, 6, 9]

    state = svb.state_dict()
    assert state == {"step": 9, "eps": 0.05, "every": 3, "bbn_eps": 0.3, "bbn_mode": "bbn"}
    resumed = SingularValueBounding(model, eps=0.5, every=100)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [resumed.step() is not None for _ in range(3)] == [False, False, True]
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="every"):
        resumed.load_state_dict({**state, "every": 0})
    assert resumed.state_dict()["every"] == 3  # a rejected state changes nothing


def test_scheduler_validation_and_atomic_apply():
    model = make_cnn()
    for kwargs, match in (
        (dict(every=0), "every"),
        (dict(every=1.5), "every"),
        (dict(every=2, bbn_eps=-1.0), "bbn_eps"),
        (dict(every=2, bbn_mode="x"), "bbn_mode"),
    ):
        with pytest.raises(ValueError, match=match):
            SingularValueBounding(model, 0.1, **kwargs)
    # BBN fails validation after SVB was computed: the weights must not be written either.
    model.add_module("bad_bn", nn.BatchNorm2d(2, track_running_stats=False))
    with torch.no_grad():
        model[0].weight.mul_(5)
    snap = snapshot(model)
    svb = SingularValueBounding(model, 0.1, every=1, bbn_eps=0.1, bbn_mode="bbn")
    with pytest.raises(ValueError, match="running_var"):
        svb.step()
    assert_identical(model, snap)


def test_readme_svb_snippet_runs():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if "SingularValueBounding" in b]
    assert blocks, "README has no SingularValueBounding snippet"
    namespace = {"__name__": "__svb_snippet__"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())
    report = namespace["report"]
    assert report.layers and all(1 / 1.05 - 1e-5 <= r.min_after and r.max_after <= 1.05 + 1e-5
                                 for r in report.layers)
