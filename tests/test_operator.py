import random

import pytest
import torch
import torch.nn as nn

from convspec import conv_operator


def _random_conv(rng: random.Random):
    groups = rng.choice([1, 2])
    g, h = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    k = (rng.randint(1, 4), rng.randint(1, 4))
    stride = (rng.randint(1, 3), rng.randint(1, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    mode = rng.choice(["zeros", "circular"])
    padding = rng.choice([0, 1, (2, 1), "valid", "same"])
    if padding == "same":
        stride = (1, 1)
    return g, h, dict(kernel_size=k, stride=stride, dilation=dilation, padding=padding,
                      groups=groups, padding_mode=mode)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_operator_applies_exactly_what_nn_conv2d_applies():
    rng = random.Random(0)
    checked = 0
    while checked < 60:
        g, h, kw = _random_conv(rng)
        n = (rng.randint(3, 9), rng.randint(3, 9))
        conv = nn.Conv2d(g, h, bias=False, **kw).double()
        x = torch.randn(g, *n, dtype=torch.float64)
        try:
            y = conv(x[None])[0]
        except RuntimeError:
            continue  # geometry nn.Conv2d itself rejects
        m = conv_operator(conv.weight, n, stride=kw["stride"], padding=kw["padding"],
                          dilation=kw["dilation"], groups=kw["groups"],
                          padding_mode=kw["padding_mode"])
        assert m.shape == (y.numel(), x.numel())
        torch.testing.assert_close(m @ x.reshape(-1), y.reshape(-1), rtol=1e-12, atol=1e-12)
        checked += 1


def test_same_zero_padding_is_doubly_block_banded_toeplitz():
    # eq. (2.1): block (c, d) is an N x N block-Toeplitz grid of banded Toeplitz blocks.
    n, k = 6, 3
    w = torch.randn(2, 3, k, k, dtype=torch.float64)
    m = conv_operator(w, n, padding="same").view(2, n, n, 3, n, n)  # (c, y1, y2, d, x1, x2)
    for c in range(2):
        for d in range(3):
            for y1 in range(n):
                for x1 in range(n):
                    block = m[c, y1, :, d, x1, :]
                    t1 = x1 - y1 + k // 2
                    if not 0 <= t1 < k:
                        assert torch.count_nonzero(block) == 0
                        continue
                    for y2 in range(n):
                        for x2 in range(n):
                            t2 = x2 - y2 + k // 2
                            want = w[c, d, t1, t2] if 0 <= t2 < k else 0.0
                            assert block[y2, x2] == want


def test_operator_is_differentiable():
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: conv_operator(w, 3, padding="same"), (w,))


def test_memory_limit_refuses_before_allocating():
    w = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError, match="max_bytes"):
        conv_operator(w, 64, padding="same")  # 64*64*64^4 floats: 256 GiB
    small = conv_operator(torch.randn(1, 1, 3, 3), 4, max_bytes=1024, padding="same")
    assert small.shape == (16, 16)
    with pytest.raises(ValueError, match="max_bytes"):
        conv_operator(torch.randn(1, 1, 3, 3), 4, max_bytes=1023, padding="same")
