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


def build_parser() -> argparse.ArgumentParser:
    from .descent import STEP_RULES
    from .experiments.guo_fig41 import INITS

    parser = argparse.ArgumentParser(
        prog="convspec",
        description="Exact control of the singular values of convolutional layers.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"convspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rep = sub.add_parser("reproduce", help="reproduce a figure or table of a paper")
    rep_sub = rep.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    rep_sub.required = True
    fig = rep_sub.add_parser(
        "guo-fig41",
        help="Guo (2019) Figure 4.1: Algorithm 3.1 on four random 3x3 kernels",
        description="Run Algorithm 3.1 (gradient descent on the exact Frobenius penalty) on "
        "random 3x3x3x1, 3x3x1x3, 3x3x3x6 and 3x3x6x3 kernels (k x k x g x h) and record the "
        "exact sigma_max and sigma_min of the convolution operator at every iteration.",
    )
    fig.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    fig.add_argument("--steps", type=_positive_int, default=300, help="iterations (default 300)")
    fig.add_argument("--size", type=_positive_int, default=20, help="input size N (default 20)")
    fig.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    fig.add_argument("--init", choices=INITS, default="normal", help="kernel entries (default normal)")
    fig.add_argument("--step-rule", choices=STEP_RULES, default="paper", help="default: paper")
    fig.add_argument("--lr", type=_positive_float, default=1e-3, help="step for --step-rule constant")
    fig.add_argument("--alpha", type=_positive_float, default=1.0, help="target a (default 1)")
    fig.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_train_parser(sub)
    _add_compare_parser(sub)
    _add_plot_parser(sub)
    _add_spectrum_parser(sub)
    return parser


def _add_spectrum_parser(sub) -> None:
    sp = sub.add_parser(
        "spectrum",
        help="per-layer singular values of a model: reshaped kernels vs exact operators",
        description="Run one forward pass to record each Conv2d's input size, then report the "
        "extreme singular values of every reshaped kernel and of every true convolution operator "
        "(exact: FFT, dense or converged iterative). Prints a table and writes DIR/spectrum.json, "
        "DIR/spectrum_histograms.png (lower, middle, higher layers) and DIR/spectrum_extremes.png.",
    )
    sp.add_argument("model", metavar="CHECKPOINT_OR_MODEL_NAME",
                    help="a checkpoint.pt of 'convspec train', or a name such as convnet-20, "
                    "preact_resnet-68, wrn-28-10 (orthogonal init, --seed)")
    sp.add_argument("--input-size", type=_positive_int, nargs=3, required=True,
                    metavar=("C", "H", "W"), help="input channels, height and width")
    sp.add_argument("--out", type=Path, default=Path("spectrum"), metavar="DIR",
                    help="output folder (default: spectrum)")
    sp.add_argument("--tol", type=_positive_float, default=1e-6,
                    help="relative tolerance of iterative spectra (default 1e-6)")
    sp.add_argument("--seed", type=int, default=0, help="seed of a named model's init (default 0)")
    sp.add_argument("--no-progress", action="store_true", help="hide the progress bar")


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
    from .train.loop import METHODS

    cmp_ = sub.add_parser(
        "compare",
        help="train several methods over several seeds and tabulate them (mean +/- std)",
        description="Train the same configuration once per --methods and --seeds into "
        "OUT/<method>-seed<S> (finished runs are reused, unfinished ones resumed), then write "
        "OUT/summary.json, OUT/summary.md (final test error and time as mean +/- std, singular "
        "value ranges of the reshaped kernels and of the exact conv operators) and "
        "OUT/test_error.png.",
    )
    cmp_.add_argument("--methods", nargs="+", choices=METHODS,
                      default=["sgd", "svb+bbn", "frobenius"], help="default: sgd svb+bbn frobenius")
    cmp_.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    _add_config_arguments(cmp_, compare=True)


def _add_config_arguments(tr, *, compare: bool) -> None:
    """The TrainConfig flags shared by ``train`` and ``compare``."""
    from .train.data import DATASETS
    from .train.loop import INITS, METHODS, SCHEDULES
    from .train.models import MODELS

    a = tr.add_argument
    a("--data", choices=DATASETS, help="dataset (default fashion-mnist)")
    a("--data-dir", help="folder with the dataset files")
    a("--model", choices=MODELS, help="architecture (default convnet)")
    a("--depth", type=_positive_int, help="weight layers: 6X+2 for convnet/preact_resnet, 6n+4 for wrn")
    a("--width", type=_positive_int, help="width multiplier (wrn only)")
    if not compare:
        a("--method", choices=METHODS, help="training method (default sgd)")
    a("--epochs", type=_positive_int, help="epochs (default 10)")
    if compare:
        a("--out", type=Path, required=True, metavar="OUT", help="folder for the runs and summary")
    else:
        a("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")
        a("--seed", type=int, help="random seed (default 0)")
        a("--resume", action="store_true",
          help="continue the run in RUN_DIR up to --epochs; only --epochs (>= the completed "
          "epochs) and --device may differ from its flags")
    a("--config", type=Path, help="TOML file of TrainConfig fields (e.g. configs/*.toml)")
    a("--batch-size", type=_positive_int)
    a("--lr", type=_positive_float, help="initial learning rate (default 0.5)")
    a("--lr-end", type=_positive_float, help="final learning rate of paper/cosine (default 0.001)")
    a("--lr-hold", type=_positive_int, help="epochs per step of the paper schedule (default 2)")
    a("--schedule", choices=SCHEDULES, help="learning-rate schedule (default paper)")
    a("--momentum", type=float)
    a("--nesterov", action="store_true", default=None)
    a("--weight-decay", type=float)
    a("--eps", type=_positive_float, help="SVB: bound singular values in [1/(1+eps), 1+eps]")
    a("--bbn-eps", type=_positive_float, help="BBN band (svb+bbn)")
    a("--bbn-mode", choices=("bbn", "rel"))
    a("--svb-every", type=_positive_int, help="SVB period in iterations (default: once per epoch)")
    a("--frob-weight", type=float, help="weight of the Frobenius penalty (method frobenius)")
    a("--frob-alpha", type=_positive_float, help="target alpha of the Frobenius penalty")
    a("--no-frob-normalize", dest="frob_normalize", action="store_false", default=None,
      help="do not divide each layer's penalty by its input dimension")
    a("--init", choices=INITS, help="weight initialisation (default orthogonal)")
    a("--augment", dest="augment", action="store_true", default=None,
      help="pad-4 random crops and flips (default: on for CIFAR)")
    a("--no-augment", dest="augment", action="store_false")
    a("--n-train", type=_positive_int, help="use the first N training examples")
    a("--n-test", type=_positive_int, help="use the first N test examples")
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a("--no-progress", action="store_true", help="hide progress bars")


def _add_plot_parser(sub) -> None:
    pl = sub.add_parser("plot", help="plot validation curves of several runs on one figure")
    pl.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    pl.add_argument("--out", type=Path, default=Path("curves.png"),
                    help="figure file; .png is added when it has no extension (default curves.png)")
    pl.add_argument("--metric", default="test_error",
                    choices=("test_error", "test_loss", "train_loss", "train_accuracy"))


def _config_from_args(args, parser, **override):
    """Built-in defaults < ``--config`` file < flags < ``override``; exits 2 when invalid."""
    from dataclasses import fields

    from .train.loop import TrainConfig, load_config_file

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


def _run_compare(args, parser) -> int:
    import warnings

    from .experiments.compare import compare, format_table
    from .train.loop import NonFiniteLoss

    # Validate every run's config against the shared flags before anything runs.
    cfg = _config_from_args(args, parser)
    for method in args.methods:
        for seed in args.seeds:
            _config_from_args(args, parser, method=method, seed=seed)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"convspec compare: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            summary = compare(cfg, args.methods, args.seeds, args.out,
                              progress=not args.no_progress)
    except NonFiniteLoss as exc:
        print(f"convspec compare: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convspec compare: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'summary.md'}, "
          f"{args.out / 'test_error.png'}")
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


