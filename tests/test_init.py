"""orthogonal_ (reshaped kernel) and delta_orthogonal_ (operator), checked with the dense M.

The dense operator is built by applying the module itself to unit impulses
(tests/_module_operator.py), so these tests do not depend on convspec's own operator code.
"""

import math

import pytest
import torch
from torch import nn

from _module_operator import module_operator
from convspec import delta_orthogonal_, orthogonal_

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def gram_is_identity(mats, atol=1e-6):
    """Rows orthonormal if wide, columns if tall, for a stack (g, m, n)."""
    m, n = mats.shape[-2:]
    g = mats @ mats.mT if m <= n else mats.mT @ mats
    eye = torch.eye(min(m, n), dtype=mats.dtype).expand_as(g)
    return torch.allclose(g, eye, atol=atol)


def group_matrices(layer):
    """The documented matrices, by explicit slicing: group j's rows of the weight, reshaped.

    Conv (out, in/g, *k): (out/g) x (in/g * prod k); transposed (in, out/g, *k):
    (in/g) x (out/g * prod k); Linear: the weight.
    """
    w = layer.weight.detach().double()
    groups = getattr(layer, "groups", 1)
    r = w.shape[0] // groups
    return torch.stack([w[j * r:(j + 1) * r].reshape(r, -1) for j in range(groups)])


def _kernel(k, dim):
    return k if isinstance(k, tuple) else (k,) * dim


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "dim, in_ch, out_ch, k, groups",
    [(2, 3, 16, 3, 1), (2, 64, 8, 3, 1), (2, 8, 8, 1, 1), (2, 12, 6, 3, 3), (2, 4, 8, (3, 5), 4),
     (1, 6, 4, 5, 2), (1, 2, 12, 2, 1), (3, 4, 6, 3, 2), (3, 3, 3, (1, 2, 3), 1)],
)
def test_orthogonal_reshaped_every_conv_type(dim, in_ch, out_ch, k, groups, transposed):
    conv = (TRANSPOSED if transposed else CONV)[dim](in_ch, out_ch, k, groups=groups)
    bias = conv.bias.detach().clone()
    assert orthogonal_(conv, generator=torch.Generator().manual_seed(0)) is conv
    mats = group_matrices(conv)
    rows = (in_ch if transposed else out_ch) // groups
    cols = (out_ch if transposed else in_ch) // groups * math.prod(_kernel(k, dim))
    assert mats.shape == (groups, rows, cols)
    assert gram_is_identity(mats)
    assert torch.equal(conv.bias, bias)


def test_orthogonal_model_gain_and_layers():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv1d(2, 2, 3), nn.Linear(7, 4),
                          nn.ConvTranspose2d(4, 2, 2))
    orthogonal_(model, gain=2.0)  # default: every supported layer
    s = torch.linalg.svdvals(model[3].weight.double())
    assert torch.allclose(s, torch.full_like(s, 2.0))
    for i in (0, 2, 4):
        assert gram_is_identity(group_matrices(model[i]) / 2), i

    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv1d(2, 2, 3), nn.Linear(7, 4))
    conv1d_before = model[1].weight.detach().clone()
    orthogonal_(model, layers=(nn.Conv2d, nn.Linear))
    assert torch.equal(model[1].weight, conv1d_before)  # excluded by the caller
    orthogonal_(model, skip=["0", "2"])
    assert gram_is_identity(group_matrices(model[1]))
    orthogonal_(model[1], layers=(nn.Linear,))  # a single layer is always accepted


def test_orthogonal_is_random_and_seeded():
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    orthogonal_(a, generator=torch.Generator().manual_seed(1))
    orthogonal_(b, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.weight, b.weight)
    orthogonal_(b, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a.weight, b.weight)


def test_orthogonal_rejects():
    with pytest.raises(ValueError, match="contains none"):
        orthogonal_(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="nn.Module"):
        orthogonal_(torch.randn(3, 3))
    with pytest.raises(ValueError, match="gain"):
        orthogonal_(nn.Linear(2, 2), gain=float("nan"))


