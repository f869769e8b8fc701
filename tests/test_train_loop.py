import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convspec.cli import main
from convspec.train.config import TrainConfig
from convspec.train.loop import learning_rate

TINY = ["--data", "synthetic", "--model", "convnet-8", "--batch-size", "32",
        "--n-train", "128", "--n-test", "64", "--no-progress", "--lr", "0.05"]
ROOT = Path(__file__).resolve().parents[1]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sgd", "svb", "svb+bbn", "frobenius"])
def test_cli_trains_every_method(tmp_path, method):
    run = tmp_path / method
    assert main(["train", *TINY, "--method", method, "--epochs", "1", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"] == method and "git_commit" in cfg["environment"]
    (row,) = _metrics(run)
    assert {"train_loss", "train_accuracy", "test_error", "epoch_time_s", "lr", "sigma_reshaped"} <= set(row)
    assert 0.0 <= row["test_error"] <= 1.0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    if method in ("svb", "svb+bbn"):  # bounded once at the end of the epoch (once per epoch)
        for lo, hi in row["sigma_reshaped"].values():
            assert 1 / 1.05 - 1e-5 <= lo and hi <= 1.05 + 1e-5


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    common = [*TINY, "--method", "svb+bbn", "--svb-every", "3", "--augment"]
    assert main(["train", *common, "--epochs", "3", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    assert main(["train", *common, "--epochs", "3", "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, part = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]
    assert strip(full) == strip(part)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "new"), "--resume"]) == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "nan"
    rc = main(["train", *TINY, "--method", "frobenius", "--frob-weight", "1e30",
               "--no-frob-normalize", "--epochs", "2", "--out", str(run)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "last good checkpoint" in err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "int"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "convspec", "train", *TINY, "--n-train", "512", "--epochs", "200",
         "--out", str(run)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 200 and len(_metrics(run)) == done
    assert main(["train", *TINY, "--n-train", "512", "--epochs", str(done + 1), "--out", str(run),
                 "--resume"]) == 0
    assert len(_metrics(run)) == done + 1


@pytest.mark.parametrize("flags,msg", [
    (["--model", "convnet-21"], "6X\\+2"), (["--data", "mnist"], "invalid choice"),
    (["--method", "adam"], "invalid choice"), (["--epochs", "0"], "positive integer"),
    (["--model", "wrn-20-10"], "6n\\+4"), (["--model", "convnet-20-2"], "no widen factor"),
    (["--model", "convnet"], "needs its depth"), (["--model", "resnet-20"], "unknown model"),
    (["--model", "preact_resnet-68"], "now written 'preact-resnet-68'"),
    # The old form names the new one.
    (["--model", "convnet", "--depth", "38"], "--model convnet-38"),
    (["--model", "wrn", "--depth", "28", "--width", "10"], "--model wrn-28-10"),
    (["--depth", "14"], "--model convnet-14"),
    (["--momentum", "-1"], "momentum"), (["--momentum", "0", "--nesterov"], "nesterov"),
    (["--weight-decay", "-0.1"], "weight-decay"), (["--frob-weight", "inf"], "frob-weight"),
    (["--device", "quantum"], "device"),
])
def test_bad_flags_exit_2(tmp_path, capsys, flags, msg):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(msg, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "svb"\nepochs = 1\neps = 0.5\nbogus = 1\n')
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--config", str(cfg), "--out", str(tmp_path / "a")])
    cfg.write_text('method = "svb"\nepochs = 1\neps = 0.5\n')
    assert main(["train", *TINY, "--config", str(cfg), "--eps", "0.25", "--out", str(tmp_path / "b")]) == 0
    resolved = json.loads((tmp_path / "b" / "config.json").read_text())["config"]
    assert resolved["method"] == "svb" and resolved["eps"] == 0.25


def test_paper_learning_rate_schedule():
    cfg = TrainConfig(epochs=10)
    lrs = [learning_rate(cfg, e) for e in range(10)]
    assert lrs[0] == lrs[1] == 0.5 and lrs[8] == lrs[9] == pytest.approx(0.001)
    assert all(b < a for a, b in zip(lrs[::2], lrs[2::2]))  # geometric steps every 2 epochs
    ratios = [b / a for a, b in zip(lrs[::2], lrs[2::2])]
    assert max(ratios) == pytest.approx(min(ratios))


def test_plot_several_runs(tmp_path):
    for m in ("sgd", "svb"):
        main(["train", *TINY, "--method", m, "--epochs", "2", "--out", str(tmp_path / m)])
    png = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "sgd"), str(tmp_path / "svb"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "missing"), "--out", str(png)]) == 1


def test_distributed_two_processes_identical_weights(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(ROOT / "tests" / "_ddp_train_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(_metrics(tmp_path / "run")) == 1  # written once, by rank 0


def test_torchrun_module_cli(tmp_path):
    """The README's command: torchrun ... -m convspec train ..."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convspec", "train", *TINY, "--method", "svb", "--epochs", "1",
           "--out", str(tmp_path / "cli")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_metrics(tmp_path / "cli")) == 1
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["world_size"] == 2
    # Rank 0 alone took the lock (a second rank would have found it taken) and released it.
    assert (tmp_path / "cli" / ".lock").read_text() == ""


def test_compare_methods_over_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--methods", "sgd", "svb+bbn", "--seeds", "0", "1", "--epochs", "2",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"sgd", "svb+bbn"} and "| svb+bbn | 2 |" in printed
    for method, res in summary["results"].items():
        finals = [_metrics(out / f"{method}-seed{s}")[-1]["test_error"] for s in (0, 1)]
        assert res["final_test_error"]["mean"] == pytest.approx(sum(finals) / 2)
        assert res["final_test_error"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
    # Seeds differ, so the runs differ.
    a, b = (_metrics(out / f"sgd-seed{s}")[-1]["train_loss"] for s in (0, 1))
    assert a != b
    # Operator ranges are the exact extreme singular values of each trained conv.
    from convspec import extreme_singular_values
    from convspec.train.models import build_model

    run = summary["results"]["svb+bbn"]["runs"][0]
    model = build_model("convnet-8", num_classes=4, in_channels=1)
    model.load_state_dict(torch.load(out / "svb+bbn-seed0" / "checkpoint.pt", weights_only=True)["model"])
    conv = model.features[0]
    smax, smin = extreme_singular_values(conv.weight, 16, padding=conv.padding)
    assert run["operator"]["features.0"] == pytest.approx([smin, smax], rel=1e-6)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # A second call reuses the finished runs.
    before = (out / "sgd-seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "sgd-seed0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_compare_bad_flags_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *TINY, "--methods", "adam", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compare", *TINY, "--model", "convnet-9", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_named_config_files_are_valid(path):
    from convspec.train.config import load_config_file

    cfg = TrainConfig(**load_config_file(path))
    cfg.validate()


def test_resume_refuses_another_configuration(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--method", "svb", "--epochs", "1", "--out", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc = main(["train", *TINY, "--method", "sgd", "--epochs", "2", "--out", str(run), "--resume"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "method: 'svb' -> 'sgd'" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched
    # --epochs may change.
    assert main(["train", *TINY, "--method", "svb", "--epochs", "2", "--out", str(run), "--resume"]) == 0
    assert len(_metrics(run)) == 2


def test_compare_refuses_a_run_of_another_configuration(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["train", *TINY, "--method", "sgd", "--epochs", "1", "--lr", "0.2",
                 "--out", str(out / "sgd-seed0")]) == 0
    rc = main(["compare", *TINY, "--methods", "sgd", "--seeds", "0", "--epochs", "1",
               "--out", str(out)])
    assert rc == 1 and "lr: 0.2 -> 0.05" in capsys.readouterr().err


def test_progress_bar_shows_the_running_mean_loss_of_the_epoch(tmp_path, monkeypatch):
    """The postfix after batch i is the mean loss of batches 1..i of the epoch: after the last
    batch it is the epoch's train_loss, and it is not the last batch's loss."""
    import contextlib

    import convspec.train.loop as loop

    bars = []

    class FakeBar:
        def __init__(self, desc):
            self.desc, self.postfix, self.steps = desc, [], 0

        def update(self, n=1):
            self.steps += n

        def set_postfix_str(self, s, refresh=True):
            self.postfix.append(s)

    @contextlib.contextmanager
    def fake_progress_bar(total, desc, enabled=True):
        bars.append(FakeBar(desc))
        yield bars[-1]

    batch_losses = []
    real_ce = loop.F.cross_entropy

    def recording_ce(logits, y, **kw):
        loss = real_ce(logits, y, **kw)
        if logits.requires_grad:  # training batches, not evaluation
            batch_losses.append((float(loss.detach()), y.shape[0]))
        return loss

    monkeypatch.setattr(loop, "progress_bar", fake_progress_bar)
    monkeypatch.setattr(loop.F, "cross_entropy", recording_ce)
    cfg = TrainConfig(data="synthetic", model="convnet-8", epochs=2, batch_size=48, n_train=128,
                      n_test=32, lr=0.05)
    result = loop.train(cfg, tmp_path / "run", progress=True)
    assert [b.desc for b in bars] == ["epoch 1/2", "epoch 2/2"]
    per_epoch = [batch_losses[:3], batch_losses[3:]]  # 48 + 48 + 32 examples
    for bar, row, losses in zip(bars, result.history, per_epoch):
        assert bar.steps == len(bar.postfix) == 3
        total = seen = 0
        for text, (loss, n) in zip(bar.postfix, losses):
            total, seen = total + loss * n, seen + n
            assert text == f"loss {total / seen:.3f}"
        assert bar.postfix[-1] == f"loss {row['train_loss']:.3f}"
    assert any(bar.postfix[-1] != f"loss {losses[-1][0]:.3f}" for bar, losses in zip(bars, per_epoch))


def test_runs_of_the_old_model_naming_resume_and_are_reused(tmp_path, capsys):
    """A run directory written before the one naming (config keys model='convnet', depth,
    width) resumes under --model convnet-8, is reused by compare and read by plot."""
    from convspec.train.rundir import RunDir

    out = tmp_path / "cmp"
    run = out / "sgd-seed0"
    assert main(["train", *TINY, "--method", "sgd", "--epochs", "1", "--out", str(run)]) == 0
    # Rewrite the run as the old code wrote it.
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    old = lambda c: {**{k: v for k, v in c.items() if k != "model"},
                     "model": "convnet", "depth": 8, "width": 1}
    state["config"] = old(state["config"])
    state["record"]["config"] = old(state["record"]["config"])
    torch.save(state, run / "checkpoint.pt")
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "config": old(record["config"])}))

    assert RunDir(run).record()["config"]["model"] == "convnet-8"
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    # compare counts it as a finished run of the same config: reused, not retrained.
    before = (run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["compare", *TINY, "--methods", "sgd", "--seeds", "0", "--epochs", "1",
                 "--out", str(out)]) == 0
    assert (run / "checkpoint.pt").stat().st_mtime_ns == before
    # --resume accepts it (same config in the new naming) and writes the new naming.
    assert main(["train", *TINY, "--method", "sgd", "--epochs", "2", "--out", str(run),
                 "--resume"]) == 0
    stored = json.loads((run / "config.json").read_text())["config"]
    assert stored["model"] == "convnet-8" and "depth" not in stored
    # Another depth is still another configuration.
    assert main(["train", *TINY[:2], "--model", "convnet-14", *TINY[4:], "--method", "sgd",
                 "--epochs", "3", "--out", str(run), "--resume"]) == 1
    assert "model: 'convnet-8' -> 'convnet-14'" in capsys.readouterr().err


def test_the_records_are_readable(tmp_path, capsys):
    """Runs written with the old naming (no checkpoints; the old records/fmnist_compare) still plot."""
    from convspec.train.plots import run_label
    from convspec.train.rundir import RunDir

    runs = sorted((ROOT / "tests" / "data" / "legacy_fmnist_compare").glob("*-seed*"))
    assert len(runs) == 9
    for run in runs:
        assert RunDir(run).record()["config"]["model"] == "convnet-20"
        assert len(RunDir(run).history()) == 5
    assert "convnet-20" in run_label(runs[0])
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
