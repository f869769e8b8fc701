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


def test_checkpoint_matches_its_weights(tmp_path):
    torch.manual_seed(3)
    model = build_model("convnet", 8, 1, num_classes=10, in_channels=1)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "convnet", "depth": 8,
                                                        "width": 1, "data": "fashion-mnist"}}, ckpt)
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
