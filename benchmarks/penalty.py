"""Penalty + gradient timings: exact structured vs dense (the paper's route) vs interior-only.

Run: ``.venv/bin/python benchmarks/penalty.py [--out benchmarks/results] [--quick]``.
Writes ``penalty.json`` and prints a markdown table. All timings are medians over repeats, in
one process, float32 on the CPU (float64 for the dense route would be slower still).

Targets (issue 2): exact >= 1000x faster than dense at g = h = 16, N = 16; exact time flat in N
(N = 16 vs N = 4096 within 1.2x); exact within 2x of the interior-only penalty at g = h = 64,
256, 512 (k = 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import frobenius_penalty, frobenius_penalty_reference  # noqa: E402
from convspec._provenance import environment  # noqa: E402


def interior_penalty(weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``||conv(K, K) - alpha delta||_F^2``: the interior-only (boundary-free) penalty.

    This is the orthogonality loss of public orthogonal-CNN code (e.g. Wang et al., "Orthogonal
    Convolutional Neural Networks", CVPR 2020): the self-convolution of the kernel against a
    centred identity. It ignores the boundary rows of M and the input size.
    """
    h, _, k1, k2 = weight.shape
    out = F.conv2d(weight, weight, padding=(k1 - 1, k2 - 1))  # (h, h, 2k1-1, 2k2-1)
    target = torch.zeros_like(out)
    target[:, :, k1 - 1, k2 - 1] = alpha * torch.eye(h, dtype=weight.dtype)
    return (out - target).square().sum()


def time_pair(fn_a, fn_b, weight: torch.Tensor, repeats: int, warmup: int = 1):
    """Median seconds of penalty + backward for two penalties, calls interleaved a, b, a, b...

    Interleaving makes the ratio robust to load from other processes on a shared machine.
    """
    w = weight.detach().clone().requires_grad_(True)
    times = {0: [], 1: []}
    for i in range(warmup + repeats):
        for j, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn(w).backward()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
            w.grad = None
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    # 1. Exact vs dense at g = h = 16, N = 16 (dense M is 4096 x 4096). Not interleaved: a
    # multi-second dense call slows the calls right after it, so the exact route goes first.
    c, n = (8, 8) if args.quick else (16, 16)
    w = torch.randn(c, c, 3, 3) / 3
    exact, _ = time_pair(lambda w: frobenius_penalty(w, n, padding="same"), lambda w: frobenius_penalty(w, n, padding="same"), w, 50)
    dense, _ = time_pair(
        lambda w: frobenius_penalty_reference(w, n, padding="same"), lambda w: w.sum(), w, 3
    )
    wd = w.double()
    agree = float(
        abs(frobenius_penalty(wd, n, padding="same") - frobenius_penalty_reference(wd, n, padding="same"))
        / frobenius_penalty_reference(wd, n, padding="same")
    )
    rows.append(dict(case=f"exact vs dense, g=h={c}, N={n}", baseline="dense",
                     baseline_s=dense, exact_s=exact, ratio=dense / exact, target=">= 1000",
                     met=dense / exact >= 1000, rel_diff_float64=agree))

    # 2. Exact time flat in N.
    small, large = time_pair(
        lambda w: frobenius_penalty(w, 16, padding="same"), lambda w: frobenius_penalty(w, 4096, padding="same"), w, 200
    )
    rows.append(dict(case=f"exact N=4096 vs N=16, g=h={c}", baseline="exact N=16",
                     baseline_s=small, exact_s=large, ratio=large / small, target="<= 1.2",
                     met=large / small <= 1.2))

    # 3. Exact vs interior-only at large channel counts, k = 3, N = 32.
    for c in ((64, 128) if args.quick else (64, 256, 512)):
        w = torch.randn(c, c, 3, 3) / (3 * c**0.5)
        reps = 40 if c <= 64 else (10 if c <= 256 else 5)
        interior, exact = time_pair(interior_penalty, lambda w: frobenius_penalty(w, 32, padding="same"), w, reps)
        rows.append(dict(case=f"exact vs interior-only, g=h={c}, N=32", baseline="interior-only",
                         baseline_s=interior, exact_s=exact, ratio=exact / interior,
                         target="<= 2", met=exact / interior <= 2))

    record = {"benchmark": "penalty", "dtype": "float32", "rows": rows, "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "penalty.json").write_text(json.dumps(record, indent=1))
    print("| case | baseline (s) | exact (s) | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['baseline_s']:.4g} ({r['baseline']}) | {r['exact_s']:.4g} | "
              f"{r['ratio']:.3g} | {r['target']} | {'yes' if r['met'] else 'no'} |")
    print(f"wrote {args.out / 'penalty.json'}")


if __name__ == "__main__":
    main()
