"""One SVB pass over a whole network: ``convspec.svb_`` vs the naive per-layer SVD loop.

Run: ``.venv/bin/python benchmarks/svb.py [--out benchmarks/results] [--quick] [--repeats R]
[--threads T] [--note TEXT]``. Writes ``svb.json`` and prints a markdown table.

Models: ConvNet-20, pre-activation ResNet-68 and WRN-28-10 (Jia et al., 2017), built by
``convspec.train.models`` for CIFAR-10 (3 input channels, 10 classes) and initialised with
orthogonal weights, then perturbed so that a realistic share of singular values lies outside the
band (as after an interval of SGD steps): every weight matrix is scaled by a random factor in
[0.7, 1.4] and has Gaussian noise of 10% of its norm added.

Baselines (same process, same weights, calls interleaved so background load hits both alike):

- ``naive float32``: what a user writes first, as in the authors' released code: for every layer,
  ``U, s, Vh = torch.linalg.svd(W)`` in the weight's dtype, clamp ``s``, ``W = U diag(s) Vh``.
- ``naive float64``: the same loop in float64 (the precision ``svb_`` uses by default).

Two ``svb_`` passes: ``convspec.svb_`` (the default, ``dtype=torch.float64``: float64 Gram and
eigendecomposition, ~1 float32 ulp from exact) against the float64 loop, and
``convspec.svb_ float32`` (``dtype=torch.float32``: everything in float32, as accurate as a float32
SVD) against the float32 loop.

Target (issues 3 and 12): ``svb_`` >= 5x faster than the naive float32 loop on WRN-28-10 on the
CPU, at the same float32 accuracy. Accuracy is measured as the largest relative Frobenius
difference between a layer's bounded weight and a float64 SVD reference, in units of float32's
machine epsilon; "the same" means at most the float32 loop's.

All four are timed in one process, each repeat running them one after the other on the same
weights, and the medians are reported: background load hits them alike. ``--threads`` sets
``torch.set_num_threads`` (default: torch's choice); ``--note`` records the conditions (e.g. other
jobs sharing the cores) in the JSON and the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import orthogonal_, svb_  # noqa: E402
from convspec._provenance import environment  # noqa: E402
from convspec.train.models import build_model  # noqa: E402

EPS = 0.05
F32 = torch.finfo(torch.float32).eps
MODELS = {"ConvNet-20": "convnet-20", "PreAct-ResNet-68": "preact-resnet-68",
          "WRN-28-10": "wrn-28-10"}
QUICK = {"ConvNet-20": "convnet-20", "WRN-16-2": "wrn-16-2"}


def weight_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def perturbed(name: str, seed: int = 0) -> nn.Module:
    """The model with orthogonal weights pushed partly out of the band (see module docstring)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=3)
    orthogonal_(model)
    with torch.no_grad():
        for m in weight_layers(model):
            w = m.weight
            noise = torch.randn_like(w)
            w.mul_(0.7 + 0.7 * torch.rand(()))
            w.add_(noise * (0.1 * w.norm() / noise.norm()))
    return model


def naive_svb_(model: nn.Module, eps: float, dtype: torch.dtype) -> None:
    """The per-layer loop: one ``torch.linalg.svd`` per weight (groups ignored, none here)."""
    lo, hi = 1 / (1 + eps), 1 + eps
    with torch.no_grad():
        for m in weight_layers(model):
            w = m.weight
            mat = w.reshape(w.shape[0], -1).to(dtype)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            w.copy_(((u * s.clamp(lo, hi)) @ vh).reshape(w.shape).to(w.dtype))


def reference_svb(model: nn.Module, eps: float):
    """Bounded weights by float64 SVD, for the accuracy check."""
    lo, hi = 1 / (1 + eps), 1 + eps
    out = []
    for m in weight_layers(model):
        mat = m.weight.detach().reshape(m.weight.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        out.append((u * s.clamp(lo, hi)) @ vh)
    return out


def max_err_in_f32_eps(model: nn.Module, reference) -> float:
    worst = 0.0
    for m, ref in zip(weight_layers(model), reference):
        new = m.weight.detach().reshape(ref.shape).double()
        worst = max(worst, float((new - ref).norm() / ref.norm()) / F32)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="small models, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--note", default=None, help="conditions of the run, for the README")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for label, name in (QUICK if args.quick else MODELS).items():
        base = perturbed(name)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        layers = weight_layers(base)
        reference = reference_svb(base, EPS)
        fns = {
            "convspec.svb_": lambda m: svb_(m, EPS),
            "convspec.svb_ float32": lambda m: svb_(m, EPS, dtype=torch.float32),
            "naive float32": lambda m: naive_svb_(m, EPS, torch.float32),
            "naive float64": lambda m: naive_svb_(m, EPS, torch.float64),
        }
        times = {k: [] for k in fns}
        errors = {}
        for _ in range(args.repeats):
            for key, fn in fns.items():
                base.load_state_dict(state)
                t0 = time.perf_counter()
                fn(base)
                times[key].append(time.perf_counter() - t0)
                errors[key] = max_err_in_f32_eps(base, reference)
        base.load_state_dict(state)
        report = svb_(base, EPS)
        base.load_state_dict(state)
        report32 = svb_(base, EPS, dtype=torch.float32)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "model": label,
            "weight_layers": len(layers),
            "parameters": sum(p.numel() for p in base.parameters()),
            "values_clipped": report.n_clipped,
            "values_total": sum(r.n_values for r in report.layers),
            "routes": sorted({r.route for r in report.layers}),
            "routes_float32": sorted({r.route for r in report32.layers}),
            "seconds": med,
            "speedup_vs_naive_float32": med["naive float32"] / med["convspec.svb_"],
            "speedup_vs_naive_float64": med["naive float64"] / med["convspec.svb_"],
            "speedup_float32_vs_naive_float32":
                med["naive float32"] / med["convspec.svb_ float32"],
            "max_rel_err_in_float32_eps": errors,
        }
        rows.append(row)
        print(f"{label}: {json.dumps(row)}", file=sys.stderr)

    record = {"benchmark": "svb", "eps": EPS, "repeats": args.repeats, "rows": rows,
              "target": "WRN-28-10: svb_ >= 5x faster than the naive float32 loop, at most its "
                        "error", "environment": environment()}
    if args.note:
        record["note"] = args.note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "svb.json").write_text(json.dumps(record, indent=1))
    print("| model | layers | svb_ (s) | svb_ float32 (s) | naive f32 (s) | naive f64 (s) | "
          "svb_ float32 vs f32 loop | svb_ vs f64 loop | max error (f32 eps): svb_ / "
          "svb_ float32 / naive f32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, e = r["seconds"], r["max_rel_err_in_float32_eps"]
        print(f"| {r['model']} | {r['weight_layers']} | {s['convspec.svb_']:.3g} | "
              f"{s['convspec.svb_ float32']:.3g} | "
              f"{s['naive float32']:.3g} | {s['naive float64']:.3g} | "
              f"{r['speedup_float32_vs_naive_float32']:.1f}x | "
              f"{r['speedup_vs_naive_float64']:.1f}x | {e['convspec.svb_']:.2g} / "
              f"{e['convspec.svb_ float32']:.2g} / {e['naive float32']:.2g} |")
    print(f"wrote {args.out / 'svb.json'}")


if __name__ == "__main__":
    main()
