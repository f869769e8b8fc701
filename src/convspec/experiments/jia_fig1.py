"""Jia et al. (2017), Figure 1: normalised singular-value histograms of a lower, a middle and a
higher conv layer of a trained plain ConvNet, SGD against SVB.

Jia plot the singular values of each layer's *reshaped kernel* (``out x in*k*k``, what SVB bounds),
divided by the largest. Beside them this records what the layer actually does to its input: all
singular values of the exact convolution operator ``M`` (zero padding, the layer's stride, at the
input size the layer sees; :func:`convspec.conv_singular_values`, exact), also divided by the
largest. The trained models are the runs of record 2 (``convspec compare --config
configs/fmnist_convnet38.toml``): a run with a checkpoint is read, a missing one is trained first.
Writes ``OUT/jia_fig1.json`` (every singular value), ``OUT/jia_fig1.md`` and ``OUT/jia_fig1.png``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .._progress import progress_bar
from .._provenance import environment
from ..report import record_input_sizes
from ..report import reshaped_values
from ..spectrum import conv_singular_values
from ..train.config import TrainConfig
from ..train.data import load_dataset, normalize
from ..train.models import build_model
from ..train.rundir import RunDir, make_output_dir, write_json
from .compare import RESULT, _epochs_done, _finished_result, compare, parse_method

#: Where in the network: index into the list of the model's convolutions (in forward order).
POSITIONS = ("lower", "middle", "higher")


def pick_layers(convs: Sequence[str]) -> Dict[str, str]:
    """``{"lower", "middle", "higher"}`` -> conv name: the second conv (the first after the stem),
    the middle one and the last one.

    >>> pick_layers(["c0", "c1", "c2", "c3", "c4"])
    {'lower': 'c1', 'middle': 'c2', 'higher': 'c4'}
    """
    if len(convs) < 3:
        raise ValueError(f"jia-fig1 needs a model with at least 3 convolutions, got {len(convs)}")
    return {"lower": convs[1], "middle": convs[len(convs) // 2], "higher": convs[-1]}


def _input_sizes(model: nn.Module, example: torch.Tensor) -> Dict[str, tuple]:
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return record_input_sizes(model, example, convs)[0]


def layer_spectra(model: nn.Module, example: torch.Tensor, progress: bool = False) -> Dict:
    """Per picked layer: its shape, input size, and all singular values (descending) of the
    reshaped kernel and of the exact operator."""
    sizes = _input_sizes(model.eval(), example)
    modules = dict(model.named_modules())
    picked = pick_layers(list(sizes))
    out = {}
    with progress_bar(len(picked), "operator spectra", enabled=progress) as bar:
        for position, name in picked.items():
            conv = modules[name]
            op = conv_singular_values(conv, sizes[name], which="all", progress=False)
            out[position] = {
                "layer": name, "weight_shape": list(conv.weight.shape), "input_size": list(sizes[name]),
                "stride": list(conv.stride), "exact": bool(op.exact),
                "reshaped": reshaped_values(conv.weight, conv.groups).tolist(),
                "operator": op.values.tolist(),
            }
            bar.update(1)
    return out


def _stats(values: List[float]) -> Dict[str, float]:
    top = values[0]
    v = [x / top for x in values]
    return {"n": len(v), "sigma_max": top, "min_normalised": min(v),
            "median_normalised": statistics.median(v),
            "fraction_below_0.1": sum(x < 0.1 for x in v) / len(v)}


def main(base: TrainConfig, out: Path, *, methods: Sequence[str] = ("sgd", "svb:eps=0.05"),
         seed: int = 0, runs_dir: Optional[Path] = None, progress: bool = True) -> Dict:
    """Train (or reuse) ``base`` with each method at ``seed``, record and plot the spectra."""
    specs = [parse_method(m) for m in methods]
    out = make_output_dir(Path(out))
    runs_root = Path(runs_dir) if runs_dir is not None else out / "runs"
    def finished(s) -> bool:  # all epochs of exactly this config, and the weights to read
        run = RunDir(runs_root / f"{s.dirname}-seed{seed}")
        cfg = s.config(base, seed)
        return (run.has_checkpoint() and _epochs_done(run, cfg) == cfg.epochs
                and _finished_result(run, cfg) is not None)

    missing = [s.label for s in specs if not finished(s)]
    if missing:  # train or resume them (a result without a checkpoint is trained again)
        for s in specs:
            if s.label in missing:
                run = RunDir(runs_root / f"{s.dirname}-seed{seed}")
                if not run.has_checkpoint() and (run.path / RESULT).exists():
                    (run.path / RESULT).unlink()
        compare(base, [s.label for s in specs], [seed], out / "training", progress=progress,
                runs_dir=runs_root)
    data = load_dataset(base.data, base.data_dir, seed=base.seed)
    example = normalize(data.x_test[:1], data.mean, data.std)
    record = {"config": asdict(base), "seed": seed,
              "environment": environment(), "methods": {}}
    for s in specs:
        run = RunDir(runs_root / f"{s.dirname}-seed{seed}")
        state = run.load(mmap=True)
        model = build_model(base.model, data.num_classes, data.in_channels)
        model.load_state_dict(state["model"])
        spectra = layer_spectra(model, example, progress=progress)
        record["methods"][s.label] = {
            "run_dir": str(run.path), "test_error": state["history"][-1]["test_error"],
            "layers": spectra,
            "stats": {pos: {"reshaped": _stats(v["reshaped"]), "operator": _stats(v["operator"])}
                      for pos, v in spectra.items()},
        }
    write_json(out / "jia_fig1.json", record, indent=None)
    table = format_table(record)
    (out / "jia_fig1.md").write_text(table + "\n")
    plot(record, out / "jia_fig1.png")
    print(table)
    print(f"wrote {out / 'jia_fig1.json'}, {out / 'jia_fig1.md'}, {out / 'jia_fig1.png'}")
    return record


def format_table(record: Dict) -> str:
    head = ("layer", "method", "matrix", "values", "sigma_max", "median sigma/sigma_max",
            "min sigma/sigma_max", "share below 0.1")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pos in POSITIONS:
        for label, m in record["methods"].items():
            layer = m["layers"][pos]
            for kind in ("reshaped", "operator"):
                st = m["stats"][pos][kind]
                name = f"{pos}: {layer['layer']} {'x'.join(map(str, layer['weight_shape']))}"
                matrix = ("reshaped kernel" if kind == "reshaped" else
                          f"operator at {'x'.join(map(str, layer['input_size']))}")
                lines.append(f"| {name} | {label} | {matrix} | {st['n']} | {st['sigma_max']:.3g} "
                             f"| {st['median_normalised']:.3f} | {st['min_normalised']:.2e} "
                             f"| {100 * st['fraction_below_0.1']:.1f}% |")
    return "\n".join(lines)


def plot(record: Dict, path: Path) -> None:
    """3 x 2 panels: rows lower / middle / higher layer; columns reshaped kernel / operator;
    each panel the histograms of sigma / sigma_max for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 10))
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    bins = [i / 40 for i in range(41)]
    for row, pos in enumerate(POSITIONS):
        for col, kind in enumerate(("reshaped", "operator")):
            ax = axes[row, col]
            for i, (label, m) in enumerate(record["methods"].items()):
                values = m["layers"][pos][kind]
                v = [x / values[0] for x in values]
                weights = [1.0 / len(v)] * len(v)
                ax.hist(v, bins=bins, weights=weights, histtype="step", lw=1.6,
                        color=colours[i % len(colours)],
                        label=f"{label} ({len(v)} values, test error "
                        f"{100 * m['test_error']:.2f}%)")
            layer = next(iter(record["methods"].values()))["layers"][pos]
            shape = "x".join(map(str, layer["weight_shape"]))
            what = ("reshaped kernel (Jia)" if kind == "reshaped" else
                    f"exact operator at {'x'.join(map(str, layer['input_size']))} input")
            ax.set_title(f"{pos} layer {layer['layer']} ({shape}): {what}", fontsize=9)
            ax.set_xlabel("singular value / largest singular value")
            ax.set_ylabel("fraction of singular values")
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"Jia et al. Figure 1 on {cfg['model']}, {cfg['data']}, seed {record['seed']}: "
                 "normalised singular-value histograms", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
