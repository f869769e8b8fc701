"""The run directory: crash consistency, the lock, safe loading, the resume rule.

Runs are tiny (synthetic data, ConvNet-8, 64 images, 2 steps per epoch) and single-threaded, so
that runs in the same process are bitwise reproducible.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from convspec.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--model", "convnet-8", "--batch-size", "32",
        "--n-train", "64", "--n-test", "32", "--no-progress", "--lr", "0.05",
        "--method", "svb+bbn", "--svb-every", "1", "--augment"]
EPOCHS = 2
WALL_CLOCK = ("epoch_time_s",)


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no handler of the code under test catches it."""


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(run, epochs=EPOCHS, *extra):
    return main(["train", *TINY, "--epochs", str(epochs), "--out", str(run), *extra])


def _rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def _ckpt(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_describes_checkpoint(run):
    """Every file of ``run`` describes exactly its checkpoint."""
    ckpt = _ckpt(run)
    assert _rows(run) == ckpt["history"]
    assert len(ckpt["history"]) == ckpt["epoch"]
    assert [r["epoch"] for r in ckpt["history"]] == list(range(1, ckpt["epoch"] + 1))
    assert json.loads((run / "config.json").read_text())["config"] == ckpt["config"]


def assert_same_run(ref, run, compare_environment=True):
    """The files of ``run`` equal those of ``ref`` but for wall-clock times."""
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())
    a, b = (json.loads((r / "config.json").read_text()) for r in (ref, run))
    if not compare_environment:  # another process: its thread count etc. may differ
        for rec in (a, b):
            rec.pop("environment", None), rec.pop("resumed", None)
    assert a == b
    assert _strip(_rows(ref)) == _strip(_rows(run))
    ca, cb = _ckpt(ref), _ckpt(run)
    ca["history"], cb["history"] = _strip(ca["history"]), _strip(cb["history"])
    if not compare_environment:
        for c in (ca, cb):
            c["record"].pop("environment", None), c["record"].pop("resumed", None)
    _same(ca, cb)
    assert_describes_checkpoint(run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the number of os.replace calls it made."""
    run = tmp_path_factory.mktemp("reference") / "run"
    real, calls = os.replace, []

    def counting(src, dst, **kw):
        calls.append(str(dst))
        real(src, dst, **kw)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    os.replace = counting
    try:
        assert train(run) == 0
    finally:
        os.replace = real
        torch.set_num_threads(n)
    return run, calls


def test_files_of_a_run_describe_its_checkpoint(reference):
    run, _ = reference
    assert_describes_checkpoint(run)
    assert (run / ".lock").read_text() == ""  # released, and naming nobody


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_at_every_write_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                     reference, when):
    """A kill just before or just after each rename of the run (every file, every epoch), then
    --resume (or a fresh start when no checkpoint exists yet): the final files equal the
    uninterrupted run's."""
    ref, calls = reference
    real = os.replace
    assert len(calls) >= 3
    for k, target in enumerate(calls):
        run = tmp_path / f"{when}{k}"
        count = [0]

        def replace(src, dst, **kw):
            hit = count[0] == k
            count[0] += 1
            if hit and when == "before":
                raise Killed
            real(src, dst, **kw)
            if hit:
                raise Killed

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            train(run)
        monkeypatch.setattr(os, "replace", real)
        if when == "before":  # what a real kill leaves: the unfinished temporary file
            (run / (Path(target).name + ".tmp")).write_bytes(b"half a file")
        resume = (run / "checkpoint.pt").exists()
        if resume:
            from convspec.train.rundir import RunDir

            ckpt = _ckpt(run)
            # Readers see exactly the checkpointed epochs, even before the resume.
            assert RunDir(run).history() == ckpt["history"], (when, k, target)
        assert train(run, EPOCHS, *(["--resume"] if resume else [])) == 0, (when, k, target)
        assert_same_run(ref, run)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json", "metrics.jsonl"])
def test_full_disk_keeps_a_consistent_run(tmp_path, monkeypatch, reference, capsys, name):
    """ENOSPC while writing the second epoch's files: one-line error, the files describe the
    checkpoint, and --resume ends with the uninterrupted run's files."""
    ref, _ = reference
    run = tmp_path / "run"
    real_fsync, seen = os.fsync, [0]

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.endswith(name + ".tmp"):
            seen[0] += 1
            if seen[0] == 3:  # the writes at start, after epoch 1, after epoch 2
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train(run) == 1
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err
    assert "No space left on device" in err and name in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    ckpt = _ckpt(run)
    assert len(_rows(run)) <= ckpt["epoch"] == len(ckpt["history"])
    assert train(run, EPOCHS, "--resume") == 0
    assert_same_run(ref, run)


@pytest.mark.parametrize("when", ["before", "after"])
def test_real_sigkill_at_a_checkpoint_then_resume(tmp_path, reference, when):
    """A real SIGKILL just before / just after the second epoch's checkpoint rename."""
    ref, _ = reference
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_kill_train_worker.py"), when, "3", "train",
         *TINY, "--epochs", str(EPOCHS), "--out", str(run)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = _ckpt(run)
    assert ckpt["epoch"] == (1 if when == "before" else 2)
    assert len(_rows(run)) <= ckpt["epoch"]
    assert train(run, EPOCHS, "--resume") == 0
    assert_same_run(ref, run, compare_environment=False)


# ---------------------------------------------------------------- the lock


def test_second_process_refuses_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    holder = subprocess.Popen(
        [sys.executable, "-m", "convspec", "train", *TINY, "--n-train", "512", "--epochs", "200",
         "--out", str(run)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        # Same flags, --resume: without a lock it would train into the same files.
        assert train(run, 2, "--n-train", "512", "--resume") == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        holder.send_signal(signal.SIGINT)
        _, herr = holder.communicate(timeout=120)
    assert holder.returncode == 130, herr
    assert_describes_checkpoint(run)
    assert (run / ".lock").read_text() == ""


def test_lock_in_process(tmp_path, capsys):
    from convspec.train.rundir import RunDir, RunLocked

    run = tmp_path / "run"
    run.mkdir()
    with RunDir(run).lock(command="the holder"):
        assert train(run) == 1
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "the holder" in err
        with pytest.raises(RunLocked):
            with RunDir(run).lock():
                pass
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written
    assert train(run, 1) == 0  # released


# ---------------------------------------------------------------- loading safely


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_run(run, marker, epochs=1):
    """A run directory whose checkpoint carries a payload, and views that look finished."""
    from convspec.train.config import TrainConfig

    cfg = TrainConfig(data="synthetic", model="convnet-8", batch_size=32, n_train=64,
                      n_test=32, lr=0.05, method="sgd", epochs=epochs)
    run.mkdir(parents=True)
    row = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0,
           "test_error": 0.5, "lr": 0.05, "epoch_time_s": 1.0, "sigma_reshaped": {}}
    torch.save({"model": {}, "config": asdict(cfg), "epoch": 1, "history": [row],
                "payload": _Payload(marker)}, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps({"config": asdict(cfg)}))
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return cfg


@pytest.mark.parametrize("command", ["train", "compare", "spectrum"])
def test_crafted_checkpoint_runs_no_code(tmp_path, capsys, command):
    marker = tmp_path / "created-by-payload"
    out = tmp_path / "cmp"
    run = out / "sgd-seed0"
    _crafted_run(run, marker)
    common = ["--data", "synthetic", "--model", "convnet-8", "--batch-size", "32",
              "--n-train", "64", "--n-test", "32", "--lr", "0.05", "--no-progress"]
    if command == "train":
        rc = main(["train", *common, "--method", "sgd", "--epochs", "2", "--out", str(run),
                   "--resume"])
    elif command == "compare":
        rc = main(["compare", *common, "--methods", "sgd", "--seeds", "0", "--epochs", "1",
                   "--out", str(out)])
    else:
        rc = main(["spectrum", str(run / "checkpoint.pt"), "--input-size", "1", "6", "6",
                   "--out", str(tmp_path / "spec"), "--no-progress"])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 1 and "refusing to load" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_checkpoints_hold_only_tensors_and_plain_data(reference):
    run, _ = reference
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # would raise otherwise
    assert ckpt["format"] == 2 and ckpt["world_size"] == 1 and ckpt["epoch"] == EPOCHS


def test_save_refuses_objects_that_are_not_plain(tmp_path):
    from convspec.train.rundir import RunDir

    with pytest.raises(TypeError, match="plain data"):
        RunDir(tmp_path).save({"epoch": 0, "history": [], "record": {}, "model": {},
                               "config": {}, "x": Path("a")})
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "half"])
def test_resume_from_a_truncated_or_empty_checkpoint_is_one_line(tmp_path, capsys, reference,
                                                                  content):
    ref, _ = reference
    run = tmp_path / "run"
    run.mkdir()
    if content == "half":
        data = (ref / "checkpoint.pt").read_bytes()
        content = data[: len(data) // 2]
    (run / "checkpoint.pt").write_bytes(content)
    assert train(run, EPOCHS, "--resume") == 1
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the resume rule


def _snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir()}


