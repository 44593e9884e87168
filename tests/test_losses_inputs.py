"""The fused losses at the edges: bad input, empty batches, extreme logits, NaN, determinism, autograd,
opcheck, torch.compile and the R1 penalty."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
from genfast import _extension, reference
from genfast.loss_terms import GAN_KINDS, RECON_LOSSES, REDUCTIONS, TERMS
from genfast.nn import FusedLinear
from tests.conftest import compiled_op_targets, non_contiguous, require_backend

BACKENDS = ["reference", "cpu", "triton"]
KINDS = sorted(GAN_KINDS)


def elbo_args(batch=4, features=6, latent=3, dtype=torch.float32):
    return (
        torch.randn(batch, features, dtype=dtype),
        torch.rand(batch, features, dtype=dtype),
        torch.randn(batch, latent, dtype=dtype),
        torch.randn(batch, latent, dtype=dtype),
    )


def escaped(words: str) -> str:
    return "".join("\\" + c if c in "()[].'" else c for c in words)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda x, t, m, v: (x.int(), t, m, v), TypeError, "recon: expected dtype"),
        (lambda x, t, m, v: (x, t.double(), m, v), TypeError, "target: expected recon's dtype"),
        (lambda x, t, m, v: (x, t.long(), m, v), TypeError, "target: expected dtype"),
        (lambda x, t, m, v: (x, t, m.double(), v), TypeError, "mu has dtype torch.float64 but recon"),
        (lambda x, t, m, v: (x, t, m, v.to("meta")), ValueError, "logvar is on meta but recon is on cpu"),
        (lambda x, t, m, v: (x, t[:, :5], m, v), ValueError, "target: expected recon's shape (4, 6)"),
        (lambda x, t, m, v: (x, t, m, v[:, :2]), ValueError, "logvar: expected mu's shape (4, 3)"),
        (lambda x, t, m, v: (x, t, m[:3], v[:3]), ValueError, "mu: expected recon's batch size 4"),
        (lambda x, t, m, v: (x[0], t[0], m, v), ValueError, "recon and mu: expected (batch, features...)"),
        (lambda x, t, m, v: (x, t.requires_grad_(), m, v), ValueError, "target: genfast's losses give"),
        (lambda x, t, m, v: (x.numpy(), t, m, v), TypeError, "recon: expected a torch.Tensor, got ndarray"),
    ],
)
def test_elbo_bad_input_raises_a_clear_error(change, error, words):
    with pytest.raises(error, match=escaped(words)):
        genfast.elbo_loss(*change(*elbo_args()))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"recon_loss": "l1"}, ValueError, "recon_loss: expected one of ['bce', 'mse'], got 'l1'"),
        ({"reduction": "avg"}, ValueError, "reduction: expected one of"),
        ({"beta": float("nan")}, TypeError, "beta: expected a finite real number"),
        ({"beta": "1"}, TypeError, "beta: expected a finite real number"),
    ],
)
def test_elbo_bad_options_raise_a_clear_error(kwargs, error, words):
    with pytest.raises(error, match=escaped(words)):
        genfast.elbo_loss(*elbo_args(), **kwargs)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda r, f: genfast.discriminator_loss(r, f, "relativistic"), ValueError, "kind: expected one of"),
        (lambda r, f: genfast.generator_loss(f, "minimax"), ValueError, "kind: expected one of"),
        (lambda r, f: genfast.discriminator_loss(r.int(), f), TypeError, "real_logits: expected dtype"),
        (
            lambda r, f: genfast.discriminator_loss(r, f.half()),
            TypeError,
            "fake_logits has dtype torch.float16",
        ),
        (lambda r, f: genfast.discriminator_loss(r, f.to("meta")), ValueError, "fake_logits is on meta"),
        (
            lambda r, f: genfast.discriminator_loss(r, f, "hinge", 0.1),
            ValueError,
            "the 'hinge' loss has no labels",
        ),
        (
            lambda r, f: genfast.discriminator_loss(r, f, real_label_smoothing=1.0),
            ValueError,
            "in [0, 1), got 1.0",
        ),
        (
            lambda r, f: genfast.discriminator_loss(r, f[:3], reduction="none"),
            ValueError,
            "fake_logits: reduction 'none' needs real_logits' shape (4, 1), got (3, 1)",
        ),
        (
            lambda r, f: genfast.generator_loss(f, reduction="mean_over_batch"),
            ValueError,
            "reduction: expected",
        ),
    ],
)
def test_gan_bad_input_raises_a_clear_error(call, error, words):
    with pytest.raises(error, match=escaped(words)):
        call(torch.randn(4, 1), torch.randn(4, 1))


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_cpp_loss_codes_are_the_python_table():
    assert _extension._C.loss_codes() == {"recon": RECON_LOSSES, "reduction": REDUCTIONS, "term": TERMS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """ "mean" over no samples is an error; "sum" is 0 with empty gradients; "none" is empty."""
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (
        t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args(batch=0))
    )
    fake = torch.randn(0, 1, requires_grad=True)
    with genfast.use_backend(backend):
        with pytest.raises(ValueError, match="the mean over an empty batch"):
            genfast.elbo_loss(recon, target, mu, logvar)
        with pytest.raises(ValueError, match="the mean over an empty batch"):
            genfast.generator_loss(fake)
        with pytest.raises(ValueError, match="the mean over an empty batch"):
            genfast.discriminator_loss(torch.randn(4, 1), fake)
        total = genfast.elbo_loss(recon, target, mu, logvar, reduction="sum")
        per_sample = genfast.elbo_loss(recon, target, mu, logvar, reduction="none")
        g_sum, g_none = (
            genfast.generator_loss(fake, reduction="sum"),
            genfast.generator_loss(fake, reduction="none"),
        )
        (total + per_sample.sum() + g_sum + g_none.sum()).backward()
    assert total.item() == 0.0 and g_sum.item() == 0.0
    assert per_sample.shape == (0,) and g_none.shape == (0, 1)
    assert recon.grad.shape == (0, 6) and mu.grad.shape == (0, 3) and fake.grad.shape == (0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_of_plus_minus_1e4_give_finite_loss_and_gradients(backend, dtype):
    require_backend(backend, "cpu")
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter does not handle bfloat16")
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.5]], dtype=dtype).repeat(3, 1)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.3]], dtype=dtype).repeat(3, 1)
    recon, mu, logvar = (
        logits.clone().requires_grad_(),
        torch.zeros(3, 2, requires_grad=True, dtype=dtype),
        torch.zeros(3, 2, requires_grad=True, dtype=dtype),
    )
    with genfast.use_backend(backend):
        loss = genfast.elbo_loss(recon, target, mu, logvar, reduction="none")
        d_losses = [
            genfast.discriminator_loss(logits[:, i], logits[:, j], kind)
            for kind in KINDS
            for i, j in ((0, 1), (1, 0))
        ]
        g_losses = [genfast.generator_loss(logits.flatten(), kind) for kind in KINDS]
    assert loss.isfinite().all() and d_losses and all(v.isfinite() for v in d_losses + g_losses)
    # Per sample: 1e4 (x = -1e4 against 1 and x = 1e4 against 0) x 2 + the 0.5 logit's small loss.
    expected = reference.elbo_terms(
        recon.double(), target.double(), mu.double(), logvar.double(), reduction="none"
    )
    torch.testing.assert_close(
        loss.double(), expected[0], rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0
    )
    loss.sum().backward()
    assert recon.grad.isfinite().all()
    torch.testing.assert_close(recon.grad[0, :4], torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=dtype))
    for kind in KINDS:
        x = (torch.tensor([1e4, -1e4], dtype=dtype)).requires_grad_()
        with genfast.use_backend(backend):
            genfast.discriminator_loss(x, x.flip(0), kind).backward()
        assert x.grad.isfinite().all(), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend):
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args()))
    with torch.no_grad():
        recon[1, 2] = float("nan")
        mu[2, 0] = float("nan")
    with genfast.use_backend(backend):
        per_sample = genfast.elbo_loss(recon, target, mu, logvar, reduction="none")
        assert genfast.elbo_loss(recon, target, mu, logvar).isnan()
        for recon_loss in ("bce", "mse"):
            assert genfast.elbo_loss(
                recon, target, mu, logvar, recon_loss=recon_loss, reduction="sum"
            ).isnan()
    assert per_sample[[1, 2]].isnan().all() and per_sample[[0, 3]].isfinite().all()
    per_sample.sum().backward()
    assert recon.grad[1, 2].isnan() and mu.grad[2, 0].isnan()
    assert recon.grad.isnan().sum() == 1 and mu.grad.isnan().sum() == 1
    for kind in KINDS:
        real, fake = torch.randn(5, 1, requires_grad=True), torch.randn(5, 1, requires_grad=True)
        with torch.no_grad():
            real[3, 0] = float("nan")
        with genfast.use_backend(backend):
            d_loss = genfast.discriminator_loss(real, fake, kind)
            d_none = genfast.discriminator_loss(real, fake, kind, reduction="none")
            g_loss = genfast.generator_loss(real, kind)
        assert d_loss.isnan() and g_loss.isnan(), kind
        assert d_none[3].isnan() and d_none[[0, 1, 2, 4]].isfinite().all(), kind
        d_loss.backward()
        assert real.grad[3].isnan() and real.grad[[0, 1, 2, 4]].isfinite().all(), kind


def test_inf_propagates_like_eager():
    require_backend("cpu", "cpu")
    x = torch.tensor([[float("inf"), -float("inf"), 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.5]])
    with genfast.use_backend("cpu"):
        ours = genfast.elbo_loss(x, t, torch.zeros(1, 1), torch.zeros(1, 1), reduction="none")
    eager = F.binary_cross_entropy_with_logits(x, t, reduction="sum")
    assert ours.isnan().item() == eager.isnan().item() and ours.isinf().item() == eager.isinf().item()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_same_input_gives_the_same_bits(backend):
    require_backend(backend, "cpu")
    shape = (4096, 784, 32) if backend == "cpu" else (37, 300, 5)
    recon, target, mu, logvar = (t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args(*shape)))
    logits = torch.randn(70_000 if backend == "cpu" else 3000, requires_grad=True)

    def run():
        with genfast.use_backend(backend):
            loss = genfast.elbo_loss(recon, target, mu, logvar)
            d_loss = genfast.discriminator_loss(logits, logits.flip(0))
        return [loss, d_loss, *torch.autograd.grad(loss + d_loss, (recon, mu, logvar, logits))]

    first = run()
    for other in run(), run():
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_cpu_bits_do_not_depend_on_the_thread_count():
    require_backend("cpu", "cpu")
    recon, target, mu, logvar = (
        t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args(3000, 784, 16))
    )
    logits = torch.randn(100_000, requires_grad=True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with genfast.use_backend("cpu"):
                loss = genfast.elbo_loss(recon, target, mu, logvar)
                d_loss = genfast.discriminator_loss(logits, logits.flip(0), "hinge", reduction="sum")
            results.append([loss, d_loss, *torch.autograd.grad(loss + d_loss, (recon, mu, logvar, logits))])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
def test_elbo_gradcheck_float64(recon_loss, reduction):
    require_backend("cpu", "cpu")
    recon, target, mu, logvar = elbo_args(5, 9, 3, torch.float64)
    leaves = tuple(t.requires_grad_() for t in (recon, mu, logvar))

    def all_outputs(x, m, v):
        return genfast.elbo_loss(
            x, target, m, v, beta=0.3, recon_loss=recon_loss, reduction=reduction, return_terms=True
        )

    with genfast.use_backend("cpu"):
        assert torch.autograd.gradcheck(all_outputs, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_gan_gradcheck_float64(kind, reduction):
    require_backend("cpu", "cpu")
    real, fake = (torch.randn(6, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    smoothing = 0.1 if GAN_KINDS[kind].smoothable else 0.0
    with genfast.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda r, f: genfast.discriminator_loss(r, f, kind, smoothing, reduction), (real, fake)
        )
        assert torch.autograd.gradcheck(lambda f: genfast.generator_loss(f, kind, reduction), (fake,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (
        t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args(5, 7, 3))
    )
    uint8_target = torch.randint(0, 256, (5, 7), dtype=torch.uint8)
    with genfast.use_backend(backend):
        for reduction in REDUCTIONS.values():
            for kind in RECON_LOSSES.values():
                torch.library.opcheck(
                    torch.ops.genfast.elbo_loss.default,
                    (recon, target, mu, logvar, 0.7, kind, reduction, 1.0, True),
                )
            torch.library.opcheck(
                torch.ops.genfast.elbo_loss.default,
                (recon, uint8_target, mu, logvar, 1.0, 0, reduction, 1 / 255, True),
            )
            first = recon.flatten()
            second = first.detach() + 1 if reduction == REDUCTIONS["none"] else mu.flatten()
            for term in TERMS.values():
                torch.library.opcheck(
                    torch.ops.genfast.gan_loss.default,
                    (first, second, term, -1.0, TERMS["square"], 0.5, reduction, True),
                )
            torch.library.opcheck(
                torch.ops.genfast.gan_loss.default,
                (recon.flatten(), recon.new_empty(0), 0, 1.0, 0, 0.0, reduction, True),
            )
            detached = [t.detach() for t in (recon, target, mu, logvar)]  # need_grad False: empty gradients
            torch.library.opcheck(
                torch.ops.genfast.elbo_loss.default, (*detached, 1.0, 0, reduction, 1.0, False)
            )
            torch.library.opcheck(
                torch.ops.genfast.gan_loss.default,
                (detached[0].flatten(), detached[0].new_empty(0), 0, 1.0, 0, 0.0, reduction, False),
            )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_eager_path_and_custom_op_agree_bit_for_bit(backend):
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (
        t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args(9, 20, 4))
    )
    with genfast.use_backend(backend):
        eager = genfast.elbo_loss(recon, target, mu, logvar, beta=0.7, reduction="none")
        op = torch.ops.genfast.elbo_loss(recon, target, mu, logvar, 0.7, 0, REDUCTIONS["none"], 1.0, True)[0]
        weights = torch.randn(9)
        assert torch.equal(eager, op)
        for a, b in zip(
            torch.autograd.grad(eager, (recon, mu, logvar), weights),
            torch.autograd.grad(op, (recon, mu, logvar), weights),
        ):
            assert torch.equal(a, b)


def test_no_grad_mode_gives_the_same_loss_without_gradients():
    require_backend("cpu", "cpu")
    args = elbo_args(8, 30, 4)
    leaves = [t.clone().requires_grad_() if i != 1 else t for i, t in enumerate(args)]
    with genfast.use_backend("cpu"):
        with torch.no_grad():
            evaluated = genfast.elbo_loss(*leaves)
        trained = genfast.elbo_loss(*leaves)
    assert not evaluated.requires_grad and torch.equal(evaluated, trained.detach())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_raises_instead_of_a_wrong_answer(backend):
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (t.requires_grad_() if i != 1 else t for i, t in enumerate(elbo_args()))
    logits = torch.randn(4, 1, requires_grad=True)
    with genfast.use_backend(backend):
        elbo, gan = genfast.elbo_loss(recon, target, mu, logvar), genfast.generator_loss(logits, "lsgan")
    with pytest.raises(RuntimeError, match="genfast elbo_loss has no double backward"):
        torch.autograd.grad(elbo, recon, create_graph=True)
    with pytest.raises(RuntimeError, match="genfast gan_loss has no double backward"):
        torch.autograd.grad(gan, logits, create_graph=True)


# ---------------------------------------------------------------------------------------------------
# torch.compile


class TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(20, 2 * 4)
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 20))

    def forward(self, x, eps):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mu + eps * (0.5 * logvar).exp()), mu, logvar


def vae_step(model, x, eps):
    recon, mu, logvar = model(x, eps)
    return genfast.elbo_loss(recon, x, mu, logvar, beta=0.5)


def gan_step(generator, discriminator, z, real, kind):
    fake = generator(z)
    d_loss = genfast.discriminator_loss(discriminator(real), discriminator(fake.detach()), kind)
    g_loss = genfast.generator_loss(discriminator(fake), kind)
    return d_loss, g_loss


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_training_steps_match_eager(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    vae = TinyVAE()
    generator, discriminator = nn.Sequential(nn.Linear(3, 8), nn.Tanh()), nn.Linear(8, 1)
    x, eps, z, real = torch.rand(16, 20), torch.randn(16, 4), torch.randn(16, 3), torch.randn(16, 8)
    compiled_vae = torch.compile(vae_step, fullgraph=True)
    compiled_gan = torch.compile(gan_step, fullgraph=True)
    modules = [vae, generator, discriminator]
    with genfast.use_backend(backend):
        for step, kind in (
            (vae_step, None),
            (compiled_vae, None),
            (gan_step, "hinge"),
            (compiled_gan, "hinge"),
            (gan_step, "nonsaturating"),
            (compiled_gan, "nonsaturating"),
        ):
            for module in modules:
                module.zero_grad()
            losses = step(vae, x, eps) if kind is None else step(generator, discriminator, z, real, kind)
            losses = losses if isinstance(losses, tuple) else (losses,)
            torch.autograd.backward([0.7 * loss for loss in losses])
            grads = [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]
            if step in (vae_step, gan_step):
                expected = ([loss.detach() for loss in losses], grads)
            else:
                torch.testing.assert_close([loss.detach() for loss in losses], expected[0])
                torch.testing.assert_close(grads, expected[1])


def test_compiled_graph_contains_the_custom_ops():
    require_backend("cpu", "cpu")

    def losses(x, t, mu, logvar, real, fake):
        return genfast.elbo_loss(x, t, mu, logvar) + genfast.discriminator_loss(real, fake)

    seen = compiled_op_targets(losses, *elbo_args(), torch.randn(4), torch.randn(4))
    assert any("genfast.elbo_loss" in t for t in seen) and any("genfast.gan_loss" in t for t in seen), seen


# ---------------------------------------------------------------------------------------------------
# R1


def test_r1_penalty_is_gamma_half_the_squared_input_gradient():
    """For a linear D(x) = x w + b the input gradient is w for every sample: R1 = gamma/2 ||w||^2."""
    discriminator = nn.Linear(10, 1)
    real = torch.randn(7, 10, requires_grad=True)
    penalty = genfast.r1_penalty(discriminator(real), real, gamma=10.0)
    w = discriminator.weight
    torch.testing.assert_close(penalty, 5.0 * w.square().sum())
    penalty.backward()
    torch.testing.assert_close(w.grad, 10.0 * w)


def test_r1_penalty_on_images_matches_the_stylegan2_expression():
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    real = torch.randn(5, 2, 4, 4, requires_grad=True)
    logits = discriminator(real)
    ours = genfast.r1_penalty(logits, real, gamma=2.0)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    theirs = grad.square().sum([1, 2, 3]).mean() * (2.0 / 2)
    torch.testing.assert_close(ours, theirs)
    params = list(discriminator.parameters())  # the last bias has no part in the input gradient: 0
    for a, b in zip(
        torch.autograd.grad(ours, params, retain_graph=True, materialize_grads=True),
        torch.autograd.grad(theirs, params, materialize_grads=True),
    ):
        torch.testing.assert_close(a, b)


def fused_discriminator():
    return nn.Sequential(
        FusedLinear(10, 32, activation="leaky_relu", negative_slope=0.2),
        FusedLinear(32, 1, activation="none"),
    )


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_r1_penalty_through_fused_layers_equals_plain_layers(backend):
    """fused_dense's double backward (create_graph=True) gives the plain layers' R1 and its gradients."""
    require_backend(backend, "cpu")
    discriminator, plain = fused_discriminator(), fused_discriminator()
    plain.load_state_dict(discriminator.state_dict())
    genfast.nn.revert(plain)
    real = torch.randn(7, 10, requires_grad=True)
    with genfast.use_backend(backend):
        ours = genfast.r1_penalty(discriminator(real), real, gamma=3.0)
        ours_grads = torch.autograd.grad(ours, list(discriminator.parameters()), materialize_grads=True)
    theirs = genfast.r1_penalty(plain(real), real, gamma=3.0)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(
        ours_grads, torch.autograd.grad(theirs, list(plain.parameters()), materialize_grads=True)
    ):
        torch.testing.assert_close(a, b)


def test_r1_penalty_bad_input():
    real = torch.randn(3, 4)
    with pytest.raises(ValueError, match="real_inputs: must require grad"):
        genfast.r1_penalty(nn.Linear(4, 1)(real), real, gamma=1.0)
    with pytest.raises(TypeError, match="gamma: expected a finite real number"):
        real.requires_grad_()
        genfast.r1_penalty(nn.Linear(4, 1)(real), real, gamma=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_non_contiguous_inputs(backend):
    """The defect: the raw ops rejected non-contiguous inputs on the cpu backend."""
    require_backend(backend, "cpu")
    recon, target, mu, logvar = (
        non_contiguous(t.requires_grad_(i != 1)) for i, t in enumerate(elbo_args(5, 7, 3))
    )
    assert not recon.is_contiguous()
    with genfast.use_backend(backend):
        for reduction in REDUCTIONS.values():
            torch.library.opcheck(
                torch.ops.genfast.elbo_loss.default,
                (recon, target, mu, logvar, 0.7, RECON_LOSSES["bce"], reduction, 1.0, True),
            )
            first, second = non_contiguous(recon.flatten()), non_contiguous(recon.detach().flatten() + 1)
            torch.library.opcheck(
                torch.ops.genfast.gan_loss.default,
                (first, second, TERMS["bce"], 1.0, TERMS["hinge"], 1.0, reduction, True),
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_may_be_a_one_element_tensor(backend):
    require_backend(backend, "cpu")
    args = elbo_args(5, 7, 3)
    with genfast.use_backend(backend):
        expected = genfast.elbo_loss(*args, beta=0.5)
        assert torch.equal(genfast.elbo_loss(*args, beta=torch.tensor(0.5)), expected)
        assert torch.equal(genfast.elbo_loss(*args, beta=torch.tensor([0.5], dtype=torch.float64)), expected)
        with pytest.raises(ValueError, match="beta: genfast's losses give beta no gradient"):
            genfast.elbo_loss(*args, beta=torch.tensor(0.5, requires_grad=True))
        with pytest.raises(TypeError, match="beta: expected a real number or a one-element real tensor"):
            genfast.elbo_loss(*args, beta=torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_term_leaves_the_other_term_finite(backend):
    """The defect: Triton summed each returned term as w_a S_a + w_b S_b, so a zero weight on an
    infinite sum made the finite term 0 * inf = NaN."""
    require_backend(backend, "cpu")
    recon, target, mu, logvar = elbo_args(5, 7, 3)
    logvar[2, 1] = 100.0  # exp(100) overflows float32: the KL term is inf
    with genfast.use_backend(backend):
        loss, r, k = genfast.elbo_loss(recon, target, mu, logvar, return_terms=True)
    expected = reference.elbo_terms(recon.double(), target.double(), mu.double(), logvar.double())
    assert torch.isfinite(r) and k == float("inf") and loss == float("inf")
    torch.testing.assert_close(r, expected[1].float())


@pytest.mark.parametrize("loss", ["elbo", "generator"])
def test_a_retained_graph_backward_twice_accumulates_the_same_gradient(loss):
    """The cpu nodes hand back the saved gradient itself when grad_output is exactly 1: a second backward
    of a retained graph must still give the same gradient, and a gradient changed in place must make it
    fail loudly (the saved tensor's version counter), never return the changed values."""
    require_backend("cpu", "cpu")
    if loss == "elbo":
        recon, target, mu, logvar = elbo_args(6, 10, 3)
        leaves = [t.requires_grad_() for t in (recon, mu, logvar)]
        out = genfast.elbo_loss(recon, target, mu, logvar)
    else:
        leaves = [torch.randn(6, 1, requires_grad=True)]
        out = genfast.generator_loss(leaves[0])
    out.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    out.backward(retain_graph=True)
    for t, g in zip(leaves, first):
        assert torch.equal(t.grad, 2 * g)
    (grad,) = torch.autograd.grad(out, leaves[0], retain_graph=True)
    assert torch.equal(grad, first[0])
    grad.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, leaves[0])
