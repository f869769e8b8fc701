"""Datasets for the training harness: Fashion-MNIST, CIFAR-10/100, and a synthetic set.

Everything is read into memory as tensors (these datasets are small); batching and augmentation
run on the training device in whole batches, so no worker processes and no torchvision are needed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HELP = (
    "Fashion-MNIST comes from Debian's package dataset-fashion-mnist: "
    "run `sudo apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/"
    "fashion-mnist/), or pass --data-dir to a folder holding train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
)
CIFAR_HELP = (
    "CIFAR is read from the standard python version: download cifar-10-python.tar.gz or "
    "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and "
    "pass --data-dir pointing at the folder that contains {folder}/ (or at {folder}/ itself)"
)
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")


class DataError(RuntimeError):
    """A dataset file is missing or corrupt; the message names the file and how to get it."""


@dataclass
class Dataset:
    """Train and test tensors: images ``(n, C, H, W)`` uint8 (or float32), labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: bool  # pad-4 random crops and horizontal flips at training time

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    def subset(self, n_train: Optional[int], n_test: Optional[int]) -> "Dataset":
        """The first ``n_train`` / ``n_test`` examples (``None`` keeps all)."""
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
            self.mean,
            self.std,
            self.augment,
        )


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)


def _open_maybe_gz(folder: Path, stem: str) -> Tuple[Path, bytes]:
    for path in (folder / stem, folder / (stem + ".gz")):
        if path.is_file():
            try:
                raw = path.read_bytes()
                return path, gzip.decompress(raw) if path.suffix == ".gz" else raw
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"cannot read {path}: {exc}. {FASHION_MNIST_HELP}") from exc
    raise DataError(f"missing file {folder / stem}[.gz]. {FASHION_MNIST_HELP}")


def read_idx(path: Path, raw: bytes, expect_dims: int) -> np.ndarray:
    """Parse an IDX file (unsigned bytes) with ``expect_dims`` dimensions; validate its size."""
    if len(raw) < 4 + 4 * expect_dims:
        raise DataError(f"{path} is truncated (only {len(raw)} bytes). {FASHION_MNIST_HELP}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {expect_dims} dimensions "
            f"(header {raw[:4].hex()}). {FASHION_MNIST_HELP}"
        )
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(
            f"{path} is corrupt: header says {dims} = {int(np.prod(dims))} bytes, "
            f"file holds {len(body)}. {FASHION_MNIST_HELP}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_fashion_mnist(data_dir: Optional[Path] = None) -> Dataset:
    """Fashion-MNIST (60000 train, 10000 test, 1 x 28 x 28, 10 classes) from IDX files."""
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DataError(f"no folder {folder}. {FASHION_MNIST_HELP}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ipath, iraw = _open_maybe_gz(folder, f"{prefix}-images-idx3-ubyte")
        lpath, lraw = _open_maybe_gz(folder, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(ipath, iraw, 3)
        labels = read_idx(lpath, lraw, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{ipath} has {images.shape[0]} images but {lpath} has {labels.shape[0]} labels"
            )
        if labels.max(initial=0) > 9:
            raise DataError(f"{lpath} holds labels above 9: not Fashion-MNIST")
        parts[split] = (
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return Dataset(
        "fashion-mnist", *parts["train"], *parts["test"], num_classes=10,
        mean=(0.2860,), std=(0.3530,), augment=False,
    )


# ---------------------------------------------------------------- CIFAR (python pickles)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts: plain containers and numpy arrays, nothing executable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _load_cifar_batch(path: Path, label_key: str, help_text: str):
    if not path.is_file():
        raise DataError(f"missing file {path}. {help_text}")
    try:
        with path.open("rb") as fh:
            d = _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key.encode()], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch ({exc!r}). {help_text}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path} is corrupt: data {data.shape}, labels {labels.shape}. {help_text}"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(name: str, data_dir: Optional[Path]) -> Dataset:
    """CIFAR-10 (``'cifar10'``) or CIFAR-100 (``'cifar100'``, fine labels) from the python version."""
    folder_name, train_files, test_file, label_key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                    "test_batch", "labels", 10),
        "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
    }[name]
    help_text = CIFAR_HELP.format(folder=folder_name)
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir. {help_text}")
    folder = Path(data_dir)
    if (folder / folder_name).is_dir():
        folder = folder / folder_name
    if not folder.is_dir():
        raise DataError(f"no folder {folder}. {help_text}")
    xs, ys = zip(*(_load_cifar_batch(folder / f, label_key, help_text) for f in train_files))
    x_test, y_test = _load_cifar_batch(folder / test_file, label_key, help_text)
    y_train = torch.cat(ys)
    if int(max(y_train.max(), y_test.max())) >= classes or int(min(y_train.min(), y_test.min())) < 0:
        raise DataError(f"labels in {folder} fall outside 0..{classes - 1}: not {name}")
    mean = (0.4914, 0.4822, 0.4465) if name == "cifar10" else (0.5071, 0.4865, 0.4409)
    std = (0.2470, 0.2435, 0.2616) if name == "cifar10" else (0.2673, 0.2564, 0.2762)
    return Dataset(name, torch.cat(xs), y_train, x_test, y_test, classes, mean, std, augment=True)


# ---------------------------------------------------------------- synthetic


def synthetic(
    n_train: int = 512,
    n_test: int = 256,
    *,
    channels: int = 1,
    size: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    noise: float = 0.5,
) -> Dataset:
    """A seeded, learnable image classification set: one smooth random template per class plus
    Gaussian noise (float32 images, already normalised). Same seed, same data."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn(n, channels, size, size, generator=g)
        return x.float(), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes,
                   mean=(0.0,) * channels, std=(1.0,) * channels, augment=False)


def load_dataset(name: str, data_dir: Optional[Path] = None, *, seed: int = 0) -> Dataset:
    """One of :data:`DATASETS` by name."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir)
    if name == "synthetic":
        return synthetic(seed=seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


# ---------------------------------------------------------------- batches and augmentation


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images to float in [0, 1], then per-channel standardisation."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, take a random crop of the original size, flip half horizontally.

    One gather for the whole batch, on ``x``'s device; offsets come from ``generator`` (on CPU)
    so that runs are reproducible.
    """
    b, _, h, w = x.shape
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offs[0].view(b, 1) + torch.arange(h, device=x.device).view(1, h)  # (b, h)
    cols = offs[1].view(b, 1) + torch.arange(w, device=x.device).view(1, w)  # (b, w)
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    idx_b = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[idx_b, idx_c, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: Optional[torch.Generator] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``(x, y)``; with ``world_size > 1``, rank ``rank``'s share of each epoch
    (the same permutation on every rank, split round-robin and padded to equal length, like
    ``DistributedSampler``)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = torch.cat([order, order[: per_rank * world_size - n]])[rank::world_size]
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
