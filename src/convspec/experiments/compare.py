"""Compare training methods over seeds: SGD vs SVB(+BBN) vs the Frobenius penalty, with statistics.

One :class:`~convspec.train.config.TrainConfig` (defaults, a config file, flags) is trained once
per method and seed into ``OUT/<method>-seed<S>`` (a repeated method or seed counts once). A
method is a name from :data:`~convspec.train.config.METHODS`, optionally with fields of its own:
``svb:eps=0.5`` or ``frobenius:frob_weight=0.01`` (:func:`parse_method`). Runs go one at a time
or ``jobs`` at a time in worker processes (each with its share of the CPU threads).

A finished run leaves ``result.json`` beside its checkpoint: its config, per-epoch metrics and
the exact operator spectra of the trained layers. A run whose ``result.json`` holds exactly this
configuration and all epochs is reused, with or without its checkpoint (so that a record can keep
the small files and drop the checkpoints, and resume in another checkout); a run with a shorter
checkpoint is resumed.

Then, per method, the final test error and the training time as mean +/- std over seeds, the
difference of each method from the baseline (``sgd`` when present) with its 95% confidence
interval and Welch's t-test p-value (:mod:`convspec.experiments.stats`), and the singular value
ranges of the trained layers: of the reshaped kernels (what SVB bounds) and of the true
convolution operators at the input size each layer sees (what the Frobenius penalty acts on).
Writes ``OUT/summary.json``, ``OUT/summary.md`` and ``OUT/curves.png`` (training and test
error per epoch, mean +/- std over seeds, as Jia et al.'s Figure 2).
"""

from __future__ import annotations

import math
import os
import queue as queue_module
import sys
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._progress import progress_bar
from .._provenance import environment
from ..train.data import load_dataset, normalize
from ..train.config import METHODS, TrainConfig, config_differences, field_type_problem
from ..train.loop import NonFiniteLoss, train
from ..train.models import build_model
from ..train.rundir import RunDir, RunDirError, make_output_dir, write_json
from .stats import mean_std, welch

#: Columns of the printed table.
HEADER = ("method", "seeds", "test error (%)", "vs baseline (pp) [95% CI]", "p (Welch)",
          "time / run (s)", "reshaped sigma [min, max]", "operator sigma [min, max]")

#: Fields a method spec may not set (the spec's name is the method; seeds come from --seeds).
_NOT_PER_METHOD = ("method", "seed")


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    ms = mean_std(values)
    return {"mean": ms["mean"], "std": ms["std"]}


@dataclass(frozen=True)
class MethodSpec:
    """A training method and the config fields it sets: ``svb:eps=0.5`` is method ``svb`` with
    ``eps = 0.5``. ``label`` is the canonical text (the table's row name), ``dirname`` the run
    folder prefix (``svb_eps0.5``)."""

    method: str
    overrides: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_text(v)}" for k, v in self.overrides)

    @property
    def dirname(self) -> str:
        return self.label.replace(":", "_").replace(",", "_").replace("=", "")

    def config(self, base: TrainConfig, seed: int) -> TrainConfig:
        return replace(base, method=self.method, seed=seed, **dict(self.overrides))


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _parse_value(name: str, text: str) -> Any:
    from ..train.config import _FIELD_TYPES

    base, optional = _FIELD_TYPES[name]
    t = text.strip()
    if optional and t.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if t.lower() not in ("true", "false"):
                raise ValueError
            return t.lower() == "true"
        if base is int:
            return int(t)
        if base is float:
            v = float(t)
            if not math.isfinite(v):
                raise ValueError
            return v
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}[base]
        raise ValueError(f"method field {name}={text!r}: expected {kind}") from None
    return t


