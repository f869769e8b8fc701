"""The norm-layers record at a tiny scale: each normalisation is measured on the true operator."""

import json

import pytest

from convspec.cli import main


def test_norm_layers_quick(tmp_path, capsys):
    assert main(["reproduce", "norm-layers", "--quick", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "norm_layers.json").read_text())
    assert (tmp_path / "norm_layers.png").stat().st_size > 0
    rows = {(r["layer"], r["method"]): r for r in record["rows"]}
    for layer in {r["layer"] for r in record["rows"]}:
        assert rows[layer, "torch spectral_norm"]["reshaped_sigma_max"] == pytest.approx(1, abs=1e-3)
        assert rows[layer, "convspec estimate"]["sigma_max"] == pytest.approx(1, abs=1e-3)
        assert rows[layer, "convspec certified"]["sigma_max"] <= 1 + 1e-9
        assert all(r["converged"] for r in record["rows"] if r["layer"] == layer)
    # what the record is about: the reshaped norm is not the operator norm
    assert rows["Conv2d 4->4, 3x3, zeros", "torch spectral_norm"]["sigma_max"] > 1.05
    assert "convspec estimate" in capsys.readouterr().out