def _run_spectrum(args, parser) -> int:
    from .experiments import spectrum_report as sr

    if args.tol >= 1:
        parser.error(f"--tol must be below 1, got {args.tol}")
    c, h, w = args.input_size
    path = Path(args.model)
    named = sr.parse_model_name(args.model)
    try:
        if path.is_file():
            model = sr.load_checkpoint_model(path, c)
            source = str(path)
        elif named is not None:
            try:
                model = sr.build_named_model(*named, in_channels=c, seed=args.seed)
            except ValueError as exc:
                parser.error(str(exc))
            source = args.model
        elif path.suffix or "/" in args.model or path.exists():
            print(f"convspec spectrum: error: {path} is not a checkpoint file", file=sys.stderr)
            return 1
        else:
            parser.error(
                f"{args.model!r} is neither a file nor a model name such as convnet-20, "
                "preact_resnet-68 or wrn-28-10"
            )
        sr.main(model, (c, h, w), args.out, source=source, tol=args.tol,
                progress=not args.no_progress)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError,
            pickle.UnpicklingError) as exc:
        # Unreadable checkpoint, a state_dict that does not fit, or an input too small for the
        # model: a message, not a traceback.
        from .train.rundir import RunDirError

        what = "" if isinstance(exc, (RunDirError, OSError)) else f"{type(exc).__name__}: "
        print(f"convspec spectrum: error: {what}{_user_error(exc)}", file=sys.stderr)
        return 1
    return 0


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
                "spectrum": _run_spectrum, "reproduce": _run_guo_fig41}
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
