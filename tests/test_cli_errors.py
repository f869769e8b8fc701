"""Every subcommand turns expected user errors into one line (exit 1, or 2 for bad flags and
configs), never a traceback; configs are type-checked strictly before anything is written."""

import json
import os
from pathlib import Path

import pytest
import torch

from convspec.cli import main
from convspec.train.config import TrainConfig

TINY = ["--data", "synthetic", "--model", "convnet-8", "--batch-size", "32",
        "--n-train", "64", "--n-test", "32", "--no-progress", "--lr", "0.05"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


def _row(epoch, **drop):
    row = {"epoch": epoch, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0,
           "test_error": 0.5, "lr": 0.1, "epoch_time_s": 1.0, "sigma_reshaped": {}}
    for k in drop:
        row.pop(k)
    return row


def _metrics_run(run, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"config": {"method": "sgd", "model": "convnet",
                                                            "depth": 8, "seed": 0}}))
    return run


# ---------------------------------------------------------------- config types


@pytest.mark.parametrize("line,key,value", [
    ('nesterov = "false"', "nesterov", "'false'"),
    ("epochs = true", "epochs", "True"),
    ("epochs = 2.5", "epochs", "2.5"),
    ("lr_end = inf", "lr_end", "inf"),
    ("lr = nan", "lr", "nan"),
    ("momentum = -inf", "momentum", "-inf"),
    ("model = 20", "model", "20"),
    ("data_dir = 5", "data_dir", "5"),
    ('augment = "yes"', "augment", "'yes'"),
    ("frob_normalize = 1", "frob_normalize", "1"),
    ("svb_every = 1.5", "svb_every", "1.5"),
    ("n_train = false", "n_train", "False"),
    ("device = 0", "device", "0"),
    ("method = 7", "method", "7"),
    ("seed = 1.0", "seed", "1.0"),
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_config_file_values_are_type_checked_before_anything_is_written(tmp_path, capsys, line,
                                                                        key, value, command):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    out = tmp_path / "out"
    argv = [command, *TINY, "--config", str(cfg), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--methods", "sgd", "--seeds", "0"] if command == "compare" else []))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{key} " in err and value in err and "expected" in err, err
    assert not out.exists()


@pytest.mark.parametrize("line,msg", [
    ("epochs = 0", "--epochs must be >= 1"), ("lr_end = -1", "--lr-end must be > 0"),
    ("seed = -1", "--seed"), ('schedule = "linear"', "--schedule"), ("bogus = 1", "unknown keys"),
    ("lr_hold = 0", "--lr-hold"),
    ('model = "wrn-28-0"', "widen factor W of wrn-D-W must be >= 1"),
    ('model = "convnet"', "needs its depth in the name"),
    # The old keys: refused with the name to write instead.
    ('model = "wrn"\ndepth = 28\nwidth = 10', 'model = "wrn-28-10"'),
    ("depth = 38", 'model = "convnet-38"'),
])
def test_config_file_ranges_and_keys(tmp_path, capsys, line, msg):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    argv = list(TINY)
    if line.startswith(("model", "depth")):  # else --model would override the file's
        del argv[argv.index("--model"):argv.index("--model") + 2]
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--momentum", "nan"], "momentum"), (["--weight-decay", "inf"], "weight_decay"),
    (["--seed", "-3"], "--seed"), (["--frob-weight=-inf"], "frob_weight"),
])
def test_flag_values_are_checked_like_config_values(tmp_path, capsys, flags, msg):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, *flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_checks_every_seed_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *TINY, "--methods", "sgd", "--seeds", "0", "-1", "--epochs", "1",
              "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_api_validates_types():
    for bad in ({"nesterov": "false"}, {"epochs": True}, {"lr_end": float("inf")},
                {"epochs": 2.5}, {"init": None}):
        with pytest.raises(ValueError, match="expected"):
            TrainConfig(**bad).validate()
    cfg = TrainConfig(lr=1, momentum=0)  # ints are fine where floats are expected
    cfg.validate()
    assert type(cfg.lr) is float and type(cfg.momentum) is float


def test_named_config_files_still_valid():
    from convspec.train.config import load_config_file

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.toml")):
        TrainConfig(**load_config_file(path)).validate()


# ---------------------------------------------------------------- paths and files


def test_config_pointing_at_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--config", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "compare", "spectrum", "guo-fig41"])
@pytest.mark.parametrize("where", ["at a file", "inside a file"])
def test_out_that_cannot_be_a_folder(tmp_path, capsys, command, where):
    f = tmp_path / "file"
    f.write_text("x")
    out = f if where == "at a file" else f / "run"
    argv = {
        "train": ["train", *TINY, "--epochs", "1"],
        "compare": ["compare", *TINY, "--methods", "sgd", "--seeds", "0", "--epochs", "1"],
        "spectrum": ["spectrum", "convnet-8", "--input-size", "1", "6", "6", "--no-progress"],
        "guo-fig41": ["reproduce", "guo-fig41", "--steps", "2", "--size", "5", "--no-progress"],
    }[command]
    assert main(argv + ["--out", str(out)]) == 1
    line = one_line_error(capsys)
    assert str(f) in line
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", *TINY, "--epochs", "1", "--out", str(locked / "run")]) == 1
        one_line_error(capsys)
        assert main(["train", *TINY, "--epochs", "1", "--out", str(locked)]) == 1
        one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def test_guo_fig41_checks_out_before_running(tmp_path, capsys, monkeypatch):
    from convspec.experiments import guo_fig41

    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setattr(guo_fig41, "run", lambda *a, **k: pytest.fail("ran before checking --out"))
    assert main(["reproduce", "guo-fig41", "--steps", "2", "--size", "5", "--no-progress",
                 "--out", str(f)]) == 1
    assert "is a file" in one_line_error(capsys)


# ---------------------------------------------------------------- plot


def test_plot_row_with_missing_keys(tmp_path, capsys):
    run = _metrics_run(tmp_path / "run", [_row(1), _row(2, test_error=None)])
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 1
    line = one_line_error(capsys)
    assert "test_error" in line and "epoch 2" in line


@pytest.mark.parametrize("text", ["{not json\n", '{"epoch": 1}\n', "[1, 2]\n"])
def test_plot_bad_metrics_lines(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 1
    one_line_error(capsys)


def test_plot_out_without_extension_says_the_file_it_wrote(tmp_path, capsys):
    run = _metrics_run(tmp_path / "run", [_row(1), _row(2)])
    out = tmp_path / "figs" / "curves"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    written = out.with_name("curves.png")
    assert capsys.readouterr().out.strip() == f"wrote {written}"
    assert written.read_bytes()[:4] == b"\x89PNG" and not out.exists()
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 1  # an existing folder
    assert "is a folder" in one_line_error(capsys)


# ---------------------------------------------------------------- Ctrl-C, compare


def test_ctrl_c_before_the_first_checkpoint_says_nothing_can_be_resumed(tmp_path, capsys,
                                                                      monkeypatch):
    import convspec.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_dataset", interrupted)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "continue with --resume" not in err
    assert not (run / "checkpoint.pt").exists()
    monkeypatch.undo()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0  # the advice works


def test_compare_counts_repeated_methods_and_seeds_once(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "sgd", "sgd", "--seeds", "0", "0", "--epochs",
                 "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["sgd"] and summary["seeds"] == [0]
    assert len(summary["results"]["sgd"]["runs"]) == 1
    assert "| sgd | 1 |" in captured.out
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert len(warnings) == 2 and all("more than once" in w for w in warnings), captured.err
