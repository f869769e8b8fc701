"""The training loop: SGD, SVB, SVB+BBN or the Frobenius penalty, resumable and distributed."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, TypeVar

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
from .config import TrainConfig, resume_problems
from .data import Dataset, iterate_batches, load_dataset, normalize, random_crop_flip
from .models import build_model
from .rundir import FORMAT, RunDir, RunDirError, one_line


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


def epoch_loss_text(loss_sum: float, seen: int) -> str:
    """The progress bar's postfix: the mean training loss over the epoch's batches so far
    (``loss_sum`` is the sum of per-example losses over ``seen`` examples of this process), so
    that the number settles as the epoch goes instead of jumping with every batch.

    >>> epoch_loss_text(3.0 * 32 + 1.0 * 32, 64)
    'loss 2.000'
    """
    return f"loss {loss_sum / max(1, seen):.3f}"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


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
    start_epoch: int = 0  # epochs completed before this call (resumed from the checkpoint)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint_epoch`` is the epoch of the checkpoint left in the
    run directory, None if there is none (nothing to resume)."""

    def __init__(self, checkpoint_epoch: Optional[int]):
        super().__init__(checkpoint_epoch)
        self.checkpoint_epoch = checkpoint_epoch


T = TypeVar("T")


def _on_every_rank(ctx: dist_utils.DistContext, fn: Callable[[], T]) -> T:
    """``fn()``; if it raises a run-directory or config error on any rank, raise on every rank
    (that rank's error; elsewhere one that points at it), so that no rank waits forever."""
    try:
        result, error = fn(), None
    except (RunDirError, OSError, ValueError) as exc:
        result, error = None, exc
    (failed,) = dist_utils.any_flags(ctx, error is not None)
    if error is not None:
        raise error
    if failed:
        raise RunDirError("another process of this run could not use the run directory; "
                          "see its message")
    return result


def _read_state(run: RunDir, cfg: TrainConfig, resume: bool, world_size: int) -> Optional[Dict]:
    """The checkpoint to continue (None for a new run), after checking the resume rule."""
    if not resume:
        if run.has_checkpoint():
            raise RunDirError(f"{run.path} already holds a run ({run.checkpoint.name}); pass "
                              "--resume to continue it or choose another --out")
        return None
    state = run.load()
    problems = resume_problems(state, cfg, world_size)
    if problems:
        raise RunDirError(
            f"--resume: {run.path} was trained with another configuration "
            f"({'; '.join(problems)}); resume with the same flags and number of processes "
            "(only --epochs and --device may change) or choose another --out"
        )
    if cfg.epochs < state["epoch"]:
        raise RunDirError(f"--resume: {run.path} holds {state['epoch']} completed epochs, more "
                          f"than --epochs {cfg.epochs}; pass --epochs {state['epoch']} or more")
    return state


def train(cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True,
          data: Optional[Dataset] = None,
          on_epoch: Optional[Callable[[Dict], None]] = None) -> TrainResult:
    """Train per ``cfg`` into run directory ``out``; return the metrics and the model.

    The run directory (see :mod:`convspec.train.rundir`) is locked for the duration: another
    process training into it fails at once (:class:`~convspec.train.rundir.RunLocked`). A new
    run writes its checkpoint, ``config.json`` (the resolved config, seed, git commit, library
    versions) and an empty ``metrics.jsonl`` before step 0; each epoch replaces the checkpoint
    atomically, then the two views. ``resume=True`` continues from the checkpoint up to
    ``cfg.epochs``: only ``epochs`` (not below the completed epochs; equal means nothing to do)
    and ``device`` may differ from the checkpoint's config, and the number of processes must be
    the same. Under ``torchrun`` the model is wrapped in DistributedDataParallel and only rank 0
    locks and writes files. Ctrl-C raises :class:`Interrupted`. ``on_epoch(row)`` is called on
    the main process with each epoch's metrics row once its checkpoint is written.
    """
    cfg.validate()
    ctx = dist_utils.setup()
    saved: Dict[str, Optional[int]] = {"epoch": None}  # the epoch of the checkpoint on disk
    try:
        return _train(cfg, RunDir(out), ctx, resume, progress, data, saved, on_epoch)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(saved["epoch"]) from None
    finally:
        dist_utils.cleanup(ctx)


