"""Nested-dissection factorisation of the Gram operator (``convspec._nested``), checked against
the dense Gram in float64, and the iterative spectra when that factorisation is the one used."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from convspec import conv_operator, conv_singular_values, spectrum_report
from convspec import spectrum as sp
from convspec._geometry import conv_geometry
from convspec._nested import NestedCholesky, dissection_tree, nested_cost

CASES = [  # (h, g, k, n, kw)
    (3, 3, 3, (7, 7), {}),
    (2, 4, 3, (6, 9), {}),  # wide: the Gram on the output side
    (4, 2, 3, (8, 8), dict(stride=2)),
    (3, 3, 3, (9, 9), dict(dilation=2)),
    (5, 3, (3, 2), (10, 5), dict(stride=(2, 1))),
    (3, 2, (2, 3), (8, 11), dict(padding=(0, 2))),
    (2, 3, 3, (7, 8), dict(padding_mode="reflect")),
    (3, 2, 1, (6, 7), dict(padding=0)),  # 1 x 1: reach 0, empty separators
    (4, 3, 1, (8, 6), dict(padding=0, stride=2)),
    (3, 3, (1, 3), (6, 9), dict(padding=(0, 1))),  # reach 0 on one axis only
]


def _parts(w, n, kw):
    kw = dict(kw)
    kw.setdefault("padding", 1)
    geom = conv_geometry(w, n, **kw)
    wgs, geom1 = sp._group_weights(w, geom)
    tall = sp._tall(geom1)
    (z1, z2), c = sp._gram_parts(wgs[0], geom1.axes, tall)
    r1, r2 = (sp._row_reach(ax, tall) for ax in geom1.axes)
    m = conv_operator(w, n, **kw).to(torch.float64)
    gram = m.T @ m if tall else m @ m.T
    cc, rr1, rr2 = c.shape[2], z1.shape[-1], z2.shape[-1]
    # (a, i, j) of conv_operator -> (i, j, a) of Note [banded Gram]
    perm = torch.arange(cc * rr1 * rr2).reshape(cc, rr1, rr2).permute(1, 2, 0).reshape(-1)
    return (z1, z2, c, r1, r2), gram[perm][:, perm]


@pytest.mark.parametrize("h,g,k,n,kw", CASES)
def test_solve_inertia_and_certificates_match_the_dense_gram(h, g, k, n, kw):
    k = k if isinstance(k, tuple) else (k, k)
    w = torch.randn(h, g, *k, dtype=torch.float64, generator=torch.Generator().manual_seed(h * g))
    args, gram = _parts(w, n, kw)
    eye = torch.eye(len(gram), dtype=torch.float64)
    ev = torch.linalg.eigvalsh(gram)
    b = torch.randn(len(gram), dtype=torch.float64)
    for shift in (0.3, 1e-3 * float(ev[-1])):
        x = NestedCholesky(*args, shift).solve(b)
        ref = torch.linalg.solve(gram + shift * eye, b)
        assert float((x - ref).norm() / ref.norm()) < 1e-10
    # Sylvester: the number of negative pivots is the number of eigenvalues below beta.
    for i in (0, 2, len(ev) // 2):
        beta = float(ev[i] + ev[i + 1]) / 2
        if float(ev[i + 1] - ev[i]) < 1e-8 * float(ev[-1]):
            continue
        ldl = NestedCholesky(*args, -beta, inertia=True, keep=False)
        assert ldl.ok and ldl.negatives == i + 1
        assert not NestedCholesky(*args, -beta).ok  # indefinite: Cholesky fails
    # tau I - Gram is positive definite exactly when tau > lambda_max.
    top = float(ev[-1])
    assert NestedCholesky(*args, top * (1 + 1e-6), negate=True, keep=False).ok
    assert not NestedCholesky(*args, top * (1 - 1e-6), negate=True, keep=False).ok


@pytest.mark.parametrize("shape,r", [((9, 9), (2, 2)), ((16, 5), (2, 1)), ((4, 13), (1, 3)),
                                     ((6, 6), (0, 2)), ((7, 5), (0, 0)), ((1, 1), (2, 2))])
def test_dissection_tree_partitions_the_grid(shape, r):
    nodes = dissection_tree(*shape, *r)
    seps = np.concatenate([n.sep for n in nodes])
    assert sorted(seps.tolist()) == list(range(shape[0] * shape[1]))  # each pixel once
    rank = np.empty(len(seps), dtype=np.int64)
    rank[seps] = np.arange(len(seps))
    parent = {c: i for i, n in enumerate(nodes) for c in n.children}
    for i, node in enumerate(nodes):
        # U: later pixels, in elimination order, all on separators of ancestors
        assert (np.diff(rank[node.upd]) > 0).all()
        ancestors, j = set(), i
        while j in parent:
            j = parent[j]
            ancestors.update(nodes[j].sep.tolist())
        assert set(node.upd.tolist()) <= ancestors
        # every pixel within reach of the subtree but outside it is in U
        sub, stack = set(), [i]
        while stack:
            t = stack.pop()
            sub.update(nodes[t].sep.tolist())
            stack.extend(nodes[t].children)
        near = set()
        for p in sub:
            pi, pj = divmod(p, shape[1])
            for di in range(-r[0], r[0] + 1):
                for dj in range(-r[1], r[1] + 1):
                    qi, qj = pi + di, pj + dj
                    if 0 <= qi < shape[0] and 0 <= qj < shape[1]:
                        near.add(qi * shape[1] + qj)
        assert near - sub <= set(node.upd.tolist())


def test_nested_is_cheaper_than_banded_at_scale_and_is_picked():
    for c, n in ((16, 32), (64, 32), (160, 32)):
        flops, keep, once = nested_cost(n, n, 2, 2, c)
        banded = sp._banded_cost(n, n * c, 2, 1, 3)
        assert flops < banded[0] / 1.5 and keep < banded[1] and once < keep
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    geom = conv_geometry(w, 32, padding=1)
    plan = sp._plan_factor(*sp._group_weights(w, geom))
    assert plan.nested
    small = sp._plan_factor(*sp._group_weights(w[:2, :2], conv_geometry(w[:2, :2], 6, padding=1)))
    assert not small.nested  # a small grid: the band is cheaper
    # A 1 x 1 stride-2 shortcut (WRN): pixels do not couple, and the empty separators of
    # nested dissection leave c x c fronts, where the band factorises whole image rows.
    w = torch.randn(64, 32, 1, 1, dtype=torch.float64)
    plan = sp._plan_factor(*sp._group_weights(w, conv_geometry(w, 32, stride=2)))
    assert plan.nested and plan.flops < 0.3 * sp._banded_cost(16, 16 * 64, 0, 1, 1)[0]


@pytest.fixture
def nested_everywhere(monkeypatch):
    """Route every two-axis factorisation through nested dissection, and count them."""
    seen = {"factor": 0, "inertia": 0}
    original = sp._plan_factor

    def plan(w, geom1):
        p = original(w, geom1)
        if geom1.ndim != 2:
            return p
        tall = sp._tall(geom1)
        sizes = [ax.size if tall else ax.out_size for ax in geom1.axes]
        reach = [sp._row_reach(ax, tall) for ax in geom1.axes]
        c = geom1.in_channels if tall else geom1.out_channels
        flops, keep, once = nested_cost(*sizes, *reach, c)
        return sp._Plan(True, False, 0, keep, once, flops)

    class Counting(NestedCholesky):
        def __init__(self, *a, **kw):
            seen["inertia" if kw.get("inertia") else "factor"] += 1
            super().__init__(*a, **kw)

    monkeypatch.setattr(sp, "_plan_factor", plan)
    monkeypatch.setattr(sp, "NestedCholesky", Counting)
    return seen


@pytest.mark.parametrize("h,g,k,n,kw", CASES + [
    (4, 4, 3, (10, 10), dict(groups=2)),
    (3, 3, 3, (8, 8), dict(padding=1, padding_mode="circular", stride=2)),  # not FFT: wraps
])
def test_iterative_extremes_through_nested_dissection_match_dense(nested_everywhere, h, g, k, n,
                                                                  kw):
    k = k if isinstance(k, tuple) else (k, k)
    groups = kw.get("groups", 1)
    w = torch.randn(h, g // groups, *k, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7 * h + g))
    kw = dict(kw)
    kw.setdefault("padding", 1)
    ref = torch.linalg.svdvals(conv_operator(w, n, **kw).to(torch.float64))
    got = conv_singular_values(w, n, which="extremes", method="iterative", **kw)
    assert got.converged
    assert got.sigma_max == pytest.approx(float(ref[0]), rel=1e-6)
    assert got.sigma_min == pytest.approx(float(ref[-1]), rel=1e-6)
    assert nested_everywhere["factor"] >= 2  # shift-and-invert, and a certificate


def test_temple_certificate_by_inertia(nested_everywhere):
    """A sigma_min far below sqrt(eps) sigma_max: the residual alone (Weyl) cannot certify it
    to 1e-6, Temple's bound can, with lambda_2 proven by an LDL^T inertia count."""
    g = torch.Generator().manual_seed(3)
    w = 1e-8 * torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    w[0, 0, 1, 1] += 1
    w[1, 1] += 1e-5 * 0.3 * torch.randn(3, 3, dtype=torch.float64, generator=g)
    w[1, 1, 1, 1] += 1e-5  # channel 1: singular values spread over about 1e-6 .. 3e-6
    ref = torch.linalg.svdvals(conv_operator(w, 8, padding=1))
    assert float(ref[-1]) < 1e-5 * float(ref[0]) and float(ref[-2]) > 1.2 * float(ref[-1])
    got = conv_singular_values(w, 8, padding=1, which="extremes", method="iterative")
    assert got.converged
    assert got.sigma_min == pytest.approx(float(ref[-1]), rel=1e-6)
    assert nested_everywhere["inertia"] >= 1


