"""FrobeniusRegularizer on every layer type; it must not change the model's behaviour."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import convspec
from _compile_check import assert_compiled_step_matches_eager, assert_grads_match_per_layer
import convspec.regularizer
from convspec.regularizer import MANY_SIZES

from _dense import dense_penalty


def _model():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Unflatten(2, (4, 4)),
        nn.ConvTranspose2d(4, 3, 2, stride=2),
        nn.Unflatten(2, (1, 8)),
        nn.Conv3d(3, 2, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate"),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).double()


def _x(batch=2):
    return torch.randn(batch, 2, 16, dtype=torch.float64)


def test_every_layer_type_is_regularised_exactly():
    model = _model()
    model(_x())
    reg = convspec.FrobeniusRegularizer(model, 0.5)
    assert set(reg.convs) == {"0", "3", "5"} and set(reg.linears) == {"7"}
    model(_x())
    assert reg.input_sizes == {"0": [(16,)], "3": [(4, 4)], "5": [(1, 8, 8)]}
    terms = reg.penalties()
    for name, size in (("0", 16), ("3", (4, 4)), ("5", (1, 8, 8))):
        assert float(terms[name]) == pytest.approx(dense_penalty(model.get_submodule(name), size, 0.5), rel=1e-10)
    w = model[7].weight.detach()
    lin = float((w.T @ w - 0.5 * torch.eye(w.shape[1], dtype=w.dtype)).square().sum())
    assert float(terms["7"]) == pytest.approx(lin, rel=1e-10)
    assert float(reg()) == pytest.approx(sum(float(t) for t in terms.values()), rel=1e-12)


def test_each_input_size_seen_is_penalised():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    reg = convspec.FrobeniusRegularizer(conv)
    conv(torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    conv(torch.zeros(1, 2, 12, 6, dtype=torch.float64))
    conv(torch.zeros(3, 2, 8, 8, dtype=torch.float64))
    assert reg.input_sizes == {"": [(8, 8), (12, 6)]}
    assert float(reg()) == pytest.approx(dense_penalty(conv, 8) + dense_penalty(conv, (12, 6)), rel=1e-10)
    reg.reset_sizes()
    with pytest.raises(RuntimeError, match="forward pass"):
        reg()


def test_many_sizes_warn_once():
    conv = nn.Conv1d(1, 1, 3)
    reg = convspec.FrobeniusRegularizer(conv)
    for n in range(3, 4 + MANY_SIZES):
        conv(torch.zeros(1, 1, n))
    with pytest.warns(UserWarning, match="input sizes"):
        reg()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg()


def test_save_and_deepcopy_leave_the_regularizer_alone():
    model = _model()
    model(_x())
    reg = convspec.FrobeniusRegularizer(model)
    model(_x())
    buf = io.BytesIO()
    torch.save(model, buf)  # the hook is a module-level function: the model pickles
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.allclose(loaded(_x(1) * 0), model(_x(1) * 0))
    ema = copy.deepcopy(model)
    ema[0](torch.zeros(1, 2, 7, dtype=torch.float64))  # the copy records into itself
    assert reg.input_sizes["0"] == [(16,)]
    value = float(reg())
    reg.remove()
    model[0](torch.zeros(1, 2, 9, dtype=torch.float64))
    assert reg.input_sizes["0"] == [(16,)] and float(reg()) == value


def test_compiled_step_has_no_graph_break_and_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.ConvTranspose2d(4, 2, 2, stride=2))
    assert_compiled_step_matches_eager(model, torch.randn(2, 3, 8, 8))


def test_autocast_bfloat16_forward_and_backward():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU())
    x = torch.randn(1, 2, 4, 4, 4)
    reg = convspec.FrobeniusRegularizer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().mean() + reg()
    loss.backward()
    ref = convspec.frobenius_penalty(model[0], 4)
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
    assert float(reg()) == pytest.approx(float(ref), rel=1e-6)


def _mixed_model():
    """Repeated equal layers (batched together), groups, a transposed layer, both Gram sides."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
        nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 7), nn.Linear(7, 7), nn.Linear(7, 7),
    ).double()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_bytes", [0, 30000, 2**30])
