"""Exact spectra at scale vs the dense route: iterative (zero padding), FFT (circular), bound.

Run: ``.venv/bin/python benchmarks/spectrum.py [--out benchmarks/results] [--quick]``.
Writes ``spectrum.json`` and prints a markdown table. Every ratio compares two routes timed in
this process, float64 on the CPU, 3x3 kernels with entries N(0, 1 / (9 g)).

Target (issue 4): >= 100x faster than dense where dense is feasible, agreeing to 1e-6.

* zero padding, g = h = 16, N = 16 (n = 4096): iterative sigma_max and sigma_min vs the dense
  SVD (``svdvals`` of M, the reference).
* zero padding, g = h = 16, N = 32 (n = 16384): the same vs the dense route's cheapest exact
  form, ``eigvalsh`` of the 16384 x 16384 Gram ``M^T M`` (faster than ``svdvals``, so the
  ratio understates the gain over the SVD).
* circular, g = h = 64, N = 32 (n = 65536): FFT full spectrum. The dense operator would take
  32 GiB: dense time extrapolated as n^3 from a timed ``eigvalsh`` at g = h = 16, N = 16; the
  FFT route is checked against the dense one there, and at N = 32 against ``||M||_F^2`` (sum of
  squares) and the iterative sigma_max.
* zero padding, g = h = 256, N = 32 (n = 262144): sigma_max only. Dense is infeasible (the
  operator has 6.9e10 entries); the iterative value is compared with a run at tol = 1e-10 and
  with the certified bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import conv_operator, conv_singular_values, conv_spectral_norm_bound  # noqa: E402
from convspec._geometry import conv2d, conv_geometry  # noqa: E402
from convspec._provenance import environment  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def kernel(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, c, 3, 3, dtype=torch.float64, generator=g) / (3 * c**0.5)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def dense_operator(w, n, mode, chunk=512):
    """``M`` pushed column chunk by column chunk through ``F.conv2d``, as ``conv_operator`` does.

    ``conv_operator`` sizes its chunks to ``max_bytes`` without counting the convolution's
    workspace (about ``k^2`` times the chunk), which at n = 16384 exceeds this machine's memory.
    """
    geom = conv_geometry(w, n, padding=1, padding_mode=mode)
    cols = torch.empty(geom.n_in, geom.n_out, dtype=w.dtype)
    for start in range(0, geom.n_in, chunk):
        stop = min(geom.n_in, start + chunk)
        basis = torch.zeros(stop - start, geom.n_in, dtype=w.dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        out = conv2d(basis.view(-1, geom.in_channels, n, n), w, geom)
        cols[start:stop] = out.reshape(stop - start, -1)
    return cols.T


def dense_extremes(w, n, mode, route):
    """(sigma_max, sigma_min) of the dense operator by ``svdvals`` or ``eigvalsh`` of the Gram."""
    m = dense_operator(w, n, mode)
    if n <= 16:
        assert torch.equal(m, conv_operator(w, n, padding=1, padding_mode=mode))
    if route == "svdvals":
        s = torch.linalg.svdvals(m)
        return float(s[0]), float(s[-1]), s
    e = torch.linalg.eigvalsh(m.T @ m).clamp_min(0).sqrt()
    return float(e[-1]), float(e[0]), torch.flip(e, (0,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    q = args.quick
    rows = []

    # 1-2. Zero padding, sigma_max and sigma_min: iterative vs dense.
    for c, n, route in ((8, 8, "svdvals"), (8, 12, "eigvalsh")) if q else (
        (16, 16, "svdvals"), (16, 32, "eigvalsh")
    ):
        w = kernel(c, seed=n)
        it, t_it = timed(lambda: conv_singular_values(w, n, which="extremes", method="iterative", padding="same"))
        (dmax, dmin, _), t_dense = timed(lambda: dense_extremes(w, n, "zeros", route))
        rows.append(dict(
            case=f"zero padding, g=h={c}, N={n} (n={c * n * n}): sigma_max, sigma_min",
            route="iterative", baseline=f"dense {route}", baseline_s=t_dense, route_s=t_it,
            ratio=t_dense / t_it, sigma_max=it.sigma_max, sigma_min=it.sigma_min,
            rel_diff_sigma_max=rel(it.sigma_max, dmax), rel_diff_sigma_min=rel(it.sigma_min, dmin),
            n_products=it.n_products, n_solves=it.n_solves,
            n_factorizations=it.n_factorizations, converged=it.converged,
            sigma_max_error=it.sigma_max_error, sigma_min_error=it.sigma_min_error,
            target=">= 100x, agree to 1e-6",
            met=t_dense / t_it >= 100 and max(rel(it.sigma_max, dmax), rel(it.sigma_min, dmin)) <= 1e-6,
        ))
        print(rows[-1], flush=True)

    # 3. Circular, full spectrum by FFT; dense timed at a feasible size and extrapolated.
    c0, n0 = (8, 8) if q else (16, 16)
    w0 = kernel(c0, seed=1)
    (_, _, dense_vals), t_dense0 = timed(lambda: dense_extremes(w0, n0, "circular", "eigvalsh"))
    fft0, t_fft0 = timed(lambda: conv_singular_values(w0, n0, padding_mode="circular", method="fft", padding="same"))
    agree0 = float((fft0.values - dense_vals).abs().max() / dense_vals[0])
    rows.append(dict(
        case=f"circular, g=h={c0}, N={n0} (n={c0 * n0 * n0}): all singular values",
        route="fft", baseline="dense eigvalsh", baseline_s=t_dense0, route_s=t_fft0,
        ratio=t_dense0 / t_fft0, max_abs_diff_over_sigma_max=agree0, target=">= 100x, agree to 1e-6",
        met=t_dense0 / t_fft0 >= 100 and agree0 <= 1e-6, n_products=0,
    ))
    print(rows[-1], flush=True)
    c, n = (16, 16) if q else (64, 32)
    w = kernel(c, seed=2)
    fft, t_fft = timed(lambda: conv_singular_values(w, n, padding_mode="circular", method="fft", padding="same"))
    t_dense_extrap = t_dense0 * (c * n * n / (c0 * n0 * n0)) ** 3
    frob = float((w**2).sum()) * n * n  # ||M||_F^2 of a circular convolution with P = N
    top = conv_singular_values(w, n, padding=1, padding_mode="circular", which="max",
                               method="iterative")
    rows.append(dict(
        case=f"circular, g=h={c}, N={n} (n={c * n * n}): all singular values",
        route="fft", baseline="dense eigvalsh, extrapolated n^3 (infeasible: "
        f"{(c * n * n) ** 2 * 8 / 2**30:.0f} GiB)",
        baseline_s=t_dense_extrap, route_s=t_fft, ratio=t_dense_extrap / t_fft,
        n_values=int(fft.values.numel()),
        rel_diff_sum_of_squares=rel(float((fft.values**2).sum()), frob),
        rel_diff_sigma_max_vs_iterative=rel(fft.sigma_max, top.sigma_max),
        target=">= 100x, agree to 1e-6", n_products=0,
        met=t_dense_extrap / t_fft >= 100 and rel(fft.sigma_max, top.sigma_max) <= 1e-6,
    ))
    print(rows[-1], flush=True)

    # 4. Zero padding, sigma_max of a wide layer: iterative vs bound and a tight iterative run.
    c, n = (32, 16) if q else (256, 32)
    w = kernel(c, seed=3)
    it, t_it = timed(lambda: conv_singular_values(w, n, which="max", method="iterative", padding="same"))
    bound, t_bound = timed(lambda: conv_spectral_norm_bound(w, n, padding="same"))
    ref, t_ref = timed(lambda: conv_singular_values(w, n, which="max", method="iterative",
                                                    tol=1e-10, max_products=4000, padding="same"))
    rows.append(dict(
        case=f"zero padding, g=h={c}, N={n} (n={c * n * n}): sigma_max",
        route="iterative", baseline="dense infeasible "
        f"({(c * n * n) ** 2 * 8 / 2**30:.0f} GiB); bound and tol=1e-10 run timed",
        baseline_s=None, route_s=t_it, ratio=None, sigma_max=it.sigma_max,
        n_products=it.n_products, converged=it.converged, sigma_max_error=it.sigma_max_error,
        bound=bound, bound_s=t_bound, bound_over_sigma_max=bound / it.sigma_max,
        reference_tol_1e10=ref.sigma_max, reference_s=t_ref, reference_products=ref.n_products,
        rel_diff_vs_reference=rel(it.sigma_max, ref.sigma_max),
        target="agree to 1e-6", met=rel(it.sigma_max, ref.sigma_max) <= 1e-6 and bound >= ref.sigma_max,
    ))
    print(rows[-1], flush=True)

    record = {"benchmark": "spectrum", "dtype": "float64", "rows": rows, "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spectrum.json").write_text(json.dumps(record, indent=1))
    print("| case | baseline (s) | convspec (s) | ratio | products | agreement | met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = "n/a" if r["baseline_s"] is None else f"{r['baseline_s']:.4g}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3g}"
        agree = max(v for k, v in r.items() if k.startswith(("rel_diff", "max_abs_diff")))
        products = r.get("n_products", 0)
        if r.get("n_solves"):
            products = (f"{products} + {r['n_solves']} solves + "
                        f"{r['n_factorizations']} factorizations")
        print(f"| {r['case']} | {base} ({r['baseline']}) | {r['route_s']:.4g} ({r['route']}) | "
              f"{ratio} | {products} | {agree:.1e} | {'yes' if r['met'] else 'no'} |")
    print(f"wrote {args.out / 'spectrum.json'}")


if __name__ == "__main__":
    main()
