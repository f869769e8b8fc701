"""``convspec spectrum``: named models and checkpoints, table, JSON and PNGs; bad arguments."""

import json

import pytest
import torch

from convspec import conv_singular_values
from convspec.cli import main
from convspec.train.models import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_named_model_writes_table_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "spec"
    rc = main(["spectrum", "convnet-8", "--input-size", "1", "6", "6", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    record = json.loads((out / "spectrum.json").read_text())
    layers = record["layers"]
    assert record["source"] == "convnet-8" and "git_commit" in record["environment"]
    assert len(layers) == 7  # 6X + 1 convolutions for X = 1
    assert [tuple(l["input_size"]) for l in layers] == [(6, 6)] * 4 + [(3, 3)] * 2 + [(2, 2)]
    for l in layers:
        assert l["sigma_max"] >= l["sigma_min"] >= 0 and l["exact"]
        # Orthogonal init: every reshaped kernel has all singular values 1.
        assert l["reshaped_sigma_max"] == pytest.approx(1.0) == l["reshaped_sigma_min"]
    for name in ("spectrum_histograms.png", "spectrum_extremes.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    table = capsys.readouterr().out
    assert "features.0" in table and "operator sigma_max / sigma_min" in table


@pytest.mark.parametrize("config", [
    {"model": "convnet-8", "data": "fashion-mnist"},
    {"model": "convnet", "depth": 8, "width": 1, "data": "fashion-mnist"},  # the old naming
], ids=["current", "old-naming"])
def test_checkpoint_matches_its_weights(tmp_path, config):
    torch.manual_seed(3)
    model = build_model("convnet-8", num_classes=10, in_channels=1)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config}, ckpt)
    out = tmp_path / "spec"
    assert main(["spectrum", str(ckpt), "--input-size", "1", "5", "5", "--out", str(out),
                 "--no-progress"]) == 0
    first = json.loads((out / "spectrum.json").read_text())["layers"][0]
    w = model.features[0].weight.detach()
    ref = conv_singular_values(w, 5, padding=1, method="dense")
    assert first["sigma_max"] == pytest.approx(ref.sigma_max, rel=1e-9)
    assert first["sigma_min"] == pytest.approx(ref.sigma_min, rel=1e-9)


@pytest.mark.parametrize("argv", [
    ["convnet-8"],                                            # --input-size missing
    ["convnet-8", "--input-size", "1", "0", "6"],
    ["convnet-8", "--input-size", "1", "6"],
    ["resnet-20", "--input-size", "1", "6", "6"],             # not a registry name
    ["convnet-9", "--input-size", "1", "6", "6"],             # bad depth
    ["preact_resnet-68", "--input-size", "1", "6", "6"],      # the old spelling
    ["convnet-8", "--input-size", "1", "6", "6", "--tol", "2"],
])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["spectrum"] + argv + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_or_bad_checkpoint_exits_1(tmp_path, capsys):
    assert main(["spectrum", str(tmp_path / "nope.pt"), "--input-size", "1", "6", "6",
                 "--out", str(tmp_path / "o")]) == 1
    assert "not a checkpoint file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["spectrum", str(bad), "--input-size", "1", "6", "6",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_old_spelling_names_the_new_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["spectrum", "preact_resnet-68", "--input-size", "1", "6", "6"])
    assert "now written 'preact-resnet-68'" in capsys.readouterr().err


# ---------------------------------------------------------------- package.module:factory

FACTORIES = '''
import torch
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"))


class Zoo:
    @staticmethod
    def small():
        return nn.Conv2d(2, 2, 1)


def not_a_module():
    return [1, 2]


def needs_arguments(width):
    return nn.Conv2d(2, width, 3)


def raises():
    raise RuntimeError("no GPU\\nhere")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module ``userfactories_<n>`` on sys.path holding model factories."""
    name = f"userfactories_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(folder))
    return name


def test_factory_path_builds_any_model(tmp_path, capsys, factories):
    out = tmp_path / "spec"
    rc = main(["spectrum", f"{factories}:tiny", "--input-size", "2", "6", "6", "--out", str(out),
               "--no-progress", "--seed", "4"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "spectrum.json").read_text())
    assert record["source"] == f"{factories}:tiny"
    layers = record["layers"]
    assert [l["name"] for l in layers] == ["0", "2"]
    assert [tuple(l["input_size"]) for l in layers] == [(6, 6), (6, 6)]
    # The values are those of the model the factory builds after torch.manual_seed(--seed).
    import importlib

    torch.manual_seed(4)
    model = importlib.import_module(factories).tiny()
    ref = conv_singular_values(model[0].weight.detach(), 6, padding=1, method="dense")
    assert layers[0]["sigma_max"] == pytest.approx(ref.sigma_max, rel=1e-9)
    # A dotted attribute works too.
    assert main(["spectrum", f"{factories}:Zoo.small", "--input-size", "2", "4", "4",
                 "--out", str(tmp_path / "zoo"), "--no-progress"]) == 0


def test_factory_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    name = f"cwdfactories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert main(["spectrum", f"{name}:tiny", "--input-size", "2", "4", "4", "--out", "o",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "" not in __import__("sys").path  # put back as it was


@pytest.mark.parametrize("attr,msg", [
    ("missing", "has no attribute 'missing'"),
    ("NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
    ("not_a_module", "not_a_module() returned a list, not a torch.nn.Module"),
    ("needs_arguments", "calling needs_arguments() with no arguments failed: TypeError"),
    ("raises", "failed: RuntimeError: no GPU here"),
])
def test_bad_factory_is_one_line(tmp_path, capsys, factories, attr, msg):
    out = tmp_path / "o"
    assert main(["spectrum", f"{factories}:{attr}", "--input-size", "2", "6", "6",
                 "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"convspec spectrum: error: {factories}:{attr}: ") and msg in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("module,msg", [
    ("no_such_module_xyz", "cannot import no_such_module_xyz: no module named 'no_such_module_xyz'"),
    ("convspec.no_such_submodule", "no module named 'convspec.no_such_submodule'"),
])
def test_factory_import_failure_is_one_line(tmp_path, capsys, module, msg):
    assert main(["spectrum", f"{module}:net", "--input-size", "2", "6", "6",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and msg in err, err


def test_factory_module_that_fails_to_import(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_factory_mod.py").write_text("import torch\nx = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["spectrum", "broken_factory_mod:net", "--input-size", "2", "6", "6",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot import broken_factory_mod: ZeroDivisionError: division by zero" in err, err
