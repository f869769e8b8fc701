"""The run directory of ``convspec train``: the one module that reads and writes its files.

A run directory holds

- ``checkpoint.pt``, the single source of truth: model, optimizer, SVB and RNG states, the
  number of completed epochs, the metrics of those epochs, the resolved config, the number of
  processes and the ``config.json`` record. Only tensors and plain data (dict, list, tuple, str,
  int, float, bool, None): it is written by :func:`torch.save` after a check that nothing else
  is in it, and always read with ``torch.load(weights_only=True)``, so a crafted file cannot run
  code.
- ``config.json`` and ``metrics.jsonl``: views of the checkpoint for people and other tools,
  rewritten whole from it after every checkpoint.
- ``.lock``: held (``fcntl.flock``) by the one process that trains into the directory, and
  naming it (pid, host, command) while held; empty otherwise.

Note [crash consistency]: each file is written to ``NAME.tmp``, flushed to disk and renamed over
``NAME``, checkpoint first, views after. A kill at any instant (or a full disk) leaves a whole
checkpoint of some completed epoch ``E`` and views of epoch ``E`` or ``E - 1``, never of a later
one. Readers (:meth:`RunDir.history`, :meth:`RunDir.record`) take what they report from the
checkpoint, and ``--resume`` rewrites the views from it before training on, so after a resume
every file describes the checkpointed state, and the final files equal those of an uninterrupted
run but for the wall-clock field ``epoch_time_s`` of the epochs that were run again.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
import time
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional

import torch

from .models import upgrade_model_keys

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
#: Version of the checkpoint layout. 1 (no ``format`` key): without ``record`` and ``world_size``.
FORMAT = 2
#: Keys every metrics row holds (besides ``epoch`` and ``sigma_reshaped``).
METRIC_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_error", "lr", "epoch_time_s")
#: Row fields that measure wall-clock time: they differ between two runs of the same computation.
WALL_CLOCK_KEYS = ("epoch_time_s",)


class RunDirError(ValueError):
    """A run directory, checkpoint or output folder cannot be used; the message says why."""


class RunLocked(RunDirError):
    """Another process is training into the run directory."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(text).split())


# Note [old configs]: run directories written before the one model naming store ``model`` as a
# family (``convnet``) with ``depth`` and ``width`` keys, in the checkpoint's config, its record
# and config.json. Every reader here returns them as ``model = 'convnet-20'`` (Note [model names]
# in models.py), so the resume rule, ``compare``, ``plot`` and ``spectrum`` see one naming. Reading
# never rewrites a file; ``--resume`` rewrites the views, and then they are in the new naming.


def _os_reason(exc: OSError) -> str:
    return exc.strerror or one_line(exc) or type(exc).__name__


# ---------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` so that it holds either its old content or all of the new one.

    ``write(fh)`` fills ``path.tmp``, which is flushed to disk and renamed over ``path``. On an
    error (a full disk, say) the temporary file is removed, ``path`` is untouched and a
    :class:`RunDirError` names the file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise RunDirError(f"cannot write {path}: {_os_reason(exc)}") from exc
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: object, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON into ``path``, atomically."""
    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def read_json(path: Path) -> object:
    """The JSON in ``path``; a :class:`RunDirError` if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {_os_reason(exc)}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON: {one_line(exc)}") from None


