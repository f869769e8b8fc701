"""Plots of training runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence


def read_metrics(run: Path) -> List[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run} a convspec run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no epoch yet")
    return rows


def run_label(run: Path) -> str:
    cfg_path = Path(run) / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())["config"]
        return f"{Path(run).name} ({cfg['method']}, {cfg['model']}-{cfg['depth']}, seed {cfg['seed']})"
    return Path(run).name


def plot_runs(runs: Sequence[Path], out: Path, metric: str = "test_error") -> None:
    """One figure with ``metric`` per epoch for every run directory in ``runs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(run_label(r), read_metrics(r)) for r in runs]
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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