def _train(cfg: TrainConfig, run: RunDir, ctx: dist_utils.DistContext, resume: bool,
           progress: bool, data: Optional[Dataset], saved: Dict,
           on_epoch: Optional[Callable[[Dict], None]]) -> TrainResult:
    device = ctx.device if ctx.world_size > 1 else _pick_device(cfg.device)
    if resume and not run.has_checkpoint():  # before creating anything
        raise RunDirError(f"--resume: no checkpoint at {run.checkpoint}; start the run without "
                          "--resume")
    with contextlib.ExitStack() as held:
        def claim() -> None:
            if ctx.is_main:
                run.create()
                held.enter_context(run.lock())
                run.remove_stale_tmp()

        _on_every_rank(ctx, claim)
        state = _on_every_rank(ctx, lambda: _read_state(run, cfg, resume, ctx.world_size))
        if state is not None:
            saved["epoch"] = state["epoch"]
        return _train_locked(cfg, run, ctx, device, state, progress, data, saved, on_epoch)


def _train_locked(cfg: TrainConfig, run: RunDir, ctx: dist_utils.DistContext,
                  device: torch.device, state: Optional[Dict], progress: bool,
                  data: Optional[Dataset], saved: Dict,
                  on_epoch: Optional[Callable[[Dict], None]] = None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_dataset(cfg.data, cfg.data_dir, seed=cfg.seed)
    data = data.subset(cfg.n_train, cfg.n_test)
    augment = data.augment if cfg.augment is None else cfg.augment
    model = build_model(cfg.model, data.num_classes, data.in_channels)
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

    # What config.json says: the resolved config, seed, git commit, library versions. A resumed
    # run keeps the record of its start, with the config it continues under, and appends its
    # environment if that differs.
    record = {"config": asdict(cfg), "environment": environment(),
              "world_size": ctx.world_size, "device": str(device),
              "iterations_per_epoch": iters_per_epoch}
    record = json.loads(json.dumps(record))  # plain JSON types (torch.__version__ is not a str)
    start_epoch, history, views = 0, [], None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if svb is not None and state.get("svb") is not None:
                svb.load_state_dict(state["svb"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise RunDirError(f"{run.checkpoint} does not fit this configuration's model and "
                              f"optimizer: {one_line(exc)[:200]}") from None
        start_epoch, history = state["epoch"], list(state["history"])
        stored = state.get("record")
        if stored is not None:
            later = [r for r in stored.get("resumed", []) if isinstance(r, dict)]
            envs = [stored.get("environment")] + [r.get("environment") for r in later]
            if record["environment"] not in envs:
                later.append({"epoch": start_epoch, "environment": record["environment"]})
            record = {**stored, "config": asdict(cfg), "device": str(device)}
            if later:
                record["resumed"] = later
        # The views of the checkpoint as it is (they may lag it by one epoch after a kill
        # between the two writes); the new config reaches them with the next checkpoint.
        views = {"history": history,
                 "record": stored if stored is not None else {**record, "config": state["config"]}}
        state = None  # free the loaded tensors

    def snapshot(epoch: int) -> Dict:
        return {
            "format": FORMAT, "epoch": epoch, "history": history, "config": asdict(cfg),
            "world_size": ctx.world_size, "record": record,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "svb": svb.state_dict() if svb is not None else None,
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        }

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    # From here Ctrl-C is noticed at the next step, so that no write is cut short by it.
    old_handler = signal.signal(signal.SIGINT, on_sigint) if ctx.is_main_thread else None
    try:
        if views is None:  # an interrupt in the first epoch leaves a resumable run
            _on_every_rank(ctx, lambda: run.save(snapshot(0)) if ctx.is_main else None)
        else:
            _on_every_rank(ctx, lambda: run.write_views(views) if ctx.is_main else None)
        saved["epoch"] = start_epoch
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
                            f"the last good checkpoint (end of epoch {epoch}) is kept in {run.checkpoint}. "
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
                    bar.set_postfix_str(epoch_loss_text(total_loss, seen), refresh=False)
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
            # A failed write (a full disk) stops every rank; the previous checkpoint stays.
            _on_every_rank(ctx, lambda: run.save(snapshot(epoch + 1)) if ctx.is_main else None)
            saved["epoch"] = epoch + 1
            if on_epoch is not None and ctx.is_main:
                on_epoch(row)
            if progress and ctx.is_main:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
                      f"test error {100 * test_error:.2f}%, {row['epoch_time_s']:.1f}s",
                      file=sys.stderr)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if reg is not None:
            reg.remove()
    return TrainResult(history, model, start_epoch)
