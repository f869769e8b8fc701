"""operator_spectral_norm: the effective weight's true operator norm, checked against the dense
operator in float64, and the parametrization under state_dict, deepcopy, torch.save, compile,
autocast and DDP."""

import copy
import io
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils import parametrize

from convspec import conv_operator, operator_spectral_norm

LAYERS = {  # name: (factory, spatial input size)
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), (9, 9)),
    "conv2d-strided-circular": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), (8, 8)),
    "conv2d-reflect-dilated": (
        lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (9, 7)),
    "conv2d-replicate-groups": (
        lambda: nn.Conv2d(4, 6, (3, 2), padding=1, groups=2, padding_mode="replicate"), (7, 8)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 5, padding=2), (16,)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (5, 5, 5)),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1), (9,)),
    "convtranspose2d": (
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (5, 5)),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1), (3, 3, 3)),
    "linear": (lambda: nn.Linear(7, 5), ()),
}


def operator_norm(module, size):
    w = module.weight.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return float(torch.linalg.matrix_norm(w, 2))
    # conv_operator reads the module's geometry; its weight is the effective one (float64 here)
    return float(torch.linalg.matrix_norm(conv_operator(module, size).to(torch.float64), 2))


def batch(module, size, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, nn.Linear):
        return torch.randn(n, module.in_features, generator=g, dtype=torch.float64)
    return torch.randn(n, module.in_channels, *size, generator=g, dtype=torch.float64)


def train(module, size, steps=8):
    x = batch(module, size)
    target = module(x).detach() + torch.randn_like(module(x))
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        (module(x) - target).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("bound", ["estimate", "certified"])
def test_trained_layer_has_operator_norm_one(name, bound):
    make, size = LAYERS[name]
    torch.manual_seed(1)
    m = make().double()
    # the size is recorded by the first forward pass (none given); default iterations
    operator_spectral_norm(m, bound=bound)
    train(m, size)
    m.eval()
    s = operator_norm(m, size)
    if bound == "estimate":
        assert abs(s - 1) < 1e-3
    else:
        assert s <= 1 + 1e-12
        assert s > 0.5  # a bound, not a collapse


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("optimiser", ["sgd-momentum-0.1", "adam-1e-2"])
def test_estimate_follows_large_optimiser_steps(name, optimiser):
    """Large steps turn the top singular vector of a clustered spectrum out of reach of one
    vector's step (errors to 1e-2 measured with block size 1); the block keeps the estimate
    within 1e-3, in training mode and in eval mode after the optimiser's last step."""
    make, size = LAYERS[name]
    for seed in range(3):
        torch.manual_seed(seed)
        m = make().double()
        operator_spectral_norm(m)
        x = batch(m, size, n=8, seed=seed)
        target = torch.randn_like(m(x))
        opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
               if optimiser.startswith("sgd") else torch.optim.Adam(m.parameters(), lr=1e-2))
        for _ in range(10):
            opt.zero_grad()
            (m(x) - target).square().mean().backward()
            opt.step()
        m.eval()  # normalised for the weight as the last step left it; no buffer changes
        before = [b.clone() for b in m.buffers()]
        assert abs(operator_norm(m, size) - 1) < 1e-3, (seed, "eval")
        assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))
        m.train()  # one more step, on reading the weight
        assert abs(operator_norm(m, size) - 1) < 1e-3, (seed, "train")


def test_eval_weight_is_cached_until_the_weight_or_the_vectors_change():
    make, size = LAYERS["conv2d"]
    torch.manual_seed(0)
    m = operator_spectral_norm(make().double(), input_size=size)
    m.eval()
    p = m.parametrizations.weight[0]
    calls = []
    real = p._ritz_step
    p._ritz_step = lambda *a: calls.append(1) or real(*a)
    w1 = m.weight.detach().clone()
    assert torch.equal(m.weight, w1) and len(calls) == 1  # the second read: from the cache
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(1.5)  # in place, as an optimiser step
    assert torch.allclose(m.weight, w1, atol=1e-9) and len(calls) == 2  # recomputed
    m.load_state_dict(m.state_dict())  # vectors copied in place: recomputed
    m.weight
    assert len(calls) == 3


