"""The ``convspec`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .descent import STEP_RULES
    from .experiments.guo_fig41 import INITS

    parser = argparse.ArgumentParser(
        prog="convspec",
        description="Exact control of the singular values of convolutional layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rep = sub.add_parser("reproduce", help="reproduce a figure or table of a paper")
    rep_sub = rep.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    rep_sub.required = True
    fig = rep_sub.add_parser(
        "guo-fig41",
        help="Guo (2019) Figure 4.1: Algorithm 3.1 on four random 3x3 kernels",
        description="Run Algorithm 3.1 (gradient descent on the exact Frobenius penalty) on "
        "random 3x3x3x1, 3x3x1x3, 3x3x3x6 and 3x3x6x3 kernels (k x k x g x h) and record the "
        "exact sigma_max and sigma_min of the convolution operator at every iteration.",
    )
    fig.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    fig.add_argument("--steps", type=_positive_int, default=300, help="iterations (default 300)")
    fig.add_argument("--size", type=_positive_int, default=20, help="input size N (default 20)")
    fig.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    fig.add_argument("--init", choices=INITS, default="normal", help="kernel entries (default normal)")
    fig.add_argument("--step-rule", choices=STEP_RULES, default="paper", help="default: paper")
    fig.add_argument("--lr", type=_positive_float, default=1e-3, help="step for --step-rule constant")
    fig.add_argument("--alpha", type=_positive_float, default=1.0, help="target a (default 1)")
    fig.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reproduce" and args.experiment == "guo-fig41":
        from .experiments import guo_fig41

        if args.size > 48:
            parser.error(f"--size {args.size} is too large for the dense spectrum (at most 48)")
        config = guo_fig41.Fig41Config(
            steps=args.steps,
            size=args.size,
            seed=args.seed,
            init=args.init,
            step_rule=args.step_rule,
            lr=args.lr,
            alpha=args.alpha,
        )
        guo_fig41.main(config, args.out, progress=not args.no_progress)
        return 0
    parser.error("unknown command")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