def make_output_dir(path: Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) and check that it is writable.

    Every command calls this before computing anything, so a bad ``--out`` fails at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{flag} {path}: cannot create the folder: {_os_reason(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {path}: the folder is not writable")
    return path


# ---------------------------------------------------------------- checkpoints


def _check_plain(obj: object, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` unless ``obj`` is tensors and plain data only (what
    ``torch.load(weights_only=True)`` reads back)."""
    # Exact types: a subclass (TorchVersion is a str) would be pickled as its class.
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors and "
                    "plain data")


def load_checkpoint(path: Path, *, mmap: bool = False) -> Dict:
    """The dict saved in ``path``, read with ``weights_only=True``; it must hold ``model`` (a
    state dict) and ``config``. Every failure is a one-line :class:`RunDirError`. A config (and
    the record's) in the old model naming (``model``, ``depth``, ``width``) is returned in the
    current one (Note [old configs]).

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the history or the
    config is needed.
    """
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunDirError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError as exc:
        text = one_line(exc)
        if "Unsupported global" in text:
            # weights_only refused a global: the file holds objects other than tensors and plain
            # data (a pickled class, or a payload that would run code). None of it was executed.
            what = text[text.index("Unsupported global"):].split(" was not", 1)[0]
            raise RunDirError(f"refusing to load {path}: it holds objects other than tensors "
                              f"and plain data ({what})") from None
        raise RunDirError(f"{path} is not a readable checkpoint (corrupt: "
                          f"{text[text.find('WeightsUnpickler'):][:120]})") from None
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {_os_reason(exc)}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError, struct.error) as exc:
        # Truncated, empty or not a torch.save file at all (struct.error: a legacy-format
        # opcode whose argument is cut off, as in a 4-byte text file starting with 'j').
        size = path.stat().st_size if path.is_file() else 0
        raise RunDirError(f"{path} is not a readable checkpoint ({size} bytes, truncated or "
                          f"corrupt: {one_line(exc)[:120] or type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("config"), dict):
        raise RunDirError(f"{path} is not a convspec train checkpoint (no 'model' and 'config')")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor)
               for k, v in state["model"].items()):
        raise RunDirError(f"{path}: 'model' is not a state dict of tensors")
    state["config"] = upgrade_model_keys(state["config"])
    record = state.get("record")
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        state["record"] = {**record, "config": upgrade_model_keys(record["config"])}
    return state


def check_history(rows: object, where: str) -> List[Dict]:
    """``rows`` if it is a list of metrics rows of epochs 1, 2, ...; else a :class:`RunDirError`
    that names ``where`` (a file), the row and the missing or bad key."""
    if not isinstance(rows, list):
        raise RunDirError(f"{where}: the history is not a list of rows")
    for i, row in enumerate(rows):
        at = f"{where}, row of epoch {i + 1}"
        if not isinstance(row, dict):
            raise RunDirError(f"{at}: not a JSON object")
        missing = [k for k in ("epoch", *METRIC_KEYS, "sigma_reshaped") if k not in row]
        if missing:
            raise RunDirError(f"{at}: missing keys {missing}")
        if isinstance(row["epoch"], bool) or row["epoch"] != i + 1:
            raise RunDirError(f"{at}: epoch is {row['epoch']!r}, expected {i + 1}")
        for k in METRIC_KEYS:
            v = row[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RunDirError(f"{at}: {k} = {v!r} is not a number")
        if not isinstance(row["sigma_reshaped"], dict):
            raise RunDirError(f"{at}: sigma_reshaped is not an object")
    return rows


def _metrics_text(history: List[Dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in history)


class RunDir:
    """A run directory of ``convspec train`` (see the module docstring for its files)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoint = self.path / CHECKPOINT
        self.config = self.path / CONFIG
        self.metrics = self.path / METRICS
        self.lock_file = self.path / LOCK

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def create(self) -> None:
        make_output_dir(self.path)

    # -- the lock

    def holder(self) -> str:
        """Who holds the lock, as its lock file says."""
        try:
            info = json.loads(self.lock_file.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or "pid" not in info:
            return "another process"
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({info.get('command')})")

    @contextmanager
    def lock(self, command: Optional[str] = None) -> Iterator[None]:
        """Hold an exclusive lock on the directory, or raise :class:`RunLocked` at once.

        The lock file names this process (``command``: default ``sys.argv``) while it is held.
        The lock ends with the process, even one killed by SIGKILL: the kernel releases
        ``flock`` locks with the file.
        """
        if fcntl is None:  # pragma: no cover - not POSIX
            yield
            return
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot open {self.lock_file}: {_os_reason(exc)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(f"{self.path} is in use by {self.holder()}; wait for it to end "
                                "or choose another --out") from None
            except OSError as exc:  # pragma: no cover - a file system without locks
                raise RunDirError(f"cannot lock {self.lock_file}: {_os_reason(exc)}") from None
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": command if command is not None else " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # names no holder once released
        finally:
            os.close(fd)  # releases the lock

    # -- writing (holding the lock)

    def save(self, state: Dict) -> None:
        """Write the checkpoint ``state``, then the views derived from it (Note [crash
        consistency]). ``state`` holds ``epoch``, ``history`` and ``record`` (the config.json
        content) besides the training states."""
        _check_plain(state)
        check_history(state["history"], "checkpoint to save")
        if len(state["history"]) != state["epoch"]:
            raise ValueError(f"checkpoint of epoch {state['epoch']} with "
                             f"{len(state['history'])} history rows")
        atomic_write(self.checkpoint, lambda fh: torch.save(state, fh))
        self.write_views(state)

    def write_views(self, state: Dict) -> None:
        """Rewrite ``config.json`` and ``metrics.jsonl`` from the checkpoint ``state``."""
        write_json(self.config, state["record"])
        text = _metrics_text(state["history"])
        atomic_write(self.metrics, lambda fh: fh.write(text.encode()))

    def remove_stale_tmp(self) -> None:
        """Remove the temporary files a killed writer left behind."""
        for name in (CHECKPOINT, CONFIG, METRICS):
            try:
                (self.path / (name + ".tmp")).unlink()
            except FileNotFoundError:
                pass

    # -- reading

    def load(self, *, mmap: bool = False) -> Dict:
        """The checkpoint of a training run, validated: ``epoch`` completed epochs, a
        ``history`` of as many rows, ``config``; a checkpoint of format 1 gets ``world_size``
        and ``record`` None."""
        state = load_checkpoint(self.checkpoint, mmap=mmap)
        where = str(self.checkpoint)
        required = ("optimizer", "generator", "torch_rng", "epoch", "history")
        missing = [k for k in required if k not in state]
        if missing:
            raise RunDirError(f"{where} is not a checkpoint of a training run (missing {missing})")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise RunDirError(f"{where}: epoch is {epoch!r}, not an int >= 0")
        check_history(state["history"], where)
        if len(state["history"]) != epoch:
            raise RunDirError(f"{where}: epoch {epoch} but {len(state['history'])} history rows")
        for k in ("generator", "torch_rng"):
            if not isinstance(state[k], torch.Tensor) or state[k].dtype != torch.uint8:
                raise RunDirError(f"{where}: {k} is not a random generator state")
        if not isinstance(state["optimizer"], dict):
            raise RunDirError(f"{where}: optimizer is not a state dict")
        ws = state.setdefault("world_size", None)
        if ws is not None and (isinstance(ws, bool) or not isinstance(ws, int) or ws < 1):
            raise RunDirError(f"{where}: world_size is {ws!r}")
        state.setdefault("svb", None)
        state.setdefault("record", None)
        return state

    def history(self) -> List[Dict]:
        """The metrics rows of the completed epochs: the checkpoint's if there is one, else
        ``metrics.jsonl``'s (a run directory whose checkpoint was deleted, e.g. a record)."""
        if self.has_checkpoint():
            return self.load(mmap=True)["history"]
        if not self.metrics.is_file():
            raise RunDirError(f"{self.path} is not a convspec run directory (no {CHECKPOINT} "
                              f"and no {METRICS})")
        try:
            lines = self.metrics.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunDirError(f"cannot read {self.metrics}: {one_line(exc)}") from None
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise RunDirError(f"{self.metrics} line {n} is not JSON: {one_line(exc)}") from None
        return check_history(rows, str(self.metrics))

    def record(self) -> Dict:
        """The ``config.json`` record (``config``, ``environment``, ...): the checkpoint's if
        there is one, else the file's."""
        if self.has_checkpoint():
            state = self.load(mmap=True)
            return state["record"] or {"config": state["config"]}
        if not self.config.is_file():
            raise RunDirError(f"{self.path} is not a convspec run directory (no {CHECKPOINT} "
                              f"and no {CONFIG})")
        record = read_json(self.config)
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise RunDirError(f"{self.config} has no 'config' object")
        return {**record, "config": upgrade_model_keys(record["config"])}

    def read_side(self, name: str) -> Optional[object]:
        """A side file written by another tool (e.g. ``operator_sigma.json`` of ``compare``),
        or None if it is missing or unreadable (side files are caches)."""
        try:
            return read_json(self.path / name)
        except RunDirError:
            return None

    def write_side(self, name: str, obj: object) -> None:
        write_json(self.path / name, obj, indent=None)