def test_state_dict_of_the_one_vector_version_loads():
    """state_dicts saved before the block (buffers _u, _v, _p) still load."""
    make, size = LAYERS["conv2d"]
    torch.manual_seed(0)
    a = operator_spectral_norm(make().double(), input_size=size)
    sd = a.state_dict()
    prefix = "parametrizations.weight.0."
    sd[prefix + "_p"] = torch.zeros_like(sd[prefix + "_u"])
    del sd[prefix + "_q"]
    b = operator_spectral_norm(make().double())
    b.load_state_dict(sd)
    assert b.parametrizations.weight[0]._q.shape == (0, 3, *size)
    b.train()
    for _ in range(30):  # the block of one grows back only on re-targeting; it still converges
        b.weight
    b.eval()
    assert abs(operator_norm(b, size) - 1) < 1e-3


def test_reshaped_spectral_norm_is_not_the_operator_norm():
    """What motivates the parametrization: PyTorch normalises the reshaped kernel."""
    torch.manual_seed(0)
    torchs = nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3, padding=1).double())
    ours = operator_spectral_norm(nn.Conv2d(4, 4, 3, padding=1).double(), input_size=16,
                                  n_power_iterations=50)
    for m in (torchs, ours):
        m(torch.randn(1, 4, 16, 16, dtype=torch.float64))
        m.eval()
    assert operator_norm(torchs, (16, 16)) > 1.05
    assert abs(operator_norm(ours, (16, 16)) - 1) < 1e-3


@pytest.mark.parametrize("bound", ["estimate", "certified"])
def test_state_dict_round_trip_and_removal(bound):
    make, size = LAYERS["conv2d-strided-circular"]
    torch.manual_seed(2)
    a = operator_spectral_norm(make(), bound=bound)
    train(a.double(), size)
    a.eval()
    w = a.weight.detach().clone()
    b = operator_spectral_norm(make().double(), bound=bound)  # input size not known yet
    b.load_state_dict(a.state_dict())
    b.eval()
    assert torch.equal(b.weight, w)
    assert torch.equal(b.parametrizations.weight[0].input_size, torch.tensor([8, 8]))
    parametrize.remove_parametrizations(b, "weight")
    assert not parametrize.is_parametrized(b) and torch.equal(b.weight.detach(), w)


def test_gradient_matches_finite_differences():
    torch.manual_seed(3)
    for make, size in (LAYERS["conv2d-reflect-dilated"], LAYERS["convtranspose1d"],
                       LAYERS["linear"]):
        for bound in ("estimate", "certified"):
            m = operator_spectral_norm(make().double(), bound=bound, n_power_iterations=5)
            m(batch(m, size))  # records the size, runs the power iteration
            m.eval()  # the vectors stay fixed: the map W -> W / sigma(W) is deterministic
            p = m.parametrizations.weight[0]
            w = m.parametrizations.weight.original.detach().clone().requires_grad_()
            assert torch.autograd.gradcheck(lambda t: p(t), (w,), atol=1e-6, rtol=1e-5)


def test_deepcopy_and_torch_save_keep_their_own_state():
    make, size = LAYERS["conv2d"]
    torch.manual_seed(4)
    net = nn.Sequential(operator_spectral_norm(make().double()), nn.ReLU())
    x = batch(net[0], size)
    net(x)
    ema = copy.deepcopy(net)
    u = net[0].parametrizations.weight[0]._u.clone()
    ema(batch(net[0], (12, 12)))  # the copy re-targets to a new size; the original does not
    assert ema[0].parametrizations.weight[0]._size == (12, 12)
    assert net[0].parametrizations.weight[0]._size == (9, 9)
    assert torch.equal(net[0].parametrizations.weight[0]._u, u)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    net.eval()
    loaded.eval()
    assert torch.equal(loaded(x), net(x))
    loaded.train()
    loaded(batch(net[0], (6, 6)))  # the hook survived pickling
    assert loaded[0].parametrizations.weight[0]._size == (6, 6)


