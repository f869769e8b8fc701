"""Exact extremes at model scale: nested dissection vs the block band, and WRN-28-10's distance.

Run: ``.venv/bin/python benchmarks/model_scale.py [--out benchmarks/results] [--quick]``.
Writes ``model_scale.json``. Float64, 3x3 kernels with entries N(0, 1 / (9 g)), zero padding 1.

Target (issue 12, item 1): sigma_max and sigma_min of every conv of WRN-28-10 at 32 x 32 in
<= 10 minutes on 2 cores and <= 6 GB, each checked against dense where dense is feasible.

* ``factorisations``: one Cholesky of the shifted Gram (factor kept, as shift-and-invert
  needs), nested dissection (``convspec._nested``) against the block band (Note [banded Gram]),
  interleaved in this process, median of ``--repeats``; flops from the cost models, and the
  achieved rate.
* ``extremes``: ``conv_singular_values(which='extremes')`` through each factorisation, the
  two results compared with each other and, at the small size, with the dense SVD.
* ``wrn``: every conv of WRN-28-10 at the size it sees on 32 x 32 inputs, with the plan the
  library picks, its flops (three factorisations per layer: shift-and-invert, and the
  certificates of sigma_min and sigma_max) and memory, and the time that takes at the rate
  measured above: the distance to the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import conv_operator, conv_singular_values  # noqa: E402
from convspec import spectrum as sp  # noqa: E402
from convspec._geometry import conv_geometry, geometry_of, is_conv  # noqa: E402
from convspec._nested import nested_cost  # noqa: E402
from convspec._provenance import environment  # noqa: E402
from convspec.train.models import build_model  # noqa: E402


def kernel(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, c, 3, 3, dtype=torch.float64, generator=g) / (3 * c**0.5)


def banded_plan(w, geom1) -> "sp._Plan":
    flops, swap, rows, need = sp._banded_best(w, geom1)
    return sp._Plan(False, swap, rows, need, need, flops)


def plans(w, n):
    geom = conv_geometry(w, n, padding=1)
    wgs, geom1 = sp._group_weights(w, geom)
    return wgs[0], geom1, sp._plan_factor(wgs[0], geom1), banded_plan(wgs[0], geom1)


def factorisation_row(c: int, n: int, repeats: int) -> dict:
    w = kernel(c, seed=c + n)
    wg, geom1, nested, banded = plans(w, n)
    assert nested.nested, "the library should pick nested dissection here"
    tall = sp._tall(geom1)
    times = {"nested": [], "banded": []}
    for _ in range(repeats):
        for name, plan in (("nested", nested), ("banded", banded)):
            axes = geom1.axes[::-1] if plan.swap else geom1.axes
            wt = wg.transpose(-1, -2) if plan.swap else wg
            t0 = time.perf_counter()
            f = sp._factor(wt, axes, tall, plan, 1e-8)
            times[name].append(time.perf_counter() - t0)
            assert f.ok
            del f
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(case=f"g=h={c}, N={n}", channels=c, size=n, repeats=repeats,
                nested_s=med["nested"], banded_s=med["banded"], speedup=med["banded"] / med["nested"],
                nested_flops=nested.flops, banded_flops=banded.flops,
                nested_bytes=nested.need, banded_bytes=banded.need,
                nested_gflops_per_s=nested.flops / med["nested"] / 1e9,
                banded_gflops_per_s=banded.flops / med["banded"] / 1e9)


def extremes_row(c: int, n: int, dense: bool) -> dict:
    w = kernel(c, seed=7 * c + n)
    original = sp._plan_factor

    def nested_plan(w, geom1):
        tall = sp._tall(geom1)
        sizes = [ax.size if tall else ax.out_size for ax in geom1.axes]
        reach = [sp._row_reach(ax, tall) for ax in geom1.axes]
        flops, keep, once = nested_cost(*sizes, *reach, geom1.in_channels)
        return sp._Plan(True, False, 0, keep, once, flops)

    out = {}
    for name in ("nested", "banded"):
        sp._plan_factor = nested_plan if name == "nested" else banded_plan
        try:
            t0 = time.perf_counter()
            res = conv_singular_values(w, n, padding=1, which="extremes", method="iterative",
                                       max_bytes=8 * 2**30)
            out[name] = (res, time.perf_counter() - t0)
        finally:
            sp._plan_factor = original
    (a, ta), (b, tb) = out["nested"], out["banded"]
    row = dict(case=f"g=h={c}, N={n}", channels=c, size=n, nested_s=ta, banded_s=tb,
               speedup=tb / ta, sigma_max=a.sigma_max, sigma_min=a.sigma_min,
               converged=a.converged and b.converged, n_factorizations=a.n_factorizations,
               rel_diff_nested_banded=max(abs(a.sigma_max / b.sigma_max - 1),
                                          abs(a.sigma_min / b.sigma_min - 1)))
    if dense:
        s = torch.linalg.svdvals(conv_operator(w, n, padding=1))
        row["rel_diff_dense"] = max(abs(a.sigma_max / float(s[0]) - 1),
                                    abs(a.sigma_min / float(s[-1]) - 1))
    return row


def wrn_rows(rate: float) -> list:
    model = build_model("wrn-28-10", num_classes=10, in_channels=3)
    sizes = {}

    def record(name):
        def hook(module, inputs):
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))  # returns None: inputs kept
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if is_conv(m)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    groups = {}
    for name, m in model.named_modules():
        if not is_conv(m):
            continue
        geom = geometry_of(m, sizes[name])
        w = m.weight.detach().to(torch.float64)
        wgs, geom1 = sp._group_weights(*sp._canonical(w, geom))
        plan = sp._plan_factor(wgs[0], geom1)
        banded = banded_plan(wgs[0], geom1)
        key = (tuple(w.shape), sizes[name], tuple(m.stride))
        g = groups.setdefault(key, dict(
            layer=f"{w.shape[0]}x{w.shape[1]}x{w.shape[2]}x{w.shape[3]}, stride "
                  f"{m.stride[0]}, {sizes[name][0]}x{sizes[name][1]}",
            count=0, plan="nested" if plan.nested else "banded",
            flops=3 * plan.flops, bytes=plan.need, banded_flops=3 * banded.flops,
            banded_bytes=banded.need))
        g["count"] += 1
    rows = list(groups.values())
    for r in rows:
        r["projected_s"] = r["count"] * r["flops"] / (rate * 1e9)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a shared machine stalls two threads on small ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    fact = [factorisation_row(c, n, args.repeats)
            for c, n in (((8, 48),) if q else ((16, 32), (32, 32), (16, 48)))]
    for r in fact:
        print(r, flush=True)
    ext = [extremes_row(c, n, dense) for c, n, dense in
           (((16, 32, False),) if q else ((16, 16, True), (32, 32, False)))]
    for r in ext:
        print(r, flush=True)
    rate = max(r["nested_gflops_per_s"] for r in fact)
    wrn = wrn_rows(rate)
    total_s = sum(r["projected_s"] for r in wrn)
    peak = max(r["bytes"] for r in wrn)
    for r in wrn:
        print(r, flush=True)
    record = {
        "benchmark": "model_scale", "dtype": "float64", "factorisations": fact, "extremes": ext,
        "wrn": wrn, "rate_gflops_per_s": rate, "wrn_projected_s": total_s,
        "wrn_peak_bytes": peak,
        "target": "WRN-28-10, every conv at 32 x 32: sigma_max and sigma_min in <= 10 min on "
                  "2 cores, <= 6 GB",
        "met": total_s <= 600 and peak <= 6e9,
        "environment": environment(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_scale.json").write_text(json.dumps(record, indent=1))
    print(f"WRN-28-10 projected {total_s / 60:.0f} min at {rate:.0f} Gflop/s, peak "
          f"{peak / 1e9:.1f} GB; wrote {args.out / 'model_scale.json'}")


if __name__ == "__main__":
    main()
