"""Shared checks of FrobeniusRegularizer: a compiled step matches eager; reg()'s gradient is
that of the per-layer penalties."""

import torch

import convspec


def assert_compiled_step_matches_eager(model, x):
    torch._dynamo.reset()
    model(x)
    reg = convspec.FrobeniusRegularizer(model)

    def step(inp):
        return model(inp).square().mean() + 1e-3 * reg()

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    eager = step(x)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, backend="eager")(x)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def assert_grads_match_per_layer(model, reg, total):
    """``total = reg()``: its gradient equals that of ``sum(reg.penalties().values())``."""
    total.backward()
    weights = [m.weight for m in model if hasattr(m, "weight")]
    grads = [w.grad.clone() for w in weights]
    model.zero_grad()
    sum(reg.penalties().values()).backward()
    for w, g in zip(weights, grads):
        assert torch.allclose(w.grad, g, rtol=1e-10, atol=1e-12)
