"""Plots of training runs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from .rundir import RunDir, RunDirError, make_output_dir


def read_metrics(run: Path) -> List[dict]:
    """The metrics rows of the completed epochs of run directory ``run`` (at least one)."""
    rows = RunDir(run).history()
    if not rows:
        raise RunDirError(f"{run} holds no completed epoch yet")
    return rows


def run_label(run: Path) -> str:
    cfg = RunDir(run).record()["config"]
    try:
        return f"{Path(run).name} ({cfg['method']}, {cfg['model']}, seed {cfg['seed']})"
    except KeyError:
        return Path(run).name


def figure_path(out: Path) -> Path:
    """Where ``plot_runs`` writes for ``--out out``: ``out`` itself, with ``.png`` added when it
    has no extension (as matplotlib would); an existing folder is refused."""
    out = Path(out)
    if out.is_dir():
        raise RunDirError(f"--out {out} is a folder; give a file name such as {out / 'curves.png'}")
    return out if out.suffix else out.with_name(out.name + ".png")


def plot_runs(runs: Sequence[Path], out: Path, metric: str = "test_error") -> Path:
    """One figure with ``metric`` per epoch for every run directory in ``runs``; returns the path
    written (see :func:`figure_path`)."""
    path = figure_path(out)
    data = [(run_label(r), read_metrics(r)) for r in runs]  # every run is readable first
    make_output_dir(path.parent)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in data:
        scale = 100.0 if metric in ("test_error", "train_accuracy") else 1.0
        ax.plot([r["epoch"] for r in rows], [scale * r[metric] for r in rows], marker="o", ms=3,
                label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if metric in ("test_error", "train_accuracy") else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
