"""orthogonal_ (reshaped kernel) and delta_orthogonal_ (operator), checked with the dense M."""

import pytest
import torch
from torch import nn

from convspec import conv_operator, delta_orthogonal_, orthogonal_


def gram_is_identity(mats, atol=1e-6):
    """Rows orthonormal if wide, columns if tall, for a stack (g, m, n)."""
    m, n = mats.shape[-2:]
    g = mats @ mats.mT if m <= n else mats.mT @ mats
    eye = torch.eye(min(m, n), dtype=mats.dtype).expand_as(g)
    return torch.allclose(g, eye, atol=atol)


@pytest.mark.parametrize(
    "in_ch, out_ch, k, groups", [(3, 16, 3, 1), (64, 8, 3, 1), (8, 8, 1, 1), (12, 6, 3, 3), (4, 8, (3, 5), 4)]
)
def test_orthogonal_conv_reshaped(in_ch, out_ch, k, groups):
    conv = nn.Conv2d(in_ch, out_ch, k, groups=groups)
    bias = conv.bias.detach().clone()
    assert orthogonal_(conv, generator=torch.Generator().manual_seed(0)) is conv
    w = conv.weight.detach().double()
    assert gram_is_identity(w.reshape(groups, out_ch // groups, -1))
    assert torch.equal(conv.bias, bias)


def test_orthogonal_model_gain_and_layers():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv1d(2, 2, 3), nn.Linear(7, 4))
    conv1d_before = model[2].weight.detach().clone()
    orthogonal_(model, gain=2.0)
    s = torch.linalg.svdvals(model[3].weight.double())
    assert torch.allclose(s, torch.full_like(s, 2.0))
    assert gram_is_identity(model[0].weight.double().reshape(1, 6, -1) / 2)
    assert torch.equal(model[2].weight, conv1d_before)  # not in the default layers
    orthogonal_(model[2])  # a single layer is always accepted
    assert gram_is_identity(model[2].weight.double().reshape(1, 2, -1))


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


def operator_svals(conv, n, **kw):
    m = conv_operator(conv.weight.detach().double(), n, groups=conv.groups, **kw)
    return torch.linalg.svdvals(m)


@pytest.mark.parametrize(
    "in_ch, out_ch, k, groups, dilation",
    [(4, 4, 3, 1, 1), (2, 6, 3, 1, 1), (6, 2, 3, 1, 1), (4, 4, 5, 2, 1), (3, 3, 3, 1, 2),
     (4, 4, 2, 1, 1), (4, 8, (3, 1), 2, 1)],
)
def test_delta_orthogonal_operator_circular(in_ch, out_ch, k, groups, dilation):
    conv = nn.Conv2d(in_ch, out_ch, k, groups=groups, dilation=dilation, bias=False)
    delta_orthogonal_(conv, generator=torch.Generator().manual_seed(3))
    s = operator_svals(conv, 6, padding="same", dilation=dilation, padding_mode="circular")
    # One side is an isometry: min(in, out) * N^2 singular values, all exactly 1.
    assert s.numel() == min(in_ch, out_ch) * 36
    assert torch.allclose(s, torch.ones_like(s), atol=1e-6)
    kk = conv.kernel_size
    w = conv.weight.detach()
    centre = w[:, :, kk[0] // 2, kk[1] // 2]
    assert torch.count_nonzero(w) == torch.count_nonzero(centre) > 0


def test_delta_orthogonal_zero_padding():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    delta_orthogonal_(conv, gain=1.5)
    same = operator_svals(conv, 5, padding=1)  # odd k, 'same': the centre tap never pads
    assert torch.allclose(same, torch.full_like(same, 1.5), atol=1e-6)
    valid = operator_svals(conv, 5, padding="valid")  # a crop: values are gain or 0
    assert bool(((valid - 1.5).abs() < 1e-6).logical_or(valid.abs() < 1e-6).all())
    assert bool((valid.abs() < 1e-6).any())


def test_delta_orthogonal_rejects():
    with pytest.raises(ValueError, match="needs an nn.Conv1d/2d/3d"):
        delta_orthogonal_(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="needs an nn.Conv1d/2d/3d"):
        delta_orthogonal_(nn.ConvTranspose2d(3, 3, 3))
