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
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._provenance import environment
from ..report import LayerSpectrum, spectrum_report


def build_named_model(name: str, in_channels: int, seed: int = 0):
    """The registry model ``name`` (``convnet-20``, ``preact-resnet-68``, ``wrn-28-10``) with
    the orthogonal initialisation of ``convspec train`` and ``seed``; ``ValueError`` for a bad
    name."""
    from ..init import orthogonal_
    from ..train.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=in_channels)
    orthogonal_(model, generator=torch.Generator().manual_seed(seed))
    return model


#: ``package.module:factory`` (the attribute may be dotted: ``module:Class.create``).
FACTORY_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class FactoryError(ValueError):
    """A ``package.module:factory`` path that does not give a model; the message says why."""


def is_factory_path(text: str) -> bool:
    return FACTORY_PATH.match(text) is not None


def model_from_factory(path: str, seed: int = 0) -> nn.Module:
    """Import ``package.module``, call its ``factory`` with no arguments (after
    ``torch.manual_seed(seed)``) and return the ``nn.Module`` it builds.

    Modules in the current directory are found, as with ``python -m``: ``mymodels:net`` finds
    ``./mymodels.py``. Every failure (the import, a missing or non-callable attribute, the call,
    a result that is not an ``nn.Module``) is a one-line :class:`FactoryError`.
    """
    import importlib
    import sys

    from ..train.rundir import one_line

    module_name, _, attr = path.partition(":")
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while it is imported
        what = f"no module named {exc.name!r}" if isinstance(exc, ModuleNotFoundError) \
            else f"{type(exc).__name__}: {one_line(exc)}"
        raise FactoryError(f"{path}: cannot import {module_name}: {what}") from None
    finally:
        if added:
            sys.path.remove("")
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FactoryError(f"{path}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise FactoryError(f"{path}: {attr} is a {type(obj).__name__}, not a callable that "
                           "builds a model")
    torch.manual_seed(seed)
    try:
        model = obj()
    except Exception as exc:  # and the user's factory anything while it builds
        raise FactoryError(f"{path}: calling {attr}() with no arguments failed: "
                           f"{type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{path}: {attr}() returned a {type(model).__name__}, not a "
                           "torch.nn.Module")
    return model


def load_checkpoint_model(path: Path, in_channels: int):
    """The model of a ``convspec train`` checkpoint (``{"model": state_dict, "config": ...}``),
    read as the run directory's owner reads it (tensors and plain data only; configs of the old
    model naming are read too)."""
    from ..train.models import build_model
    from ..train.rundir import RunDirError, load_checkpoint

    ckpt = load_checkpoint(Path(path))
    cfg, state = ckpt["config"], ckpt["model"]
    if "model" not in cfg:
        raise RunDirError(f"{path}: its config has no model")
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    num_classes = int(linear[-1].shape[0]) if linear else 10
    try:
        model = build_model(cfg["model"], num_classes, in_channels)
    except ValueError as exc:
        raise RunDirError(f"{path}: {exc}") from None
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
            f"{'x'.join(map(str, r.input_size))} | {r.stride[0]} | {r.groups} | "
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
                     f"input {'x'.join(map(str, r.input_size))})", fontsize=9)
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