def parse_method(spec: str) -> MethodSpec:
    """``NAME`` or ``NAME:FIELD=VALUE[,FIELD=VALUE...]`` -> :class:`MethodSpec`; FIELD is a
    :class:`~convspec.train.config.TrainConfig` field (``-`` or ``_``), VALUE of its type.

    >>> parse_method("svb:eps=0.5").label
    'svb:eps=0.5'
    >>> parse_method("frobenius:frob-weight=1e-2").dirname
    'frobenius_frob_weight0.01'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method {spec!r}: expected NAME or NAME:FIELD=VALUE,...")
    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise ValueError(f"method {spec!r}: {name!r} is not one of {', '.join(METHODS)}")
    overrides: Dict[str, Any] = {}
    if rest:
        known = {f.name for f in fields(TrainConfig)}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key:
                raise ValueError(f"method {spec!r}: {item!r} is not FIELD=VALUE")
            if key not in known:
                raise ValueError(f"method {spec!r}: unknown field {key!r}")
            if key in _NOT_PER_METHOD:
                raise ValueError(f"method {spec!r}: {key} cannot be set per method")
            if key in overrides:
                raise ValueError(f"method {spec!r}: {key} is given twice")
            v = _parse_value(key, value)
            problem = field_type_problem(key, v)
            if problem:
                raise ValueError(f"method {spec!r}: {problem}")
            overrides[key] = v
    return MethodSpec(name, tuple(sorted(overrides.items())))


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


RESULT = "result.json"


def _finished_result(run: RunDir, cfg: TrainConfig) -> Optional[Dict]:
    """The run's ``result.json`` if it records exactly ``cfg`` with all its epochs, else None;
    raise if it records another configuration (and there is no checkpoint to judge by)."""
    res = run.read_side(RESULT)
    if not (isinstance(res, dict) and isinstance(res.get("config"), dict)
            and isinstance(res.get("history"), list) and isinstance(res.get("operator"), dict)):
        return None
    diffs = config_differences(res["config"], cfg)
    if diffs and not run.has_checkpoint():
        raise RunDirError(f"{run.path} holds a run of another configuration ({'; '.join(diffs)}); "
                          "choose another --out")
    if diffs or res["config"].get("epochs") != cfg.epochs:
        return None
    if len(res["history"]) != cfg.epochs and not res.get("diverged"):
        return None
    return res


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


def _train_one(cfg: TrainConfig, path: str, data_seed: int, progress: bool, threads: int = 0,
               data=None, events=None) -> Dict:
    """Train (or resume) one run into ``path``, then write its ``result.json``; in a worker
    process ``threads`` sets torch's thread count and ``events`` receives one item per epoch."""
    if threads:
        torch.set_num_threads(threads)
    run = RunDir(Path(path))
    if data is None:
        data = load_dataset(cfg.data, cfg.data_dir, seed=data_seed)
    done = _epochs_done(run, cfg)
    if done != cfg.epochs:
        if progress:
            print(f"== {run.path.name}: {'resuming' if done is not None else 'training'} "
                  f"into {run.path}", flush=True)
        on_epoch = (lambda row: events.put(path)) if events is not None else None
        try:
            train(cfg, run.path, resume=done is not None, progress=progress, data=data,
                  on_epoch=on_epoch)
        except NonFiniteLoss as exc:  # a result of this config, not a failure of the command
            state = run.load(mmap=True)
            result = {"config": asdict(cfg), "history": state["history"], "operator": {},
                      "diverged": str(exc)}
            run.write_side(RESULT, result)
            if progress:
                print(f"== {run.path.name}: diverged: {exc}", file=sys.stderr, flush=True)
            return result
    state = run.load(mmap=True)
    history = state["history"]
    model = _trained_model(cfg, state, data.in_channels, data.num_classes)
    example = normalize(data.x_test[:1], data.mean, data.std)  # sets each conv's input size
    result = {"config": state["config"], "history": history,
              "operator": operator_sigma_ranges(model, example)}
    run.write_side(RESULT, result)
    return result


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    progress: bool = True,
    jobs: int = 1,
    baseline: Optional[str] = None,
    runs_dir: Optional[Path] = None,
) -> Dict:
    """Train ``base`` with every method and seed into ``out``; return (and write) the summary.

    ``methods`` are specs for :func:`parse_method`; ``jobs`` runs that many trainings at once
    in worker processes, each with ``max(1, torch.get_num_threads() // jobs)`` threads;
    ``baseline`` (default: ``sgd`` if listed, else the first method) is what every other method
    is compared with. ``runs_dir`` (default: ``out``) holds the run folders, so that several
    comparisons of one base config can share runs (a run is reused only when its config is
    identical).
    """
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    specs = [parse_method(m) for m in methods]
    labels = _unique([s.label for s in specs], "--methods")
    by_label = {s.label: s for s in specs}
    seeds = _unique(list(seeds), "--seeds")
    if baseline is None:
        baseline = "sgd" if "sgd" in labels else labels[0]
    else:
        baseline = parse_method(baseline).label
        if baseline not in labels:
            raise ValueError(f"--baseline {baseline!r} is not among --methods ({', '.join(labels)})")
    configs = {(lab, s): by_label[lab].config(base, s) for lab in labels for s in seeds}
    for cfg in configs.values():  # every run's config is valid before anything is written
        cfg.validate()
    out = make_output_dir(Path(out))
    runs_root = out if runs_dir is None else make_output_dir(Path(runs_dir), "--runs")
    paths = {key: runs_root / f"{by_label[key[0]].dirname}-seed{key[1]}" for key in configs}
    results: Dict[Tuple[str, int], Dict] = {}
    todo = []
    for key, cfg in configs.items():
        res = _finished_result(RunDir(paths[key]), cfg)
        if res is not None:
            results[key] = res
        else:
            _epochs_done(RunDir(paths[key]), cfg)  # refuse another configuration before training
            todo.append(key)
    if todo and (jobs == 1 or len(todo) == 1):
        data = load_dataset(base.data, base.data_dir, seed=base.seed)
        for key in todo:
            results[key] = _train_one(configs[key], str(paths[key]), base.seed, progress, data=data)
    elif todo:
        results.update(_train_parallel(configs, paths, todo, base.seed, jobs, progress))

    runs: Dict[str, List[Dict]] = {}
    for (label, seed) in configs:
        res = results[(label, seed)]
        history = res["history"]
        runs.setdefault(label, []).append({
            "seed": seed,
            "run_dir": str(paths[(label, seed)]),
            "diverged": res.get("diverged"),
            "test_error": [r["test_error"] for r in history],
            "train_error": [1.0 - r["train_accuracy"] for r in history],
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            "reshaped": history[-1]["sigma_reshaped"] if history else {},
            "operator": res["operator"],
        })

    summary = {"config": asdict(base), "methods": labels, "seeds": seeds, "baseline": baseline,
               "jobs": jobs, "environment": environment(), "results": {}}

    def finals(label: str) -> List[float]:
        return [r["test_error"][-1] for r in runs[label] if not r["diverged"]]

    base_errors = finals(baseline)
    for label, all_rows in runs.items():
        rows = [r for r in all_rows if not r["diverged"]]
        errors = finals(label)
        vs = None
        if label != baseline and len(errors) > 1 and len(base_errors) > 1:
            vs = welch(errors, base_errors)
        summary["results"][label] = {
            "method": by_label[label].method,
            "overrides": dict(by_label[label].overrides),
            "diverged": len(all_rows) - len(rows),
            "final_test_error": _mean_std(errors) if errors else None,
            "vs_baseline": vs,
            "train_time_s": _mean_std([r["train_time_s"] for r in rows]) if rows else None,
            # Over layers and the finished seeds: the smallest minimum and the largest maximum.
            "reshaped_sigma": [min(v[0] for r in rows for v in r["reshaped"].values()),
                               max(v[1] for r in rows for v in r["reshaped"].values())]
            if rows else None,
            "operator_sigma": [min(v[0] for r in rows for v in r["operator"].values()),
                               max(v[1] for r in rows for v in r["operator"].values())]
            if rows else None,
            "runs": all_rows,
        }
    write_json(out / "summary.json", summary)
    table = format_table(summary)
    (out / "summary.md").write_text(table + "\n")
    plot_comparison(summary, out / "curves.png")
    return summary


