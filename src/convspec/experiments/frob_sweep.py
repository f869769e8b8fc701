"""What the Frobenius weight does: a sweep of the penalty weight ``lambda`` in
``loss + lambda * sum_layers R_alpha(K) / (g N^2)`` (Guo, 2019, the penalty added to the training
loss; :class:`~convspec.regularizer.FrobeniusRegularizer` with ``normalize=True``).

The sweep is a :func:`~convspec.experiments.compare.compare` of ``sgd`` (weight 0) and
``frobenius:frob_weight=W`` for each weight, over seeds. On top of the comparison's table it
records, per weight, the exact operator ``sigma_max`` and ``sigma_min`` of every conv layer at the
input size it sees (mean over seeds), and recommends a weight by a rule fixed before the runs:

    the largest weight whose final test error is not significantly above SGD's (Welch's t-test,
    two-sided p >= 0.05, or a mean error not above SGD's), and none of whose runs diverged.

That is the strongest conditioning of the operators that costs no measurable accuracy. Writes
``OUT/frob_sweep.json``, ``OUT/frob_sweep.md`` and ``OUT/frob_sweep.png`` beside the comparison's
``summary.*`` and ``curves.png``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..train.config import TrainConfig
from ..train.rundir import write_json
from .compare import compare

#: Default weights: from "no measurable effect" to "over-regularised".
WEIGHTS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Significance level of the recommendation rule.
ALPHA_LEVEL = 0.05


def method_of(weight: float) -> str:
    """The compare method spec of one weight (0: plain SGD)."""
    return "sgd" if weight == 0 else f"frobenius:frob_weight={float(weight)!r}"


def _layers(summary: Dict, label: str) -> Dict[str, List[float]]:
    """Per layer, [mean sigma_min, mean sigma_max] of the operator over the finished seeds."""
    rows = [r for r in summary["results"][label]["runs"] if not r.get("diverged")]
    if not rows:
        return {}
    names = list(rows[0]["operator"])
    return {n: [statistics.fmean(r["operator"][n][0] for r in rows),
                statistics.fmean(r["operator"][n][1] for r in rows)] for n in names}


def analyse(summary: Dict, weights: Sequence[float]) -> Dict:
    """Per weight: test error, the comparison with SGD, per-layer operator extremes; and the
    recommended weight with the reason."""
    entries = []
    for w in [0.0, *weights]:
        label = method_of(w)
        res = summary["results"][label]
        layers = _layers(summary, label)
        entry = {"weight": w, "method": label, "diverged": res["diverged"],
                 "seeds": len(res["runs"]), "test_error": res["final_test_error"],
                 "vs_sgd": res["vs_baseline"], "layers": layers}
        if layers:
            entry["max_sigma_max"] = max(v[1] for v in layers.values())
            entry["min_sigma_min"] = min(v[0] for v in layers.values())
            entry["median_condition"] = statistics.median(
                v[1] / v[0] if v[0] > 0 else math.inf for v in layers.values())
        entries.append(entry)

    def acceptable(e: Dict) -> bool:
        if e["weight"] == 0 or e["diverged"] or e["test_error"] is None:
            return False
        vs = e["vs_sgd"]
        return vs is None or vs["difference"] <= 0 or vs["p_value"] >= ALPHA_LEVEL

    ok = [e for e in entries if acceptable(e)]
    if ok:
        best = max(ok, key=lambda e: e["weight"])
        reason = (f"the largest weight whose test error is not significantly above SGD's "
                  f"(p >= {ALPHA_LEVEL} or lower error) and with no diverged run")
    else:
        best = min((e for e in entries if e["weight"] > 0), key=lambda e: e["weight"])
        reason = "no weight matched SGD's test error; the smallest weight is the least harmful"
    return {"entries": entries, "recommended": best["weight"], "reason": reason,
            "rule": __doc__.split("recommends a weight by a rule fixed before the runs:")[1]
            .split("That is")[0].strip().replace("\n    ", " ")}


def format_table(analysis: Dict) -> str:
    head = ("weight", "seeds", "test error (%)", "vs SGD (pp) [95% CI]", "p (Welch)",
            "max sigma_max", "min sigma_min", "median cond.")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in analysis["entries"]:
        err = e["test_error"]
        err_t = f"{100 * err['mean']:.2f} +/- {100 * err['std']:.2f}" if err else "diverged"
        vs = e["vs_sgd"]
        if e["weight"] == 0:
            vs_t, p_t = "(SGD)", "-"
        elif vs is None:
            vs_t, p_t = "-", "-"
        else:
            vs_t = (f"{100 * vs['difference']:+.2f} [{100 * vs['ci_low']:+.2f}, "
                    f"{100 * vs['ci_high']:+.2f}]")
            p_t = f"{vs['p_value']:.3f}" if vs["p_value"] >= 1e-3 else f"{vs['p_value']:.1e}"
        seeds = f"{e['seeds'] - e['diverged']} ({e['diverged']} diverged)" if e["diverged"] \
            else str(e["seeds"])
        mark = " (recommended)" if e["weight"] == analysis["recommended"] else ""
        extra = [f"{e[k]:.3g}" if k in e else "-" for k in
                 ("max_sigma_max", "min_sigma_min", "median_condition")]
        lines.append(f"| {e['weight']:g}{mark} | {seeds} | {err_t} | {vs_t} | {p_t} | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines)


def plot(analysis: Dict, summary: Dict, path: Path) -> None:
    """Test error against the weight, and the per-layer operator sigma_max / sigma_min."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    entries = analysis["entries"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    sgd = entries[0]["test_error"]
    if sgd:
        ax.axhspan(100 * (sgd["mean"] - sgd["std"]), 100 * (sgd["mean"] + sgd["std"]),
                   color="gray", alpha=0.2)
        ax.axhline(100 * sgd["mean"], color="gray", ls="--", label="SGD (weight 0), mean +/- std")
    pts = [e for e in entries if e["weight"] > 0 and e["test_error"]]
    ax.errorbar([e["weight"] for e in pts], [100 * e["test_error"]["mean"] for e in pts],
                yerr=[100 * e["test_error"]["std"] for e in pts], marker="o", capsize=3,
                color="tab:green", label="Frobenius penalty, mean +/- std")
    ax.axvline(analysis["recommended"], color="tab:red", lw=0.8, ls=":", label="recommended")
    gone = [e for e in entries if e["weight"] > 0 and not e["test_error"]]
    for e in gone:
        ax.annotate(f"lambda = {e['weight']:g}: all {e['seeds']} runs diverged",
                    xy=(0.02, 0.02 + 0.06 * gone.index(e)), xycoords="axes fraction", fontsize=8,
                    color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("penalty weight lambda (log scale)")
    ax.set_ylabel("final test error (%)")
    ax.set_title("test error against the penalty weight", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for k, (idx, title) in enumerate(((1, "sigma_max"), (0, "sigma_min"))):  # [min, max] pairs
        ax = axes[1 + k]
        for i, e in enumerate(entries):
            if not e["layers"]:
                continue
            values = [v[idx] for v in e["layers"].values()]
            colour = "black" if e["weight"] == 0 else cmap(i / max(1, len(entries) - 1))
            ax.semilogy(range(len(values)), values, marker=".", color=colour,
                        label="SGD" if e["weight"] == 0 else f"lambda = {e['weight']:g}")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("conv layer (input to output)")
        ax.set_ylabel(f"operator {title} (log scale)")
        ax.set_title(f"exact operator {title} per layer, mean over seeds", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    cfg = summary["config"]
    subset = f"{cfg['n_train']} training images" if cfg.get("n_train") else "full training set"
    fig.suptitle(f"Frobenius penalty weight sweep: {cfg['model']} on {cfg['data']} ({subset}, "
                 f"{cfg['epochs']} epochs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(base: TrainConfig, out: Path, *, weights: Sequence[float] = WEIGHTS,
         seeds: Sequence[int] = (0, 1, 2), jobs: int = 1, runs_dir: Optional[Path] = None,
         progress: bool = True) -> Dict:
    """Run (or reuse) the sweep, write the analysis, print the table; return the analysis."""
    weights = sorted(set(float(w) for w in weights))
    if not weights or weights[0] <= 0:
        raise ValueError(f"--weights must be > 0 (weight 0 is the SGD run, always included), "
                         f"got {weights}")
    methods = ["sgd"] + [method_of(w) for w in weights]
    summary = compare(base, methods, seeds, out, progress=progress, jobs=jobs, baseline="sgd",
                      runs_dir=runs_dir)
    analysis = analyse(summary, weights)
    out = Path(out)
    write_json(out / "frob_sweep.json", {"config": summary["config"], "seeds": summary["seeds"],
                                         "environment": summary["environment"], **analysis})
    table = format_table(analysis)
    (out / "frob_sweep.md").write_text(table + f"\n\nRecommended weight: {analysis['recommended']:g} "
                                       f"({analysis['reason']}).\n")
    plot(analysis, summary, out / "frob_sweep.png")
    print(table)
    print(f"recommended weight: {analysis['recommended']:g} ({analysis['reason']})")
    print(f"wrote {out / 'frob_sweep.json'}, {out / 'frob_sweep.md'}, {out / 'frob_sweep.png'}")
    return analysis
