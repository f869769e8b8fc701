"""The training loop: SGD, SVB, SVB+BBN or the Frobenius penalty, resumable and distributed."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from .._provenance import environment
from ..bounding import SingularValueBounding
from ..init import orthogonal_
from ..regularizer import FrobeniusRegularizer
from ..report import reshaped_values
from . import distributed as dist_utils
from .data import DATASETS, Dataset, iterate_batches, load_dataset, normalize, random_crop_flip
from .models import MODELS, build_model

METHODS = ("sgd", "svb", "svb+bbn", "frobenius")
SCHEDULES = ("paper", "step", "cosine")
INITS = ("orthogonal", "default")


@dataclass
class TrainConfig:
    """Defaults follow Jia et al. (2017): SGD, momentum 0.9, weight decay 1e-4, batch 128, the
    learning rate decaying geometrically from 0.5 to 0.001 in steps held for 2 epochs,
    orthogonal initialisation, SVB once per epoch."""

    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    n_train: Optional[int] = None  # a subset of the training set (first n examples)
    n_test: Optional[int] = None
    model: str = "convnet"
    depth: int = 20
    width: int = 1
    method: str = "sgd"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.5  # start of the schedule
    lr_end: float = 0.001  # end of the paper's geometric schedule
    lr_hold: int = 2  # epochs per step of the paper's schedule
    schedule: str = "paper"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    eps: float = 0.05  # SVB band [1/(1+eps), 1+eps]
    bbn_eps: float = 0.2
    bbn_mode: str = "bbn"
    svb_every: Optional[int] = None  # iterations; None = once per epoch
    frob_weight: float = 1e-3
    frob_alpha: float = 1.0
    frob_normalize: bool = True
    init: str = "orthogonal"
    augment: Optional[bool] = None  # None: the dataset's default (on for CIFAR)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.data in DATASETS, f"--data must be one of {DATASETS}, got {self.data!r}"),
            (self.model in MODELS, f"--model must be one of {MODELS}, got {self.model!r}"),
            (self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (self.init in INITS, f"--init must be one of {INITS}"),
            (self.bbn_mode in ("bbn", "rel"), "--bbn-mode must be 'bbn' or 'rel'"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0 and self.lr_end > 0 and math.isfinite(self.lr), "learning rates must be > 0"),
            (self.lr_hold >= 1, "--lr-hold must be >= 1"),
            (self.eps > 0 and self.bbn_eps > 0, "--eps and --bbn-eps must be > 0"),
            (self.svb_every is None or self.svb_every >= 1, "--svb-every must be >= 1"),
            (self.frob_weight >= 0 and math.isfinite(self.frob_weight),
             "--frob-weight must be finite and >= 0"),
            (self.frob_alpha > 0 and math.isfinite(self.frob_alpha), "--frob-alpha must be > 0"),
            (math.isfinite(self.eps) and math.isfinite(self.bbn_eps), "--eps and --bbn-eps must be finite"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             "--weight-decay must be finite and >= 0"),
            (self.n_train is None or self.n_train >= 1, "--n-train must be >= 1"),
            (self.n_test is None or self.n_test >= 1, "--n-test must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.model in ("convnet", "preact_resnet") and (self.depth < 8 or (self.depth - 2) % 6):
            raise ValueError(f"--depth for {self.model} must be 6X+2 (8, 14, 20, 38, 68, ...), got {self.depth}")
        if self.model == "wrn" and (self.depth < 10 or (self.depth - 4) % 6):
            raise ValueError(f"--depth for wrn must be 6n+4 (10, 16, 22, 28, ...), got {self.depth}")
        if self.model != "wrn" and self.width != 1:
            raise ValueError("--width applies to --model wrn only")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"--device {self.device!r} is not a device (cpu, cuda, cuda:1, auto)") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"--device {self.device!r}: only cpu and cuda are supported")


#: Fields a resumed run may change; any other difference from the checkpoint's config is refused.
#: A different ``epochs`` stretches the learning-rate schedule (it depends on the total).
RESUME_MAY_DIFFER = ("epochs", "device", "data_dir")


def config_differences(stored: Dict, cfg: "TrainConfig") -> List[str]:
    """``field: stored -> now`` for every field of ``cfg`` (but :data:`RESUME_MAY_DIFFER`) that
    differs from the stored config dict."""
    now = asdict(cfg)
    return [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUME_MAY_DIFFER and stored.get(k) != v]


def load_config_file(path: Path) -> Dict:
    """Read a TOML config file: keys are :class:`TrainConfig` field names."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("config files need Python >= 3.11 or `pip install tomli`") from None
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}")
    return data