def test_retargets_to_a_new_input_size():
    torch.manual_seed(5)
    m = operator_spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double(), n_power_iterations=30)
    for size in ((6, 6), (14, 10)):
        for _ in range(3):
            m(batch(m, size))
        m.eval()
        assert abs(operator_norm(m, size) - 1) < 1e-3
        m.train()


def test_compile_and_autocast():
    torch.manual_seed(6)
    net = nn.Sequential(operator_spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_size=8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
    x = torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="eager")
    for _ in range(2):
        out = compiled(x)
        ref = eager(x)
        assert torch.allclose(out, ref, atol=1e-6)
        out.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    p = net[0].parametrizations.weight[0]
    assert p._u.dtype == torch.float32  # the vectors stay float32 under autocast


def test_bad_input_raises_and_leaves_the_module_alone():
    conv = nn.Conv2d(3, 4, 3)
    for kwargs, match in [
        (dict(n_power_iterations=0), "n_power_iterations"),
        (dict(bound="tight"), "bound"),
        (dict(eps=0.0), "eps"),
        (dict(input_size=2), "input"),  # smaller than the kernel without padding
        (dict(name="bias2"), "no tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            operator_spectral_norm(conv, **kwargs)
        assert not parametrize.is_parametrized(conv) and not conv._forward_pre_hooks
    with pytest.raises(ValueError, match="nn.Conv1d"):
        operator_spectral_norm(nn.BatchNorm2d(3))
    bad = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        operator_spectral_norm(bad)
    ok = operator_spectral_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(RuntimeError, match="input size is not known"):
        ok.weight
    with pytest.raises(ValueError, match="already"):
        operator_spectral_norm(ok)


# --- DDP --------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        net = nn.Sequential(operator_spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_size=8),
                            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
        torch.manual_seed(10 + rank)  # different power-iteration noise and data per rank
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
        ddp(torch.randn(4, 3, 8, 8))  # broadcasts rank 0's buffers first
        torch.save({k: v.clone() for k, v in net.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs the gloo backend")
def test_ddp_ranks_share_vectors_and_weights(tmp_path):
    ctx = mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    assert ctx.join(timeout=150) or ctx.join(timeout=1)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and "0.parametrizations.weight.0._u" in a
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_after_removal_keyword_inputs_and_eval_at_a_new_size():
    torch.manual_seed(7)
    m = operator_spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
    m(input=torch.randn(2, 3, 8, 8))  # a keyword input is recorded too
    p = m.parametrizations.weight[0]
    assert p._size == (8, 8)
    m.eval()
    w = m.weight.detach().clone()
    x = torch.randn(1, 3, 20, 20)
    state = torch.random.get_rng_state()
    m(x)  # eval: the weight stays normalised for the trained size
    assert p._size == (8, 8) and torch.equal(m.weight, w)
    assert torch.equal(torch.random.get_rng_state(), state)  # and no random draw
    parametrize.remove_parametrizations(m, "weight")
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)  # the hook is a no-op now


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_modules_keep_float32_vectors_and_the_certificate(dtype):
    torch.manual_seed(8)
    for bound in ("estimate", "certified"):
        m = operator_spectral_norm(nn.Conv2d(4, 4, 3, padding=1), input_size=8, bound=bound)
        m.to(dtype)
        p = m.parametrizations.weight[0]
        assert p._u.dtype == p._v.dtype == torch.float32
        m(torch.randn(2, 4, 8, 8, dtype=dtype))
        m.eval()
        w = m.weight.detach()
        assert w.dtype == dtype
        s = float(torch.linalg.matrix_norm(conv_operator(w.double(), 8, padding=1), 2))
        if bound == "certified":
            assert s <= 1.0  # the rounded weight itself, not just the float32 quotient
        else:
            assert abs(s - 1) < 5 * torch.finfo(dtype).eps + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make,size", [
    (lambda: nn.Linear(5, 9, bias=False), ()),
    (lambda: nn.Conv1d(2, 4, 3, dilation=2, padding=2, padding_mode="circular"), (10,)),
    (lambda: nn.ConvTranspose1d(4, 3, 3, stride=3, padding=1, output_padding=2), (7,)),
])
def test_certified_margin_is_for_the_weights_dtype(dtype, make, size):
    """Where the bound is tight (no slack to hide in), the margin must cover rounding the
    quotient to float16/bfloat16, not just to the float32 it is computed in."""
    torch.manual_seed(1)
    m = operator_spectral_norm(make().double(), bound="certified")
    train(m, size, steps=3)
    m.to(dtype)
    m(batch(m, size).to(dtype))
    m.eval()
    w = m.weight.detach()
    assert w.dtype == dtype
    if isinstance(m, nn.Linear):
        s = float(torch.linalg.matrix_norm(w.double(), 2))
    else:
        ref = copy.deepcopy(m)
        parametrize.remove_parametrizations(ref, "weight")
        with torch.no_grad():
            s = float(torch.linalg.matrix_norm(conv_operator(ref.double(), size), 2))
    assert s <= 1.0


def test_removing_from_a_deepcopy_leaves_the_original_normalised():
    """parametrize's own deepcopy shares the run-time class between original and copy:
    removing the parametrization from the copy (exporting an EMA model) deleted the original's
    ``weight`` property."""
    torch.manual_seed(9)
    for name in ("conv1d", "linear"):
        make, size = LAYERS[name]
        m = operator_spectral_norm(make().double())
        x = batch(m, size)
        m(x)
        m.eval()
        ref = m(x)
        ema = copy.deepcopy(nn.Sequential(m))
        assert type(ema[0]) is not type(m)
        parametrize.remove_parametrizations(ema[0], "weight")
        assert parametrize.is_parametrized(m) and torch.equal(m(x), ref)
        assert torch.equal(ema[0](x), ref)
        twice = copy.deepcopy(copy.deepcopy(m))  # a copy of a copy is a parametrized module
        assert parametrize.is_parametrized(twice) and torch.equal(twice(x), ref)


def test_tensors_and_sizes_that_are_not_the_layers_raise_and_change_nothing():
    for module, kwargs, match in [
        (nn.Conv2d(3, 4, 3), dict(name="bias"), "not that of the layer's weight"),
        (nn.Linear(3, 4), dict(name="bias"), "not that of the layer's weight"),
        (nn.Linear(3, 4), dict(input_size=0), "nn.Linear has none"),
        (nn.Linear(3, 4), dict(input_size=(5,)), "nn.Linear has none"),
    ]:
        with pytest.raises(ValueError, match=match):
            operator_spectral_norm(module, **kwargs)
        assert not parametrize.is_parametrized(module) and not module._forward_pre_hooks
    # a first forward at a size the layer cannot take records nothing: a later one (eval
    # included) at a good size is recorded
    m = operator_spectral_norm(nn.Conv2d(3, 4, 5))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 3, 3, 3))
    assert m.parametrizations.weight[0]._size is None
    m.eval()
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 4, 4, 4)
    assert m.parametrizations.weight[0]._size == (8, 8)


@pytest.mark.parametrize("make,size", [
    (lambda: nn.Conv1d(2, 4, 3, dilation=2, padding=2, padding_mode="circular"), (12,)),
    (lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), (6, 6)),
    (lambda: nn.Linear(5, 9), ()),
])
def test_certified_under_autocast_covers_the_rounding_to_bfloat16(make, size):
    """Under autocast the layer computes with its weight rounded to bfloat16: the certificate's
    margin is for that rounding too (the weight itself stays float32)."""
    worst = 0.0
    for seed in range(6):
        torch.manual_seed(seed)
        m = operator_spectral_norm(make(), input_size=size or None, bound="certified")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = m.weight.detach()
        assert w.dtype == torch.float32
        as_used = w.to(torch.bfloat16).to(torch.float64)
        if isinstance(m, nn.Linear):
            s = float(torch.linalg.matrix_norm(as_used, 2))
        else:
            s = float(torch.linalg.matrix_norm(conv_operator(
                as_used, size, padding=m.padding, dilation=m.dilation,
                padding_mode=m.padding_mode), 2))
        worst = max(worst, s)
    assert 0.5 < worst <= 1
