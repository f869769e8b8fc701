"""``convspec reproduce guo-2norm`` at a tiny scale, and the pieces its numbers rest on: the
adjoint kernel of Note [smaller Gram], the stopping test of Note [stopping test], and the descent
loop against :func:`convspec.penalty_descent`."""

import json

import pytest
import torch

from convspec import conv_operator, extreme_singular_values, penalty_descent, spectral_penalty
from convspec.cli import main
from convspec.experiments import guo_2norm as g2
from convspec.experiments.guo_2norm import (
    Guo2NormConfig,
    TargetTracker,
    descend,
    meets_target,
    parse_rule,
    tall_kernel,
)


@pytest.fixture(autouse=True)
def one_thread():
    # The record runs on one thread (Guo2NormConfig.threads); so do these tests. On a loaded
    # 2-core machine two OpenMP threads make a tiny conv2d ~1000x slower (spinning workers).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h,g,k", [(2, 3, 3), (1, 3, 3), (2, 5, 5), (3, 3, 3)])
def test_tall_kernel_is_the_kernel_of_the_adjoint(h, g, k):
    w = _rand(h, g, k, k)
    t = tall_kernel(w)
    m = conv_operator(w, 6, padding=k // 2)
    mt = conv_operator(t, 6, padding=k // 2)
    if h >= g:
        assert t is w
    else:
        assert t.shape == (g, h, k, k)
        torch.testing.assert_close(mt, m.T, rtol=0, atol=1e-12)


def test_the_literal_2norm_penalty_cannot_raise_sigma_min_of_a_wide_layer():
    # Note [smaller Gram]: for g > h, ||M^T M - I||_2 >= 1 with no gradient once sigma_max^2 <= 2.
    w = _rand(1, 3, 3, 3)
    w = w / extreme_singular_values(w, 6, padding=1)[0] * 1.2  # sigma_max^2 = 1.44 < 2
    w.requires_grad_(True)
    p = spectral_penalty(w, 6, padding=1, n_power_iterations=100, state={})
    p.backward()
    assert float(p.detach()) == pytest.approx(1.0)
    assert float(w.grad.abs().max()) == 0.0
    # On the adjoint kernel (the smaller Gram) it has a gradient, and it is 1 - sigma_min^2.
    t = tall_kernel(w.detach()).requires_grad_(True)
    q = spectral_penalty(t, 6, padding=1, n_power_iterations=500, state={})
    q.backward()
    smin = extreme_singular_values(t.detach(), 6, padding=1)[1]
    assert float(q.detach()) == pytest.approx(1 - smin**2, rel=1e-6)
    assert float(t.grad.abs().max()) > 0


def test_meets_target_boundaries():
    assert meets_target(1.05, 0.9)
    assert not meets_target(1.0500001, 0.95)
    assert not meets_target(1.0, 0.8999999)
    assert meets_target(1.2, 1.1, sigma_max_target=1.2, sigma_min_target=1.0)


def _diag_kernel(a, b):
    """A 3x3 kernel whose operator is I (x) diag(a, b): singular values exactly {a, b}."""
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 1, 1], w[1, 1, 1, 1] = a, b
    return w


# (sigma_a, sigma_b) per iteration and the first index where both lie in [0.9, 1.05]
SEQUENCE = [(1.3, 0.5), (1.06, 0.95), (1.0, 0.89), (1.05, 0.9), (1.2, 1.0), (1.0, 1.0)]


@pytest.mark.parametrize("gate", [True, False])
def test_tracker_finds_the_first_iteration_in_the_target(gate):
    w0 = _diag_kernel(*SEQUENCE[0])
    tr = TargetTracker(w0, 5, iterations=30, gate=gate)
    hits = [tr.check(_diag_kernel(a, b)) for a, b in SEQUENCE]
    # Exact values of 1.05 / 0.9 meet the target; their float rounding is within tol 1e-6.
    assert hits[:3] == [False, False, False] and hits[4] is False and hits[5] is True
    assert tr.exact_calls <= len(SEQUENCE)
    if gate:
        assert tr.exact_calls < len(SEQUENCE)  # the bounds rule out 1.3 / 0.5 at least


@pytest.mark.parametrize("shape,seed", [((4, 2), 0), ((3, 3), 1), ((5, 2), 2)])
def test_tracker_bounds_bracket_the_exact_extremes(shape, seed):
    w = _rand(*shape, 3, 3, seed=seed)
    tr = TargetTracker(w, 6, seed=seed)
    for iters in (0, 1, 3, 1000):
        lo, hi = tr.refine(w, iters)
        smax, smin = extreme_singular_values(w, 6, padding=1)
        assert lo <= smax * (1 + 1e-9)
        assert hi >= smin * (1 - 1e-9)
    assert lo == pytest.approx(smax, rel=1e-6)


@pytest.mark.parametrize("rule,kw", [("paper", {}), ("armijo", {}),
                                     ("constant:1e-3", {"lr": 1e-3})])
@pytest.mark.parametrize("method", ["frobenius", "spectral"])
def test_descend_takes_the_steps_of_penalty_descent(rule, kw, method):
    w = 0.5 * _rand(3, 2, 3, 3, seed=4)
    # The 2-norm penalty's Armijo search fails after a few steps (the power-iteration value
    # changes between trials): both loops stop there alike.
    steps = 5 if (method, rule) == ("spectral", "armijo") else 15
    torch.manual_seed(7)
    ref = penalty_descent(w, 5, steps=steps, step_rule=rule.split(":")[0], penalty=method,
                          track_spectrum=False, padding=1, **kw)
    torch.manual_seed(7)
    k, res = descend(w, 5, method, rule, steps=steps, stop_at_target=False)
    assert ref.stopped is None and res.stopped is None
    assert res.iterations_run == steps
    torch.testing.assert_close(k, ref.weight, rtol=1e-10, atol=1e-12)
    assert res.final_penalty == pytest.approx(ref.penalty[-1], rel=1e-10)


@pytest.mark.parametrize("method,rule", [("frobenius", "armijo"), ("spectral", "polyak:1"),
                                         ("frobenius", "polyak:0.5")])
def test_first_hit_equals_the_first_hit_of_exact_spectra_at_every_iteration(method, rule):
    # A near-orthogonal start, so that the target is reached within a few dozen iterations.
    w = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    w[:2, :, 1, 1] = 1.6 * torch.eye(2, dtype=torch.float64)
    w = w + 0.15 * _rand(3, 2, 3, 3, seed=5)
    torch.manual_seed(0)
    tr = TargetTracker(w, 6, iterations=3)
    _, res = descend(w, 6, method, rule, steps=80, tracker=tr, stop_at_target=False)
    torch.manual_seed(0)
    ref = TargetTracker(w, 6, gate=False)
    _, res_ref = descend(w, 6, method, rule, steps=80, tracker=ref, stop_at_target=False)
    assert res.reached and res.iterations_to_target is not None
    assert res.iterations_to_target == res_ref.iterations_to_target
    assert 0 < res.iterations_to_target < 80
    assert tr.exact_calls < ref.exact_calls
    assert res.time_to_target_s <= res.method_time_s


def test_descend_stops_at_budget_or_first_hit_whichever_is_later():
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[:, :, 1, 1] = torch.eye(2, dtype=torch.float64)  # orthogonal: in the target at iteration 0
    tr = TargetTracker(w, 5)
    k, res = descend(w, 5, "frobenius", "armijo", steps=50, budget=7, tracker=tr)
    assert res.reached and res.iterations_to_target == 0
    assert res.iterations_run == 7


def test_parse_rule_rejects_bad_rules():
    assert parse_rule("constant:0.01") == ("constant", 0.01)
    for bad in ("newton", "constant", "constant:-1", "polyak:x", "armijo:2", "constant:inf"):
        with pytest.raises(ValueError):
            parse_rule(bad)


TINY = ["--size", "5", "--shapes", "3x3x1x2", "3x3x2x1", "--seeds", "0", "1", "--search-seeds",
        "9", "--rules", "armijo", "polyak:1", "--budget", "6", "--horizon", "12",
        "--search-horizon", "6", "--no-progress"]


def test_command_writes_json_table_and_png(tmp_path, capsys):
    out = tmp_path / "g2"
    assert main(["reproduce", "guo-2norm", "--out", str(out), *TINY]) == 0
    record = json.loads((out / "guo_2norm.json").read_text())
    cfg = record["config"]
    assert cfg["size"] == 5 and cfg["seeds"] == [0, 1] and cfg["rules"] == ["armijo", "polyak:1"]
    assert "git_commit" in record["environment"] and record["wall_time_s"] > 0
    assert record["compute_time_s"] > 0 and record["runs_reused"] == 0
    # The search covers every rule per shape, method, init and search seed.
    assert len(record["search_runs"]) == 2 * 2 * 2 * 2 * 1
    for shape in ("3x3x1x2", "3x3x2x1"):
        for method in ("frobenius", "spectral"):
            assert record["search"][shape][method]["chosen"] in ("armijo", "polyak:1")
    # Evaluation: shapes x inits x seeds x methods, each with what the table needs.
    assert len(record["runs"]) == 2 * 2 * 2 * 2
    for r in record["runs"]:
        assert r["phase"] == "main" and r["final_iteration"] == 6 or r["stopped"]
        if r["final_sigma_max"] is not None:
            assert r["final_exact"] and r["final_sigma_max"] >= r["final_sigma_min"]
        if r["reached"]:
            assert 0 <= r["iterations_to_target"] <= 12 and r["time_to_target_s"] >= 0
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 16 + 16
    for r in rows:
        if r["phase"] == "main":
            assert r["trace"]["iteration"][0] == 0
    assert len(record["summary"]) == 2 * 2
    for e in record["summary"]:
        assert set(e["methods"]) == {"frobenius", "spectral"}
        for m in e["methods"].values():
            for key in ("rule", "reached", "runs", "iterations_mean", "iterations_std",
                        "time_s_mean", "final_sigma_max_mean", "final_sigma_min_mean",
                        "ms_per_iteration"):
                assert key in m
            assert m["runs"] == 2
        assert "iteration_ratio_mean" in e["paired"]
    md = (out / "guo_2norm.md").read_text()
    assert "| 3x3x2x1 | normal |" in md and "Step-rule search" in md
    png = (out / "guo_2norm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "3x3x1x2" in capsys.readouterr().out


def test_command_resumes_from_runs_jsonl(tmp_path, monkeypatch):
    out = tmp_path / "g2"
    args = ["reproduce", "guo-2norm", "--out", str(out), *TINY]
    assert main(args) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    first = json.loads((out / "guo_2norm.json").read_text())
    monkeypatch.setattr(g2, "one_run", lambda *a, **k: pytest.fail("ran a finished run again"))
    assert main(args) == 0
    assert (out / "runs.jsonl").read_text().splitlines() == lines
    again = json.loads((out / "guo_2norm.json").read_text())
    assert again["runs_reused"] == len(first["runs"]) + len(first["search_runs"])
    assert again["runs"] == first["runs"] and again["summary"] == first["summary"]


def test_same_flags_same_numbers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["reproduce", "guo-2norm", "--out", str(a), *TINY])
    main(["reproduce", "guo-2norm", "--out", str(b), *TINY])
    ra = json.loads((a / "guo_2norm.json").read_text())["runs"]
    rb = json.loads((b / "guo_2norm.json").read_text())["runs"]
    drop = ("method_time_s", "check_time_s", "time_to_target_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


@pytest.mark.parametrize("flags", [
    ["--shapes", "3x3x1"], ["--shapes", "2x2x1x1"], ["--seeds"], ["--rules", "newton"],
    ["--budget", "0"], ["--budget", "20", "--horizon", "10"], ["--seeds", "1", "--search-seeds", "1"],
    ["--inits", "zeros"], ["--threads", "0"],
])
def test_bad_flags_exit_2(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "guo-2norm", "--out", str(tmp_path / "o")] + flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="horizon"):
        Guo2NormConfig(budget=10, horizon=5).validate()
    with pytest.raises(ValueError, match="search_seeds"):
        Guo2NormConfig(seeds=[1], search_seeds=[1]).validate()


@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_mirrored_shapes_are_different_problems(init):
    # A k x k x g x h kernel and its mirror k x k x h x g reduce to the same tall problem
    # (tall_kernel): drawn from the seed alone they were one problem counted twice.
    for seed in range(3):
        a = tall_kernel(g2._initial_kernel((3, 3, 3, 1), init, seed))
        b = tall_kernel(g2._initial_kernel((3, 3, 1, 3), init, seed))
        # the same problem up to a flip of the kernel (a unitary change of both bases)
        assert a.shape == b.shape
        assert not torch.equal(a, b) and not torch.equal(a.flip(-2, -1), b)
    # and every (shape, seed) pair of a record has its own draws
    keys = {g2._run_seed(s, seed) for s in g2.SHAPES for seed in range(10)}
    assert len(keys) == 10 * len(g2.SHAPES)


def test_runs_of_another_seeding_are_not_reused(tmp_path):
    out = tmp_path / "g2"
    args = ["reproduce", "guo-2norm", "--out", str(out), *TINY]
    assert main(args) == 0
    meta = json.loads((out / "runs_config.json").read_text())
    assert meta["kernel_seeding"] == g2.KERNEL_SEEDING
    meta["kernel_seeding"] = "seed"  # as a record made before the shape entered the seed
    (out / "runs_config.json").write_text(json.dumps(meta))
    assert main(args) == 0
    assert json.loads((out / "guo_2norm.json").read_text())["runs_reused"] == 0
