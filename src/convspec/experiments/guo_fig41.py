"""Figure 4.1 of Guo (2019): Algorithm 3.1 on random kernels, sigma_max and sigma_min per iteration.

The paper writes kernel shapes as ``k x k x g x h`` (g input, h output channels); PyTorch's weight
is ``(h, g, k, k)``. Inputs are ``N x N`` with zero ``'same'`` padding, as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from .._progress import progress_bar
from .._provenance import environment
from ..descent import STEP_RULES, penalty_descent

SHAPES: Tuple[Tuple[int, int, int, int], ...] = ((3, 3, 3, 1), (3, 3, 1, 3), (3, 3, 3, 6), (3, 3, 6, 3))
INITS = ("normal", "uniform")


@dataclass
class Fig41Config:
    """Defaults reproduce the paper's figure: 300 steps of the paper's schedule on 20 x 20 inputs."""

    steps: int = 300
    size: int = 20
    seed: int = 1
    init: str = "normal"
    step_rule: str = "paper"
    lr: float = 1e-3
    alpha: float = 1.0
    shapes: List[Tuple[int, int, int, int]] = field(default_factory=lambda: list(SHAPES))

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def random_kernel(shape: Sequence[int], init: str, generator: torch.Generator) -> torch.Tensor:
    """A ``k x k x g x h`` kernel (paper order) as a PyTorch weight ``(h, g, k, k)`` in float64.

    ``'normal'``: standard normal entries (``randn``); ``'uniform'``: uniform on ``[-1, 1]``.
    """
    k1, k2, g, h = shape
    if init == "normal":
        return torch.randn(h, g, k1, k2, generator=generator, dtype=torch.float64)
    return 2 * torch.rand(h, g, k1, k2, generator=generator, dtype=torch.float64) - 1


def run(config: Fig41Config, progress: bool = True) -> dict:
    """Run Algorithm 3.1 on each kernel of ``config.shapes``; return the JSON-ready record."""
    config.validate()
    generator = torch.Generator().manual_seed(config.seed)
    record = {"config": asdict(config), "environment": environment(), "kernels": []}
    total = config.steps * len(config.shapes)
    with progress_bar(total, "guo-fig41", enabled=progress) as bar:
        for shape in config.shapes:
            weight = random_kernel(shape, config.init, generator)
            res = penalty_descent(
                weight,
                config.size,
                config.alpha,
                steps=config.steps,
                step_rule=config.step_rule,
                lr=config.lr,
                callback=lambda it, r: bar.update(1), padding="same",
            )
            entry = {"shape": list(shape), **res.history()}
            record["kernels"].append(entry)
            if res.stopped:
                bar.update(config.steps - (len(res.iteration) - 1))
    return record


def table(record: dict, iterations: Sequence[int] = (0, 5, 10, 20, 30, 50, 100, 200, 300)) -> str:
    """A plain-text table: sigma_max / sigma_min of each kernel at a few iterations."""
    kernels = record["kernels"]
    head = ["iter"] + ["x".join(map(str, k["shape"])) for k in kernels]
    rows = [head]
    last = max(len(k["iteration"]) for k in kernels) - 1
    for it in sorted(set(i for i in iterations if i <= last) | {last}):
        row = [str(it)]
        for k in kernels:
            if it < len(k["iteration"]):
                row.append(f"{k['sigma_max'][it]:7.3f} / {k['sigma_min'][it]:.3f}")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "sigma_max / sigma_min of M per kernel (k x k x g x h)\n" + "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """A 2 x 2 figure like the paper's: sigma_max (blue, solid) and sigma_min (orange, dashed) of
    the exact operator per iteration, on one log axis with a legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is in the default extras
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'convspec[cli]'"
        ) from exc
    cfg = record["config"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, k in zip(axes.flat, record["kernels"]):
        it = k["iteration"]
        ax.semilogy(it, k["sigma_max"], color="tab:blue", lw=1.6, label=r"$\sigma_{\max}(M)$")
        ax.semilogy(it, k["sigma_min"], color="tab:orange", lw=1.6, ls="--",
                    label=r"$\sigma_{\min}(M)$")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="target: 1")
        ax.set_xlabel("iteration of Algorithm 3.1 (gradient steps)")
        ax.set_ylabel("singular value of M (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.set_title("kernel " + "x".join(map(str, k["shape"])) + " (k x k x g x h), "
                     f"{cfg['size']}x{cfg['size']} input", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Guo (2019) Figure 4.1: Algorithm 3.1 on the Frobenius penalty ({cfg['step_rule']} "
        f"steps, {cfg['init']} init, seed {cfg['seed']}, zero 'same' padding)", fontsize=11
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config: Fig41Config, out: Path, progress: bool = True) -> dict:
    """Run, print the table, write ``out/guo_fig41.json`` and ``out/guo_fig41.png``."""
    from ..train.rundir import make_output_dir, write_json

    config.validate()
    out = make_output_dir(Path(out))  # a bad --out fails before the descent runs
    record = run(config, progress=progress)
    json_path = out / "guo_fig41.json"
    write_json(json_path, record)
    plot(record, out / "guo_fig41.png")
    print(table(record))
    print(f"wrote {json_path} and {out / 'guo_fig41.png'}")
    return record