def learning_rate(cfg: TrainConfig, epoch: int, step_in_epoch: float = 0.0) -> float:
    """The learning rate at (0-based) ``epoch``.

    ``'paper'``: geometric from ``lr`` to ``lr_end``, constant within blocks of ``lr_hold``
    epochs; ``'step'``: ``lr`` divided by 10 at 50% and 75% of the run; ``'cosine'``: cosine
    decay from ``lr`` to ``lr_end``.
    """
    if cfg.schedule == "paper":
        blocks = max(1, math.ceil(cfg.epochs / cfg.lr_hold))
        i = min(epoch // cfg.lr_hold, blocks - 1)
        return cfg.lr * (cfg.lr_end / cfg.lr) ** (i / max(1, blocks - 1))
    if cfg.schedule == "step":
        frac = epoch / cfg.epochs
        return cfg.lr * (0.1 if frac >= 0.5 else 1.0) * (0.1 if frac >= 0.75 else 1.0)
    t = (epoch + step_in_epoch) / cfg.epochs
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * t))


def reshaped_sigma_ranges(model: nn.Module) -> Dict[str, List[float]]:
    """Per layer: [min, max] singular value of the reshaped weight (out x in*k*k per group)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            s = reshaped_values(m.weight, m.groups if isinstance(m, nn.Conv2d) else 1)
            out[name] = [float(s[-1]), float(s[0])]
    return out


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 512):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in iterate_batches(data.x_test, data.y_test, batch_size, shuffle=False):
            x = normalize(x.to(device), data.mean, data.std)
            y = y.to(device)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    n = data.x_test.shape[0]
    return loss / n, 1.0 - correct / n


@dataclass
class TrainResult:
    history: List[Dict]  # one metrics row per epoch
    model: nn.Module  # the trained model (unwrapped from DDP)


def train(cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True,
          data: Optional[Dataset] = None) -> TrainResult:
    """Train per ``cfg`` into run directory ``out``; return the metrics and the model.

    ``out/config.json`` (the resolved config, seed, git commit, library versions) is written
    before step 0; each epoch appends a line to ``out/metrics.jsonl`` and replaces
    ``out/checkpoint.pt`` atomically. ``resume=True`` continues from that checkpoint up to
    ``cfg.epochs``. Under ``torchrun`` the model is wrapped in DistributedDataParallel and only
    rank 0 writes files.
    """
    cfg.validate()
    ctx = dist_utils.setup()
    device = ctx.device if ctx.world_size > 1 else _pick_device(cfg.device)
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise FileExistsError(
            f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or "
            "choose another --out"
        )
    state = None
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diffs = config_differences(state.get("config", {}), cfg)
        if diffs:
            raise ValueError(
                f"--resume: {out} was trained with another configuration ({'; '.join(diffs)}); "
                "resume with the same flags (only --epochs and --device may change) or choose "
                "another --out"
            )
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # Every rank has checked the run directory before rank 0 writes into it.
    dist_utils.barrier(ctx)

    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_dataset(cfg.data, cfg.data_dir, seed=cfg.seed)
    data = data.subset(cfg.n_train, cfg.n_test)
    augment = data.augment if cfg.augment is None else cfg.augment
    model = build_model(cfg.model, cfg.depth, cfg.width, data.num_classes, data.in_channels)
    if cfg.init == "orthogonal":
        orthogonal_(model)
    model.to(device)
    iters_per_epoch = math.ceil(math.ceil(data.x_train.shape[0] / ctx.world_size) / cfg.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    svb = None
    if cfg.method in ("svb", "svb+bbn"):
        svb = SingularValueBounding(
            model, cfg.eps, every=cfg.svb_every or iters_per_epoch,
            bbn_eps=cfg.bbn_eps if cfg.method == "svb+bbn" else None, bbn_mode=cfg.bbn_mode,
        )
    reg = FrobeniusRegularizer(model, cfg.frob_alpha, normalize=cfg.frob_normalize) \
        if cfg.method == "frobenius" else None
    net = dist_utils.wrap(model, ctx)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # shuffling and augmentation

    start_epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if svb is not None and state.get("svb") is not None:
            svb.load_state_dict(state["svb"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
    elif ctx.is_main:
        record = {"config": asdict(cfg), "environment": environment(),
                  "world_size": ctx.world_size, "device": str(device),
                  "iterations_per_epoch": iters_per_epoch}
        (out / "config.json").write_text(json.dumps(record, indent=1))
        metrics_path.write_text("")

    def save(epoch: int) -> None:
        _atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "svb": svb.state_dict() if svb is not None else None,
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch": epoch, "history": history, "config": asdict(cfg),
        }, ckpt_path)

    if not resume and ctx.is_main:
        save(0)  # so that an interrupt in the first epoch still leaves a resumable run

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if ctx.is_main_thread else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            net.train()
            total_loss, total_correct, seen = 0.0, 0, 0
            lr = learning_rate(cfg, epoch)
            batches = iterate_batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True,
                                      generator=gen, rank=ctx.rank, world_size=ctx.world_size)
            with progress_bar(iters_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                              enabled=progress and ctx.is_main) as bar:
                for i, (x, y) in enumerate(batches):
                    if cfg.schedule == "cosine":
                        lr = learning_rate(cfg, epoch, i / iters_per_epoch)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    x, y = x.to(device), y.to(device)
                    if augment:  # in whole batches on the training device
                        x = random_crop_flip(x, 4, gen)
                    x = normalize(x, data.mean, data.std)
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                    total = loss + cfg.frob_weight * reg() if reg is not None else loss
                    # Every rank stops together (before DDP's backward collective) when any rank
                    # sees a non-finite loss or an interrupt.
                    bad, stop = dist_utils.any_flags(
                        ctx, not bool(torch.isfinite(total.detach())), interrupted["flag"]
                    )
                    if stop:
                        raise KeyboardInterrupt
                    if bad:
                        raise NonFiniteLoss(
                            f"loss became {float(total.detach())} at epoch {epoch + 1}, iteration {i + 1}; "
                            f"the last good checkpoint (end of epoch {epoch}) is kept in {ckpt_path}. "
                            "Lower --lr or --frob-weight."
                        )
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    if svb is not None:
                        svb.step()
                    total_loss += float(loss.detach()) * y.shape[0]
                    total_correct += int((logits.argmax(1) == y).sum())
                    seen += y.shape[0]
                    bar.update(1)
                    bar.set_postfix_str(f"loss {float(loss.detach()):.3f}", refresh=False)
            total_loss, total_correct, seen = dist_utils.sum_over_ranks(
                ctx, [total_loss, total_correct, seen])
            dist_utils.sync_buffers(model, ctx)
            test_loss, test_error = evaluate(model, data, device)
            row = {
                "epoch": epoch + 1,
                "train_loss": total_loss / max(1, seen),
                "train_accuracy": total_correct / max(1, seen),
                "test_loss": test_loss,
                "test_error": test_error,
                "lr": lr,
                "epoch_time_s": time.perf_counter() - t0,
                "sigma_reshaped": reshaped_sigma_ranges(model),
            }
            history.append(row)
            if ctx.is_main:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                save(epoch + 1)
                if progress:
                    print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
                          f"test error {100 * test_error:.2f}%, {row['epoch_time_s']:.1f}s",
                          file=sys.stderr)
            dist_utils.barrier(ctx)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if reg is not None:
            reg.remove()
        dist_utils.cleanup(ctx)
    return TrainResult(history, model)
