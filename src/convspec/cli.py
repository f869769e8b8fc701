"""The ``convspec`` command line."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import List, Optional


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _show(value) -> str:
    """A default as the help text shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``convspec`` parser. Every option has a help text, and every option that takes a value
    shows its default (tests/test_cli_help.py walks the parsers to check it)."""
    from . import __version__
    from .descent import STEP_RULES
    from .experiments.guo_fig41 import INITS

    parser = argparse.ArgumentParser(
        prog="convspec",
        description="Exact control of the singular values of convolutional layers.",
    )
    parser.add_argument("--version", action="version", version=f"convspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rep = sub.add_parser("reproduce", help="reproduce a figure or table of a paper",
                         description="Reproduce a figure or table of a paper.")
    rep_sub = rep.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    rep_sub.required = True
    fig = rep_sub.add_parser(
        "guo-fig41",
        help="Guo (2019) Figure 4.1: Algorithm 3.1 on four random 3x3 kernels",
        description="Run Algorithm 3.1 (gradient descent on the exact Frobenius penalty) on "
        "random 3x3x3x1, 3x3x1x3, 3x3x3x6 and 3x3x6x3 kernels (k x k x g x h) and record the "
        "exact sigma_max and sigma_min of the convolution operator at every iteration.",
    )
    fig.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                     help="output folder (default: %(default)s)")
    fig.add_argument("--steps", type=_positive_int, default=300,
                     help="iterations (default: %(default)s)")
    fig.add_argument("--size", type=_positive_int, default=20,
                     help="input size N, at most 48 (default: %(default)s)")
    fig.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    fig.add_argument("--init", choices=INITS, default="normal",
                     help="distribution of the kernel entries (default: %(default)s)")
    fig.add_argument("--step-rule", choices=STEP_RULES, default="paper",
                     help="paper: the paper's steps 1e-5, 1e-4, 1e-3 (tied to N = 20); armijo: "
                     "backtracking line search; constant: --lr (default: %(default)s)")
    fig.add_argument("--lr", type=_positive_float, default=1e-3,
                     help="step of --step-rule constant (default: %(default)g)")
    fig.add_argument("--alpha", type=_positive_float, default=1.0,
                     help="target alpha of ||M^T M - alpha I||_F^2 (default: %(default)g)")
    fig.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_guo_2norm_parser(rep_sub)
    _add_frob_sweep_parser(rep_sub)
    _add_jia_fig1_parser(rep_sub)
    _add_norm_layers_parser(rep_sub)
    _add_train_parser(sub)
    _add_compare_parser(sub)
    _add_plot_parser(sub)
    _add_spectrum_parser(sub)
    _add_lipschitz_parser(sub)
    return parser


def _kernel_shape(text: str):
    """``'3x3x16x16'`` -> ``(3, 3, 16, 16)``: k1 x k2 x g x h, odd k1 and k2."""
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise argparse.ArgumentTypeError(
            f"expected k1xk2xgxh with odd k1, k2 (e.g. 3x3x16x16), got {text!r}")
    return shape


def _add_frob_sweep_parser(rep_sub) -> None:
    from .experiments.frob_sweep import WEIGHTS

    fs = rep_sub.add_parser(
        "frob-sweep",
        help="what the Frobenius weight does: a sweep of the penalty weight against SGD",
        description="Train SGD (weight 0) and the Frobenius penalty at each --weights over "
        "--seeds (a 'convspec compare' of sgd and frobenius:frob_weight=W; finished runs are "
        "reused), then record per weight the test error against SGD (Welch's t-test, 95%% CI) "
        "and the exact operator sigma_max / sigma_min of every conv layer, and recommend the "
        "largest weight whose test error is not significantly above SGD's. Writes "
        "OUT/frob_sweep.json, .md, .png beside the comparison's summary.*.",
    )
    fs.add_argument("--weights", nargs="+", type=_positive_float, default=None, metavar="W",
                    help="penalty weights (default: the config file's frobenius methods, else "
                    f"{_show(list(WEIGHTS))})")
    fs.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                    help="seeds (default: the config file's [compare] seeds, else [0, 1, 2])")
    fs.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                    help="trainings run at once (default: the config file's [compare] jobs, "
                    "else 1)")
    fs.add_argument("--runs", type=Path, default=None, metavar="DIR",
                    help="folder of the run folders (default: the config file's [compare] runs, "
                    "else OUT)")
    _add_config_arguments(fs, compare=True)


def _add_jia_fig1_parser(rep_sub) -> None:
    jf = rep_sub.add_parser(
        "jia-fig1",
        help="Jia et al. (2017) Figure 1: singular-value histograms of trained layers, SGD vs SVB",
        description="Normalised singular-value histograms (sigma / sigma_max) of a lower, a middle "
        "and a higher conv layer of the trained model, one run per --methods at --seed: of the "
        "reshaped kernels (as Jia et al.) and of the exact convolution operators at the input "
        "size each layer sees. Runs with a checkpoint in the runs folder are read (e.g. those of "
        "'convspec compare --config configs/fmnist_convnet38.toml'); missing ones are trained. "
        "Writes OUT/jia_fig1.json, .md and .png.",
    )
    jf.add_argument("--methods", nargs="+", default=["sgd", "svb:eps=0.05"], metavar="METHOD",
                    help="methods to compare, as for compare (default: sgd svb:eps=0.05)")
    jf.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    jf.add_argument("--runs", type=Path, default=None, metavar="DIR",
                    help="folder of the run folders (default: the config file's [compare] runs, "
                    "else OUT/runs)")
    _add_config_arguments(jf, compare=True)


def _add_norm_layers_parser(rep_sub) -> None:
    nl = rep_sub.add_parser(
        "norm-layers",
        help="true operator norms of layers under spectral_norm, orthogonal and "
        "operator_spectral_norm",
        description="For a few convolutions and seeds: apply PyTorch's spectral_norm and "
        "orthogonal, convspec's operator_spectral_norm (estimate and certified) and, when "
        "installed, deel-torchlip's SpectralConv2d; converge their power iterations; record the "
        "exact operator sigma_max and sigma_min of each layer. Writes OUT/norm_layers.json, .md "
        "and .png.",
    )
    nl.add_argument("--out", type=Path, default=Path("records/norm_layers"), metavar="DIR",
                    help="output folder (default: %(default)s)")
    nl.add_argument("--quick", action="store_true",
                    help="one seed and small layers, for a smoke run")
    nl.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_guo_2norm_parser(rep_sub) -> None:
    from .experiments.guo_2norm import Guo2NormConfig, QUICK
    from .experiments.guo_fig41 import INITS

    d = Guo2NormConfig()
    g2 = rep_sub.add_parser(
        "guo-2norm",
        help="Guo (2019) vs Guo & Ye: Frobenius vs 2-norm penalty descent, iterations to target",
        description="Gradient descent on the exact Frobenius penalty ||M^T M - alpha I||_F^2 "
        "(Algorithm 3.1) against gradient descent on the 2-norm penalty ||M^T M - alpha I||_2, "
        "from the same random kernels: iterations and wall time until sigma_max <= 1.05 and "
        "sigma_min >= 0.9, and the exact sigma_max, sigma_min after --budget iterations. Each "
        "method uses, per kernel, the best of --rules on --search-seeds. Finished runs are "
        "appended to DIR/runs.jsonl and reused when the command is run again; writes "
        "DIR/guo_2norm.json, DIR/guo_2norm.md and DIR/guo_2norm.png.",
    )

    def q(name):
        value = QUICK[name]
        return f"{_show(value)} with --quick"

    g2.add_argument("--out", type=Path, default=Path("out/guo_2norm"), metavar="DIR",
                    help="output folder (default: %(default)s)")
    g2.add_argument("--quick", action="store_true",
                    help="a small version for a first look (about 15 s on 2 cores): the four kernels "
                    "of Figure 4.1, fewer seeds, rules and iterations; flags still override it")
    g2.add_argument("--shapes", type=_kernel_shape, nargs="+", metavar="KxKxGxH",
                    help="kernels, k x k x g x h as in the paper (default: "
                    f"{' '.join('x'.join(map(str, s)) for s in d.shapes)}; the first four with "
                    "--quick)")
    g2.add_argument("--inits", nargs="+", choices=INITS, metavar="INIT",
                    help=f"kernel distributions, from {', '.join(INITS)} (default: "
                    f"{_show(d.inits)})")
    g2.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                    help=f"seeds of the evaluation runs (default: {_show(d.seeds)}; "
                    f"{q('seeds')})")
    g2.add_argument("--size", type=_positive_int,
                    help=f"input size N (default: {d.size}; {q('size')})")
    g2.add_argument("--budget", type=_positive_int,
                    help=f"iteration at which the final sigma_max, sigma_min are taken "
                    f"(default: {d.budget}; {q('budget')})")
    g2.add_argument("--horizon", type=_positive_int,
                    help=f"iterations an evaluation run may take to reach the target, >= --budget "
                    "(3x3x64x64: --budget) "
                    f"(default: {d.horizon}; {q('horizon')})")
    g2.add_argument("--rules", nargs="+", metavar="RULE",
                    help="step rules searched per method and kernel: paper, armijo, "
                    "constant:LR, polyak:GAMMA (default: " + _show(d.rules) + f"; {q('rules')})")
    g2.add_argument("--search-seeds", type=int, nargs="+", metavar="SEED",
                    help=f"seeds of the step-rule search, not among --seeds (default: "
                    f"{_show(d.search_seeds)})")
    g2.add_argument("--search-horizon", type=_positive_int,
                    help=f"iterations of a search run (default: {d.search_horizon}; "
                    f"{q('search_horizon')})")
    g2.add_argument("--alpha", type=_positive_float, default=d.alpha,
                    help="target alpha of both penalties (default: %(default)g)")
    g2.add_argument("--threads", type=_positive_int, default=d.threads,
                    help="torch CPU threads; 1 keeps wall times comparable on a shared machine "
                    "(default: %(default)s)")
    g2.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_spectrum_parser(sub) -> None:
    from .train.models import MODEL_EXAMPLES

    sp = sub.add_parser(
        "spectrum",
        help="per-layer singular values of a model: reshaped kernels vs exact operators",
        description="Run one forward pass to record each convolution's input size, then report the "
        "extreme singular values of every reshaped kernel and of every true convolution operator "
        "(FFT and dense: exact to float64 rounding; iterative: with certified error bounds, "
        "shown when a layer is not within tol). Prints a table and writes DIR/spectrum.json, "
        "DIR/spectrum_histograms.png (lower, middle, higher layers) and DIR/spectrum_extremes.png.",
    )
    sp.add_argument("model", metavar="MODEL",
                    help="a checkpoint.pt of 'convspec train'; a model name such as "
                    f"{MODEL_EXAMPLES} (orthogonal init from --seed); or package.module:factory, "
                    "a function called with no arguments that returns any nn.Module (modules in "
                    "the current folder are found)")
    sp.add_argument("--input-size", type=_positive_int, nargs=3, required=True,
                    metavar=("C", "H", "W"), help="input channels, height and width (required)")
    sp.add_argument("--out", type=Path, default=Path("spectrum"), metavar="DIR",
                    help="output folder (default: %(default)s)")
    sp.add_argument("--tol", type=_positive_float, default=1e-6,
                    help="relative tolerance of iterative spectra (default: %(default)g)")
    sp.add_argument("--seed", type=int, default=0,
                    help="seed of a named model's initialisation, and of torch before a factory "
                    "is called (default: %(default)s)")
    sp.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_lipschitz_parser(sub) -> None:
    from .train.models import MODEL_EXAMPLES

    lp = sub.add_parser(
        "lipschitz",
        help="exact per-layer operator norms and an upper bound on a model's Lipschitz constant",
        description="Run one forward pass (eval mode) to record each layer's input size, trace "
        "the model with torch.fx, and print each layer's exact operator sigma_max (convolutions at "
        "their input size, linear layers, pooling), BatchNorm's diagonal scale and activations' "
        "constants, and the upper bound on the whole network's l2 Lipschitz constant they give "
        "(products along chains, sums for x + f(x)). Modules without a known bound are named "
        "and the network is then not bounded (exit status 3).",
    )
    lp.add_argument("model", metavar="MODEL",
                    help="a checkpoint.pt of 'convspec train'; a model name such as "
                    f"{MODEL_EXAMPLES} (initialised from --seed); or package.module:factory")
    lp.add_argument("--input-size", type=_positive_int, nargs=3, required=True,
                    metavar=("C", "H", "W"), help="input channels, height and width (required)")
    lp.add_argument("--tol", type=_positive_float, default=1e-6,
                    help="relative tolerance of iterative operator norms (default: %(default)g)")
    lp.add_argument("--seed", type=int, default=0,
                    help="seed of a named model's initialisation (default: %(default)s)")
    lp.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write the report as JSON to FILE (default: none)")


def _add_train_parser(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a network with SGD, SVB, SVB+BBN or the Frobenius penalty",
        description="Train a ConvNet / pre-activation ResNet / Wide ResNet. Defaults follow Jia "
        "et al. (2017); precedence: built-in defaults < --config file < flags. After every epoch "
        "RUN_DIR/checkpoint.pt is replaced atomically, then RUN_DIR/metrics.jsonl and "
        "RUN_DIR/config.json (the resolved config) are rewritten from it; a kill at any moment "
        "followed by --resume ends with the files of an uninterrupted run. One process at a "
        "time trains into a RUN_DIR (a lock; a second one stops at once). --resume continues "
        "up to --epochs with the same flags and number of processes: only --epochs (not below "
        "the completed epochs; equal: nothing to do) and --device may change.",
    )
    _add_config_arguments(tr, compare=False)


def _add_compare_parser(sub) -> None:
    from .train.config import METHODS

    cmp_ = sub.add_parser(
        "compare",
        help="train several methods over several seeds and tabulate them (mean +/- std)",
        description="Train the same configuration once per --methods and --seeds into "
        "OUT/<method>-seed<S> (finished runs are reused, unfinished ones resumed), then write "
        "OUT/summary.json, OUT/summary.md (final test error and time as mean +/- std, singular "
        "value ranges of the reshaped kernels and of the exact conv operators) and "
        "OUT/curves.png (training and test error per epoch).",
    )
    cmp_.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                      help=f"methods to train: {', '.join(METHODS)}, each optionally with "
                      "config fields of its own, e.g. svb:eps=0.5 or frobenius:frob_weight=0.01 "
                      "(default: the config file's [compare] methods, else "
                      f"{_show(['sgd', 'svb+bbn', 'frobenius'])})")
    cmp_.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                      help="seeds to train each method with (default: the config file's "
                      f"[compare] seeds, else {_show([0, 1, 2])})")
    cmp_.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                      help="trainings run at once, in worker processes that share the CPU "
                      "threads (default: the config file's [compare] jobs, else 1)")
    cmp_.add_argument("--runs", type=Path, default=None, metavar="DIR",
                      help="folder of the run folders, when not OUT: comparisons that share a "
                      "base config can share runs (default: the config file's [compare] runs, "
                      "relative to the working directory, else OUT)")
    cmp_.add_argument("--baseline", metavar="METHOD", default=None,
                      help="the method every other is compared with (Welch's t-test, 95%% CI "
                      "of the difference) (default: sgd when listed, else the first method)")
    _add_config_arguments(cmp_, compare=True)


def _add_config_arguments(tr, *, compare: bool) -> None:
    """The TrainConfig flags shared by ``train`` and ``compare``. Their argparse default is None
    (a flag not given leaves the config file's value); the help shows TrainConfig's default."""
    from dataclasses import fields

    from .train.config import BBN_MODES, INITS, METHODS, SCHEDULES, TrainConfig
    from .train.data import DATASETS
    from .train.models import MODEL_EXAMPLES

    defaults = {f.name: f.default for f in fields(TrainConfig)}

    def a(*flags, default_text=None, **kw):
        """Add a flag; for a TrainConfig field, append '(default: X)' from TrainConfig."""
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        takes_value = kw.get("action") not in ("store_true", "store_false")
        if takes_value and not kw.get("required"):
            shown = default_text if default_text is not None else _show(defaults[dest])
            kw["help"] = f"{kw['help']} (default: {shown})"
        tr.add_argument(*flags, **kw)

    a("--data", choices=DATASETS, help="dataset")
    a("--data-dir", metavar="DIR", help="folder with the dataset files",
      default_text="/usr/share/datasets/fashion-mnist for fashion-mnist; CIFAR needs it")
    a("--model", metavar="NAME",
      help="convnet-D, preact-resnet-D (D = 6X+2 weight layers) or wrn-D-W (D = 6n+4, widen "
      f"factor W), e.g. {MODEL_EXAMPLES}")
    # The old form '--model convnet --depth 20': refused with the name to write instead.
    tr.add_argument("--depth", help=argparse.SUPPRESS)
    tr.add_argument("--width", help=argparse.SUPPRESS)
    if not compare:
        a("--method", choices=METHODS, help="training method")
    a("--epochs", type=_positive_int, help="epochs")
    if compare:
        a("--out", type=Path, required=True, metavar="OUT",
          help="folder for the runs and the summary (required)")
    else:
        a("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory (required)")
        a("--seed", type=int, help="random seed of the initialisation, data order and "
          "augmentation")
        a("--resume", action="store_true",
          help="continue the run in RUN_DIR up to --epochs; only --epochs (>= the completed "
          "epochs) and --device may differ from its flags")
    a("--config", type=Path, metavar="FILE",
      help="TOML file of TrainConfig fields (e.g. configs/*.toml); flags override it",
      default_text="none")
    a("--batch-size", type=_positive_int, help="mini-batch size per process")
    a("--lr", type=_positive_float, help="initial learning rate")
    a("--lr-end", type=_positive_float, help="final learning rate of the paper and cosine "
      "schedules")
    a("--lr-hold", type=_positive_int, help="epochs per step of the paper schedule")
    a("--schedule", choices=SCHEDULES,
      help="learning-rate schedule: paper (geometric from --lr to --lr-end in steps of --lr-hold "
      "epochs), step (/10 at 50%% and 75%% of the epochs) or cosine")
    a("--momentum", type=float, help="SGD momentum, in [0, 1)")
    a("--nesterov", action="store_true", default=None,
      help=f"use Nesterov momentum (default: {_show(defaults['nesterov'])})")
    a("--weight-decay", type=float, help="SGD weight decay (L2), >= 0")
    a("--eps", type=_positive_float,
      help="SVB (methods svb and svb+bbn): each reshaped kernel's singular values are bounded "
      "into [1/(1+eps), 1+eps]")
    a("--bbn-eps", type=_positive_float,
      help="BBN (method svb+bbn): the BatchNorm scales relative to their mean are bounded into "
      "[1/(1+eps), 1+eps]")
    a("--bbn-mode", choices=BBN_MODES,
      help="bbn: bound gamma_i/sigma_i (Jia et al., Algorithm 2); rel: bound gamma_i/mean(gamma), "
      "as the authors' code does")
    a("--svb-every", type=_positive_int, help="SVB period in iterations",
      default_text="once per epoch")
    a("--frob-weight", type=float,
      help="weight of the exact Frobenius penalty in the loss (method frobenius), >= 0")
    a("--frob-alpha", type=_positive_float,
      help="target alpha of the Frobenius penalty ||M^T M - alpha I||_F^2")
    a("--no-frob-normalize", dest="frob_normalize", action="store_false", default=None,
      help="do not divide each layer's Frobenius penalty by its input dimension (default: "
      "divide)")
    a("--init", choices=INITS, help="weight initialisation: orthogonal (Jia et al.) or default "
      "(PyTorch's)")
    a("--augment", dest="augment", action="store_true", default=None,
      help="pad-4 random crops and flips (default: on for CIFAR, off otherwise)")
    a("--no-augment", dest="augment", action="store_false", help="no augmentation")
    a("--n-train", type=_positive_int, metavar="N", help="use the first N training examples",
      default_text="all")
    a("--n-test", type=_positive_int, metavar="N", help="use the first N test examples", default_text="all")
    a("--device", help="cpu, cuda, cuda:1, ...; auto: cuda if available, else cpu")
    a("--no-progress", action="store_true", help="hide progress bars")


def _add_plot_parser(sub) -> None:
    from .train.rundir import METRIC_KEYS

    pl = sub.add_parser("plot", help="plot validation curves of several runs on one figure",
                        description="Plot one metric per epoch of several run directories "
                        "(of 'convspec train', or OUT/<method>-seed<S> of 'compare') on one "
                        "figure.")
    pl.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                    help="run directories to plot")
    pl.add_argument("--out", type=Path, default=Path("curves.png"), metavar="FILE",
                    help="figure file; .png is added when it has no extension "
                    "(default: %(default)s)")
    metrics = [k for k in METRIC_KEYS if k not in ("lr", "epoch_time_s")]
    pl.add_argument("--metric", default="test_error", choices=metrics,
                    help="what to plot per epoch (default: %(default)s)")


def _config_from_args(args, parser, **override):
    """Built-in defaults < ``--config`` file < flags < ``override``; exits 2 when invalid."""
    from dataclasses import fields

    from .train.config import TrainConfig, load_config_file

    if args.depth is not None or args.width is not None:
        parser.error(_old_model_flags(args))
    values = {}
    try:
        if args.config is not None:
            values.update(load_config_file(args.config))
        for f in fields(TrainConfig):
            v = getattr(args, f.name, None)
            if v is not None:
                values[f.name] = str(v) if f.name == "data_dir" else v
        values.update(override)
        cfg = TrainConfig(**values)
        cfg.validate()
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return cfg


def _old_model_flags(args) -> str:
    """The error for the old ``--model FAMILY --depth D --width W``: the name to write instead."""
    from .train.config import TrainConfig
    from .train.models import model_name, parse_model_name

    family, depth, width = args.model or TrainConfig.model, 20, 1
    try:
        family, depth, width = parse_model_name(family)
    except ValueError:
        pass
    depth = args.depth if args.depth is not None else depth
    width = args.width if args.width is not None else width
    flags = " ".join(f"--{k} {v}" for k, v in (("model", args.model), ("depth", args.depth),
                                                ("width", args.width)) if v is not None)
    return (f"{flags}: --depth and --width are gone; the model name carries them: "
            f"--model {model_name(family, depth, width)}")


def _run_train(args, parser) -> int:
    from .train.loop import Interrupted, NonFiniteLoss, train

    cfg = _config_from_args(args, parser)
    try:
        result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLoss as exc:
        print(f"convspec train: stopped: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if exc.checkpoint_epoch is None:
            print("convspec train: interrupted before the first checkpoint; nothing to resume: "
                  "run the same command again (without --resume)", file=sys.stderr)
        else:
            print(f"convspec train: interrupted; {args.out / 'checkpoint.pt'} holds epoch "
                  f"{exc.checkpoint_epoch}: continue with --resume", file=sys.stderr)
        return 130
    if args.resume and result.start_epoch == cfg.epochs:
        print(f"convspec train: {args.out} already holds all {cfg.epochs} epochs; nothing to do "
              "(pass a larger --epochs to train on)", file=sys.stderr)
    return 0


def _compare_section(args, parser) -> dict:
    """The ``[compare]`` table of ``--config`` (``{}`` without one); exits 2 when invalid."""
    from .train.config import load_compare_section

    if args.config is None:
        return {}
    try:
        return load_compare_section(args.config)
    except ValueError as exc:
        parser.error(str(exc))


def _runs_dir(args, section: dict):
    """``--runs``, else the config file's ``[compare] runs``, else None (the output folder)."""
    if args.runs is not None:
        return args.runs
    return Path(section["runs"]) if section.get("runs") else None


def _run_compare(args, parser) -> int:
    import warnings

    from .experiments.compare import compare, format_table, parse_method
    from .train.loop import NonFiniteLoss

    section = _compare_section(args, parser)
    methods = args.methods or section.get("methods") or ["sgd", "svb+bbn", "frobenius"]
    seeds = args.seeds if args.seeds is not None else section.get("seeds", [0, 1, 2])
    jobs = args.jobs or section.get("jobs", 1)
    baseline = args.baseline or section.get("baseline")
    runs_dir = _runs_dir(args, section)
    # Validate every run's config against the shared flags before anything runs.
    cfg = _config_from_args(args, parser)
    try:
        specs = [parse_method(m) for m in methods]
        if baseline is not None and parse_method(baseline).label not in [s.label for s in specs]:
            raise ValueError(f"--baseline {baseline!r} is not among --methods")
    except ValueError as exc:
        parser.error(f"--methods: {exc}" if "baseline" not in str(exc) else str(exc))
    for spec in specs:
        for seed in seeds:
            _config_from_args(args, parser, method=spec.method, seed=seed, **dict(spec.overrides))

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"convspec compare: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            summary = compare(cfg, methods, seeds, args.out, progress=not args.no_progress,
                              jobs=jobs, baseline=baseline, runs_dir=runs_dir)
    except NonFiniteLoss as exc:
        print(f"convspec compare: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convspec compare: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'summary.md'}, "
          f"{args.out / 'curves.png'}")
    return 0