def _outcome(result: Dict) -> str:
    """One run's result in words: its final test error, or that it diverged."""
    if result.get("diverged"):
        return f"diverged after {len(result['history'])} completed epochs"
    return f"test error {100 * result['history'][-1]['test_error']:.2f}%"


def _train_parallel(configs, paths, todo, data_seed: int, jobs: int, progress: bool) -> Dict:
    """Run the ``todo`` trainings ``jobs`` at a time in spawned worker processes, with one
    progress bar over all their epochs."""
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, torch.get_num_threads() // jobs)
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    events = manager.Queue()
    remaining = {key: configs[key].epochs - (_epochs_done(RunDir(paths[key]), configs[key]) or 0)
                 for key in todo}
    results: Dict = {}
    try:
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool, \
                progress_bar(sum(remaining.values()),
                             f"{len(todo)} runs, {min(jobs, len(todo))} at a time (epochs)",
                             enabled=progress) as bar:
            futures = {pool.submit(_train_one, configs[key], str(paths[key]), data_seed, False,
                                   threads, None, events): key for key in todo}
            pending = set(futures)
            try:
                while pending:
                    done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                    while True:
                        try:
                            events.get_nowait()
                        except queue_module.Empty:
                            break
                        bar.update(1)
                    for fut in done:
                        key = futures[fut]
                        results[key] = fut.result()  # a worker's error is raised here
                        if progress:
                            print(f"finished {paths[key].name}: {_outcome(results[key])}",
                                  file=sys.stderr, flush=True)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        manager.shutdown()
    return results


