"""lipschitz_report: per-layer operator norms against the dense operator, the network bound
against the network itself, and the CLI."""

import json
import math

import pytest
import torch
from torch import nn

from convspec import conv_operator, lipschitz_report
from convspec.cli import main


def dense_norm(conv, size):
    return float(torch.linalg.matrix_norm(conv_operator(conv, size).to(torch.float64), 2))


class Residual(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


def linear_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(3, 3, 3, stride=2, padding=1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 16, 5),
    ).double()


def test_layers_are_exact_and_a_chain_is_their_product():
    net = linear_net()
    rep = lipschitz_report(net, torch.zeros(1, 2, 16, 16, dtype=torch.float64))
    assert [r.name for r in rep.layers] == ["0", "1", "2", "3", "4"]
    assert rep.layers[0].sigma_max == pytest.approx(dense_norm(net[0], 16), rel=1e-9)
    assert rep.layers[1].sigma_max == pytest.approx(dense_norm(net[1], 16), rel=1e-6)
    assert rep.layers[1].input_size == (16, 16) and rep.layers[2].input_size == (8, 8)
    assert rep.layers[2].sigma_max == pytest.approx(0.5)  # 2 x 2 average: 1 / 2
    assert rep.layers[4].sigma_max == pytest.approx(
        float(torch.linalg.matrix_norm(net[4].weight.detach(), 2)), rel=1e-12)
    assert rep.bound == pytest.approx(math.prod(r.bound for r in rep.layers), rel=1e-12)
    assert rep.unsupported == []


def test_bound_is_above_the_true_constant_and_tight_for_one_layer():
    net = linear_net(1)
    x = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    rep = lipschitz_report(net, x)
    # The network is linear: its constant is the norm of its Jacobian.
    jac = torch.autograd.functional.jacobian(lambda t: net(t.view(1, 2, 16, 16)).reshape(-1),
                                             x.reshape(-1))
    true = float(torch.linalg.matrix_norm(jac, 2))
    assert true <= rep.bound * (1 + 1e-9)
    one = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    r1 = lipschitz_report(one, x)
    jac = torch.autograd.functional.jacobian(lambda t: one(t.view(1, 2, 16, 16)).reshape(-1),
                                             x.reshape(-1))
    assert r1.bound == pytest.approx(float(torch.linalg.matrix_norm(jac, 2)), rel=1e-6)


def test_residual_blocks_batchnorm_and_activations():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), bn, nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid(),
                               nn.Conv2d(3, 3, 3, padding=1))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    ).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    rep = lipschitz_report(net, x)
    b = {r.name: r.bound for r in rep.layers}
    scale = float((bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).max())
    assert b["1"] == pytest.approx(scale, rel=1e-9)
    assert b["3.f.1"] == 0.25
    inner = b["3.f.0"] * 0.25 * b["3.f.2"]
    expected = b["0"] * b["1"] * b["2"] * (1 + inner) * b["4"] * b["6"]
    assert rep.bound == pytest.approx(expected, rel=1e-12)
    assert net.training  # the training flag is restored
    net[1].eval()  # a frozen BatchNorm in a training model stays frozen
    lipschitz_report(net, x)
    assert net.training and not net[1].training and net[0].training
    net.eval()
    y = torch.randn_like(x)
    with torch.no_grad():  # and it is a bound
        ratio = (net(x) - net(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= rep.bound


def test_unsupported_modules_are_named_never_assumed():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax(dim=1), nn.BatchNorm2d(3),
                        nn.BatchNorm2d(3, track_running_stats=False))
    rep = lipschitz_report(net, torch.randn(2, 2, 6, 6))
    assert rep.bound is None
    assert len(rep.unsupported) == 2 and "Softmax" in rep.unsupported[0]
    assert "3 (BatchNorm2d)" in rep.unsupported[1]  # no running statistics; BN 2 is fine

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="torch.fx"):
        lipschitz_report(Untraceable(), torch.randn(1, 2))
    with pytest.raises(ValueError, match="nn.Module"):
        lipschitz_report(lambda x: x, torch.randn(1, 2))