def _run_plot(args, parser) -> int:
    from .train.plots import plot_runs

    path = plot_runs(args.runs, args.out, metric=args.metric)
    print(f"wrote {path}")
    return 0


def _run_guo_fig41(args, parser) -> int:
    from .experiments import guo_fig41

    if args.size > 48:
        parser.error(f"--size {args.size} is too large for the dense spectrum (at most 48)")
    config = guo_fig41.Fig41Config(
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        init=args.init,
        step_rule=args.step_rule,
        lr=args.lr,
        alpha=args.alpha,
    )
    guo_fig41.main(config, args.out, progress=not args.no_progress)
    return 0


def _run_guo_2norm(args, parser) -> int:
    from dataclasses import replace

    from .experiments import guo_2norm

    config = guo_2norm.Guo2NormConfig()
    if args.quick:
        config = replace(config, **guo_2norm.QUICK)
    given = {name: getattr(args, name) for name in (
        "shapes", "inits", "seeds", "size", "budget", "horizon", "rules", "search_seeds",
        "search_horizon") if getattr(args, name) is not None}
    if "budget" in given and "horizon" not in given:
        given["horizon"] = max(config.horizon, given["budget"])
    config = replace(config, alpha=args.alpha, threads=args.threads, **given)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    guo_2norm.main(config, args.out, progress=not args.no_progress)
    return 0


