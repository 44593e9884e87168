"""FusedLinear is a drop-in nn.Linear; convert/revert rewrite models without changing outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genfast
from genfast.nn import FusedLinear, convert, revert


def mnist_autoencoder() -> nn.Sequential:
    """The classic MNIST autoencoder: 784-600-400-200 with ReLU, mirrored decoder, Sigmoid output."""
    sizes = [784, 600, 400, 200]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    encoder = nn.Sequential(*layers)
    back = sizes[::-1]
    layers = []
    for a, b in zip(back, back[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers[-1] = nn.Sigmoid()
    return nn.Sequential(encoder, nn.Sequential(*layers))


def test_same_initialisation_parameters_and_keys_as_linear():
    torch.manual_seed(3)
    plain = nn.Linear(100, 7)
    torch.manual_seed(3)
    fused = FusedLinear(100, 7, activation="gelu")
    assert list(fused.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    assert torch.equal(fused.weight, plain.weight) and torch.equal(fused.bias, plain.bias)
    assert FusedLinear(3, 4, bias=False).bias is None
    assert FusedLinear(3, 4, dtype=torch.float64).weight.dtype == torch.float64


def test_state_dict_round_trips_both_ways():
    plain, fused = nn.Linear(784, 100), FusedLinear(784, 100, activation="tanh")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(7, 784)
    torch.testing.assert_close(fused(x), torch.tanh(plain(x)))
    plain2 = nn.Linear(784, 100)
    plain2.load_state_dict(fused.state_dict())
    assert torch.equal(plain2.weight, plain.weight)


def test_repr_names_the_activation():
    assert "activation='leaky_relu', negative_slope=0.2" in repr(
        FusedLinear(2, 3, activation="leaky_relu", negative_slope=0.2)
    )


def test_convert_and_revert_the_mnist_autoencoder_keep_outputs_and_keys():
    model = mnist_autoencoder()
    keys = list(model.state_dict())
    x = torch.rand(100, 784)
    expected = model(x)
    params = {id(p) for p in model.parameters()}
    assert convert(model) is model
    fused = [m for m in model.modules() if isinstance(m, FusedLinear)]
    assert len(fused) == 6 and fused[-1].activation == "sigmoid"
    assert not any(type(m) in (nn.ReLU, nn.Sigmoid) for m in model.modules())
    assert {id(p) for p in model.parameters()} == params, "convert must keep the very Parameters"
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)
    revert(model)
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "act",
    [
        nn.ReLU(),
        nn.LeakyReLU(0.3),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
        nn.Sigmoid(),
        nn.Tanh(),
    ],
)
def test_convert_each_activation_module(act):
    model = nn.Sequential(nn.Linear(7, 5), act, nn.Linear(5, 3))
    x = torch.randn(4, 7)
    expected = model(x)
    convert(model)
    assert isinstance(model[0], FusedLinear) and type(model[2]) is nn.Linear, "a lone Linear stays"
    torch.testing.assert_close(model(x), expected)
    revert(model)
    assert type(model[1]) is type(act)
    torch.testing.assert_close(model(x), expected)


def test_revert_outside_a_sequential_wraps_linear_and_activation():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = FusedLinear(4, 3, activation="silu")

        def forward(self, x):
            return self.fc(x)

    net = Net()
    x = torch.randn(2, 4)
    expected = net(x)
    revert(net)
    assert isinstance(net.fc, nn.Sequential) and type(net.fc[1]) is nn.SiLU
    torch.testing.assert_close(net(x), expected)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="activation: expected one of"):
        FusedLinear(3, 4, activation="swish")


def test_training_a_converted_model_matches_the_plain_model():
    torch.manual_seed(0)
    plain = mnist_autoencoder()
    fused = mnist_autoencoder()
    fused.load_state_dict(plain.state_dict())
    convert(fused)
    x = torch.rand(64, 784)
    for model in (plain, fused):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x).backward()
            opt.step()
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_autocast_runs_in_the_autocast_dtype():
    layer = FusedLinear(16, 8, activation="gelu")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = nn.functional.gelu(nn.functional.linear(x, layer.weight, layer.bias))
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    assert genfast.fused_dense(x, layer.weight, layer.bias).dtype == torch.float32


@pytest.mark.parametrize("hooked", ["linear", "activation"])
def test_convert_leaves_layers_with_hooks_unfused_and_says_so(hooked):
    """The defect: convert() silently dropped the forward hooks of the nn.Linear it replaced."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Tanh())
    seen = []
    model[0 if hooked == "linear" else 1].register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone())
    )
    x = torch.randn(5, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match="left '0' and its activation unfused: they carry hooks"):
        convert(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.ReLU, "the hooked pair must stay as it was"
    assert isinstance(model[2], FusedLinear), "pairs without hooks are still fused"
    seen.clear()
    torch.testing.assert_close(model(x), expected)
    assert len(seen) == 1, "the hook must still run"
