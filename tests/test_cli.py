import json

import pytest

from convspec.cli import main


def test_guo_fig41_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "fig"
    rc = main(["reproduce", "guo-fig41", "--out", str(out), "--steps", "4", "--size", "6",
               "--seed", "2", "--no-progress"])
    assert rc == 0
    record = json.loads((out / "guo_fig41.json").read_text())
    assert record["config"]["steps"] == 4 and record["config"]["seed"] == 2
    assert "git_commit" in record["environment"]
    shapes = [k["shape"] for k in record["kernels"]]
    assert shapes == [[3, 3, 3, 1], [3, 3, 1, 3], [3, 3, 3, 6], [3, 3, 6, 3]]
    for k in record["kernels"]:
        assert k["iteration"] == [0, 1, 2, 3, 4]
        for key in ("sigma_max", "sigma_min", "penalty"):
            assert len(k[key]) == 5
        assert all(a >= b for a, b in zip(k["sigma_max"], k["sigma_min"]))
    png = (out / "guo_fig41.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = capsys.readouterr().out
    assert "3x3x6x3" in table and "sigma_max / sigma_min" in table


def test_same_seed_same_record(tmp_path):
    args = ["reproduce", "guo-fig41", "--steps", "2", "--size", "5", "--no-progress",
            "--step-rule", "armijo", "--init", "uniform"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "guo_fig41.json").read_text())["kernels"]
    b = json.loads((tmp_path / "b" / "guo_fig41.json").read_text())["kernels"]
    assert a == b


@pytest.mark.parametrize("flags", [
    ["--steps", "0"], ["--steps", "x"], ["--size", "-3"], ["--init", "zeros"],
    ["--step-rule", "newton"], ["--lr", "-1"], ["--size", "200"], ["--bogus"],
])
def test_bad_flags_exit_2(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "guo-fig41", "--out", str(tmp_path)] + flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "guo_fig41.json").exists()


def test_unknown_experiment_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "jia-table1"])
    assert exc.value.code == 2
