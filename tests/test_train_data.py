import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from convspec.train.data import (
    FASHION_MNIST_DIR,
    DataError,
    iterate_batches,
    load_cifar,
    load_fashion_mnist,
    random_crop_flip,
    synthetic,
)


def _write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def _fake_fashion(folder, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    ds = load_fashion_mnist(_fake_fashion(tmp_path / "fm", gz=gz))
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.y_test.shape == (5,) and ds.num_classes == 10


def test_fashion_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    folder = _fake_fashion(tmp_path / "fm", gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(folder)
    folder = _fake_fashion(tmp_path / "fm2", gz=False)
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match="corrupt.*train-images|train-images.*corrupt"):
        load_fashion_mnist(folder)
    p.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an IDX file"):
        load_fashion_mnist(folder)


def test_real_fashion_mnist_when_installed():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed (make installs it when run as root)")
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert sorted(ds.y_train.unique().tolist()) == list(range(10))
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


def _fake_cifar(root, name, n=6):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder = root / "cifar-100-python"
        files, key, classes = ["train", "test"], b"fine_labels", 100
    folder.mkdir(parents=True)
    for f in files:
        d = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
             key: rng.integers(0, classes, n).tolist(), b"batch_label": b"fake"}
        (folder / f).write_bytes(pickle.dumps(d, protocol=2))
    return folder


@pytest.mark.parametrize("name,n_train", [("cifar10", 30), ("cifar100", 6)])
def test_cifar_python_format(tmp_path, name, n_train):
    folder = _fake_cifar(tmp_path, name)
    for where in (tmp_path, folder):
        ds = load_cifar(name, where)
        assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
        assert ds.augment
    raw = np.frombuffer(pickle.loads((folder / ("test_batch" if name == "cifar10" else "test")).read_bytes())[b"data"], np.uint8)
    assert torch.equal(ds.x_test.reshape(-1), torch.from_numpy(raw.copy()))


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        load_cifar("cifar10", None)
    folder = _fake_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing file .*data_batch_3.*cs.toronto.edu"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR python batch"):
        load_cifar("cifar10", tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_cifar("cifar10", tmp_path)


def test_synthetic_is_seeded():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    g = torch.Generator().manual_seed(0)
    y = random_crop_flip(x, 2, g)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each output is some window of the padded image, maybe flipped
        found = any(
            torch.equal(y[b], w) or torch.equal(y[b], w.flip(-1))
            for i in range(5) for j in range(5)
            for w in [padded[b, :, i:i + 5, j:j + 5]]
        )
        assert found
    assert torch.equal(random_crop_flip(x, 0, torch.Generator().manual_seed(5)).abs().sum(), x.sum())


def test_iterate_batches_shards_like_distributed_sampler():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    parts = [torch.cat([b for _, b in iterate_batches(x, y, 3, shuffle=True,
                                                      generator=torch.Generator().manual_seed(0),
                                                      rank=r, world_size=3)]) for r in range(3)]
    assert [p.numel() for p in parts] == [4, 4, 4]
    assert set(torch.cat(parts).tolist()) == set(range(10))
