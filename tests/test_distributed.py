"""svb_ / bbn_ under torch.distributed: 2 gloo processes on CPU, spawned by the test.

Every rank must end with identical weights equal to the single-process result; errors must be
raised on every rank (never a deadlock). The processes are killed after a deadline.
"""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from convspec import bbn_, svb_

WORLD = 2
DEADLINE_S = 150
EPS = 0.05

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs the gloo backend"
)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # same shape as the next: batched on one rank
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        out = {}
        # 1. Plain model, identical on both ranks (auto-detected process group).
        model = make_model()
        report = svb_(model, EPS)
        out["plain"] = weights(model)
        out["plain_report"] = [(r.name, r.n_clipped, r.min_before, r.max_after) for r in report.layers]

        # 2. Ranks that disagree before the call still agree after it: each layer comes from
        #    its owner (layer i from rank i % 2).
        model = make_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * rank)
        svb_(model, EPS)
        out["diverged"] = weights(model)

        # 3. DistributedDataParallel-wrapped model, after a real forward/backward.
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different data per rank: different BN running stats
        ddp(torch.randn(4, 3, 8, 8)).sum().backward()
        report = svb_(ddp, EPS)
        out["ddp_names"] = [r.name for r in report.layers]
        bbn_(ddp, 0.1, mode="bbn")  # rank 0's result is broadcast
        out["ddp"] = {k: v for k, v in weights(model).items() if "running" not in k}

        # 4. A NaN on one rank only: every rank raises, nothing is written, nobody hangs.
        model = make_model()
        if rank == 1:
            with torch.no_grad():
                model[4].weight[0, 0, 0, 0] = float("nan")
        before = weights(model)
        try:
            svb_(model, EPS)
            out["nan_error"] = None
        except ValueError as err:
            out["nan_error"] = str(err)
        out["nan_unchanged"] = all(
            torch.equal(torch.nan_to_num(v), torch.nan_to_num(before[k]))
            for k, v in model.state_dict().items()
        )

        # 5. Explicit opt-out: no collective, local computation.
        model = make_model()
        svb_(model, EPS, distributed=False)
        out["local"] = weights(model)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir):
    ctx = mp.start_processes(
        _worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("svb_dist"))


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_ranks_identical_and_equal_to_single_process(results):
    r0, r1 = results
    assert_same(r0["plain"], r1["plain"])
    single = make_model()
    report = svb_(single, EPS)
    assert_same(r0["plain"], weights(single), exact=False)
    assert r0["plain_report"] == r1["plain_report"]
    assert [row[0] for row in r0["plain_report"]] == [r.name for r in report.layers]
    for (_, n_clipped, lo, hi), row in zip(r0["plain_report"], report.layers):
        assert n_clipped == row.n_clipped
        assert lo == pytest.approx(row.min_before, rel=1e-9)
        assert hi == pytest.approx(row.max_after, rel=1e-9)


def test_owner_rank_wins_when_ranks_disagree(results):
    r0, r1 = results
    bounded = [f"{name}.weight" for name in ("0", "3", "4", "5", "9")]
    # Only the bounded weights are synchronised; svb_ leaves biases and BatchNorm alone.
    assert_same({k: r0["diverged"][k] for k in bounded}, {k: r1["diverged"][k] for k in bounded})
    assert not torch.equal(r0["diverged"]["0.bias"], r1["diverged"]["0.bias"])
    # Layer i (in module order: 0, 3, 4, 5, 9) is owned by rank i % 2.
    for index, name in enumerate(["0", "3", "4", "5", "9"]):
        owner = index % 2
        model = make_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * owner)
        svb_(model, EPS)
        key = f"{name}.weight"
        assert torch.allclose(r0["diverged"][key], weights(model)[key], rtol=0, atol=1e-6), key


def test_ddp_model(results):
    r0, r1 = results
    assert r0["ddp_names"] == ["module.0", "module.3", "module.4", "module.5", "module.9"]
    assert_same(r0["ddp"], r1["ddp"])  # BatchNorm gammas too, although running stats differ


def test_nan_on_one_rank_raises_everywhere(results):
    for r in results:
        assert r["nan_error"] is not None and "layer '4'" in r["nan_error"]
        assert r["nan_unchanged"]


def test_opt_out_is_local(results):
    single = make_model()
    svb_(single, EPS)
    for r in results:
        assert_same(r["local"], weights(single), exact=False)
