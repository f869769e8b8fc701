"""Compare training methods over several seeds: SGD vs SVB(+BBN) vs the Frobenius penalty.

One :class:`~convspec.train.config.TrainConfig` (defaults, a config file, flags) is trained once
per method and seed into ``OUT/<method>-seed<S>`` (a repeated method or seed counts once); a
run directory whose checkpoint has all epochs is reused, one with fewer is resumed. Then, per
method, the final test error and the training time as mean +/- std over seeds, and the singular
value ranges of the trained layers: of the reshaped kernels (what SVB bounds) and of the true
convolution operators at the input size each layer sees (what the Frobenius penalty acts on). Writes ``OUT/summary.json``,
``OUT/summary.md`` and ``OUT/test_error.png`` (mean +/- std over seeds, per epoch).
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .._provenance import environment
from ..train.data import load_dataset, normalize
from ..train.config import TrainConfig, config_differences
from ..train.loop import train
from ..train.models import build_model
from ..train.rundir import RunDir, RunDirError, make_output_dir, write_json

#: Columns of the printed table.
HEADER = ("method", "seeds", "test error (%)", "time / run (s)", "reshaped sigma [min, max]",
          "operator sigma [min, max]")


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def operator_sigma_ranges(model: nn.Module, example_input: torch.Tensor) -> Dict[str, List[float]]:
    """Per conv layer ``[sigma_min, sigma_max]`` of its exact operator at the input size it sees.

    A thin wrapper over :func:`convspec.spectrum_report` (one forward pass with hooks).
    """
    from ..report import spectrum_report

    report = spectrum_report(model, example_input, keep_values=False)
    return {row.name: [row.sigma_min, row.sigma_max] for row in report
            if row.sigma_max is not None}


def _epochs_done(run: RunDir, cfg: TrainConfig) -> Optional[int]:
    """The epochs ``run`` has completed of exactly ``cfg`` (its checkpoint is the truth; None: no
    run yet); raise if it holds another configuration or more than ``cfg.epochs`` epochs."""
    if not run.has_checkpoint():
        return None
    state = run.load(mmap=True)
    diffs = config_differences(state["config"], cfg)
    if diffs:
        raise RunDirError(f"{run.path} holds a run of another configuration ({'; '.join(diffs)}); "
                          "choose another --out")
    if state["epoch"] > cfg.epochs:
        raise RunDirError(f"{run.path} holds {state['epoch']} epochs, more than --epochs "
                          f"{cfg.epochs}; choose another --out")
    return state["epoch"]


def _trained_model(cfg: TrainConfig, state: Dict, in_channels: int, num_classes: int) -> nn.Module:
    model = build_model(cfg.model, num_classes, in_channels)
    model.load_state_dict(state["model"])
    return model.eval()


def _unique(values: Sequence, flag: str) -> List:
    """``values`` without repeats (first occurrence kept); warn about the repeats."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=unique.index)
        warnings.warn(f"{flag} lists {', '.join(map(str, repeated))} more than once; each "
                      "runs and counts once", stacklevel=3)
    return unique


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    progress: bool = True,
) -> Dict:
    """Train ``base`` with every method and seed into ``out``; return (and write) the summary."""
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    methods, seeds = _unique(list(methods), "--methods"), _unique(list(seeds), "--seeds")
    configs = {(m, s): replace(base, method=m, seed=s) for m in methods for s in seeds}
    for cfg in configs.values():  # every run's config is valid before anything is written
        cfg.validate()
    out = make_output_dir(Path(out))
    data = load_dataset(base.data, base.data_dir, seed=base.seed)
    example = normalize(data.x_test[:1], data.mean, data.std)  # sets each conv's input size
    runs: Dict[str, List[Dict]] = {}
    for (method, seed), cfg in configs.items():
        run = RunDir(out / f"{method}-seed{seed}")
        done = _epochs_done(run, cfg)
        if done != cfg.epochs:
            if progress:
                print(f"== {method}, seed {seed}: {'resuming' if done is not None else 'training'} "
                      f"into {run.path}", flush=True)
            train(cfg, run.path, resume=done is not None, progress=progress, data=data)
        state = run.load(mmap=True)
        history = state["history"]
        cache = run.read_side("operator_sigma.json")  # the spectra of the final checkpoint
        if isinstance(cache, dict) and cache.get("epoch") == len(history) \
                and isinstance(cache.get("ranges"), dict):
            operator = cache["ranges"]
        else:
            model = _trained_model(cfg, state, data.in_channels, data.num_classes)
            operator = operator_sigma_ranges(model, example)
            run.write_side("operator_sigma.json", {"epoch": len(history), "ranges": operator})
        runs.setdefault(method, []).append({
            "seed": seed,
            "run_dir": str(run.path),
            "test_error": [r["test_error"] for r in history],
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            "reshaped": history[-1]["sigma_reshaped"],
            "operator": operator,
        })

    summary = {"config": asdict(base), "methods": methods, "seeds": seeds,
               "environment": environment(), "results": {}}
    for method, rows in runs.items():
        summary["results"][method] = {
            "final_test_error": _mean_std([r["test_error"][-1] for r in rows]),
            "train_time_s": _mean_std([r["train_time_s"] for r in rows]),
            # Over layers and seeds: the smallest minimum and the largest maximum.
            "reshaped_sigma": [min(v[0] for r in rows for v in r["reshaped"].values()),
                               max(v[1] for r in rows for v in r["reshaped"].values())],
            "operator_sigma": [min(v[0] for r in rows for v in r["operator"].values()),
                               max(v[1] for r in rows for v in r["operator"].values())],
            "runs": rows,
        }
    write_json(out / "summary.json", summary)
    table = format_table(summary)
    (out / "summary.md").write_text(table + "\n")
    plot_comparison(summary, out / "test_error.png")
    return summary


def format_table(summary: Dict) -> str:
    """The summary as a markdown table (one row per method)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for method, res in summary["results"].items():
        err, t = res["final_test_error"], res["train_time_s"]
        rs, op = res["reshaped_sigma"], res["operator_sigma"]
        lines.append(
            f"| {method} | {len(res['runs'])} | {100 * err['mean']:.2f} +/- {100 * err['std']:.2f} "
            f"| {t['mean']:.0f} +/- {t['std']:.0f} | [{rs[0]:.3g}, {rs[1]:.3g}] "
            f"| [{op[0]:.2g}, {op[1]:.3g}] |"
        )
    return "\n".join(lines)


def plot_comparison(summary: Dict, path: Path) -> None:
    """Test error per epoch, mean +/- std over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, res in summary["results"].items():
        curves = torch.tensor([r["test_error"] for r in res["runs"]], dtype=torch.float64) * 100
        mean = curves.mean(0)
        std = curves.std(0, unbiased=True) if curves.shape[0] > 1 else torch.zeros_like(mean)
        epochs = range(1, mean.numel() + 1)
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{method} ({curves.shape[0]} seeds)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    cfg = summary["config"]
    subset = f", {cfg['n_train']} training images" if cfg.get("n_train") else ""
    ax.set_title(f"{cfg['model']} on {cfg['data']}{subset}: test error, "
                 "mean +/- std", fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