def _run_norm_layers(args, parser) -> int:
    from torch import nn

    from .experiments import norm_layers

    kw = {}
    if args.quick:
        kw = dict(seeds=(0,), layers=[
            ("Conv2d 4->4, 3x3, zeros", lambda: nn.Conv2d(4, 4, 3, padding=1), (8, 8)),
            ("Conv1d 3->4, k=3, circular",
             lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (12,))])
    record = norm_layers.main(args.out, progress=not args.no_progress, **kw)
    print(norm_layers.format_table(record))
    print(f"wrote {args.out}/norm_layers.json, .md, .png")
    return 0


def _run_frob_sweep(args, parser) -> int:
    from .experiments import frob_sweep
    from .experiments.compare import parse_method

    section = _compare_section(args, parser)
    weights = args.weights
    if weights is None and section.get("methods"):
        try:
            specs = [parse_method(m) for m in section["methods"]]
        except ValueError as exc:
            parser.error(f"config file {args.config}: {exc}")
        weights = [dict(s.overrides).get("frob_weight") for s in specs if s.method == "frobenius"]
        weights = [w for w in weights if w is not None]
    weights = weights or list(frob_sweep.WEIGHTS)
    seeds = args.seeds if args.seeds is not None else section.get("seeds", [0, 1, 2])
    jobs = args.jobs or section.get("jobs", 1)
    runs_dir = _runs_dir(args, section)
    cfg = _config_from_args(args, parser)
    for seed in seeds:
        _config_from_args(args, parser, method="frobenius", seed=seed, frob_weight=max(weights))
    try:
        frob_sweep.main(cfg, args.out, weights=weights, seeds=seeds, jobs=jobs, runs_dir=runs_dir,
                        progress=not args.no_progress)
    except KeyboardInterrupt:
        print("convspec reproduce frob-sweep: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def _run_jia_fig1(args, parser) -> int:
    from .experiments import jia_fig1
    from .experiments.compare import parse_method

    section = _compare_section(args, parser)
    runs_dir = _runs_dir(args, section)
    cfg = _config_from_args(args, parser)
    try:
        specs = [parse_method(m) for m in args.methods]
    except ValueError as exc:
        parser.error(f"--methods: {exc}")
    for spec in specs:
        _config_from_args(args, parser, method=spec.method, seed=args.seed, **dict(spec.overrides))
    try:
        jia_fig1.main(cfg, args.out, methods=args.methods, seed=args.seed, runs_dir=runs_dir,
                      progress=not args.no_progress)
    except KeyboardInterrupt:
        print("convspec reproduce jia-fig1: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def _run_reproduce(args, parser) -> int:
    if args.experiment == "jia-fig1":
        return _run_jia_fig1(args, parser)
    if args.experiment == "guo-2norm":
        return _run_guo_2norm(args, parser)
    if args.experiment == "frob-sweep":
        return _run_frob_sweep(args, parser)
    if args.experiment == "norm-layers":
        return _run_norm_layers(args, parser)
    return _run_guo_fig41(args, parser)


class _ModelError(Exception):
    """A MODEL argument that names no checkpoint, model or factory (message ready to print)."""


def _load_model_argument(args, parser, command: str):
    """``(model, source)`` from the MODEL argument of ``spectrum`` / ``lipschitz``: a
    checkpoint file, a registry model name, or ``package.module:factory``."""
    from .experiments import spectrum_report as sr
    from .train.models import parse_model_name

    c = args.input_size[0]
    path, source = Path(args.model), args.model
    if path.is_file():
        return sr.load_checkpoint_model(path, c), str(path)
    if sr.is_factory_path(args.model):
        try:
            return sr.model_from_factory(args.model, seed=args.seed), source
        except sr.FactoryError as exc:
            raise _ModelError(str(exc)) from exc
    try:
        parse_model_name(args.model)
    except ValueError as exc:
        if path.suffix or "/" in args.model or path.exists():
            raise _ModelError(f"{path} is not a checkpoint file") from exc
        parser.error(f"{exc}; or give a checkpoint file or package.module:factory")
    return sr.build_named_model(args.model, in_channels=c, seed=args.seed), source


def _model_command(command: str, args, parser, body) -> int:
    """Load MODEL, run ``body(model, source)``; expected failures print one line, exit 1."""
    if args.tol >= 1:
        parser.error(f"--tol must be below 1, got {args.tol}")
    try:
        model, source = _load_model_argument(args, parser, command)
        return body(model, source)
    except _ModelError as exc:
        print(f"convspec {command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError,
            pickle.UnpicklingError) as exc:
        # Unreadable checkpoint, a state_dict that does not fit, or an input too small for the
        # model: a message, not a traceback.
        from .train.rundir import RunDirError

        what = "" if isinstance(exc, (RunDirError, OSError)) else f"{type(exc).__name__}: "
        print(f"convspec {command}: error: {what}{_user_error(exc)}", file=sys.stderr)
        return 1


def _run_spectrum(args, parser) -> int:
    from .experiments import spectrum_report as sr

    def body(model, source):
        sr.main(model, tuple(args.input_size), args.out, source=source, tol=args.tol,
                progress=not args.no_progress)
        return 0

    return _model_command("spectrum", args, parser, body)


def _run_lipschitz(args, parser) -> int:
    import dataclasses
    import json

    import torch

    from .lipschitz import lipschitz_report

    def body(model, source):
        x = torch.zeros(1, *args.input_size)
        report = lipschitz_report(model, x, tol=args.tol)
        print(f"{source} on {'x'.join(map(str, args.input_size))} inputs")
        print(report.table())
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "model": source, "input_size": list(args.input_size), "bound": report.bound,
                "unsupported": report.unsupported,
                "layers": [dataclasses.asdict(r) for r in report.layers]}, indent=1))
        return 0 if report.bound is not None else 3

    return _model_command("lipschitz", args, parser, body)


