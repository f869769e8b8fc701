"""Statistics of `convspec compare` (Welch's t-test, confidence intervals), method specs,
the [compare] config table, parallel jobs and reuse of finished runs from result.json."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from convspec.cli import main
from convspec.experiments.compare import parse_method
from convspec.experiments.stats import (incomplete_beta, mean_std, t_quantile, t_two_sided_p,
                                        welch)
from convspec.train.config import TrainConfig, load_compare_section, load_config_file

TINY = ["--data", "synthetic", "--model", "convnet-8", "--batch-size", "32",
        "--n-train", "96", "--n-test", "48", "--no-progress", "--lr", "0.05"]


# ------------------------------------------------------------------------- the t distribution


@pytest.mark.parametrize("df,q975", [(1, 12.706205), (2, 4.302653), (4, 2.776445),
                                     (10, 2.228139), (30, 2.042272), (1000, 1.962339)])
def test_t_quantiles_match_the_tables(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, rel=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-q975, rel=1e-6)
    assert t_two_sided_p(q975, df) == pytest.approx(0.05, rel=1e-5)


def test_t_distribution_closed_forms():
    # df = 1 is the Cauchy distribution: P(|T| >= t) = 1 - 2 atan(t) / pi.
    for t in (0.1, 1.0, 3.0, 50.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    # df = 2: P(|T| >= t) = 1 - t / sqrt(2 + t^2).
    for t in (0.3, 2.0, 9.0):
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert t_two_sided_p(1.5, math.inf) == pytest.approx(math.erfc(1.5 / math.sqrt(2)))
    # I_x(a, 1) = x^a and the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    assert incomplete_beta(3.5, 1.0, 0.3) == pytest.approx(0.3 ** 3.5, rel=1e-12)
    assert incomplete_beta(2.5, 0.7, 0.8) == pytest.approx(1 - incomplete_beta(0.7, 2.5, 0.2))
    for bad in ((0.0, 1.0, 0.5), (1.0, 1.0, 1.5)):
        with pytest.raises(ValueError):
            incomplete_beta(*bad)


def test_welch_matches_a_hand_computation():
    a, b = [10.1, 9.8, 10.4, 10.0, 9.9], [9.2, 9.9, 9.4, 9.0, 9.6, 9.5]
    r = welch(a, b)
    ma, mb = sum(a) / 5, sum(b) / 6
    va = sum((x - ma) ** 2 for x in a) / 4
    vb = sum((x - mb) ** 2 for x in b) / 5
    se = math.sqrt(va / 5 + vb / 6)
    df = (va / 5 + vb / 6) ** 2 / ((va / 5) ** 2 / 4 + (vb / 6) ** 2 / 5)
    assert r["difference"] == pytest.approx(ma - mb)
    assert r["t"] == pytest.approx((ma - mb) / se)
    assert r["df"] == pytest.approx(df)
    half = t_quantile(0.975, df) * se
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ma - mb - half, ma - mb + half))
    assert r["p_value"] == pytest.approx(t_two_sided_p((ma - mb) / se, df))
    # Swapping the samples flips the sign, keeps p.
    s = welch(b, a)
    assert s["difference"] == pytest.approx(-r["difference"]) and s["p_value"] == pytest.approx(r["p_value"])


def test_welch_detects_a_known_difference_and_not_a_null_one():
    rng = random.Random(0)
    shifted = [welch([rng.gauss(1.0, 0.3) for _ in range(6)], [rng.gauss(0.0, 0.3) for _ in range(6)])
               for _ in range(200)]
    assert sum(r["p_value"] < 0.05 for r in shifted) > 190  # power ~1 at 3.3 sd
    assert sum(r["ci_low"] <= 1.0 <= r["ci_high"] for r in shifted) >= 180  # ~95% coverage
    null = [welch([rng.gauss(0.0, 1.0) for _ in range(5)], [rng.gauss(0.0, 1.0) for _ in range(5)])
            for _ in range(400)]
    false_positive = sum(r["p_value"] < 0.05 for r in null) / len(null)
    assert 0.01 <= false_positive <= 0.10


def test_welch_degenerate_and_bad_samples():
    same = welch([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    assert welch([0.1, 0.1], [0.1, 0.1])["p_value"] == 1.0
    assert welch([0.2, 0.2], [0.1, 0.1])["p_value"] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        welch([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        welch([0.1, float("nan")], [0.1, 0.2])
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}


# ------------------------------------------------------------------------------ method specs


def test_method_specs():
    s = parse_method("svb:eps=0.5")
    assert (s.method, dict(s.overrides), s.label, s.dirname) == ("svb", {"eps": 0.5}, "svb:eps=0.5",
                                                                   "svb_eps0.5")
    assert parse_method("svb+bbn:bbn-eps=0.1,eps=0.05").label == "svb+bbn:bbn_eps=0.1,eps=0.05"
    assert parse_method("sgd").label == "sgd"
    cfg = parse_method("frobenius:frob_weight=1e-2").config(TrainConfig(), 3)
    assert (cfg.method, cfg.frob_weight, cfg.seed) == ("frobenius", 0.01, 3)
    for bad, msg in [("adam", "not one of"), ("svb:eps", "FIELD=VALUE"), ("svb:foo=1", "unknown"),
                     ("svb:seed=1", "cannot be set"), ("svb:eps=x", "finite number"),
                     ("svb:eps=0.1,eps=0.2", "twice"), ("svb:nesterov=1", "true or false")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)


def test_compare_table_in_config_files(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "convnet-8"\nepochs = 2\n[compare]\nmethods = ["sgd", "svb:eps=0.5"]\n'
                    "seeds = [0, 1]\njobs = 2\n")
    assert load_config_file(path) == {"model": "convnet-8", "epochs": 2}
    assert load_compare_section(path) == {"methods": ["sgd", "svb:eps=0.5"], "seeds": [0, 1],
                                          "jobs": 2}
    path.write_text("[compare]\nseeds = [0, true]\n")
    with pytest.raises(ValueError, match="seeds"):
        load_compare_section(path)
    path.write_text("[compare]\nworkers = 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_compare_section(path)


def test_compare_bad_method_spec_exits_2_before_writing(tmp_path, capsys):
    for methods in (["sgd", "svb:eps=-1"], ["svb:eps=zero"], ["sgd", "svb"]):
        extra = ["--baseline", "frobenius"] if methods == ["sgd", "svb"] else []
        with pytest.raises(SystemExit) as exc:
            main(["compare", *TINY, "--methods", *methods, *extra, "--out", str(tmp_path / "x")])
        assert exc.value.code == 2
        assert not (tmp_path / "x").exists()
    err = capsys.readouterr().err
    assert "--eps must be > 0" in err and "finite number" in err and "baseline" in err


# --------------------------------------------------------------- compare end to end, in parallel


def test_compare_statistics_jobs_and_reuse_from_result_json(tmp_path, capsys):
    """Two jobs at once give the same runs as one at a time; the summary holds Welch's test
    against the baseline; a copy of the run folders without checkpoints is reused as is."""
    out, seq = tmp_path / "par", tmp_path / "seq"
    common = ["--methods", "sgd", "svb:eps=0.5", "--seeds", "0", "1", "--epochs", "1"]
    assert main(["compare", *TINY, *common, "--jobs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert main(["compare", *TINY, *common, "--out", str(seq)]) == 0
    par_summary = json.loads((out / "summary.json").read_text())
    seq_summary = json.loads((seq / "summary.json").read_text())
    for label in ("sgd", "svb:eps=0.5"):
        a = [r["test_error"] for r in par_summary["results"][label]["runs"]]
        b = [r["test_error"] for r in seq_summary["results"][label]["runs"]]
        assert a == b
    assert (out / "svb_eps0.5-seed1" / "result.json").exists()
    cfg = json.loads((out / "svb_eps0.5-seed1" / "config.json").read_text())["config"]
    assert cfg["eps"] == 0.5 and cfg["method"] == "svb"
    res = par_summary["results"]["svb:eps=0.5"]
    errors = [r["test_error"][-1] for r in res["runs"]]
    base = [r["test_error"][-1] for r in par_summary["results"]["sgd"]["runs"]]
    assert res["vs_baseline"] == pytest.approx(welch(errors, base))
    assert par_summary["results"]["sgd"]["vs_baseline"] is None and par_summary["baseline"] == "sgd"
    assert "| svb:eps=0.5 | 2 |" in printed and "(baseline)" in printed
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # A record keeps result.json and the views, not the checkpoints: reused without training.
    kept = tmp_path / "kept"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("checkpoint.pt", ".lock"))
    assert main(["compare", *TINY, *common, "--out", str(kept)]) == 0
    assert not any(kept.glob("*/checkpoint.pt"))
    assert json.loads((kept / "summary.json").read_text())["results"]["sgd"]["runs"][0]["test_error"] \
        == par_summary["results"]["sgd"]["runs"][0]["test_error"]
    # ... but one of another configuration is refused, and one with fewer epochs is retrained.
    rc = main(["compare", *TINY, *common[:-1], "1", "--lr", "0.07", "--out", str(kept)])
    assert rc == 1 and "lr: 0.05 -> 0.07" in capsys.readouterr().err
    assert main(["compare", *TINY, "--methods", "sgd", "--seeds", "0", "--epochs", "2",
                 "--out", str(kept)]) == 0
    assert len(json.loads((kept / "sgd-seed0" / "result.json").read_text())["history"]) == 2


# ------------------------------------------------------------------------------ record configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_compare_tables_are_valid(path):
    section = load_compare_section(path)
    for spec in section.get("methods", []):
        parse_method(spec).config(TrainConfig(**load_config_file(path)), 0).validate()
    if "baseline" in section:
        assert parse_method(section["baseline"]).label in [parse_method(m).label
                                                            for m in section["methods"]]


def test_records_that_share_runs_share_their_base_config():
    """Runs are reused only for identical configs: the sweep and record 2 share SGD runs."""
    by_runs = {}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        runs = load_compare_section(path).get("runs")
        if runs:
            by_runs.setdefault(runs, []).append(load_config_file(path))
    assert by_runs, "no config shares a runs folder"
    for runs, bases in by_runs.items():
        assert all(b == bases[0] for b in bases), runs


# ------------------------------------------------------------------------ frob-sweep end to end


def test_frob_sweep_recommends_and_survives_divergence(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["reproduce", "frob-sweep", *TINY, "--epochs", "1", "--weights", "0.001", "1000",
               "--seeds", "0", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "frob_sweep.json").read_text())
    by_weight = {e["weight"]: e for e in record["entries"]}
    assert set(by_weight) == {0.0, 0.001, 1000.0}
    assert by_weight[1000.0]["diverged"] == 2 and by_weight[1000.0]["test_error"] is None
    assert record["recommended"] == 0.001  # never a diverged weight
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["results"]["frobenius:frob_weight=0.001"]["runs"]
    # The per-layer means are the means of the runs' exact operator extremes.
    name = next(iter(runs[0]["operator"]))
    mean_max = sum(r["operator"][name][1] for r in runs) / len(runs)
    assert by_weight[0.001]["layers"][name][1] == pytest.approx(mean_max)
    assert "| 1000 | 0 (2 diverged) | diverged |" in printed
    assert (out / "frob_sweep.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------------- jia-fig1 end to end


def test_jia_fig1_histograms_of_reshaped_kernels_and_exact_operators(tmp_path, capsys):
    import torch

    from convspec import extreme_singular_values
    from convspec.report import reshaped_values
    from convspec.train.models import build_model

    out, runs = tmp_path / "fig1", tmp_path / "runs"
    argv = ["reproduce", "jia-fig1", *TINY, "--epochs", "1", "--methods", "sgd", "svb:eps=0.05",
            "--runs", str(runs), "--out", str(out)]
    assert main(argv) == 0  # trains the two missing runs first
    record = json.loads((out / "jia_fig1.json").read_text())
    assert set(record["methods"]) == {"sgd", "svb:eps=0.05"}
    m = record["methods"]["svb:eps=0.05"]
    assert [m["layers"][p]["layer"] for p in ("lower", "middle", "higher")] == \
        ["features.3", "features.9", "features.18"]  # convnet-8: 7 convs
    model = build_model("convnet-8", num_classes=4, in_channels=1)
    model.load_state_dict(torch.load(runs / "svb_eps0.05-seed0" / "checkpoint.pt",
                                     weights_only=True)["model"])
    conv = dict(model.named_modules())["features.9"]
    layer = m["layers"]["middle"]
    assert layer["reshaped"] == pytest.approx(reshaped_values(conv.weight).tolist(), rel=1e-12)
    # SVB bounded the reshaped kernel into [1/1.05, 1.05] at its last step of the epoch or not,
    # but the operator's spectrum is the exact one: its extremes match the extreme solver.
    smax, smin = extreme_singular_values(conv, tuple(layer["input_size"]))
    assert layer["operator"][0] == pytest.approx(smax, rel=1e-8)
    assert layer["operator"][-1] == pytest.approx(smin, rel=1e-6, abs=1e-9)
    h, g = conv.weight.shape[:2]
    n_in = g * layer["input_size"][0] * layer["input_size"][1]
    p_out = h * ((layer["input_size"][0] - 1) // conv.stride[0] + 1) ** 2
    assert len(layer["operator"]) == min(n_in, p_out)
    assert (out / "jia_fig1.png").read_bytes()[:4] == b"\x89PNG"
    # A second call reads the checkpoints instead of training.
    before = (runs / "sgd-seed0" / "checkpoint.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (runs / "sgd-seed0" / "checkpoint.pt").stat().st_mtime_ns == before
