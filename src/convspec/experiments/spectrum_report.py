"""``convspec spectrum``: table, JSON and plots of a model's per-layer spectra.

Figure 1 of Jia et al. (2017) shows histograms of singular values at lower, middle and higher
layers; :func:`plot_histograms` draws the same for the reshaped kernels, with the true operator's
spectrum beside it where it was computed. :func:`plot_extremes` draws sigma_max and sigma_min per
layer, reshaped kernel vs operator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._provenance import environment
from ..report import LayerSpectrum, spectrum_report

_NAME = re.compile(r"^(convnet|preact_resnet|wrn)-(\d+)(?:-(\d+))?$")


def parse_model_name(text: str) -> Optional[Tuple[str, int, int]]:
    """``'wrn-28-10'`` -> ``('wrn', 28, 10)``; ``None`` if ``text`` is not such a name."""
    m = _NAME.match(text)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3) or 1)


def build_named_model(name: str, depth: int, width: int, in_channels: int, seed: int = 0):
    """A registry model with the orthogonal initialisation of ``convspec train`` and ``seed``."""
    from ..init import orthogonal_
    from ..train.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, depth, width, num_classes=10, in_channels=in_channels)
    orthogonal_(model, generator=torch.Generator().manual_seed(seed))
    return model


def load_checkpoint_model(path: Path, in_channels: int):
    """The model of a ``convspec train`` checkpoint (``{"model": state_dict, "config": ...}``),
    read as the run directory's owner reads it (tensors and plain data only)."""
    from ..train.models import build_model
    from ..train.rundir import RunDirError, load_checkpoint

    ckpt = load_checkpoint(Path(path))
    cfg, state = ckpt["config"], ckpt["model"]
    missing = [k for k in ("model", "depth") if k not in cfg]
    if missing:
        raise RunDirError(f"{path}: its config has no {missing}")
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    num_classes = int(linear[-1].shape[0]) if linear else 10
    model = build_model(cfg["model"], cfg["depth"], cfg.get("width", 1), num_classes, in_channels)
    model.load_state_dict(state)
    return model


def format_table(rows: Sequence[LayerSpectrum]) -> str:
    """A markdown table: one line per convolution."""
    lines = [
        "| layer | weight | input | stride | groups | reshaped sigma_max / sigma_min "
        "| operator sigma_max / sigma_min | method |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = "n/a" if r.sigma_max is None else f"{r.sigma_max:.4g} / {r.sigma_min:.4g}"
        if r.sigma_max is not None and not r.exact and r.sigma_min_error is not None:
            # Not within tol: show the absolute accuracy that is guaranteed (ConvSpectrum).
            op += f" (not within tol: +{r.sigma_max_error:.1g} / -{r.sigma_min_error:.1g})"
        lines.append(
            f"| {r.name} | {'x'.join(map(str, r.weight_shape))} | "
            f"{r.input_size[0]}x{r.input_size[1]} | {r.stride[0]} | {r.groups} | "
            f"{r.reshaped_sigma_max:.4g} / {r.reshaped_sigma_min:.4g} | {op} | "
            f"{r.method or r.note} |"
        )
    return "\n".join(lines)


def _pick_layers(rows: Sequence[LayerSpectrum]) -> List[int]:
    n = len(rows)
    return sorted({0, n // 2, n - 1})


def plot_histograms(rows: Sequence[LayerSpectrum], path: Path) -> None:
    """Histograms of singular values at a lower, a middle and a higher layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _pick_layers(rows)
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.4), squeeze=False)
    for ax, i, where in zip(axes[0], picks, ("lower", "middle", "higher")[-len(picks):]):
        r = rows[i]
        series = [("reshaped kernel", r.reshaped_values)]
        if r.values is not None:
            series.append(("operator (exact)", r.values))
        allv = torch.cat([v for _, v in series]).tolist()
        if r.sigma_max is not None:
            allv += [r.sigma_max, r.sigma_min]
        lo, hi = min(allv), max(allv)
        pad = max(0.02 * (hi - lo), 0.05 * max(hi, 1e-12))  # orthogonal kernels: all values 1
        bins = np.linspace(max(lo - pad, 0.0), hi + pad, 61)
        for label, v in series:
            # Fractions, not densities: a reshaped spectrum of equal values is one bar, not a spike.
            ax.hist(v.numpy(), bins=bins, weights=np.full(v.numel(), 1.0 / v.numel()),
                    alpha=0.6, label=f"{label} ({v.numel()} values)")
        if r.values is None and r.sigma_max is not None:
            for v in (r.sigma_max, r.sigma_min):
                ax.axvline(v, color="C1", ls="--")
            ax.plot([], [], color="C1", ls="--", label="operator sigma_max / sigma_min")
        ax.set_yscale("log")
        ax.set_ylim(top=1.5)
        ax.set_title(f"{where}: {r.name} ({'x'.join(map(str, r.weight_shape))}, "
                     f"input {r.input_size[0]}x{r.input_size[1]})", fontsize=9)
        ax.set_xlabel("singular value")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of singular values")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_extremes(rows: Sequence[LayerSpectrum], path: Path) -> None:
    """sigma_max and sigma_min per layer, reshaped kernel vs operator (PNG, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4))
    ax.plot(x, [r.reshaped_sigma_max for r in rows], "o-", color="C0", label="reshaped sigma_max")
    ax.plot(x, [r.reshaped_sigma_min for r in rows], "o--", color="C0", label="reshaped sigma_min")
    ops = [(i, r) for i, r in enumerate(rows) if r.sigma_max is not None]
    ax.plot([i for i, _ in ops], [r.sigma_max for _, r in ops], "s-", color="C1",
            label="operator sigma_max")
    ax.plot([i for i, _ in ops], [max(r.sigma_min, 1e-300) for _, r in ops], "s--", color="C1",
            label="operator sigma_min")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("singular value")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(model, input_size: Tuple[int, int, int], out: Path, *, source: str, tol: float = 1e-6,
         progress: bool = True) -> List[LayerSpectrum]:
    """Report, print the table, write ``spectrum.json`` and the two PNGs under ``out``."""
    from ..train.rundir import make_output_dir

    make_output_dir(out)  # a bad --out fails before the spectra are computed
    example = torch.zeros(1, *input_size)
    rows = spectrum_report(model, example, tol=tol, progress=progress)
    record = {
        "source": source, "input_size": list(input_size), "tol": tol,
        "layers": [r.as_dict(with_values=True) for r in rows], "environment": environment(),
    }
    (out / "spectrum.json").write_text(json.dumps(record, indent=1))
    plot_histograms(rows, out / "spectrum_histograms.png")
    plot_extremes(rows, out / "spectrum_extremes.png")
    print(format_table(rows))
    print(f"wrote {out / 'spectrum.json'}, {out / 'spectrum_histograms.png'}, "
          f"{out / 'spectrum_extremes.png'}")
    return rows