def _fmt_vs(vs: Optional[Dict]) -> Tuple[str, str]:
    if vs is None:
        return "-", "-"
    d, lo, hi = 100 * vs["difference"], 100 * vs["ci_low"], 100 * vs["ci_high"]
    p = vs["p_value"]
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]", (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def format_table(summary: Dict) -> str:
    """The summary as a markdown table (one row per method; differences from the baseline in
    percentage points, negative = fewer errors than the baseline)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for method, res in summary["results"].items():
        err, t = res["final_test_error"], res["train_time_s"]
        rs, op = res["reshaped_sigma"], res["operator_sigma"]
        vs, p = _fmt_vs(res.get("vs_baseline"))
        if method == summary.get("baseline"):
            vs, p = "(baseline)", "-"
        n = len(res["runs"])
        seeds = f"{n - res['diverged']} ({res['diverged']} diverged)" if res.get("diverged") else f"{n}"
        err_text = f"{100 * err['mean']:.2f} +/- {100 * err['std']:.2f}" if err else "diverged"
        t_text = f"{t['mean']:.0f} +/- {t['std']:.0f}" if t else "-"
        rs_text = f"[{rs[0]:.3g}, {rs[1]:.3g}]" if rs else "-"
        op_text = f"[{op[0]:.2g}, {op[1]:.3g}]" if op else "-"
        lines.append(f"| {method} | {seeds} | {err_text} | {vs} | {p} | {t_text} | {rs_text} "
                     f"| {op_text} |")
    return "\n".join(lines)


def plot_comparison(summary: Dict, path: Path) -> None:
    """Training error and test error per epoch (two panels, as Jia et al.'s Figure 2), mean +/-
    std over seeds, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, res) in enumerate(summary["results"].items()):
        for ax, key in zip(axes, ("train_error", "test_error")):
            rows = [r[key] for r in res["runs"] if key in r and not r.get("diverged")]
            if not rows:
                continue
            curves = torch.tensor(rows, dtype=torch.float64) * 100
            mean = curves.mean(0)
            std = curves.std(0, unbiased=True) if curves.shape[0] > 1 else torch.zeros_like(mean)
            epochs = list(range(1, mean.numel() + 1))
            c = colours[i % len(colours)]
            ax.plot(epochs, mean, marker="o", ms=3, color=c,
                    label=f"{method} ({curves.shape[0]} seeds)")
            ax.fill_between(epochs, mean - std, mean + std, color=c, alpha=0.15)
    cfg = summary["config"]
    subset = f"{cfg['n_train']} training images" if cfg.get("n_train") else "full training set"
    for ax, what in zip(axes, ("training error (running, during the epoch)", "test error")):
        ax.set_title(f"{what}", fontsize=10)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{cfg['model']} on {cfg['data']} ({subset}), {cfg['epochs']} epochs: "
                 "mean +/- std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
