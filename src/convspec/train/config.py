"""The training configuration: :class:`TrainConfig` (the defaults), TOML config files, strict
validation, and the rule for what a resumed run may change.

Precedence (applied by the command line): built-in defaults < a ``--config`` TOML file < flags.
Every value is type-checked strictly, then range-checked, before anything is written; a
``ValueError`` names the field (and its flag), the value and what it should be.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .data import DATASETS
from .models import MODEL_EXAMPLES, legacy_model_name, parse_model_name

METHODS = ("sgd", "svb", "svb+bbn", "frobenius")
SCHEDULES = ("paper", "step", "cosine")
INITS = ("orthogonal", "default")
BBN_MODES = ("bbn", "rel")


@dataclass
class TrainConfig:
    """Defaults follow Jia et al. (2017): SGD, momentum 0.9, weight decay 1e-4, batch 128, the
    learning rate decaying geometrically from 0.5 to 0.001 in steps held for 2 epochs,
    orthogonal initialisation, SVB once per epoch."""

    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    n_train: Optional[int] = None  # a subset of the training set (first n examples)
    n_test: Optional[int] = None
    model: str = "convnet-20"  # convnet-D, preact-resnet-D, wrn-D-W (Note [model names])
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

    def __post_init__(self) -> None:
        # TOML and Python write 1 for 1.0: store float fields as floats (bools stay as they are,
        # for validate() to refuse).
        for f in fields(self):
            v = getattr(self, f.name)
            if _FIELD_TYPES.get(f.name, (None,))[0] is float and type(v) is int:
                setattr(self, f.name, float(v))

    def validate(self) -> None:
        """Check every field's type, then its range; a ``ValueError`` names the field, the value
        and what it should be. Nothing is written before this passes."""
        for f in fields(self):
            problem = field_type_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(problem)
        checks = [
            (self.data in DATASETS, f"--data must be one of {DATASETS}, got {self.data!r}"),
            (self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.init in INITS, f"--init must be one of {INITS}, got {self.init!r}"),
            (self.bbn_mode in BBN_MODES, f"--bbn-mode must be one of {BBN_MODES}, got {self.bbn_mode!r}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lr_end > 0, f"--lr-end must be > 0, got {self.lr_end}"),
            (self.lr_hold >= 1, f"--lr-hold must be >= 1, got {self.lr_hold}"),
            (self.eps > 0, f"--eps must be > 0, got {self.eps}"),
            (self.bbn_eps > 0, f"--bbn-eps must be > 0, got {self.bbn_eps}"),
            (self.svb_every is None or self.svb_every >= 1,
             f"--svb-every must be >= 1, got {self.svb_every}"),
            (self.frob_weight >= 0, f"--frob-weight must be >= 0, got {self.frob_weight}"),
            (self.frob_alpha > 0, f"--frob-alpha must be > 0, got {self.frob_alpha}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.n_train is None or self.n_train >= 1, f"--n-train must be >= 1, got {self.n_train}"),
            (self.n_test is None or self.n_test >= 1, f"--n-test must be >= 1, got {self.n_test}"),
            (0 <= self.seed < 2**63 - 1, f"--seed must be in [0, 2**63 - 1), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        try:
            parse_model_name(self.model)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "--model 'x' ..."
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"--device {self.device!r} is not a device (cpu, cuda, cuda:1, auto)") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"--device {self.device!r}: only cpu and cuda are supported")


_KINDS = {bool: "a bool (true or false)", int: "an integer", float: "a finite number",
          str: "a string"}


def _field_types() -> Dict[str, tuple]:
    """Field name -> (base type, optional) from TrainConfig's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        out[name] = (base, optional)
    return out


_FIELD_TYPES: Dict[str, tuple] = {}


