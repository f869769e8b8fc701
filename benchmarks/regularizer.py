"""Cost of ``FrobeniusRegularizer`` forward + backward as a share of a training step.

Run: ``.venv/bin/python benchmarks/regularizer.py [--out benchmarks/results] [--quick]
[--threads T]``. Writes ``regularizer.json``; ``benchmarks/readme_tables.py`` puts the rows into
the README. Per model, in one process and interleaved (step, batched regularizer, per-layer
regularizer, step, ...), the median over ``--repeats`` of:

- a step: forward + cross-entropy + backward + ``torch.optim.SGD`` step of the model alone;
- ``reg().backward()``: the batched, cached regularizer (Note [batched penalty]);
- ``sum(reg.penalties().values()).backward()``: one exact penalty per layer, as ``reg()`` did
  before the batching (kept as the reference of the ratio).

Besides wall-clock time it records the thread CPU time of the step and of ``reg()`` (medians;
the cores may be shared with other jobs, which stretches wall time but not CPU time) and the
multiply-adds of each: the step's convolutions and linear layers (forward, weight gradient,
input gradient except for the first layer; elementwise layers not counted) and the penalty's
GEMMs (Note [pair layout] in ``convspec/penalty.py``).

Target (issue 12, item 2): ``reg()`` forward + backward <= 2% of a step for ConvNet-20 (1 x 28 x
28 inputs) and WRN-16-4 (3 x 32 x 32), batch 128, float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import FrobeniusRegularizer  # noqa: E402
from convspec import penalty  # noqa: E402
from convspec._geometry import geometry_of  # noqa: E402
from convspec._provenance import environment  # noqa: E402
from convspec.train.models import build_model  # noqa: E402

MODELS = (("ConvNet-20", "convnet-20", 1, 28), ("WRN-16-4", "wrn-16-4", 3, 32))
TARGET_PERCENT = 2.0


def step_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one training step's convolutions and linear layers (see the docstring)."""
    counts = []

    def hook(module, args, out):
        w = module.weight
        counts.append(out.numel() * w[0].numel())  # each output: in / groups * prod(k)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 3 * sum(counts) - counts[0]  # the first layer's input needs no gradient


def penalty_macs(reg: FrobeniusRegularizer) -> int:
    """Multiply-adds of ``reg()`` forward + backward: the Gram, the ``Q_i``, the backward GEMM."""
    total = 0
    layers = [(conv, geometry_of(conv, s)) for name, conv in reg.convs.items()
              for s in reg.input_sizes[name]]
    layers += [(lin, None) for lin in reg.linears.values()]
    for module, geom in layers:
        w = module.weight
        groups = geom.groups if geom is not None else 1
        ks = [ax.kernel for ax in geom.axes] if geom is not None else [1]
        kk = math.prod(ks)
        hg, gg = w.shape[0] // groups, w.shape[1]
        c, n = min(hg, gg), max(hg, gg)
        gram = kk * (kk + 1) // 2 if c >= penalty.TRIANGLE_MIN and kk > 1 else kk * kk
        total += groups * ((gram + kk * kk) * c * c * n + sum(k * k for k in ks) * kk * kk * c * c)
    return total


def measure(model_name: str, registry: str, channels: int, size: int, batch: int,
            repeats: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    model = build_model(registry, num_classes=10, in_channels=channels)
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = FrobeniusRegularizer(model)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def batched():
        reg().backward()

    def per_layer():
        sum(reg.penalties().values()).backward()

    fns = {"step": step, "regularizer": batched, "per_layer": per_layer}
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.thread_time() - c0)
        opt.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    macs = {"step": step_macs(model, x), "regularizer": penalty_macs(reg)}
    with torch.no_grad():
        value, reference = float(reg().double()), float(sum(reg.penalties().values()).double())
    return {
        "model": model_name, "input": f"{channels}x{size}x{size}", "batch": batch,
        "layers": len(reg.convs) + len(reg.linears), "repeats": repeats,
        "step_s": med["step"], "regularizer_s": med["regularizer"],
        "per_layer_s": med["per_layer"],
        "regularizer_percent": 100 * med["regularizer"] / med["step"],
        "per_layer_percent": 100 * med["per_layer"] / med["step"],
        "rel_diff_per_layer": abs(value - reference) / abs(reference),
        "step_cpu_s": med_cpu["step"], "regularizer_cpu_s": med_cpu["regularizer"],
        "regularizer_cpu_percent": 100 * med_cpu["regularizer"] / med_cpu["step"],
        "step_macs": macs["step"], "regularizer_macs": macs["regularizer"],
        "regularizer_macs_percent": 100 * macs["regularizer"] / macs["step"],
        "met": 100 * med["regularizer"] / med["step"] <= TARGET_PERCENT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="3 repeats, batch 16 (smoke test)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, batch = (3, 16) if args.quick else (args.repeats, 128)
    rows = []
    for spec in MODELS:
        row = measure(*spec, batch=batch, repeats=repeats)
        print(f"{row['model']}: step {row['step_s'] * 1e3:.1f} ms, reg() "
              f"{row['regularizer_s'] * 1e3:.2f} ms ({row['regularizer_percent']:.2f}%), "
              f"per layer {row['per_layer_s'] * 1e3:.2f} ms ({row['per_layer_percent']:.2f}%); "
              f"CPU time {row['regularizer_cpu_percent']:.2f}%, multiply-adds "
              f"{row['regularizer_macs_percent']:.2f}% of a step", flush=True)
        rows.append(row)
    record = {"benchmark": "regularizer", "dtype": "float32",
              "target": f"reg() forward + backward <= {TARGET_PERCENT:g}% of a training step",
              "rows": rows, "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        (args.out / "regularizer.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out / 'regularizer.json'}")


if __name__ == "__main__":
    main()
