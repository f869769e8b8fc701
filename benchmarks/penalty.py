"""Penalty + gradient timings: exact structured vs dense (the paper's route) vs interior-only.

Run: ``.venv/bin/python benchmarks/penalty.py [--out benchmarks/results] [--quick] [--threads T]``.
Writes ``penalty.json`` and prints a markdown table; ``benchmarks/readme_tables.py`` puts the
rows into the README. All timings are medians over repeats, in one process, float32 on the CPU
(float64 for the dense route would be slower still), of ``frobenius_penalty(conv, N)`` and its
backward on a bias-free ``nn.Conv*d`` layer with k = 3 and padding 1 (``'same'``). ``make bench``
passes ``--threads 1``, as the recorded run did (README, Benchmarks).

Targets (issues 2 and 10):

- exact >= 1000x faster than dense where dense is feasible (about a second for Conv1d at
  g = h = 32, N = 64 and Conv3d at g = h = 4, N = 8^3, where the dense ``M`` is 2048 x 2048;
  several seconds for Conv2d at g = h = 16, N = 16, 4096 x 4096);
- exact time flat in the input size, within 1.2x: Conv2d N = 16 vs N = 4096, Conv1d N = 8 vs
  N = 2^20, Conv3d N = 8^3 vs N = 128^3 (g = h = 16);
- exact within 2x of the interior-only penalty at g = h = 64, 256, 512 (Conv2d, N = 32).
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from convspec import frobenius_penalty, frobenius_penalty_reference  # noqa: E402
from convspec._provenance import environment  # noqa: E402

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


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


def make_conv(dim: int, c: int, scale: float) -> nn.Module:
    """A bias-free ``g = h = c`` k = 3 convolution with padding 1 and weight ``randn * scale``."""
    conv = CONV[dim](c, c, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight) * scale)
    return conv


def time_pair(fn_a, fn_b, conv: nn.Module, repeats: int, warmup: int = 1):
    """Median seconds of penalty + backward for two penalties of ``conv``, calls interleaved
    a, b, a, b...

    Interleaving makes the ratio robust to load from other processes on a shared machine.
    """
    times = {0: [], 1: []}
    for i in range(warmup + repeats):
        for j, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn(conv).backward()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
            conv.weight.grad = None
    return statistics.median(times[0]), statistics.median(times[1])


def size_label(dim: int, n: int) -> str:
    """``N`` as the case names write it: ``16``, ``2^20`` (1-D powers of two from 1024),
    ``8^3`` (3-D, equal sides)."""
    if dim == 3:
        return f"{n}^3"
    if dim == 1 and n >= 1024 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def dense_row(dim: int, c: int, n: int, exact_repeats: int, dense_repeats: int, prefix: str):
    """Exact vs dense for a ``Conv{dim}d``. Not interleaved: a multi-second dense call slows the
    calls right after it, so the exact route goes first."""
    conv = make_conv(dim, c, 1 / 3)
    exact, _ = time_pair(lambda m: frobenius_penalty(m, n), lambda m: frobenius_penalty(m, n),
                         conv, exact_repeats)
    dense, _ = time_pair(lambda m: frobenius_penalty_reference(m, n), lambda m: m.weight.sum(),
                         conv, dense_repeats)
    conv64 = conv.double()
    with torch.no_grad():
        reference = frobenius_penalty_reference(conv64, n)
        agree = float(abs(frobenius_penalty(conv64, n) - reference) / reference)
    return dict(case=f"{prefix}exact vs dense, g=h={c}, N={size_label(dim, n)}", baseline="dense",
                baseline_s=dense, exact_s=exact, ratio=dense / exact, target=">= 1000",
                met=dense / exact >= 1000, rel_diff_float64=agree)


def flat_row(dim: int, c: int, small: int, large: int, repeats: int, prefix: str):
    """Exact at the largest vs the smallest input size, interleaved (constants cached by the
    warm-up call, as in training, where every step sees the same size)."""
    conv = make_conv(dim, c, 1 / 3)
    t_small, t_large = time_pair(lambda m: frobenius_penalty(m, small),
                                 lambda m: frobenius_penalty(m, large), conv, repeats)
    s, L = size_label(dim, small), size_label(dim, large)
    return dict(case=f"{prefix}exact N={L} vs N={s}, g=h={c}", baseline=f"exact N={s}",
                baseline_s=t_small, exact_s=t_large, ratio=t_large / t_small, target="<= 1.2",
                met=t_large / t_small <= 1.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); recorded in the JSON. On "
                             "a machine shared with other work, 1 avoids the multi-millisecond "
                             "stalls of a thread pool waiting for a descheduled thread")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    # Conv2d (the rows of issue 2; case names without a layer prefix).
    c, n = (8, 8) if args.quick else (16, 16)
    rows.append(dense_row(2, c, n, 50, 3, ""))
    rows.append(flat_row(2, c, 16, 4096, 200, ""))
    for c in ((64, 128) if args.quick else (64, 256, 512)):
        conv = make_conv(2, c, 1 / (3 * c**0.5))
        reps = 40 if c <= 64 else (10 if c <= 256 else 5)
        interior, exact = time_pair(lambda m: interior_penalty(m.weight),
                                    lambda m: frobenius_penalty(m, 32), conv, reps)
        rows.append(dict(case=f"exact vs interior-only, g=h={c}, N=32", baseline="interior-only",
                         baseline_s=interior, exact_s=exact, ratio=exact / interior,
                         target="<= 2", met=exact / interior <= 2))

    # Conv1d and Conv3d (issue 10).
    rows.append(dense_row(1, 16, 32, 50, 3, "Conv1d: ") if args.quick
                else dense_row(1, 32, 64, 50, 5, "Conv1d: "))
    rows.append(flat_row(1, 16, 8, 2**20, 200, "Conv1d: "))
    rows.append(dense_row(3, 4, 6, 50, 3, "Conv3d: ") if args.quick
                else dense_row(3, 4, 8, 50, 5, "Conv3d: "))
    rows.append(flat_row(3, 16, 8, 128, 100, "Conv3d: "))

    record = {"benchmark": "penalty", "dtype": "float32", "rows": rows,
              "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "penalty.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| case | baseline (s) | exact (s) | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['baseline_s']:.4g} ({r['baseline']}) | {r['exact_s']:.4g} | "
              f"{r['ratio']:.3g} | {r['target']} | {'yes' if r['met'] else 'no'} |")
    print(f"wrote {args.out / 'penalty.json'}")


if __name__ == "__main__":
    main()