def test_batched_sum_matches_per_layer_and_dense(normalize, chunk_bytes, monkeypatch):
    model = _mixed_model()
    # 0: one layer per call; 30000: the two equal 6-channel 3 x 3 layers (23 kB of Gram each)
    # in two calls, the two 7 x 7 linear layers in one; 2**30: one call per group.
    monkeypatch.setattr(convspec.regularizer, "_chunk_bytes", lambda device: chunk_bytes)
    reg = convspec.FrobeniusRegularizer(model, 0.7, normalize=normalize)
    model(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    model[0](torch.randn(1, 2, 4, 6, dtype=torch.float64))  # a second size for one layer
    total = reg()
    assert any(len(g.members) > 1 for g in reg._plan[1])
    chunks = [stop - start for g in reg._plan[1] for start, stop in g.chunks]
    assert max(chunks) == (1 if chunk_bytes == 0 else 2)
    assert any(len(g.chunks) > 1 for g in reg._plan[1]) == (chunk_bytes < 2**30)
    dense = 0.0
    for name, conv in reg.convs.items():
        for size in reg.input_sizes[name]:
            term = dense_penalty(conv, size, 0.7)
            n_in = conv.weight.shape[1] * conv.groups * torch.Size(size).numel() \
                if not isinstance(conv, nn.ConvTranspose2d) else \
                conv.weight.shape[0] * torch.Size(size).numel()
            dense += term / n_in if normalize else term
    for lin in reg.linears.values():
        w = lin.weight.detach()
        term = float((w.T @ w - 0.7 * torch.eye(w.shape[1], dtype=w.dtype)).square().sum())
        dense += term / w.shape[1] if normalize else term
    assert float(total) == pytest.approx(dense, rel=1e-10)
    assert float(total) == pytest.approx(float(sum(reg.penalties().values())), rel=1e-12)
    assert_grads_match_per_layer(model, reg, total)


def test_plan_is_reused_and_rebuilt_when_sizes_or_weights_change():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    reg = convspec.FrobeniusRegularizer(conv)
    conv(torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    first = float(reg())
    plan = reg._plan
    assert float(reg()) == first and reg._plan is plan  # reused
    conv(torch.zeros(1, 2, 6, 6, dtype=torch.float64))  # a new size: a new plan
    assert float(reg()) == pytest.approx(dense_penalty(conv, 8) + dense_penalty(conv, 6), rel=1e-10)
    assert reg._plan is not plan
    reg.reset_sizes()
    with pytest.raises(RuntimeError, match="forward pass"):
        reg()
    conv(torch.zeros(1, 2, 5, 5, dtype=torch.float64))
    assert float(reg()) == pytest.approx(dense_penalty(conv, 5), rel=1e-10)
    conv.weight = nn.Parameter(torch.randn(3, 2, 3, 3, dtype=torch.float64))  # a new weight
    assert float(reg()) == pytest.approx(dense_penalty(conv, 5), rel=1e-10)
    conv.padding = (0, 0)  # a changed geometry
    assert float(reg()) == pytest.approx(dense_penalty(conv, 5), rel=1e-10)
    reg.alpha = 0.3
    assert float(reg()) == pytest.approx(dense_penalty(conv, 5, 0.3), rel=1e-10)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer ''"):
        reg()


def test_the_plan_holds_no_weight_and_the_model_still_copies():
    model = _mixed_model()
    reg = convspec.FrobeniusRegularizer(model)
    model(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    reg().backward()
    weights = {id(p) for p in model.parameters()}
    for group in reg._plan[1]:
        qs, *rest = group.consts
        assert all(id(t) not in weights for t in (*qs, *rest))
    buf = io.BytesIO()
    torch.save(model, buf)
    ema = copy.deepcopy(model)
    assert float(convspec.FrobeniusRegularizer(ema)()) == pytest.approx(float(reg()), rel=1e-12)
