"""The FFT route factorises one transfer matrix per conjugate pair of frequencies (Note
[conjugate pairs] in spectrum.py): the pairs are enumerated right in every geometry, their
values count twice, and the spectra equal the dense operator's in float64."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from convspec import conv_operator, conv_singular_values
from convspec._geometry import AxisGeometry
from convspec.spectrum import _axis_blocks, _n_chunks, _transfer_chunks, _transfer_svdvals


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def dense_values(conv, n, **kw):
    """The reference: every singular value of the dense float64 operator, descending."""
    with torch.no_grad():
        return torch.linalg.svdvals(conv_operator(conv, n, **kw).double())


def assert_spectrum(got, ref):
    """Complete, sorted, and equal to the dense SVD to 1e-12 of sigma_max."""
    assert got.values.shape == ref.shape
    assert bool((got.values[:-1] >= got.values[1:]).all())
    torch.testing.assert_close(got.values, ref, rtol=0, atol=1e-12 * float(ref[0]))


# ---------------------------------------------------------------- the enumeration of the pairs


def _frequency_probe(ns):
    """A kernel whose transfer matrix spells its frequency: output channel j has one tap, at
    offset 1 of axis j, so ``T(w)[j, 0] = exp(-2 pi i w_j / n_j)``."""
    d = len(ns)
    weight = torch.zeros((1, d, 1) + (2,) * d, dtype=torch.float64)
    for j in range(d):
        weight[(0, j, 0) + tuple(int(i == j) for i in range(d))] = 1
    axes = tuple(AxisGeometry(n, 2, 1, 1, 0, 1, "circular") for n in ns)
    return weight, axes


@pytest.mark.parametrize("ns", [
    (1,), (2,), (5,), (8,), (1, 1), (1, 6), (6, 1), (4, 6), (5, 7), (2, 3), (3, 4, 5), (2, 2, 2),
    (4, 1, 3), (1, 1, 7),
])
@pytest.mark.parametrize("chunk_bytes", [1, 2**12, 2**27])
def test_pairs_cover_every_frequency_once(ns, chunk_bytes):
    weight, axes = _frequency_probe(ns)
    cover = np.zeros(ns, dtype=int)
    chunks = 0
    for t, mult in _transfer_chunks(weight, axes, True, chunk_bytes):
        chunks += 1
        angles = torch.angle(t[0, :, :, 0]).numpy()  # (c, d)
        for row in angles:
            w = tuple(int(round(-a * n / (2 * np.pi))) % n for a, n in zip(row, ns))
            minus = tuple(-x % n for x, n in zip(w, ns))
            if mult == 1:
                assert w == minus, (w, "counted once but not self-conjugate")
                cover[w] += 1
            else:
                assert mult == 2 and w != minus
                cover[w] += 1
                cover[minus] += 1
    assert (cover == 1).all(), cover
    assert chunks == _n_chunks(weight, axes, True, chunk_bytes)
    # Without pairs: every frequency once, multiplicity 1.
    assert sum(t.shape[1] for t, m in _transfer_chunks(weight, axes, False, chunk_bytes)
               if m == 1) == int(np.prod(ns))


def test_pairs_take_about_half_the_frequencies():
    weight, axes = _frequency_probe((32, 32))
    taken = sum(t.shape[1] for t, _ in _transfer_chunks(weight, axes, True))
    assert taken == (32 * 32 + 4) // 2 == 514  # 4 self-conjugate frequencies
    weight, axes = _frequency_probe((7, 9))
    assert sum(t.shape[1] for t, _ in _transfer_chunks(weight, axes, True)) == (63 + 1) // 2


def test_axis_blocks():
    assert _axis_blocks(6, 10, False) == [(0, 6, False)]
    assert _axis_blocks(6, 10, True) == [(0, 1, True), (1, 3, False), (3, 4, True)]
    assert _axis_blocks(7, 2, True) == [(0, 1, True), (1, 3, False), (3, 4, False)]
    assert _axis_blocks(2, 10, True) == [(0, 1, True), (1, 2, True)]


def test_paired_values_equal_every_frequency_svd():
    # One SVD serves T(w) and T(-w) = conj(T(w)): the same values as factorising both.
    weight = rand((2, 3, 4, 3, 3), seed=1)  # 2 groups
    axes = (AxisGeometry(8, 3, 2, 1, 1, 1, "circular"), AxisGeometry(7, 3, 1, 2, 2, 2, "circular"))
    paired = np.concatenate([np.tile(_transfer_svdvals(t).reshape(-1), m)
                             for t, m in _transfer_chunks(weight, axes, True)])
    every = np.concatenate([torch.linalg.svdvals(t).reshape(-1).numpy()
                            for t, _ in _transfer_chunks(weight, axes, False)])
    assert paired.shape == every.shape
    np.testing.assert_allclose(np.sort(paired), np.sort(every), rtol=0,
                               atol=1e-13 * every.max())


# ------------------------------------------------------------------- against the dense operator


CASES_2D = [
    # (h, g, k, N, stride, dilation, groups, padding)
    (3, 2, 3, 7, 1, 1, 1, 1),            # odd N
    (3, 2, 3, 8, 1, 1, 1, 1),            # even N: self-conjugate rows and columns
    (2, 3, 3, (6, 9), 1, 1, 1, 1),       # non-square, one axis odd
    (2, 2, 3, (5, 8), 1, 1, 1, 1),
    (4, 2, 3, 8, 2, 1, 1, 1),            # stride 2, N' = 4 even
    (3, 3, 3, 6, 2, 1, 1, 1),            # stride 2, N' = 3 odd
    (2, 4, 3, (8, 6), (2, 1), 1, 1, 1),  # stride on one axis only
    (3, 2, 3, 9, 1, 2, 1, 2),            # dilation 2, odd N
    (3, 2, 3, 10, 1, 3, 1, 3),           # dilation 3, even N
    (4, 6, 3, 8, 1, 1, 2, 1),            # groups 2
    (6, 6, 3, 6, 2, 1, 3, 1),            # groups 3 with stride
    (2, 2, 2, 8, 2, 1, 1, 0),            # even kernel, k = s
    (3, 3, 5, 4, 1, 1, 1, 2),            # kernel wider than half the input
    (3, 2, 3, (1, 6), 1, 1, 1, (0, 1)),  # a 1 x 6 input: one axis has a single frequency
]


@pytest.mark.parametrize("h,g,k,n,s,d,groups,pad", CASES_2D)
def test_conv2d_fft_equals_dense(h, g, k, n, s, d, groups, pad):
    kh = 1 if n == (1, 6) else k
    w = rand((h, g // groups, kh, k), seed=h * 100 + g * 10 + k)
    kw = dict(stride=s, dilation=d, groups=groups, padding=pad, padding_mode="circular")
    assert_spectrum(conv_singular_values(w, n, method="fft", **kw), dense_values(w, n, **kw))


@pytest.mark.parametrize("n,s,d", [(9, 1, 1), (12, 1, 1), (12, 2, 1), (10, 2, 1), (12, 3, 2)])
def test_conv1d_fft_equals_dense(n, s, d):
    conv = nn.Conv1d(4, 6, 3, stride=s, dilation=d, padding=d, padding_mode="circular",
                     bias=False).double()
    assert_spectrum(conv_singular_values(conv, n, method="fft"), dense_values(conv, n))


@pytest.mark.parametrize("n,s,groups", [((4, 3, 5), 1, 1), ((4, 4, 4), 2, 1), ((3, 4, 2), 1, 2)])
def test_conv3d_fft_equals_dense(n, s, groups):
    conv = nn.Conv3d(2 * groups, 2 * groups, 3, stride=s, padding=1, groups=groups,
                     padding_mode="circular", bias=False).double()
    assert_spectrum(conv_singular_values(conv, n, method="fft"), dense_values(conv, n))


def test_conjugate_pairs_appear_twice_and_self_conjugate_frequencies_once():
    # N' = 4 x 4: frequencies (0|2, 0|2) are self-conjugate (real T, values once), the other 12
    # form 6 pairs whose values appear exactly twice. A random kernel's values are otherwise
    # distinct, so the run lengths of equal values count the multiplicities.
    w = rand((3, 3, 3, 3), seed=7)
    got = conv_singular_values(w, 4, padding=1, padding_mode="circular", method="fft").values
    ref = dense_values(w, 4, padding=1, padding_mode="circular")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 * float(ref[0]))
    runs = [len(list(grp)) for _, grp in itertools.groupby(
        got.tolist(), key=lambda v, top=float(got[0]): round(v / top, 9))]
    assert sorted(runs) == [1] * (4 * 3) + [2] * (6 * 3)
    # The paired values are bit-for-bit duplicates (one SVD serves both).
    for i in range(len(got) - 1):
        if abs(got[i] - got[i + 1]) < 1e-9 * got[0]:
            assert got[i] == got[i + 1]


@pytest.mark.parametrize("n", [8, 7, (6, 5)])
def test_single_channel_circular_is_sorted_abs_fft(n):
    # Closed form: a 1-in 1-out circular convolution has singular values |DFT of the kernel|.
    size = (n, n) if isinstance(n, int) else n
    w = rand((1, 1, 3, 3), seed=3)
    kernel = torch.zeros(size, dtype=torch.float64)
    kernel[:3, :3] = w[0, 0]
    expected = torch.sort(torch.fft.fft2(kernel).abs().reshape(-1), descending=True).values
    got = conv_singular_values(w, n, padding_mode="circular", padding=1, method="fft")
    torch.testing.assert_close(got.values, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv,n", [
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False), 10),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular", groups=2, bias=False), 12),
    (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular", bias=False), 33),
    (nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular", bias=False), (4, 5, 6)),
])
def test_small_chunks_give_the_same_spectrum(conv, n):
    conv = conv.double()
    free = conv_singular_values(conv, n, method="fft")
    tight = conv_singular_values(conv, n, method="fft", max_bytes=2**17)  # one-matrix chunks
    torch.testing.assert_close(tight.values, free.values, rtol=0, atol=1e-14 * free.sigma_max)
    ext = conv_singular_values(conv, n, which="extremes", method="fft", max_bytes=2**17)
    assert ext.sigma_max == pytest.approx(free.sigma_max, rel=1e-13)
    assert ext.sigma_min == pytest.approx(free.sigma_min, rel=1e-10, abs=1e-14 * free.sigma_max)