# Subcommands that write PNG plots: they need matplotlib, checked before any work starts so that
# a pip install without the extra fails in a second, not after a training run.
_PLOTTING_COMMANDS = ("reproduce", "compare", "plot", "spectrum")
CLI_EXTRA_HINT = "pip install 'convspec[cli]'"


def _missing_plotting(command: str) -> Optional[str]:
    """The one-line error for ``command`` when matplotlib is not importable, else None."""
    if command not in _PLOTTING_COMMANDS:
        return None
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return None
    return (
        f"'convspec {command}' writes PNG plots and needs matplotlib, which is not installed; "
        f"install the CLI extra: {CLI_EXTRA_HINT}"
    )


def _user_error(exc: BaseException) -> str:
    """One line for an expected failure: a path that cannot be used, a bad file, a bad config."""
    from .train.rundir import one_line

    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return one_line(exc) or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    from .train.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_plotting(args.command)
    if missing is not None:
        parser.exit(2, f"convspec: error: {missing}\n")
    commands = {"train": _run_train, "compare": _run_compare, "plot": _run_plot,
                "spectrum": _run_spectrum, "lipschitz": _run_lipschitz,
                "reproduce": _run_reproduce}
    name = args.command if args.command != "reproduce" else f"reproduce {args.experiment}"
    try:
        return commands[args.command](args, parser)
    except (OSError, ValueError, DataError, EOFError, pickle.UnpicklingError) as exc:
        # Expected user errors (a path that cannot be used, a corrupt or crafted file, a run
        # directory in use or of another config): one line, never a traceback.
        print(f"convspec {name}: error: {_user_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convspec {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