def test_estimated_flops_orders_layers_and_report_shows_per_layer_progress(capsys):
    small = sp.estimated_flops(nn.Conv2d(4, 4, 3, padding=1), (8, 8))
    big = sp.estimated_flops(nn.Conv2d(16, 16, 3, padding=1), (40, 40))
    circ = sp.estimated_flops(nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), (40, 40))
    assert 0 < small < big and 0 < circ < big
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))
    rows = spectrum_report(net, torch.randn(1, 2, 6, 6), progress=True)
    assert len(rows) == 2
    err = capsys.readouterr().err
    assert "layer 2/2: 1 (3, 3, 3, 3) at (6, 6)" in err and "Gflop" in err


def test_spectrum_report_names_the_layer_in_every_warning(monkeypatch):
    import convspec.report as report

    real = report.conv_singular_values

    def warns(conv, *a, **k):
        if conv.out_channels == 4:
            warnings.warn("the iterative spectrum did not reach tol", UserWarning)
        return real(conv, *a, **k)

    monkeypatch.setattr(report, "conv_singular_values", warns)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    with pytest.warns(UserWarning) as rec:
        rows = spectrum_report(net, torch.randn(1, 2, 6, 6))
    assert len(rows) == 2
    msgs = [str(w.message) for w in rec if "did not reach" in str(w.message)]
    assert msgs == ["layer '2': the iterative spectrum did not reach tol"]
