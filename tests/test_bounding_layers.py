"""SVB on every layer type: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d (and Lazy* forms).

The bounded matrix of each type (Note [the bounded matrix of each layer type]) is rebuilt here by
explicit slicing, and its meaning is checked against the dense operator obtained by applying the
module itself to unit impulses (tests/_module_operator.py).
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from _module_operator import module_operator
from convspec import SingularValueBounding, bound_singular_values, svb_

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LAZY = {(1, False): nn.LazyConv1d, (2, False): nn.LazyConv2d, (3, False): nn.LazyConv3d,
        (1, True): nn.LazyConvTranspose1d, (2, True): nn.LazyConvTranspose2d,
        (3, True): nn.LazyConvTranspose3d}
EPS = 0.1
LO, HI = 1 / (1 + EPS), 1 + EPS


def group_matrices(weight, groups=1):
    """The documented matrices, float64, by explicit slicing: rows j*r .. (j+1)*r-1 of the weight
    (r = weight.shape[0] // groups), flattened: (out/g) x (in/g * prod k) for a convolution,
    (in/g) x (out/g * prod k) for a transposed one, the matrix itself for a Linear."""
    w = weight.detach().double()
    r = w.shape[0] // groups
    return torch.stack([w[j * r:(j + 1) * r].reshape(r, -1) for j in range(groups)])


def reference_svb(weight, groups=1):
    """Algorithm 1 on the documented matrices by float64 SVD, laid back into the weight's shape."""
    u, s, vh = torch.linalg.svd(group_matrices(weight, groups), full_matrices=False)
    return (u @ torch.diag_embed(s.clamp(LO, HI)) @ vh).reshape(weight.shape)


def in_band(s, tol=2e-6):
    return bool(((s >= LO * (1 - tol)) & (s <= HI * (1 + tol))).all())


def make_layer(kind, dim, in_ch, out_ch, k, groups, **kw):
    if kind == "linear":
        return nn.Linear(in_ch, out_ch)
    return (TRANSPOSED if kind == "transposed" else CONV)[dim](in_ch, out_ch, k, groups=groups,
                                                               **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(snap[k])), k
        assert torch.equal(v.isnan(), snap[k].isnan()), k


# ------------------------------------------------------------------------------ every type x groups

LAYERS = [
    ("linear", 0, 7, 12, None, 1, {}),
    ("linear", 0, 30, 5, None, 1, {}),
    ("conv", 1, 6, 4, 5, 1, dict(stride=2, padding=1)),
    ("conv", 1, 6, 9, 3, 3, dict(dilation=2, padding_mode="reflect", padding=2)),
    ("conv", 2, 4, 8, 3, 2, dict(padding="same", padding_mode="circular")),
    ("conv", 2, 12, 6, (1, 4), 6, {}),
    ("conv", 3, 4, 6, 3, 2, dict(padding=1, padding_mode="replicate")),
    ("conv", 3, 3, 5, (2, 1, 3), 1, {}),
    ("transposed", 1, 6, 4, 5, 2, dict(stride=2, output_padding=1)),
    ("transposed", 1, 3, 12, 2, 1, dict(dilation=3)),
    ("transposed", 2, 8, 4, 3, 4, dict(stride=2, padding=1, output_padding=1)),
    ("transposed", 2, 6, 6, (4, 2), 3, {}),
    ("transposed", 3, 4, 6, 3, 2, dict(stride=(1, 2, 1), padding=1)),
    ("transposed", 3, 9, 3, (1, 2, 2), 3, {}),
]


@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
@pytest.mark.parametrize("kind, dim, in_ch, out_ch, k, groups, kw", LAYERS)
def test_svb_bounds_the_documented_matrix_of_every_layer_type(kind, dim, in_ch, out_ch, k, groups,
                                                              kw, method):
    torch.manual_seed(in_ch * 13 + out_ch)
    layer = make_layer(kind, dim, in_ch, out_ch, k, groups, **kw)
    with torch.no_grad():
        layer.weight.mul_(4.0)  # spread the spectrum across both band edges
    before = layer.weight.detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    report = svb_(layer, EPS, method=method)

    mats = group_matrices(layer.weight, groups)
    kernel = math.prod(layer.kernel_size) if kind != "linear" else 1
    rows = {"linear": out_ch, "conv": out_ch // groups, "transposed": in_ch // groups}[kind]
    cols = {"linear": in_ch, "conv": in_ch // groups * kernel,
            "transposed": out_ch // groups * kernel}[kind]
    assert mats.shape == (groups, rows, cols)
    assert in_band(torch.linalg.svdvals(mats))
    torch.testing.assert_close(layer.weight.double(), reference_svb(before, groups),
                               rtol=1e-5, atol=1e-6)
    assert bias is None or torch.equal(layer.bias, bias)
    row = report.layers[0]
    assert (row.groups, row.n_values) == (groups, groups * min(rows, cols))
    assert row.n_clipped > 0 and LO - 1e-6 <= row.min_after and row.max_after <= HI + 1e-6
    # The tensor layer reads the same matrices.
    torch.testing.assert_close(bound_singular_values(before, EPS, groups=groups).double(),
                               reference_svb(before, groups), rtol=1e-5, atol=1e-6)


def test_groups_of_a_transposed_layer_are_bounded_separately():
    up = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False)  # weight (4, 3, 3, 3): 2 x 27 per group
    torch.manual_seed(1)
    with torch.no_grad():
        up.weight.normal_()
        up.weight[:2] *= 10
        up.weight[2:] *= 0.01
    before = up.weight.detach().clone()
    svb_(up, EPS)
    torch.testing.assert_close(up.weight.double(), reference_svb(before, 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(up.weight.double(), reference_svb(before, 1), atol=1e-3)
    # The other reshape, (out/g) x (in/g * k) read through the output channels, is not what is
    # bounded: its 3 singular values share ||W_j||_F^2 <= 2 (1+eps)^2 < 3 / (1+eps)^2, so they
    # cannot all be in the band.
    other = up.weight.detach().double().reshape(2, 2, 3, 9).transpose(1, 2).reshape(2, 3, 18)
    assert not in_band(torch.linalg.svdvals(other))


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 3),
    transposed=st.booleans(),
    groups=st.integers(1, 3),
    a_g=st.integers(1, 4),
    b_g=st.integers(1, 4),
    k=st.integers(1, 3),
    scale=st.floats(0.05, 20.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_svb_property_over_geometries(dim, transposed, groups, a_g, b_g, k, scale, dtype):
    torch.manual_seed(a_g * 100 + b_g * 10 + k)
    layer = (TRANSPOSED if transposed else CONV)[dim](a_g * groups, b_g * groups, k,
                                                       groups=groups, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.normal_(0, scale)
    before = layer.weight.detach().clone()
    svb_(layer, EPS)
    assert layer.weight.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert in_band(torch.linalg.svdvals(group_matrices(layer.weight, groups)), tol)
    ref = reference_svb(before, groups)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(layer.weight.double(), ref, rtol=rtol, atol=rtol * max(scale, 1))


# ------------------------------------------------------------------------- what the matrix means


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_bounded_matrix_is_the_operator_on_one_patch(dim, transposed):
    # Convolution on an input one kernel large (padding 0): one output pixel, M = blockdiag(W_j).
    # Transposed convolution on a one-pixel input: one output patch, M = blockdiag(W_j^T).
    groups, k = 2, (3, 2, 2)[:dim]
    layer = (TRANSPOSED if transposed else CONV)[dim](4, 6, k, groups=groups)
    torch.manual_seed(2)
    with torch.no_grad():
        layer.weight.normal_()
    m = module_operator(layer, (1,) * dim if transposed else k)
    mats = group_matrices(layer.weight, groups)
    blocks = torch.block_diag(*(mats.mT if transposed else mats))
    # Columns of W_j run over (channel, tap); the operator's over (channel, position): the same
    # order, since the patch positions are the taps.
    torch.testing.assert_close(m, blocks, rtol=0, atol=0)


@pytest.mark.parametrize("dim, k, groups, n", [(1, 3, 1, 4), (1, 2, 2, 3), (2, (2, 3), 2, 2),
                                                (3, 2, 1, 2), (3, (1, 2, 2), 2, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_non_overlapping_patches_operator_spectrum_equals_the_bounded_matrix(dim, k, groups, n,
                                                                             transposed):
    # stride == kernel_size, padding 0: the operator is block diagonal in the bounded matrices
    # (or their transposes), so after svb_ the operator itself lies in the band.
    kk = k if isinstance(k, tuple) else (k,) * dim
    cls = (TRANSPOSED if transposed else CONV)[dim]
    layer = cls(2 * groups, 3 * groups, k, stride=k, groups=groups, bias=False)
    torch.manual_seed(3)
    with torch.no_grad():
        layer.weight.normal_(0, 2.0)
    size = (n,) * dim if transposed else tuple(n * kj for kj in kk)
    s_mats = torch.linalg.svdvals(group_matrices(layer.weight, groups)).flatten()
    s_op = torch.linalg.svdvals(module_operator(layer, size))
    expected = s_mats.repeat(n ** dim).sort(descending=True).values
    torch.testing.assert_close(s_op[: expected.numel()], expected, rtol=1e-9, atol=1e-9)
    assert bool((s_op[expected.numel():] < 1e-9).all())
    svb_(layer, EPS)
    s_op = torch.linalg.svdvals(module_operator(layer, size))[: expected.numel()]
    assert in_band(s_op)


# ------------------------------------------------------------------------------ Lazy layers


def lazy_model():
    return nn.Sequential(
        nn.LazyConv1d(6, 3), nn.LazyConvTranspose1d(4, 2, stride=2, groups=2),
        nn.Unflatten(2, (4, 4)), nn.LazyConv2d(4, 3, padding=1), nn.LazyConvTranspose2d(2, 3),
        nn.Unflatten(2, (2, 3)), nn.LazyConv3d(4, (1, 2, 2), groups=2),
        nn.LazyConvTranspose3d(2, 2), nn.Flatten(), nn.LazyLinear(5),
    )


def test_lazy_layers_once_initialised():
    model = lazy_model()
    model(torch.randn(2, 3, 10))  # 10 -> 8 -> 16 -> (4, 4) -> ... initialises every layer
    report = svb_(model, EPS)
    assert [r.name for r in report.layers] == ["0", "1", "3", "4", "6", "7", "9"]
    for i in (0, 1, 3, 4, 6, 7, 9):
        layer = model[i]
        s = torch.linalg.svdvals(group_matrices(layer.weight, getattr(layer, "groups", 1)))
        assert in_band(s), i


def test_uninitialised_lazy_layer_raises_and_changes_nothing():
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.LazyConvTranspose1d(4, 2), nn.LazyLinear(3))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '1' \(LazyConvTranspose1d\) is lazy and not "
                                         r"initialised yet.*run a forward pass first, or exclude"):
        svb_(model, EPS)
    assert torch.equal(model[0].weight, before)  # the layer before it was not written
    report = svb_(model, EPS, skip=["1", "2"])
    assert [r.name for r in report.layers] == ["0"]
    svb = SingularValueBounding(model, EPS, every=1)
    with pytest.raises(ValueError, match="'1' .* is lazy"):
        svb.step()


# ------------------------------------------------------------------------------ plan-then-commit


def every_type_model():
    torch.manual_seed(9)
    model = nn.ModuleDict({
        "lin": nn.Linear(7, 4),
        "c1": nn.Conv1d(4, 6, 3, groups=2),
        "c2": nn.Conv2d(3, 6, 3, padding_mode="reflect", padding=1),
        "c3": nn.Conv3d(2, 4, 2),
        "t1": nn.ConvTranspose1d(6, 4, 4, stride=2, groups=2),
        "t2": nn.ConvTranspose2d(5, 3, 3),  # weight (5, 3, 3, 3): the only 5 x 27 matrix
        "t3": nn.ConvTranspose3d(4, 2, 2, groups=2),
    })
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # every layer outside the band: svb_ would write all of them
    return model


@pytest.mark.parametrize("bad_layer", ["c1", "c3", "t1", "t2", "t3"])
def test_nonfinite_weight_in_any_layer_type_changes_nothing(bad_layer):
    model = every_type_model()
    with torch.no_grad():
        model[bad_layer].weight.view(-1)[3] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '{bad_layer}' has NaN or Inf"):
        svb_(model, EPS)
    assert_identical(model, snap)
    svb = SingularValueBounding(model, EPS, every=1, bbn_eps=0.2)
    with pytest.raises(ValueError, match=rf"'{bad_layer}' has NaN"):
        svb.step()
    assert_identical(model, snap)


def test_failed_decomposition_of_a_transposed_layer_changes_nothing(monkeypatch):
    model = every_type_model()
    snap = snapshot(model)
    real_svd, real_eigh = torch.linalg.svd, torch.linalg.eigh

    def failing(x, *args, **kwargs):
        if tuple(x.shape[-2:]) in ((5, 27), (5, 5)):  # only 't2' has these
            raise torch.linalg.LinAlgError("did not converge (injected)")
        return (real_svd if "full_matrices" in kwargs else real_eigh)(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(RuntimeError, match=r"layer 't2' failed.*injected.*no weight was changed"):
        svb_(model, EPS)
    assert_identical(model, snap)


def test_every_type_bounded_by_default_and_by_the_scheduler():
    model = every_type_model()
    report = svb_(model, EPS)
    assert [r.name for r in report.layers] == ["lin", "c1", "c2", "c3", "t1", "t2", "t3"]
    assert all(r.n_clipped > 0 for r in report.layers)

    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose1d(4, 4, 2, stride=2, groups=2), nn.ReLU(),
                          nn.Conv1d(4, 2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    svb = SingularValueBounding(model, eps=0.05, every=2)
    x = torch.randn(8, 2, 6)
    for it in range(1, 7):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        report = svb.step()
        if it % 2 == 0:
            assert [r.name for r in report.layers] == ["0", "2", "4"]
            for i, g in ((0, 1), (2, 2), (4, 1)):
                s = torch.linalg.svdvals(group_matrices(model[i].weight, g))
                assert bool(((s >= 1 / 1.05 - 1e-6) & (s <= 1.05 + 1e-6)).all()), (it, i)


class MyConv(nn.modules.conv._ConvNd):  # a convolution type convspec does not know
    def __init__(self):
        super().__init__(2, 2, (3,), (1,), (0,), (1,), False, (0,), 1, False, "zeros")


def test_unknown_convolution_is_named_not_skipped_silently():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(MyConv()))
    before = model[1][0].weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"svb_: .*'1\.0' \(MyConv\).*left unchanged"):
        report = svb_(model, EPS)
    assert [r.name for r in report.layers] == ["0"]
    assert torch.equal(model[1][0].weight, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svb_(model, EPS, skip=["1"])  # skipped on purpose: quiet