def test_orthogonal_lazy_layers():
    first = nn.Conv1d(2, 4, 3)
    before = first.weight.detach().clone()
    model = nn.Sequential(first, nn.LazyConvTranspose1d(6, 3))
    with pytest.raises(ValueError, match=r"layer '1' \(LazyConvTranspose1d\) is lazy and not "
                                         r"initialised yet.*forward pass first"):
        orthogonal_(model)
    assert torch.equal(first.weight, before)  # nothing written before the refusal
    orthogonal_(model, skip=["1"])
    assert gram_is_identity(group_matrices(first))
    model(torch.randn(1, 2, 9))  # initialises it (it becomes an nn.ConvTranspose1d)
    orthogonal_(model)
    assert gram_is_identity(group_matrices(model[1]))


class MyConv(nn.modules.conv._ConvNd):  # a convolution type convspec does not know
    def __init__(self):
        super().__init__(2, 2, (3,), (1,), (0,), (1,), False, (0,), 1, False, "zeros")


def test_orthogonal_names_unknown_convolutions():
    model = nn.Sequential(nn.Linear(3, 3), MyConv())
    with pytest.warns(RuntimeWarning, match=r"orthogonal_: .*'1' \(MyConv\)"):
        orthogonal_(model)


# ------------------------------------------------------------------------------ delta_orthogonal_


