"""Every op under the transforms users apply to whole models: forward-mode AD, torch.func (vmap, grad,
jvp), torch.jit.trace and torch.compile with frozen inputs. Each either gives PyTorch's own answer or
raises; never a silent zero tangent or a dropped activation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import genfast
from genfast import reference
from genfast.activations import activation_module
from genfast.nn import FusedLinear
from tests.conftest import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def _dense(x, w, b):
    return genfast.fused_dense(x, w, b, activation="gelu")


def _dense_plain(x, w, b):
    return reference.fused_dense(x, w, b, "gelu")


def _elbo(recon, mu, logvar, target):
    return genfast.elbo_loss(recon, target, mu, logvar, beta=0.5)


def _elbo_plain(recon, mu, logvar, target):
    return reference.elbo_terms(recon, target, mu, logvar, 0.5)[0]


def _disc(real, fake):
    return genfast.discriminator_loss(real, fake, kind="nonsaturating")


def _disc_plain(real, fake):
    return reference.discriminator_loss(real, fake, "nonsaturating")


def _gen(fake):
    return genfast.generator_loss(fake, kind="lsgan")


def _gen_plain(fake):
    return reference.generator_loss(fake, "lsgan")


def _kl(mu, logvar):
    return genfast.kl_divergence(mu, logvar, reduction="sum")


def _kl_plain(mu, logvar):
    return reference.kl_divergence(mu, logvar, "sum")


def _cases():
    """(name, genfast function, plain function, inputs): float64, the differentiable inputs first."""
    x, w, b = torch.randn(7, 5), torch.randn(4, 5), torch.randn(4)
    recon, mu, logvar = torch.randn(6, 10), torch.randn(6, 3), torch.randn(6, 3)
    target = torch.rand(6, 10)
    return [
        ("fused_dense", _dense, _dense_plain, (x, w, b), 3),
        ("elbo_loss", _elbo, _elbo_plain, (recon, mu, logvar, target), 3),
        ("discriminator_loss", _disc, _disc_plain, (torch.randn(9), torch.randn(9)), 2),
        ("generator_loss", _gen, _gen_plain, (torch.randn(9),), 1),
        ("kl_divergence", _kl, _kl_plain, (mu, logvar), 2),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_ad_gives_the_tangent_of_the_plain_expression(backend, requires_grad, case):
    """The defect: with no input requiring grad, the losses called their kernels and dropped the tangent."""
    require_backend(backend, "cpu")
    _, fn, plain, inputs, n_diff = case
    inputs = tuple(t.double().requires_grad_(requires_grad and i < n_diff) for i, t in enumerate(inputs))
    tangents = tuple(torch.randn_like(t) for t in inputs[:n_diff])
    results = []
    for f in (fn, plain):
        with fwAD.dual_level(), genfast.use_backend(backend):
            duals = [fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)] + list(inputs[n_diff:])
            out = fwAD.unpack_dual(f(*duals))
            results.append((out.primal, out.tangent))
    (value, tangent), (expected_value, expected_tangent) = results
    assert tangent is not None, "no tangent: forward-mode AD silently gave 0"
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(tangent, expected_tangent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_func_grad_jvp_and_vmap(backend, case):
    require_backend(backend, "cpu")
    _, fn, plain, inputs, n_diff = case
    inputs = tuple(t.double() for t in inputs)
    argnums = tuple(range(n_diff))
    batched = tuple(torch.stack([t, 0.5 * t]) for t in inputs)  # every input, weights too, gets a batch dim
    transforms = {
        "grad": lambda f: torch.func.grad(lambda *a: f(*a).sum(), argnums=argnums)(*inputs),
        "jvp": lambda f: torch.func.jvp(
            lambda *a: f(*a, *inputs[n_diff:]),
            inputs[:n_diff],
            tuple(torch.ones_like(t) for t in inputs[:n_diff]),
        ),
        "vmap": lambda f: torch.func.vmap(f)(*batched),
    }
    with genfast.use_backend(backend):
        for name, transform in transforms.items():
            torch.testing.assert_close(transform(fn), transform(plain), msg=name)


def _plain_and_fused(activation: str, sizes=(5, 8, 3)) -> tuple[nn.Module, nn.Module]:
    """A plain Linear + activation Sequential and its converted copy (the same parameters' values)."""
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), activation_module(activation, 0.2)]
    plain = nn.Sequential(*layers)
    fused = genfast.nn.convert(copy.deepcopy(plain))
    assert isinstance(fused[0], FusedLinear)
    return plain, fused


def test_per_sample_gradients_of_a_fused_model():
    """The classic torch.func recipe: vmap(grad(loss of functional_call)) over the batch."""
    plain, model = _plain_and_fused("relu")
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 5), torch.randn(6, 3)

    def per_sample(m):
        def loss(p, xi, yi):
            return (torch.func.functional_call(m, p, (xi.unsqueeze(0),)) - yi).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    ours, theirs = per_sample(model), per_sample(plain)
    for name in params:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_sampling_under_vmap_follows_pytorchs_randomness_rule():
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(genfast.reparameterize)(mu, logvar)
    z = torch.func.vmap(genfast.reparameterize, randomness="different")(mu, logvar)
    assert z.shape == mu.shape and torch.isfinite(z).all()


def test_sampling_under_forward_ad_gives_the_tangent_of_its_sample():
    """z = mu + exp(logvar / 2) eps: dz = dmu + z_minus_mu / 2 * dlogvar for the very eps drawn."""
    mu, logvar = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    dmu, dlogvar = torch.randn_like(mu), torch.randn_like(logvar)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(
            genfast.reparameterize(fwAD.make_dual(mu, dmu), fwAD.make_dual(logvar, dlogvar))
        )
    torch.testing.assert_close(out.tangent, dmu + 0.5 * (out.primal - mu) * dlogvar)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "sigmoid"])
def test_jit_trace_records_the_op_and_keeps_the_activation(backend, activation):
    """The defect: the trace of a converted model held only aten::addmm, the activation gone."""
    require_backend(backend, "cpu")
    plain, model = _plain_and_fused(activation, (6, 5, 3))
    with genfast.use_backend(backend):
        traced = torch.jit.trace(model, torch.randn(4, 6))
        assert "genfast::fused_dense" in str(traced.inlined_graph)
        x = torch.randn(9, 6, requires_grad=True)
        out = traced(x)
    x_plain = x.detach().requires_grad_()
    expected = plain(x_plain)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad)


@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "x+weight", "x+bias", "weight+bias"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compiled_backward_with_inputs_that_need_no_gradient(backend, frozen):
    """The defect: the backward kernels returned one shared empty tensor for every unneeded gradient,
    which torch.compile refuses ('may not alias any inputs ... or other returns')."""
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    x, w, b = torch.randn(8, 5), torch.randn(3, 5), torch.randn(3)
    leaves = {"x": x, "weight": w, "bias": b}
    for name, t in leaves.items():
        t.requires_grad_(name not in frozen.split("+"))
    with genfast.use_backend(backend):
        out = torch.compile(_dense, fullgraph=True)(x, w, b)
        out.square().sum().backward()
    copies = {k: v.detach().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    _dense_plain(*copies.values()).square().sum().backward()
    for name, t in leaves.items():
        if t.requires_grad:
            torch.testing.assert_close(t.grad, copies[name].grad, msg=name)
        else:
            assert t.grad is None


def test_compiled_layer_without_bias_trains():
    """The issue's own reproduction."""
    torch._dynamo.reset()
    layer = FusedLinear(5, 3, bias=False)
    torch.compile(layer, fullgraph=True)(torch.randn(8, 5)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (3, 5)