def field_type_problem(name: str, value: object) -> Optional[str]:
    """Why ``value`` is not of the type of TrainConfig field ``name`` (None if it is).

    Strict: a bool field takes only ``True``/``False`` (not ``"false"`` or 0), an int field only
    an int (not ``True`` or 2.5), a float field only a finite int or float, a str field only a
    str; optional fields also take None (leave the key out of a config file).
    """
    if name not in _FIELD_TYPES:
        return f"unknown key {name!r} (known: {', '.join(f.name for f in fields(TrainConfig))})"
    base, optional = _FIELD_TYPES[name]
    if value is None and optional:
        return None
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, base)
    if ok:
        return None
    what = _KINDS[base] + (" (or leave the key out)" if optional else "")
    flag = "--" + name.replace("_", "-")
    return f"{name} ({flag}) = {value!r}: expected {what}, got {type(value).__name__}"


_FIELD_TYPES.update(_field_types())

#: Fields a resumed run may change; any other difference from the checkpoint's config is refused,
#: and so is another number of processes. A different ``epochs`` stretches the learning-rate
#: schedule (it depends on the total); it may not be below the epochs already completed.
RESUME_MAY_DIFFER = ("epochs", "device")


def config_differences(stored: Dict, cfg: "TrainConfig") -> List[str]:
    """``field: stored -> now`` for every field of ``cfg`` (but :data:`RESUME_MAY_DIFFER`) that
    differs from the stored config dict."""
    now = asdict(cfg)
    return [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUME_MAY_DIFFER and stored.get(k) != v]


def _read_toml(path: Path) -> Dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("config files need Python >= 3.11 or `pip install tomli`") from None
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text (UTF-8) file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None


#: Keys of a config file's optional ``[compare]`` table (read by ``convspec compare`` only).
COMPARE_KEYS = {"methods": "a list of method strings", "seeds": "a list of integers",
                "jobs": "an integer >= 1", "baseline": "a method string",
                "runs": "a folder path (string)"}


def load_config_file(path: Path) -> Dict:
    """Read a TOML config file: keys are :class:`TrainConfig` field names, each value of the
    field's type (ranges are checked by :meth:`TrainConfig.validate`). The keys ``depth`` and
    ``width`` of the old naming are refused with the model name to write instead. An optional
    ``[compare]`` table is for ``convspec compare`` (:func:`load_compare_section`)."""
    data = _read_toml(path)
    data.pop("compare", None)
    if "depth" in data or "width" in data:
        raise ValueError(
            f"config file {path}: the keys depth and width are gone; the model name carries them: "
            f'model = "{legacy_model_name(data)}" (names such as {MODEL_EXAMPLES})'
        )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}")
    for name, value in data.items():
        problem = field_type_problem(name, value)
        if problem:
            raise ValueError(f"config file {path}: {problem}")
    return data


def load_compare_section(path: Path) -> Dict:
    """The ``[compare]`` table of a TOML config file (``methods``, ``seeds``, ``jobs``,
    ``baseline``, ``runs``), type-checked; ``{}`` when the file has none. ``runs`` is a folder
    relative to the working directory (commands are run from the repository root)."""
    section = _read_toml(path).get("compare", {})
    if not isinstance(section, dict):
        raise ValueError(f"config file {path}: compare must be a table ([compare])")
    unknown = sorted(set(section) - set(COMPARE_KEYS))
    if unknown:
        raise ValueError(f"config file {path}: [compare] has unknown keys {unknown} "
                         f"(known: {', '.join(COMPARE_KEYS)})")
    checks = {
        "methods": lambda v: isinstance(v, list) and v and all(isinstance(m, str) for m in v),
        "seeds": lambda v: isinstance(v, list) and v and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        "jobs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "baseline": lambda v: isinstance(v, str),
        "runs": lambda v: isinstance(v, str) and v != "",
    }
    for key, value in section.items():
        if not checks[key](value):
            raise ValueError(f"config file {path}: [compare] {key} = {value!r}: expected "
                             f"{COMPARE_KEYS[key]}")
    return section


def resume_problems(state: Dict, cfg: "TrainConfig", world_size: int) -> List[str]:
    """Why the checkpoint ``state`` cannot be continued by ``cfg`` on ``world_size`` processes:
    ``field: stored -> now`` per differing field (but :data:`RESUME_MAY_DIFFER`), and
    ``processes: stored -> now``."""
    problems = config_differences(state["config"], cfg)
    stored = state.get("world_size")
    if stored is not None and stored != world_size:
        problems.append(f"processes: {stored} -> {world_size}")
    return problems