def test_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "lip.json"
    rc = main(["lipschitz", "convnet-8", "--input-size", "1", "12", "12", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "network Lipschitz constant <=" in text
    record = json.loads(out.read_text())
    assert record["bound"] > 0 and record["unsupported"] == []
    assert record["layers"][0]["name"] == "features.0"  # the first conv of the named model
    name = f"lipfactories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n\ndef soft():\n    return nn.Sequential(nn.Conv2d(1, 2, 3), "
        "nn.Softmax(1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["lipschitz", f"{name}:soft", "--input-size", "1", "6", "6"]) == 3
    assert "unsupported: 1 (Softmax)" in capsys.readouterr().out
    assert main(["lipschitz", str(tmp_path / "none.pt"), "--input-size", "1", "6", "6"]) == 1
    assert "not a checkpoint file" in capsys.readouterr().err


class _Pattern(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.down = nn.Conv2d(2, 2, 8, stride=8, bias=False)
        self.elu = nn.ELU(alpha=3.0, inplace=True)
        self.fc = nn.Linear(2 * 8 * 8, 2 * 8 * 8, bias=False)

    def forward(self, x):
        k = self.kind
        if k == "broadcast":
            return x + self.pool(x)
        if k == "alpha":
            return torch.add(x, torch.relu(x), alpha=10)
        if k == "data":
            return x + 10 * self.fc(x.data.flatten(1)).view_as(x)
        if k == "two outputs":
            return x, x
        if k == "reuse at two sizes":
            return self.conv(self.down(torch.cat([x] * 4, dim=2).repeat(1, 1, 1, 4)))
        if k == "eval branch":
            return x * 10 if not self.training else x
        if k == "alpha on the input":  # the constant is the first operand: alpha scales x
            return torch.sub(self.fc.weight.sum().detach(), x, alpha=10)
        if k == "chunk":  # tuples of tensors: each piece must carry a bound
            a, b = x.chunk(2, 1)
            return x + torch.cat([a, b], 1) * 10
        if k == "split":
            return x + 10 * torch.split(x, 1, dim=1)[0]
        if k == "unbind":
            return x + 10 * torch.stack(x.unbind(1), 1)
        raise AssertionError(k)


@pytest.mark.parametrize("kind", ["broadcast", "alpha", "data", "two outputs", "eval branch",
                                  "alpha on the input", "chunk", "split", "unbind"])
def test_bound_holds_on_tricky_graphs(kind):
    """Patterns where a naive propagation reports less than the true constant."""
    torch.manual_seed(0)
    net = _Pattern(kind).double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rep = lipschitz_report(net, x)
    assert rep.bound is not None, rep.unsupported
    net.eval()

    def f(t):
        out = net(t.view(1, 2, 8, 8))
        out = out if isinstance(out, tuple) else (out,)
        return torch.cat([o.reshape(-1) for o in out])

    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))  # all these maps are linear
    assert float(torch.linalg.matrix_norm(jac, 2)) <= rep.bound * (1 + 1e-9)


@pytest.mark.parametrize("module,forward,why", [
    (nn.Hardshrink(), lambda m, x: m(x), "Hardshrink"),  # discontinuous: no constant
    (nn.Identity(), lambda m, x: x[:, [0, 0, 0]], "indexing"),  # repeats a value
    (nn.ELU(alpha=3.0, inplace=True), lambda m, x: m(x) + x, "in-place"),
    # the in-place activation writes into x through a view: x + elu(x) becomes 2 elu(x)
    (nn.ELU(alpha=3.0, inplace=True), lambda m, x: x + m(x.view(-1)).view_as(x), "in-place"),
    # a module that returns a tuple: its values must not be dropped from the sum
    (nn.MaxPool2d(2, return_indices=True), lambda m, x: x[:, :, :2, :2] + 10 * m(x)[0],
     "MaxPool2d"),
    (nn.Identity(), lambda m, x: x + m(x).max().item(), "item"),  # a number from the input
])
def test_unsound_patterns_are_refused(module, forward, why):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, x):
            return forward(self.m, x)

    rep = lipschitz_report(Net(), torch.randn(1, 2, 4, 4))
    assert rep.bound is None and any(why in u for u in rep.unsupported), rep.unsupported


def test_a_module_applied_at_two_sizes_is_bounded_at_each():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x[:, :, :1, :1]).flatten(1), self.conv(x).flatten(1)

    x = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    rep = lipschitz_report(Twice(), x)
    sizes = sorted(r.input_size for r in rep.layers)
    assert sizes == [(1, 1), (16, 16)]
    big = next(r for r in rep.layers if r.input_size == (16, 16))
    assert big.sigma_max == pytest.approx(dense_norm(conv, 16), rel=1e-6)


def test_activation_constants_bound_the_derivative():
    from convspec.lipschitz import _ACTIVATIONS, _FUNCTIONS

    x = torch.linspace(-12, 12, 480001, dtype=torch.float64, requires_grad=True)
    fns = [(cls.__name__, cls().eval(), lip) for cls, lip in _ACTIVATIONS.items()
           if cls not in (nn.Flatten, nn.Unflatten)]  # rearrangements, not elementwise
    fns += [(f.__name__, f, lip) for f, lip in _FUNCTIONS.items()]
    for name, f, lip in fns:
        y = f(x)
        g, = torch.autograd.grad(y.sum(), x)
        # 1e-7: Hardsigmoid's backward multiplies by 1/6 rounded to float32
        assert float(g.abs().max()) <= lip * (1 + 1e-7), name


@pytest.mark.parametrize("junk", [b"junk", b"", b"not a checkpoint"])
def test_cli_on_a_checkpoint_and_on_files_that_are_not_one(tmp_path, capsys, junk):
    from convspec.train.models import build_model

    torch.manual_seed(3)
    model = build_model("convnet-8", num_classes=10, in_channels=1)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "convnet-8"}}, ckpt)
    assert main(["lipschitz", str(ckpt), "--input-size", "1", "6", "6"]) == 0
    assert "network Lipschitz constant <=" in capsys.readouterr().out
    bad = tmp_path / "bad.pt"
    bad.write_bytes(junk)  # b"junk": a legacy opcode cut off (struct.error, was a traceback)
    assert main(["lipschitz", str(bad), "--input-size", "1", "6", "6"]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