def centre_only(conv):
    w = conv.weight.detach()
    centre = tuple((k - 1) // 2 for k in conv.kernel_size)  # Note [centre tap]
    c = w[(slice(None), slice(None)) + centre]
    return torch.count_nonzero(w) == torch.count_nonzero(c) > 0


def assert_isometry(m, side, gain=1.0, atol=1e-6):
    """side 'in': M^T M = gain^2 I; 'out': M M^T = gain^2 I; 'both': orthogonal times gain."""
    if side in ("in", "both"):
        eye = torch.eye(m.shape[1], dtype=m.dtype)
        assert torch.allclose(m.T @ m, gain ** 2 * eye, atol=atol)
    if side in ("out", "both"):
        eye = torch.eye(m.shape[0], dtype=m.dtype)
        assert torch.allclose(m @ m.T, gain ** 2 * eye, atol=atol)


@pytest.mark.parametrize(
    "dim, in_ch, out_ch, k, groups, dilation",
    [(2, 4, 4, 3, 1, 1), (2, 2, 6, 3, 1, 1), (2, 6, 2, 3, 1, 1), (2, 4, 4, 5, 2, 1),
     (2, 3, 3, 3, 1, 2), (2, 4, 4, 2, 1, 1), (2, 4, 8, (3, 1), 2, 1), (2, 4, 4, (2, 4), 2, 1),
     (1, 4, 4, 3, 1, 1), (1, 4, 4, 4, 2, 1), (1, 2, 6, 2, 2, 3), (1, 6, 3, 5, 1, 1),
     (3, 2, 2, 3, 1, 1), (3, 4, 4, (2, 3, 1), 2, 1), (3, 2, 4, 2, 1, 1)],
)
def test_delta_orthogonal_operator_circular(dim, in_ch, out_ch, k, groups, dilation):
    conv = CONV[dim](in_ch, out_ch, k, groups=groups, dilation=dilation, padding="same",
                     padding_mode="circular", bias=False)
    delta_orthogonal_(conv, gain=1.5, generator=torch.Generator().manual_seed(3))
    assert centre_only(conv)
    n = {1: 7, 2: 5, 3: 4}[dim]
    m = module_operator(conv, (n,) * dim)
    # Stride 1, circular: the centre tap is a cyclic shift, M = H (x) shift per group.
    side = "both" if in_ch == out_ch else ("in" if out_ch > in_ch else "out")
    assert_isometry(m, side, gain=1.5)
    s = torch.linalg.svdvals(m)
    assert torch.allclose(s[: min(in_ch, out_ch) * n ** dim], torch.full((1,), 1.5, dtype=s.dtype),
                          atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dim, k", [(1, 2), (1, 4), (2, (2, 3)), (3, 2)])
def test_delta_orthogonal_even_kernel_same_zero_padding_is_orthogonal(dim, k):
    # padding='same' pads (k-1)//2 on the left: the centre tap (k-1)//2 reads the output position
    # itself and never the padding (with k//2 the last row would be lost).
    conv = CONV[dim](4, 4, k, padding="same", bias=False)
    delta_orthogonal_(conv, generator=torch.Generator().manual_seed(4))
    assert_isometry(module_operator(conv, (5,) * dim), "both")


def test_delta_orthogonal_strided_conv_keeps_rows_orthonormal():
    conv = nn.Conv2d(6, 4, 4, stride=2, padding=1, bias=False)  # padding = dilation * (4-1)//2
    delta_orthogonal_(conv, generator=torch.Generator().manual_seed(5))
    assert_isometry(module_operator(conv, (7, 6)), "out")  # out <= in: M M^T = I


@pytest.mark.parametrize(
    "dim, in_ch, out_ch, k, groups, dilation",
    [(1, 4, 4, 3, 1, 1), (1, 6, 6, 5, 3, 2), (2, 4, 4, 3, 1, 1), (2, 4, 4, (3, 5), 2, 1),
     (3, 2, 2, 3, 1, 1), (3, 4, 4, (1, 3, 3), 2, 2)],
)
def test_delta_orthogonal_transposed_stride_1_is_orthogonal(dim, in_ch, out_ch, k, groups,
                                                            dilation):
    kk = _kernel(k, dim)
    padding = tuple(dilation * (kj - 1) // 2 for kj in kk)
    up = TRANSPOSED[dim](in_ch, out_ch, k, groups=groups, dilation=dilation, padding=padding,
                         bias=False)
    delta_orthogonal_(up, generator=torch.Generator().manual_seed(6))
    assert centre_only(up)
    n = {1: 6, 2: 4, 3: 3}[dim]
    m = module_operator(up, (n,) * dim)
    assert m.shape[0] == m.shape[1]  # output size = input size
    assert_isometry(m, "both")


@pytest.mark.parametrize("in_ch, out_ch, k, stride, groups", [(4, 4, 4, 2, 1), (2, 6, 3, 2, 2),
                                                               (3, 3, 2, 3, 1)])
def test_delta_orthogonal_transposed_strided_is_an_isometry(in_ch, out_ch, k, stride, groups):
    # Every input position lands on its own output position: M^T M = I when in <= out.
    up = nn.ConvTranspose2d(in_ch, out_ch, k, stride=stride, padding=(k - 1) // 2, groups=groups,
                            output_padding=stride - 1, bias=False)
    delta_orthogonal_(up, gain=0.5, generator=torch.Generator().manual_seed(7))
    assert_isometry(module_operator(up, (3, 4)), "in", gain=0.5)


def test_delta_orthogonal_zero_padding():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    delta_orthogonal_(conv, gain=1.5)
    same = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    same.load_state_dict(conv.state_dict())
    s = torch.linalg.svdvals(module_operator(same, (5, 5)))  # odd k, 'same': the tap never pads
    assert torch.allclose(s, torch.full_like(s, 1.5), atol=1e-6)
    valid = torch.linalg.svdvals(module_operator(conv, (5, 5)))  # a crop: values are gain or 0
    assert bool(((valid - 1.5).abs() < 1e-6).logical_or(valid.abs() < 1e-6).all())
    assert bool((valid.abs() < 1e-6).any())


def test_delta_orthogonal_rejects_and_lazy():
    with pytest.raises(ValueError, match="needs an nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d"):
        delta_orthogonal_(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="lazy and not initialised"):
        delta_orthogonal_(nn.LazyConv2d(3, 3))
    lazy = nn.LazyConv3d(2, 3, padding=1)
    lazy(torch.randn(1, 2, 3, 3, 3))
    delta_orthogonal_(lazy)
    assert_isometry(module_operator(lazy, (3, 3, 3)), "both")