def test_resume_with_fewer_epochs_is_refused(tmp_path, capsys, reference):
    ref, _ = reference
    before = _snapshot(ref)
    assert train(ref, 1, "--resume") == 1
    err = capsys.readouterr().err
    assert "holds 2 completed epochs" in err and "--epochs 2 or more" in err
    assert _snapshot(ref) == before


def test_resume_with_the_same_epochs_says_there_is_nothing_to_do(tmp_path, capsys, reference):
    ref, _ = reference
    before = _snapshot(ref)
    assert train(ref, EPOCHS, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert _snapshot(ref) == before


def test_resume_with_another_data_dir_is_refused(tmp_path, capsys, reference):
    ref, _ = reference
    before = _snapshot(ref)
    assert train(ref, 3, "--resume", "--data-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "data_dir: None ->" in err and "--epochs and --device" in err
    assert _snapshot(ref) == before


def test_resume_with_another_number_of_processes_is_refused(reference):
    from convspec.train.config import TrainConfig, resume_problems
    from convspec.train.rundir import RunDir

    ref, _ = reference
    state = RunDir(ref).load(mmap=True)
    cfg = TrainConfig(**state["config"])
    assert resume_problems(state, cfg, 1) == []
    assert resume_problems(state, cfg, 2) == ["processes: 1 -> 2"]
    cfg.epochs, cfg.device = 9, "cpu"
    assert resume_problems(state, cfg, 1) == []  # the two fields that may change


def test_torchrun_resume_of_a_single_process_run_is_refused(tmp_path):
    run = tmp_path / "run"
    assert train(run, 1) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convspec", "train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "processes: 1 -> 2" in proc.stderr, proc.stderr[-3000:]
    assert _ckpt(run)["epoch"] == 1


# ---------------------------------------------------------------- compare reads the checkpoint


def test_compare_resumes_a_run_whose_metrics_ran_ahead_of_its_checkpoint(tmp_path, monkeypatch,
                                                                         reference):
    """The state the old write order left after a kill (metrics.jsonl one epoch ahead of the
    checkpoint) is an unfinished run: compare resumes it instead of counting it finished."""
    ref, _ = reference
    out = tmp_path / "cmp"
    run = out / "svb+bbn-seed0"
    real, count = os.replace, [0]

    def replace(src, dst, **kw):
        if str(dst).endswith("checkpoint.pt"):
            count[0] += 1
            if count[0] == 3:  # the checkpoint of epoch 2
                raise Killed
        real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train(run)
    monkeypatch.setattr(os, "replace", real)
    rows = _rows(run)[:1]
    rows.append({**rows[0], "epoch": 2})  # the line the old order appended before the rename
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [a for a in TINY if a not in ("--method", "svb+bbn")]
    assert main(["compare", *args, "--methods", "svb+bbn", "--seeds", "0", "--epochs",
                 str(EPOCHS), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert _ckpt(run)["epoch"] == EPOCHS
    assert summary["results"]["svb+bbn"]["runs"][0]["test_error"] == \
        [r["test_error"] for r in _rows(ref)]
    assert_describes_checkpoint(run)
