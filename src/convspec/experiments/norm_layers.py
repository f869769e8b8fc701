"""Record: the true operator norm of layers that are meant to be normalised.

``convspec reproduce norm-layers --out records/norm_layers``. For a few convolutions (shape,
padding, stride, input size) and several seeds, each normalisation is applied to a freshly
initialised layer, its power iteration (if any) is run to convergence by training-mode forward
passes, and the exact ``sigma_max`` and ``sigma_min`` of the operator ``M`` the layer then
applies are computed (:func:`convspec.conv_singular_values`, certified; FFT for circular
padding), with the reshaped kernel's ``sigma_max`` (what ``spectral_norm`` normalises):

* ``torch spectral_norm``: ``torch.nn.utils.parametrizations.spectral_norm``;
* ``torch orthogonal``: ``torch.nn.utils.parametrizations.orthogonal`` (on a conv weight it
  makes the trailing ``k x k`` matrices orthogonal);
* ``convspec estimate`` / ``convspec certified``: :func:`convspec.operator_spectral_norm`;
* ``deel-torchlip SpectralConv2d``: when the package ``deel-torchlip`` is installed (an
  optional dependency of this record only: ``pip install --no-deps deel-torchlip``; its only
  requirements are numpy and torch), 2-D zero-padded layers only.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .._progress import progress_bar
from .._provenance import environment
from ..parametrizations import operator_spectral_norm
from ..report import reshaped_values
from ..spectrum import conv_singular_values

#: (label, factory, spatial input size)
LAYERS = [
    ("Conv2d 16->16, 3x3, zeros", lambda: nn.Conv2d(16, 16, 3, padding=1), (16, 16)),
    ("Conv2d 32->32, 3x3, zeros", lambda: nn.Conv2d(32, 32, 3, padding=1), (32, 32)),
    ("Conv2d 16->32, 3x3, stride 2, zeros",
     lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (16, 16)),
    ("Conv2d 16->16, 3x3, circular",
     lambda: nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), (16, 16)),
    ("Conv1d 16->16, k=5, zeros", lambda: nn.Conv1d(16, 16, 5, padding=2), (64,)),
]
SEEDS = (0, 1, 2)
#: Training-mode forward passes that let each power iteration converge.
FORWARDS = 100


def _deel():
    try:
        from deel import torchlip  # noqa: F401
    except ImportError:
        return None
    return torchlip


def methods() -> Dict[str, Callable[[nn.Module], Optional[nn.Module]]]:
    out = {
        "none (default init)": lambda m: m,
        "torch spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m),
        "torch orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m),
        "convspec estimate": lambda m: operator_spectral_norm(m, n_power_iterations=1),
        "convspec certified": lambda m: operator_spectral_norm(m, bound="certified"),
    }
    lip = _deel()
    if lip is not None:
        def deel(m):
            if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros" or m.stride != (1, 1):
                return None
            layer = lip.SpectralConv2d(m.in_channels, m.out_channels, m.kernel_size,
                                       padding=m.padding)
            return layer
        out["deel-torchlip SpectralConv2d"] = deel
    return out


def measure(layer: nn.Module, size) -> Dict[str, float]:
    x = torch.randn(4, layer.in_channels, *size)
    layer.train()
    with torch.no_grad():
        for _ in range(FORWARDS):
            layer(x)
    layer.eval()
    w = layer.weight.detach().double()
    spec = conv_singular_values(layer, size, which="extremes", progress=False)
    groups = getattr(layer, "groups", 1)
    return {"sigma_max": spec.sigma_max, "sigma_min": spec.sigma_min,
            "converged": bool(spec.converged), "method": spec.method,
            "reshaped_sigma_max": float(reshaped_values(w, groups)[0])}


def main(out: Path, *, seeds=SEEDS, layers=LAYERS, progress: bool = True) -> Dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    names = methods()
    record = {"experiment": "norm-layers", "seeds": list(seeds), "forwards": FORWARDS,
              "deel_torchlip": _deel() is not None, "environment": environment(), "rows": []}
    total = len(layers) * len(names) * len(seeds)
    with progress_bar(total, "norm-layers", enabled=progress) as bar:
        for label, make, size in layers:
            for name, apply in names.items():
                runs: List[Dict] = []
                for seed in seeds:
                    torch.manual_seed(seed)
                    layer = apply(make())
                    bar.update(1)
                    if layer is None:
                        continue
                    runs.append(measure(layer, size))
                if not runs:
                    continue
                row = {"layer": label, "input_size": list(size), "method": name,
                       "n": len(runs), "converged": all(r["converged"] for r in runs),
                       "route": runs[0]["method"]}
                for key in ("sigma_max", "sigma_min", "reshaped_sigma_max"):
                    vals = [r[key] for r in runs]
                    row[key] = statistics.fmean(vals)
                    row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    row[key + "_all"] = vals
                record["rows"].append(row)
    record["seconds"] = time.time() - t0
    (out / "norm_layers.json").write_text(json.dumps(record, indent=1))
    (out / "norm_layers.md").write_text(format_table(record) + "\n")
    plot(record, out / "norm_layers.png")
    return record


def format_table(record: Dict) -> str:
    lines = ["| layer (input) | normalisation | operator sigma_max | operator sigma_min | "
             "reshaped sigma_max |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        size = "x".join(map(str, r["input_size"]))
        lines.append(
            f"| {r['layer']} ({size}) | {r['method']} | {r['sigma_max']:.4g} +/- "
            f"{r['sigma_max_std']:.2g} | {r['sigma_min']:.3g} | {r['reshaped_sigma_max']:.4g} |")
    return "\n".join(lines) + (f"\n\nmean +/- std over seeds {record['seeds']}; exact operator "
                               "values (certified to relative 1e-6)")


def plot(record: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in record["rows"]))
    meths = list(dict.fromkeys(r["method"] for r in record["rows"]))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(meths)
    for j, m in enumerate(meths):
        xs, ys, es = [], [], []
        for i, layer in enumerate(layers):
            for r in record["rows"]:
                if r["layer"] == layer and r["method"] == m:
                    xs.append(i + (j - (len(meths) - 1) / 2) * width)
                    ys.append(r["sigma_max"])
                    es.append(r["sigma_max_std"])
        ax.bar(xs, ys, width, yerr=es, label=m)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="operator norm 1 (the target)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"{l}\n({'x'.join(map(str, r['input_size']))})" for l in layers
                        for r in [next(x for x in record["rows"] if x["layer"] == l)]],
                       fontsize=7)
    ax.set_ylabel("true operator sigma_max (log scale)")
    ax.set_title("Operator norm of normalised layers (mean +/- std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
