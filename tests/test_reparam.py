"""Reparameterization sampling and the Gaussian KL, by behaviour, on every backend.

Backends run as (backend, device) pairs: reference, cpu and triton (interpreted, TRITON_INTERPRET=1) on CPU
tensors; cuda, and triton compiled, on CUDA tensors. Every CUDA case is marked `gpu` (skipped, with the
reason, on a machine without one; `pytest -m gpu` selects them). require_backend skips what this machine
cannot run. Shapes and dtypes per backend are tables: the Triton interpreter runs float32/float64 and small
shapes only; the GPU runs float32/float16/bfloat16 and big sizes.

Two levels: the public API (genfast.reparameterize, kl_divergence, reparameterize_kl and the custom ops
torch.ops.genfast.*), and each backend's kernels called directly, the functions the ops call
(`kernels`: genfast.reference's, genfast._C.*_cpu / *_cuda, genfast.triton.reparam's), each returning
the rng_state (seed, offset) of the noise it drew. drawn_noise(rng_state, shape) regenerates that noise
with genfast.reference.philox_normal; values are checked in float64 with the very noise drawn, under the
rule of tests/tolerance.py (at most twice eager PyTorch's error at the same dtype, + 1e-6).

A test that runs on several backends has the same checks on each; only its tables (shapes, dtypes, and
EPS_CLOSE where a backend's noise is known closer to the reference's) differ per backend. Where a
public-API test and a kernel-level test check the same behaviour in different ways (their eager baseline,
their inputs), both stay, side by side in the behaviour's section. What one backend alone has (Triton's
Philox key split and block sizes, the CPU's thread count, CUDA's generator offsets, graphs, memory and
64-bit indices) is marked for that backend.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import genfast
from genfast import _extension, reference
from genfast.loss_terms import KL_ROWS_DTYPE
from genfast.rng import new_rng_state
from tests.conftest import non_contiguous, require_backend
from tests.tolerance import assert_within_rule

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from genfast.triton.reparam import _philox_bits

    @triton.jit
    def _bits_kernel(state_ptr, groups_ptr, out_ptr, N: tl.constexpr):
        """out[4 i + k] = word k of the Philox bits of group groups[i] under rng_state."""
        i = tl.arange(0, N)
        bits = _philox_bits(state_ptr, tl.load(groups_ptr + i))
        for k in tl.static_range(4):
            tl.store(out_ptr + 4 * i + k, bits[k].to(tl.int64))


# ---------------------------------------------------------------------------------------------------
# Backends and tables

REFERENCE, CPU, TRITON = ("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu")  # on CPU tensors
CUDA, TRITON_GPU = ("cuda", "cuda"), ("triton", "cuda")  # on CUDA tensors: marked gpu
ON_CPU = [REFERENCE, CPU, TRITON]

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTERPRETER_DTYPES = [torch.float32, torch.float64]  # the Triton interpreter runs neither fp16 nor bf16
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(value) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value)) if value else "scalar"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def cases(table: dict[tuple[str, str], list]) -> list:
    """pytest params (backend, device, *row) for every row of table[(backend, device)], the CUDA ones
    marked gpu. A row is the tuple of the test's other arguments (see grid)."""
    params = []
    for (backend, device), rows in table.items():
        name = backend if device == "cpu" or backend == "cuda" else f"{backend}-{device}"
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for row in rows:
            case_id = "-".join([name, *map(_id, row)])
            params.append(pytest.param(backend, device, *row, marks=marks, id=case_id))
    return params


def grid(*axes) -> list[tuple]:
    """The rows of every combination of the axes' values (one axis: rows of one value)."""
    return list(itertools.product(*axes))


def on(*pairs) -> list:
    """pytest params (backend, device) of these pairs."""
    return cases({pair: [()] for pair in pairs})


# The public API, values and gradients: (shape, dtype) per backend.
_SHAPES = [(1, 1), (7, 100), (100, 784), (1003, 7), (3, 5, 7)]
_INTERPRETER_SHAPES = [(1, 1), (7, 100), (33, 7), (3, 5, 7)]
_GPU_SHAPES = [(1, 1), (7, 100), (1003, 784), (3, 5, 7)]
PUBLIC_ON_CPU = {
    REFERENCE: grid(_SHAPES, CPU_DTYPES),
    CPU: grid(_SHAPES + [(1, 100003)], CPU_DTYPES),
    TRITON: grid(_INTERPRETER_SHAPES, INTERPRETER_DTYPES),
}
PUBLIC = {**PUBLIC_ON_CPU, CUDA: grid(_GPU_SHAPES, GPU_DTYPES), TRITON_GPU: grid(_GPU_SHAPES, GPU_DTYPES)}

# Kernel sizes: numel 1, 7, 100, 784, 1000+, not a multiple of 4, several grid-stride rounds.
SIZES = [(n,) for n in (1, 7, 100, 784, 1003, 4097, (1 << 20) + 3)]
# (rows, cols) for the per-row KL: cols 1 and 2 (many rows per warp), rows cut mid-group (cols % 4 != 0),
# cols around the 4096-element chunk, rows of many chunks (the second reduction kernel).
KL_SHAPES = [
    (1, 1),
    (7, 1),
    (1000, 2),
    (1, 7),
    (100, 7),
    (784, 100),
    (1003, 784),
    (3, 4095),
    (3, 4097),
    (5, 12345),
    (2, 100003),
    (1, (1 << 22) + 5),
]
_INTERPRETER_KL_SHAPES = [(1, 1), (7, 1), (1000, 2), (1, 7), (100, 7), (784, 100), (3, 4095), (3, 4097)]
FUSED_SHAPES = [(1, 1), (7, 3), (1003, 7), (128, 20), (3, 4097), (2, 100003)]
EMPTY_SHAPES = [(0,), (0, 5), (5, 0), (2, 0, 3)]
REDUCTIONS = ["none", "sum", "mean"]


# ---------------------------------------------------------------------------------------------------
# Helpers


def inputs(shape, dtype, device="cpu", offset=0):
    """mu, logvar ~ N(0, 1) (drawn in float64, rounded to dtype), contiguous, `offset` elements into
    their storage."""
    n = math.prod(shape)
    storage = torch.randn(2, n + offset, device=device, dtype=torch.float64).to(dtype)
    return storage[0, offset:].view(shape), storage[1, offset:].view(shape)


def leaves(shape, dtype, device="cpu"):
    return [t.clone().requires_grad_() for t in inputs(shape, dtype, device)]


def seeded(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


KERNEL_NAMES = (
    "reparam_forward",
    "reparam_backward",
    "kl_forward",
    "kl_backward",
    "reparam_kl_forward",
    "reparam_kl_backward",
)


@pytest.fixture
def kernels(backend, device):
    """The backend's kernels, as the ops call them: reparam_forward(mu, logvar, generator) -> (z, rng_state),
    reparam_backward(grad_z, logvar, rng_state), kl_forward(mu, logvar) -> (rows,) float64,
    kl_backward(grad_kl, mu, logvar), reparam_kl_forward(mu, logvar, generator) -> (z, rng_state, kl),
    reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state) -> (grad_mu, grad_logvar)."""
    require_backend(backend, device)
    if backend == "reference":
        return reference
    if backend == "triton":
        from genfast.triton import reparam

        return reparam
    if not hasattr(_extension._C, f"reparam_forward_{backend}"):
        pytest.skip(f"genfast._C was built without the reparam {backend.upper()} kernels")
    return SimpleNamespace(**{name: getattr(_extension._C, f"{name}_{backend}") for name in KERNEL_NAMES})


def drawn_noise(rng_state: torch.Tensor, shape) -> torch.Tensor:
    """The float32 noise a call drew (and its backward draws again): the reference generator's at the
    (seed, offset) the call recorded, computed on the CPU, on rng_state's device."""
    return reference.noise(rng_state.cpu(), tuple(shape)).to(rng_state.device)


def kernel_eps(kernels, rng_state: torch.Tensor, shape) -> torch.Tensor:
    """The kernels' own float32 noise, bit for bit: their backward with logvar = 0, grad_z = 2 is eps."""
    ones = torch.ones(shape, device=rng_state.device)
    return kernels.reparam_backward(2 * ones, 0 * ones, rng_state)


def sample_op(backend, mu, logvar, generator=None):
    """(z, rng_state) through the custom op on `backend`: the testing window onto the noise."""
    with genfast.use_backend(backend):
        return torch.ops.genfast.reparameterize(mu, logvar, generator)


def public_sample(backend, mu, logvar, seed, **kwargs):
    torch.manual_seed(seed)
    with genfast.use_backend(backend):
        return genfast.reparameterize(mu, logvar, **kwargs)


def check_sample(name, z, mu, logvar, eps):
    mu, logvar = mu.detach(), logvar.detach()
    assert z.shape == mu.shape and z.dtype == mu.dtype, f"{name}: z is {z.dtype} {tuple(z.shape)}"
    exact = mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()
    eager = mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
    assert_within_rule(f"{name} z", z, eager, exact)


def check_sample_gradient(name, grad_logvar, grad_z, logvar, eps):
    logvar = logvar.detach()
    exact = 0.5 * grad_z.double() * eps.double() * torch.exp(0.5 * logvar.double())
    eager = 0.5 * grad_z * eps.to(logvar.dtype) * torch.exp(0.5 * logvar)
    assert_within_rule(f"{name} grad_logvar", grad_logvar, eager, exact)


def kl_plain(mu, logvar):
    """KL per sample as VAE code writes it, at the inputs' dtype."""
    return 0.5 * (torch.exp(logvar) - 1 - logvar + mu * mu).sum(-1)


def kl_rows(mu, logvar):
    """0.5 * sum over the last dimension of exp(logvar) + mu^2 - 1 - logvar, at the inputs' dtype (the
    eager baseline of the tests that began on the GPU: the terms in this order)."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1 - logvar).sum(-1)


def check_kl(name, kl, mu, logvar):
    """kl: per-row values of any dtype; eager at mu's dtype, in kl's dtype for the comparison."""
    exact = kl_rows(mu.double(), logvar.double()).reshape(kl.shape)
    assert_within_rule(f"{name} kl", kl, kl_rows(mu, logvar).reshape(kl.shape).to(kl.dtype), exact)


def check_kl_gradients(name, grad_mu, grad_logvar, grad_kl, mu, logvar):
    g = grad_kl.reshape(*mu.shape[:-1], 1)
    for label, ours, eager, exact in (
        ("grad_mu", grad_mu, g.to(mu.dtype) * mu, g.double() * mu.double()),
        (
            "grad_logvar",
            grad_logvar,
            0.5 * g.to(mu.dtype) * (torch.exp(logvar) - 1),
            0.5 * g.double() * torch.expm1(logvar.double()),
        ),
    ):
        assert_within_rule(f"{name} {label}", ours, eager, exact)


def reduce(values, reduction):
    return {"none": lambda t: t, "sum": torch.sum, "mean": torch.mean}[reduction](values)


def generator_offset() -> int:
    return torch.cuda.default_generators[torch.cuda.current_device()].get_offset()


def default_generator_state(device):
    """What a call that draws from the default generator of `device` changes: the CUDA generator's Philox
    offset, the CPU generator's state."""
    return generator_offset() if device == "cuda" else torch.get_rng_state().numpy().tobytes()


# ---------------------------------------------------------------------------------------------------
# Sampling: z and its gradient against the float64 reference with the noise the call drew


@pytest.mark.parametrize("backend, device, shape, dtype", cases(PUBLIC))
def test_sample_and_gradients_use_the_drawn_noise(backend, device, shape, dtype):
    require_backend(backend, device)
    mu, logvar = leaves(shape, dtype, device)
    with genfast.use_backend(backend):
        z, rng_state = torch.ops.genfast.reparameterize(mu, logvar)
        grad_z = torch.randn_like(z)
        grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    assert torch.equal(grad_mu, grad_z), "grad_mu is grad_z"
    eps = drawn_noise(rng_state, shape)
    check_sample(f"{backend} {shape} {dtype}", z, mu, logvar, eps)
    check_sample_gradient(f"{backend} {shape} {dtype}", grad_logvar, grad_z, logvar, eps)


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_public_function_is_the_op(backend, device):
    """genfast.reparameterize (eager autograd.Function) draws what the custom op draws, gradients too."""
    require_backend(backend, device)
    mu, logvar = leaves((33, 20), torch.float32)
    grad_z = torch.randn(33, 20)
    results = []
    for fn in (lambda: sample_op(backend, mu, logvar)[0], lambda: genfast.reparameterize(mu, logvar)):
        torch.manual_seed(1234)
        with genfast.use_backend(backend):
            z = fn()
            results.append((z, *torch.autograd.grad(z, (mu, logvar), grad_z)))
    for ours, op in zip(*results):
        assert torch.equal(ours, op)


@pytest.mark.parametrize("backend, device, shape, dtype", cases(PUBLIC_ON_CPU | {CUDA: PUBLIC[CUDA]}))
def test_public_sample_is_the_backends_kernel_with_its_gradients(kernels, backend, device, shape, dtype):
    mu, logvar = leaves(shape, dtype, device)
    z = public_sample(backend, mu, logvar, seed=31)
    torch.manual_seed(31)
    expected, rng_state = kernels.reparam_forward(mu.detach(), logvar.detach(), None)
    assert torch.equal(z, expected)
    grad_z = torch.randn_like(z)
    grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    assert torch.equal(grad_mu, grad_z), "grad_mu is grad_z"
    check_sample_gradient(
        f"public {shape} {dtype}", grad_logvar, grad_z, logvar.detach(), drawn_noise(rng_state, shape)
    )


# eps within a few ulps of the reference's, where a backend's log/sin/cos are known to be that close (the
# rule's 1e-6 RMS floor holds everywhere: the GPU's logf/sinf/cosf may differ by an ulp).
EPS_CLOSE = {"triton": {"rtol": 1e-6, "atol": 1e-6}}  # the interpreter's numpy log/cos/sin vs torch's


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    cases(
        {
            REFERENCE: grid(SIZES, CPU_DTYPES),
            CPU: grid(SIZES, CPU_DTYPES),
            TRITON: grid([(1,), (7,), (3, 5), (2, 3, 101), (1031,)], INTERPRETER_DTYPES),
            CUDA: grid(SIZES, GPU_DTYPES),
        }
    ),
)
def test_kernel_sample_and_gradient_use_the_recorded_noise(kernels, backend, device, shape, dtype):
    mu, logvar = inputs(shape, dtype, device)
    z, rng_state = kernels.reparam_forward(mu, logvar, None)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device == mu.device
    eps = drawn_noise(rng_state, mu.shape)
    ours = kernel_eps(kernels, rng_state, mu.shape)
    assert_within_rule("eps", ours, eps, eps.double())
    if backend in EPS_CLOSE:
        torch.testing.assert_close(ours, eps, **EPS_CLOSE[backend])
    check_sample(f"{shape} {dtype}", z, mu, logvar, eps)
    grad_z = torch.randn_like(mu)
    grad_logvar = kernels.reparam_backward(grad_z, logvar, rng_state)
    check_sample_gradient(f"{shape} {dtype}", grad_logvar, grad_z, logvar, eps)


# Rows of 1, 7, 100 and 784 columns (cut mid Philox group, several KL steps), 3-D, numel % 4 != 0.
_CONTRACT_SHAPES = [(5, 1), (1, 7), (3, 7), (16, 100), (4, 784), (2, 3, 7), (3, 1031)]


@pytest.mark.parametrize(
    "backend, device, shape, dtype", cases({TRITON: grid(_CONTRACT_SHAPES, INTERPRETER_DTYPES)})
)
def test_kernel_contract_functions_match_the_reference(kernels, backend, device, shape, dtype):
    """The Triton launchers against genfast.reference's functions of the same contract: the same
    rng_state from a generator (both draw it through genfast.rng), z, grad_logvar, KL and its gradients."""
    mu, logvar = inputs(shape, dtype, device)
    mu64, logvar64 = mu.double(), logvar.double()
    z, rng_state = kernels.reparam_forward(mu, logvar, seeded(7))
    want_z, want_state = reference.reparam_forward(mu64, logvar64, seeded(7))
    assert torch.equal(rng_state, want_state) and z.dtype == dtype and z.shape == mu.shape
    eps = reference.noise(rng_state, shape).to(dtype)
    assert_within_rule("z", z, mu + torch.exp(0.5 * logvar) * eps, want_z)

    grad_z = torch.randn_like(mu)
    assert_within_rule(
        "grad_logvar",
        kernels.reparam_backward(grad_z, logvar, rng_state),
        0.5 * grad_z * eps * torch.exp(0.5 * logvar),
        reference.reparam_backward(grad_z.double(), logvar64, rng_state),
    )

    kl = kernels.kl_forward(mu, logvar)
    assert kl.dtype == KL_ROWS_DTYPE
    eager_kl = 0.5 * (torch.expm1(logvar) - logvar + mu * mu).sum(-1).reshape(-1)
    assert_within_rule("kl", kl, eager_kl.to(kl.dtype), reference.kl_forward(mu64, logvar64))

    grad_kl = torch.randn(kl.shape, dtype=kl.dtype)
    grad_mu, grad_logvar = kernels.kl_backward(grad_kl, mu, logvar)
    want_mu, want_logvar = reference.kl_backward(grad_kl.double(), mu64, logvar64)
    g = grad_kl.view(*shape[:-1], 1).to(dtype)
    assert_within_rule("kl grad_mu", grad_mu, g * mu, want_mu)
    assert_within_rule("kl grad_logvar", grad_logvar, 0.5 * g * torch.expm1(logvar), want_logvar)


@pytest.mark.parametrize(
    "backend, device, offset, dtype",
    cases(
        {
            CPU: grid([1, 2, 3], CPU_DTYPES),
            TRITON: grid([1, 2, 3], INTERPRETER_DTYPES),
            CUDA: grid([1, 2, 3], GPU_DTYPES + [torch.float64]),
        }
    ),
)
def test_misaligned_storage_and_nd_shapes(kernels, backend, device, offset, dtype):
    """Storage offsets that rule out vector loads; eps follows the flat (row-major) index."""
    mu, logvar = inputs((3, 7, 101), dtype, device, offset)
    z, rng_state = kernels.reparam_forward(mu, logvar, None)
    eps = drawn_noise(rng_state, mu.shape)
    check_sample(f"offset {offset} {dtype}", z, mu, logvar, eps)
    grad_z = torch.randn(1 + mu.numel(), device=device, dtype=dtype)[1:].view(mu.shape)
    check_sample_gradient(
        f"offset {offset} {dtype}", kernels.reparam_backward(grad_z, logvar, rng_state), grad_z, logvar, eps
    )
    torch.manual_seed(21)
    z, rng_state = kernels.reparam_forward(mu, logvar, None)
    torch.manual_seed(21)
    aligned_z, aligned_state = kernels.reparam_forward(mu.clone(), logvar.clone(), None)
    assert torch.equal(aligned_state, rng_state)
    assert torch.equal(aligned_z, z), "the vector and the scalar path must give the same bits"
    aligned = (mu.clone(), logvar.clone())
    assert torch.equal(kernels.kl_forward(mu, logvar), kernels.kl_forward(*aligned))
    grad_kl = torch.randn(21, device=device, dtype=torch.float64)
    for ours, want in zip(kernels.kl_backward(grad_kl, mu, logvar), kernels.kl_backward(grad_kl, *aligned)):
        assert torch.equal(ours, want)
    fused_grads = kernels.reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state)
    aligned_grads = kernels.reparam_kl_backward(grad_z.clone(), grad_kl, *aligned, rng_state)
    for ours, want in zip(fused_grads, aligned_grads):
        assert torch.equal(ours, want)
    torch.manual_seed(22)
    fused = kernels.reparam_kl_forward(mu, logvar, None)
    torch.manual_seed(22)
    for ours, want in zip(fused, kernels.reparam_kl_forward(*aligned, None)):
        assert torch.equal(ours, want)


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_non_contiguous_inputs_sample_as_their_contiguous_copies(backend, device):
    require_backend(backend, device)
    mu, logvar = (t.detach().t() for t in leaves((20, 33), torch.float32))
    assert not mu.is_contiguous()
    z, rng_state = sample_op(backend, mu, logvar, seeded(3))
    contiguous, _ = sample_op(backend, mu.contiguous(), logvar.contiguous(), seeded(3))
    assert torch.equal(z, contiguous)
    check_sample(f"{backend} transposed", z, mu, logvar, drawn_noise(rng_state, mu.shape))
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        assert torch.equal(kl, genfast.kl_divergence(mu.contiguous(), logvar.contiguous(), reduction="none"))
    exact = kl_plain(mu.double(), logvar.double())
    assert_within_rule(f"{backend} transposed kl", kl, kl_plain(mu, logvar), exact)


@pytest.mark.parametrize("backend, device", on(*ON_CPU, CUDA))
def test_public_sample_of_non_contiguous_inputs_is_the_kernels_of_their_copies(kernels, backend, device):
    """A transposed view samples as its contiguous copy: eps follows the logical row-major index."""
    mu, logvar = (t.t() for t in inputs((784, 100), torch.float32, device))
    z = public_sample(backend, mu, logvar, seed=3)
    torch.manual_seed(3)
    assert torch.equal(z, kernels.reparam_forward(mu.contiguous(), logvar.contiguous(), None)[0])
    z_generator = public_sample(backend, mu, logvar, seed=0, generator=seeded(3, device))
    assert torch.equal(z_generator, z)


@pytest.mark.parametrize("backend, device", on(*ON_CPU, CUDA))
def test_public_reparameterize_kl_of_non_contiguous_inputs_and_both_gradients(kernels, backend, device):
    """Transposed mu, logvar and grad_z (784 x 100 viewed as 100 x 784): z and the summed KL both reach
    the loss (the fused backward), gradients against float64 with the noise the forward drew."""
    mu_leaf, logvar_leaf = leaves((784, 100), torch.float32, device)
    mu, logvar = mu_leaf.t(), logvar_leaf.t()
    grad_z = torch.randn(784, 100, device=device).t()
    with genfast.use_backend(backend):
        torch.manual_seed(9)
        z, kl = genfast.reparameterize_kl(mu, logvar, reduction="sum")
        grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl)))
    torch.manual_seed(9)
    z_copy, rng_state = kernels.reparam_forward(mu.detach().contiguous(), logvar.detach().contiguous(), None)
    assert torch.equal(z, z_copy)
    eps = drawn_noise(rng_state, mu.shape)
    m, lv = mu.detach(), logvar.detach()
    gz64, m64, lv64, eps64 = grad_z.double(), m.double(), lv.double(), eps.double()
    assert_within_rule("transposed grad_mu", grad_mu, grad_z + m, gz64 + m64)
    eager = 0.5 * (grad_z * eps * torch.exp(0.5 * lv) + torch.expm1(lv))
    exact = 0.5 * (gz64 * eps64 * torch.exp(0.5 * lv64) + torch.expm1(lv64))
    assert_within_rule("transposed grad_logvar", grad_logvar, eager, exact)


# ---------------------------------------------------------------------------------------------------
# Gradients: gradcheck, what the forward saves, what backward refuses, a KL-only loss


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_gradcheck_float64(backend, device):
    require_backend(backend, device)
    mu, logvar = leaves((5, 7), torch.float64)

    def sample_and_kl(m, lv):  # a fresh generator of a fixed seed per call: the same noise every time
        return genfast.reparameterize_kl(m, lv, reduction="none", generator=seeded(0))

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(sample_and_kl, (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, lv: genfast.kl_divergence(m, lv, "sum"), (mu, logvar))


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_forward_saves_no_noise(backend, device):
    """Saved for backward: logvar (the caller's tensor) and the 2-element rng_state, nothing of mu's shape."""
    require_backend(backend, device)
    mu, logvar = leaves((64, 32), torch.float32)
    saved = []
    with (
        genfast.use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        genfast.reparameterize(mu, logvar)
    assert len(saved) == 2
    assert saved[0] is logvar or saved[0].data_ptr() == logvar.data_ptr()
    assert saved[1].shape == (2,) and saved[1].dtype == torch.int64


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_forward_allocates_only_z_and_saves_no_noise_on_the_gpu(kernels, backend, device):
    """Backward regenerates eps: the forward allocates z (and a 16-byte rng_state) and saves only inputs."""
    mu, logvar = leaves((4096, 1024), torch.float32, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with genfast.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = genfast.reparameterize(mu, logvar)
    grown = torch.cuda.memory_allocated() - before
    z_bytes = z.numel() * z.element_size()
    assert grown <= z_bytes + 65536, f"forward kept {grown - z_bytes} bytes besides z"
    for t in saved:
        if t.numel() >= mu.numel():
            assert t.data_ptr() in (mu.data_ptr(), logvar.data_ptr()), f"forward saved a new {tuple(t.shape)}"
    z.backward(torch.ones_like(z))
    assert torch.equal(mu.grad, torch.ones_like(mu))


def test_second_order_gradients_are_refused():
    mu, logvar = leaves((4, 3), torch.float32)
    z = genfast.reparameterize(mu, logvar)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(z.sum(), logvar, create_graph=True)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_a_kl_only_loss_gives_the_kl_gradient_even_where_the_sample_scale_overflows(
    backend, device, compiled
):
    """The defect: with z unused, backward still added the sampling term 0 * exp(0.5 logvar) = 0 * inf = NaN.
    PyTorch never reaches an unused z: grad_logvar is the KL's alone (inf where expm1 overflows too)."""
    require_backend(backend, device)
    mu, logvar = leaves((3, 4), torch.float32)
    with torch.no_grad():
        logvar[0, 0], logvar[1, 1] = 180.0, float("inf")  # exp(90) and exp(inf) overflow float32

    def kl_only(m, lv):
        return genfast.reparameterize_kl(m, lv, reduction="sum")[1]

    fn = kl_only
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(kl_only, fullgraph=True)
    with genfast.use_backend(backend):
        grad_mu, grad_logvar = torch.autograd.grad(fn(mu, logvar), (mu, logvar))
    m, lv = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.kl_divergence(m, lv, "sum"), (m, lv))
    assert not grad_logvar.isnan().any()
    torch.testing.assert_close(grad_logvar, expected[1].float())
    torch.testing.assert_close(grad_mu, expected[0].float())


# ---------------------------------------------------------------------------------------------------
# KL divergence: forward and backward


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device, shape, dtype", cases(PUBLIC_ON_CPU))
def test_kl_divergence_and_gradients_against_eager_autograd(backend, device, shape, dtype, reduction):
    require_backend(backend, device)
    mu, logvar = leaves(shape, dtype)
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction=reduction)
    m64, lv64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    exact = reduce(kl_plain(m64, lv64), reduction)
    eager_in = [t.detach().clone().requires_grad_() for t in (mu, logvar)]
    eager = reduce(kl_plain(*eager_in), reduction)
    label = f"{backend} {shape} {dtype} {reduction}"
    assert kl.dtype == dtype and kl.shape == exact.shape
    assert_within_rule(f"{label} kl", kl, eager, exact)
    grad = (
        torch.randn(exact.shape, dtype=torch.float64).to(dtype).double()
    )  # the same grad_output for all three
    with genfast.use_backend(backend):
        ours = torch.autograd.grad(kl, (mu, logvar), grad.to(dtype))
    for name, g, e, x in zip(
        ("grad_mu", "grad_logvar"),
        ours,
        torch.autograd.grad(eager, eager_in, grad.to(dtype)),
        torch.autograd.grad(exact, (m64, lv64), grad),
    ):
        assert_within_rule(f"{label} {name}", g, e, x)


@pytest.mark.parametrize("backend, device, shape, dtype", cases(PUBLIC))
def test_kl_per_row_and_its_closed_form_gradients(backend, device, shape, dtype):
    require_backend(backend, device)
    mu, logvar = leaves(shape, dtype, device)
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        grad_kl = torch.randn_like(kl)
        kl_grads = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    rows64 = kl_rows(mu.detach().double(), logvar.detach().double())
    assert_within_rule(f"{backend} kl {dtype}", kl, kl_rows(mu.detach(), logvar.detach()), rows64)
    check_kl_gradients(f"{backend} {dtype}", *kl_grads, grad_kl.double(), mu.detach(), logvar.detach())


@pytest.mark.parametrize(
    "backend, device, dtype, reduction",
    cases(
        {
            REFERENCE: grid(GPU_DTYPES, REDUCTIONS),
            CPU: grid(GPU_DTYPES, REDUCTIONS),
            TRITON: grid([torch.float32], REDUCTIONS),
            CUDA: grid(GPU_DTYPES, REDUCTIONS),
        }
    ),
)
def test_public_kl_divergence_and_reparameterize_kl(kernels, backend, device, reduction, dtype):
    shape = (1003, 20)
    mu, logvar = leaves(shape, dtype, device)
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction=reduction)
        torch.manual_seed(17)
        z, kl_fused = genfast.reparameterize_kl(mu, logvar, reduction=reduction)
    torch.manual_seed(17)
    assert torch.equal(z, kernels.reparam_forward(mu.detach(), logvar.detach(), None)[0])
    assert torch.equal(kl, kl_fused)
    rows = kl_rows(mu.detach(), logvar.detach())
    rows64 = kl_rows(mu.detach().double(), logvar.detach().double())
    assert kl.shape == reduce(rows64, reduction).shape
    assert_within_rule(
        f"public kl {reduction} {dtype}", kl, reduce(rows, reduction).to(kl.dtype), reduce(rows64, reduction)
    )
    grad_kl = torch.randn_like(kl)
    grad_mu, grad_logvar = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    per_row = grad_kl.float() * torch.ones(shape[0], device=device) / (shape[0] if reduction == "mean" else 1)
    check_kl_gradients(
        f"public {reduction} {dtype}", grad_mu, grad_logvar, per_row, mu.detach(), logvar.detach()
    )


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    cases(
        {
            CPU: grid(KL_SHAPES, GPU_DTYPES),
            TRITON: grid(_INTERPRETER_KL_SHAPES, INTERPRETER_DTYPES),
            CUDA: grid(KL_SHAPES, GPU_DTYPES),
        }
    ),
)
def test_kernel_kl_forward_and_backward(kernels, backend, device, shape, dtype):
    mu, logvar = inputs(shape, dtype, device)
    kl = kernels.kl_forward(mu, logvar)
    assert kl.dtype == torch.float64 and kl.shape == (shape[0],)
    check_kl(f"{shape} {dtype}", kl, mu, logvar)
    assert torch.equal(kl, kernels.kl_forward(mu, logvar)), "the KL must be the same bits run to run"
    grad_kl = torch.randn(shape[0], device=device, dtype=torch.float64)
    grad_mu, grad_logvar = kernels.kl_backward(grad_kl, mu, logvar)
    assert grad_mu.dtype == dtype and grad_logvar.shape == mu.shape
    check_kl_gradients(f"{shape} {dtype}", grad_mu, grad_logvar, grad_kl, mu, logvar)


@pytest.mark.parametrize("backend, device", on(*ON_CPU, CUDA))
def test_kernel_kl_of_nd_input_is_per_row_of_the_last_dimension(kernels, backend, device):
    mu, logvar = inputs((3, 5, 7), torch.float32, device)
    kl = kernels.kl_forward(mu, logvar)
    assert kl.shape == (15,)
    check_kl("3d", kl, mu.reshape(15, 7), logvar.reshape(15, 7))


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_kl_bits_are_the_same_run_to_run(backend, device):
    require_backend(backend, device)
    mu, logvar = (t.detach() for t in leaves((64, 4099 if backend == "cpu" else 130), torch.float32))
    with genfast.use_backend(backend):
        results = [genfast.kl_divergence(mu, logvar, reduction="none") for _ in range(2)]
    assert torch.equal(*results)


# ---------------------------------------------------------------------------------------------------
# Fused sampling and KL


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_fused_sample_and_kl_equal_the_separate_ops(backend, device, reduction):
    require_backend(backend, device)
    mu, logvar = leaves((33, 7), torch.float32)
    grad_z = torch.randn(33, 7)
    with genfast.use_backend(backend):
        torch.manual_seed(11)
        z, kl = genfast.reparameterize_kl(mu, logvar, reduction=reduction)
        fused = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl)))
        torch.manual_seed(11)
        z_alone, kl_alone = genfast.reparameterize(mu, logvar), genfast.kl_divergence(mu, logvar, reduction)
        separate = torch.autograd.grad((z_alone, kl_alone), (mu, logvar), (grad_z, torch.ones_like(kl)))
    assert torch.equal(z, z_alone)
    eps = torch.finfo(torch.float32).eps
    if reduction == "none":  # both are kl_rows
        assert torch.equal(kl, kl_alone)
    else:  # the reduced KL alone is the ELBO kernel's sum, its fp32 terms rounded in another order: the
        # two fp64 totals differ in about the 8th digit and, rounded to fp32, can land 1 ulp apart (26 of
        # 300 random inputs on Triton)
        torch.testing.assert_close(kl, kl_alone, rtol=eps, atol=0)
    # The same math, its rounding steps in another order: the reduced KL alone writes its gradient in the
    # forward kernel (the ELBO's, 1/batch folded into the scale), the fused op scales in backward. Each
    # KL term (a product of 0.5, 1/batch and expm1) is rounded up to twice each way: 4 ulp apart at most,
    # at the scale of the gradient (added to the sampling term, it can cancel to a smaller value).
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * float(b.abs().max()))


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    cases(
        {
            CPU: grid(FUSED_SHAPES, GPU_DTYPES),
            TRITON: grid(FUSED_SHAPES[:-1], INTERPRETER_DTYPES),
            CUDA: grid(FUSED_SHAPES, GPU_DTYPES),
        }
    ),
)
def test_kernel_fused_sample_and_kl_equal_the_separate_kernels(kernels, backend, device, shape, dtype):
    """reparam_kl_forward draws each group once per row it touches: same z, same KL bits as the two kernels."""
    mu, logvar = inputs(shape, dtype, device)
    torch.manual_seed(11)
    z, rng_state, kl = kernels.reparam_kl_forward(mu, logvar, None)
    torch.manual_seed(11)
    z_alone, state_alone = kernels.reparam_forward(mu, logvar, None)
    assert torch.equal(rng_state, state_alone)
    assert torch.equal(z, z_alone)
    assert torch.equal(kl, kernels.kl_forward(mu, logvar))
    check_sample(f"{shape} {dtype}", z, mu, logvar, drawn_noise(rng_state, shape))
    check_kl(f"{shape} {dtype}", kl, mu, logvar)


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    cases(
        {
            REFERENCE: grid(FUSED_SHAPES[:-1], CPU_DTYPES),
            CPU: grid(FUSED_SHAPES, CPU_DTYPES),
            TRITON: grid(FUSED_SHAPES[:-1], INTERPRETER_DTYPES),
            CUDA: grid(FUSED_SHAPES, GPU_DTYPES),
        }
    ),
)
def test_kernel_fused_backward_is_the_sum_of_both_gradients(kernels, backend, device, shape, dtype):
    """reparam_kl_backward: grad_z + g mu and the sampling plus the KL gradient of logvar, with the
    forward's noise, against eager PyTorch's sum of the two gradients at the dtype and float64."""
    mu, logvar = inputs(shape, dtype, device)
    z, rng_state, kl = kernels.reparam_kl_forward(mu, logvar, seeded(5, device))
    eps = drawn_noise(rng_state, shape)
    grad_z = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
    grad_kl = torch.randn(kl.shape, device=device, dtype=torch.float64)
    grad_mu, grad_logvar = kernels.reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state)
    assert grad_mu.dtype == dtype and grad_mu.shape == shape and grad_logvar.shape == shape
    g, g64 = grad_kl.view(-1, 1).to(dtype), grad_kl.view(-1, 1)
    gz64, mu64, lv64, eps64 = grad_z.double(), mu.double(), logvar.double(), eps.double()
    assert_within_rule(f"{shape} {dtype} grad_mu", grad_mu, grad_z + g * mu, gz64 + g64 * mu64)
    eager = 0.5 * grad_z * eps.to(dtype) * torch.exp(0.5 * logvar) + 0.5 * g * torch.expm1(logvar)
    exact = 0.5 * gz64 * eps64 * torch.exp(0.5 * lv64) + 0.5 * g64 * torch.expm1(lv64)
    assert_within_rule(f"{shape} {dtype} grad_logvar", grad_logvar, eager, exact)
    # The same noise as the sampling kernel's backward: with grad_kl = 0 the sums are that gradient alone.
    alone = kernels.reparam_backward(grad_z, logvar, rng_state)
    zero_kl = kernels.reparam_kl_backward(grad_z, torch.zeros_like(grad_kl), mu, logvar, rng_state)[1]
    torch.testing.assert_close(zero_kl, alone, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("backend, device, dtype", cases({pair: grid(INTERPRETER_DTYPES) for pair in ON_CPU}))
def test_kernel_kl_bits_are_the_same_run_to_run_and_fused_with_a_generator(kernels, backend, device, dtype):
    mu, logvar = inputs((9, 3, 101), dtype, device)
    kl = kernels.kl_forward(mu, logvar)
    assert torch.equal(kernels.kl_forward(mu.clone(), logvar.clone()), kl)
    z, rng_state, fused_kl = kernels.reparam_kl_forward(mu, logvar, seeded(11))
    alone_z, alone_state = kernels.reparam_forward(mu, logvar, seeded(11))
    assert torch.equal(rng_state, alone_state) and torch.equal(z, alone_z)
    assert torch.equal(fused_kl, kl)


# ---------------------------------------------------------------------------------------------------
# Noise and RNG semantics: the Philox bits, the distribution, seeds, generators, offsets, determinism


@pytest.mark.parametrize("backend, device", on(TRITON))
def test_philox_bits_are_the_references(kernels, backend, device):
    """tl.philox's key split and counter words against the reference (which passes Random123's
    known answers), with seed, offset and group all past 32 bits."""
    groups = torch.tensor([0, 1, 5, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11])
    for seed, offset in [(0, 0), (-1, 0), (2**63 - 1, 5), (-(2**63), 2**32 + 9), (123456789, -7)]:
        out = torch.empty(4 * len(groups), dtype=torch.int64)
        _bits_kernel[(1,)](torch.tensor([seed, offset]), groups, out, N=len(groups))
        want = reference.philox_bits(seed & (2**64 - 1), offset & (2**64 - 1), groups)
        assert torch.equal(out.view(-1, 4), torch.stack(want, dim=1)), f"seed {seed}, offset {offset}"


@pytest.mark.parametrize("backend, device", on(CPU, TRITON))
def test_backends_draw_the_reference_noise(backend, device):
    """Every backend's eps is philox_normal's: the same bits, log/sin/cos within an ulp or two."""
    require_backend(backend, device)
    # On the CPU 2^20 + 15 normals: the inline log/sin/cos of csrc/common/cpu_math.h over much of their domain.
    shape = (1025, 1023) if backend == "cpu" else (3, 103)
    ones = torch.ones(shape)
    z, rng_state = sample_op(backend, 0 * ones, 0 * ones)  # mu = 0, std = 1: z is eps
    eps = drawn_noise(rng_state, shape)
    torch.testing.assert_close(z, eps, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)


# n i.i.d. N(0, 1) samples: the sample mean, variance, skewness and excess kurtosis have standard errors
# sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(24/n), and a lag-k correlation sqrt(1/n). Bounds of 6 standard
# errors: each false alarm has probability 2e-9. Kolmogorov-Smirnov at significance 1e-4: the asymptotic
# critical value of sqrt(n) D is sqrt(-ln(1e-4 / 2) / 2) = 2.2.
SIGMAS = 6.0
KS_CRITICAL = math.sqrt(-math.log(1e-4 / 2) / 2)


def assert_standard_normal(backend: str, x: torch.Tensor, following: torch.Tensor) -> None:
    """x: the noise of one call (flat, float64, rows of 64); following: the next call's."""
    n = x.numel()
    mean = x.mean()
    centred = x - mean
    var = centred.square().mean()
    skew = (centred**3).mean() / var**1.5
    kurtosis = (centred**4).mean() / var**2 - 3
    for name, value, standard_error in (
        ("mean", mean, 1 / n),
        ("variance", var - 1, 2 / n),
        ("skewness", skew, 6 / n),
        ("excess kurtosis", kurtosis, 24 / n),
    ):
        bound = SIGMAS * math.sqrt(standard_error)
        assert abs(float(value)) < bound, f"{backend}: {name} off by {float(value):.3g} (bound {bound:.3g})"
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / n
    ks = float((ranks - torch.special.ndtr(x.sort().values)).abs().max())
    assert math.sqrt(n) * ks < KS_CRITICAL, (
        f"{backend}: KS statistic {math.sqrt(n) * ks:.3f} >= {KS_CRITICAL:.3f}"
    )
    bound = SIGMAS / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5, 64):  # within a Philox group (1..3), across groups (4, 5), across rows (64)
        corr = float((centred[:-lag] * centred[lag:]).mean() / var)
        assert abs(corr) < bound, f"{backend}: lag-{lag} correlation {corr:.3g} (bound {bound:.3g})"
    corr = float(((following - following.mean()) * centred).mean() / var)
    assert abs(corr) < bound, f"{backend}: successive calls correlate ({corr:.3g}, bound {bound:.3g})"


# 2^20 samples on the CPU (the interpreter's speed), 2^24 on the GPU; rows of 64.
@pytest.mark.parametrize(
    "backend, device, shape",
    cases(
        {
            **{pair: grid([(1 << 14, 64)]) for pair in ON_CPU},
            CUDA: grid([(1 << 18, 64)]),
            TRITON_GPU: grid([(1 << 18, 64)]),
        }
    ),
)
def test_noise_is_standard_normal(backend, device, shape):
    require_backend(backend, device)
    mu, logvar = inputs(shape, torch.float32, device)

    def recovered():
        with genfast.use_backend(backend):
            z = genfast.reparameterize(mu, logvar)
        return ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).reshape(-1)

    assert_standard_normal(backend, recovered(), recovered())


@pytest.mark.parametrize("backend, device", on(REFERENCE, CPU, CUDA))
def test_kernel_noise_is_standard_normal_and_uncorrelated(kernels, backend, device):
    """Over n = 2^22 samples recovered as (z - mu) / std, each statistic lies within 6 standard errors
    of N(0, 1)'s (standard errors of a normal sample: mean 1/sqrt(n), variance sqrt(2/n), skew
    sqrt(6/n), excess kurtosis sqrt(24/n), a correlation 1/sqrt(n); a false alarm has probability ~2e-9
    each), and a Kolmogorov-Smirnov test at significance 1e-4 holds on 1e6 of them."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 22
    mu, logvar = inputs((n // 1024, 1024), torch.float32, device)
    z1, z2 = (kernels.reparam_forward(mu, logvar, None)[0] for _ in range(2))
    std = torch.exp(0.5 * logvar.double())
    e1, e2 = ((z.double() - mu.double()) / std for z in (z1, z2))
    e1, e2 = e1.flatten(), e2.flatten()
    bound = 6 / math.sqrt(n)
    centred = e1 - e1.mean()
    variance = centred.pow(2).mean()
    assert abs(float(e1.mean())) < bound
    assert abs(float(variance) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float(centred.pow(3).mean() / variance**1.5)) < 6 * math.sqrt(6 / n)
    assert abs(float(centred.pow(4).mean() / variance**2) - 3) < 6 * math.sqrt(24 / n)
    for lag in (1, 2, 3, 4, 5):  # within a Philox group (lags 1-3) and across groups
        assert abs(float(torch.corrcoef(torch.stack([e1[:-lag], e1[lag:]]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([e1, e2]))[0, 1])) < bound, "successive calls correlate"
    assert scipy_stats.kstest(e1[:1_000_000].cpu().numpy(), "norm").pvalue > 1e-4


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_same_seed_same_noise_fresh_noise_otherwise(backend, device):
    require_backend(backend, device)
    mu, logvar = (t.detach() for t in leaves((100, 7), torch.float32))

    def draw():
        with genfast.use_backend(backend):
            return genfast.reparameterize(mu, logvar)

    torch.manual_seed(7)
    first, following = draw(), draw()
    torch.manual_seed(7)
    again = draw()
    torch.manual_seed(8)
    other = draw()
    assert torch.equal(first, again)
    assert not torch.equal(first, following) and not torch.equal(first, other)
    generators = [seeded(99) for _ in range(2)]
    state = torch.get_rng_state()
    with genfast.use_backend(backend):
        a, b = (genfast.reparameterize(mu, logvar, generator=g) for g in generators)
    assert torch.equal(a, b) and not torch.equal(a, first)
    assert torch.equal(state, torch.get_rng_state()), "an explicit generator leaves the default one alone"


@pytest.mark.parametrize("backend, device", on(*ON_CPU, CUDA))
def test_kernel_determinism_and_fresh_noise(kernels, backend, device):
    mu, logvar = inputs((1000, 20), torch.float32, device)
    torch.manual_seed(7)
    first = kernels.reparam_forward(mu, logvar, None)[0]
    following = kernels.reparam_forward(mu, logvar, None)[0]
    torch.manual_seed(7)
    again = kernels.reparam_forward(mu, logvar, None)[0]
    torch.manual_seed(8)
    other_seed = kernels.reparam_forward(mu, logvar, None)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, following) and not torch.equal(first, other_seed)
    # An explicit generator: the same seed gives the same noise and leaves the default generator alone.
    state = default_generator_state(device)
    generators = [seeded(99, device) for _ in range(2)]
    a, b = (kernels.reparam_forward(mu, logvar, g)[0] for g in generators)
    assert torch.equal(a, b) and not torch.equal(a, first)
    assert default_generator_state(device) == state


@pytest.mark.parametrize("backend, device", on(REFERENCE, CPU, TRITON))
def test_kernel_forward_draws_a_fresh_seed_at_offset_0(kernels, backend, device):
    """On CPU tensors every forward takes one fresh seed from the generator, at offset 0."""
    mu, logvar = inputs((3, 7), torch.float32, device)
    states = [kernels.reparam_forward(mu, logvar, None)[1] for _ in range(2)]
    states.append(kernels.reparam_kl_forward(mu, logvar, None)[1])
    assert len({int(s[0]) for s in states}) == 3 and all(int(s[1]) == 0 for s in states)


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_rng_state_follows_the_cuda_generator(kernels, backend, device):
    """seed = the generator's seed; counter offset = philox offset / 4, one counter block per call."""
    mu, logvar = inputs((100, 7), torch.float32, device)
    torch.cuda.manual_seed(123456789)
    start = generator_offset()
    _, first = kernels.reparam_forward(mu, logvar, None)
    _, second = kernels.reparam_forward(mu, logvar, None)
    _, third, _ = kernels.reparam_kl_forward(mu, logvar, None)
    assert first.tolist() == [123456789, start // 4]
    assert second.tolist() == [123456789, start // 4 + 1]
    assert third.tolist() == [123456789, start // 4 + 2]
    assert generator_offset() == start + 12, "each call reserves an increment of 4 (32-bit draws)"


def test_cpu_result_does_not_depend_on_the_thread_count():
    require_backend("cpu", "cpu")
    script = (
        "import hashlib, sys, torch, genfast\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "mu = torch.linspace(-2, 2, 1003 * 257).view(1003, 257); logvar = mu.flip(0)\n"
        "with genfast.use_backend('cpu'):\n"
        "    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(5),"
        " reduction='none')\n"
        "    big = genfast.reparameterize(torch.zeros(1 << 20), torch.zeros(1 << 20),"
        " generator=torch.Generator().manual_seed(6))\n"
        "print(hashlib.sha256(torch.cat([z.flatten(), kl, big]).numpy().tobytes()).hexdigest())\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(threads)], capture_output=True, text=True, check=True
        ).stdout
        for threads in (1, 2, 3)
    }
    assert len(outputs) == 1, outputs


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    cases({TRITON: grid([(37, 6), (2, 3, 101), (3, 784)], INTERPRETER_DTYPES)}),
)
def test_triton_results_do_not_depend_on_the_block_size(kernels, backend, device, shape, dtype):
    """Sampling blocks of 16 and 64 Philox groups, KL blocks of 1, 2 and 16 rows: the same bits."""
    mu, logvar = inputs(shape, dtype, device)
    z, rng_state = kernels.reparam_forward(mu, logvar, seeded(3))
    grad_z = torch.randn_like(mu)
    grad_logvar = kernels.reparam_backward(grad_z, logvar, rng_state)
    kl = kernels.kl_forward(mu, logvar)
    grad_kl = torch.randn(kl.shape, dtype=kl.dtype)
    kl_grads = kernels.kl_backward(grad_kl, mu, logvar)
    fused_grads = kernels.reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state)
    for block in (16, 64):
        assert torch.equal(kernels.reparam_forward(mu, logvar, seeded(3), block=block)[0], z), block
        assert torch.equal(kernels.reparam_backward(grad_z, logvar, rng_state, block=block), grad_logvar)
    for block in (1, 2, 16):
        assert torch.equal(kernels.kl_forward(mu, logvar, block=block), kl), block
        fused_z, _, fused_kl = kernels.reparam_kl_forward(mu, logvar, seeded(3), block=block)
        assert torch.equal(fused_z, z) and torch.equal(fused_kl, kl), block
        for ours, want in zip(kernels.kl_backward(grad_kl, mu, logvar, block=block), kl_grads):
            assert torch.equal(ours, want), block
        fused = kernels.reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state, block=block)
        for ours, want in zip(fused, fused_grads):
            assert torch.equal(ours, want), block


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_cuda_graph_replays_of_the_kernels_draw_fresh_noise_equal_to_the_eager_sequence(
    kernels, backend, device
):
    """philox_cuda_state unpacked in the kernel: each replay reads the generator's state of that replay,
    records it in rng_state, and backward (captured too) reads rng_state from device memory."""
    mu, logvar = inputs((1003, 7), torch.float32, device)
    grad_z = torch.randn_like(mu)

    def step():
        z, rng_state = kernels.reparam_forward(mu, logvar, None)
        grad_logvar = kernels.reparam_backward(grad_z, logvar, rng_state)
        z_kl, state_kl, kl = kernels.reparam_kl_forward(mu, logvar, None)
        return z, rng_state, grad_logvar, z_kl, state_kl, kl

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    torch.manual_seed(2024)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append([t.clone() for t in static])
    torch.manual_seed(2024)
    eager = [step() for _ in range(3)]
    for replay, expected in zip(replayed, eager):
        for got, want in zip(replay, expected):
            assert torch.equal(got, want)
    assert not torch.equal(replayed[0][0], replayed[1][0]), "each replay must draw fresh noise"
    check_sample("replay", replayed[2][0], mu, logvar, drawn_noise(replayed[2][1], mu.shape))
    check_sample_gradient("replay", replayed[2][2], grad_z, logvar, drawn_noise(replayed[2][1], mu.shape))


@pytest.mark.parametrize("backend, device", on(CUDA, TRITON_GPU))
def test_cuda_graph_replays_match_the_eager_sequence(backend, device):
    """Replays of a captured forward + backward draw fresh noise, equal to eager calls under the same seed
    (the warm-up calls compile the kernels before the capture)."""
    require_backend(backend, device)
    mu, logvar = leaves((1003, 7), torch.float32, device)
    grad_z = torch.randn(1003, 7, device=device)

    def step():
        with genfast.use_backend(backend):
            z, kl = genfast.reparameterize_kl(mu, logvar, reduction="sum")
        return (z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl))))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    torch.manual_seed(78)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append([t.clone() for t in static])
    torch.manual_seed(78)
    eager = [[t.detach() for t in step()] for _ in range(3)]
    for replay, expected in zip(replayed, eager):
        for got, want in zip(replay, expected):
            assert torch.equal(got, want)
    assert not torch.equal(replayed[0][0], replayed[1][0])


# ---------------------------------------------------------------------------------------------------
# Input errors


def test_bad_input_is_refused_with_clear_errors():
    mu, logvar = torch.randn(10, 4), torch.randn(10, 4)
    cases = [
        (lambda: genfast.reparameterize(mu, logvar[:, :3]), ValueError, "logvar: expected mu's shape"),
        (lambda: genfast.reparameterize(mu, logvar.double()), TypeError, "logvar has dtype"),
        (lambda: genfast.reparameterize(mu.int(), logvar.int()), TypeError, "mu: expected dtype"),
        (lambda: genfast.reparameterize(mu, logvar.to("meta")), ValueError, "logvar is on meta"),
        (lambda: genfast.reparameterize(mu.numpy(), logvar), TypeError, "mu: expected a torch.Tensor"),
        (lambda: genfast.reparameterize(mu, logvar, generator=5), TypeError, "generator"),
        (lambda: genfast.kl_divergence(mu, logvar, reduction="avg"), ValueError, "reduction"),
        (lambda: genfast.kl_divergence(mu[0, 0], logvar[0, 0]), ValueError, "at least one dimension"),
        (lambda: genfast.reparameterize_kl(mu, logvar.half()), TypeError, "logvar has dtype"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


def test_mean_over_an_empty_batch_is_refused():
    mu = torch.empty(0, 5)
    with pytest.raises(ValueError, match="empty batch"):
        genfast.kl_divergence(mu, mu, reduction="mean")


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_public_bad_devices_are_refused(kernels, backend, device):
    mu, logvar = inputs((10, 4), torch.float32, device)
    with genfast.use_backend(backend):
        with pytest.raises((ValueError, TypeError), match="logvar"):
            genfast.reparameterize(mu, logvar.cpu())
        with pytest.raises((ValueError, TypeError), match="logvar"):
            genfast.kl_divergence(mu, logvar.cpu())
        with pytest.raises((ValueError, TypeError), match="generator"):
            genfast.reparameterize(mu, logvar, generator=torch.Generator())


@pytest.mark.parametrize("backend, device", on(CPU, CUDA))
def test_kernel_bad_arguments_are_refused(kernels, backend, device):
    mu, logvar = inputs((10, 4), torch.float32, device)
    grad_kl = torch.ones(10, device=device, dtype=torch.float64)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    cases = [
        (lambda: kernels.reparam_forward(mu, logvar.double(), None), "dtype"),
        (lambda: kernels.reparam_forward(mu, logvar[:, :3].contiguous(), None), "shape"),
        (lambda: kernels.reparam_forward(mu.t(), logvar.t(), None), "contiguous"),
        (lambda: kernels.reparam_forward(mu.int(), logvar.int(), None), "float"),
        (
            lambda: kernels.reparam_backward(mu, logvar, torch.zeros(3, dtype=torch.int64, device=device)),
            "shape",
        ),
        (lambda: kernels.reparam_backward(mu, logvar, torch.zeros(2, device=device)), "int64"),
        (lambda: kernels.kl_forward(mu[0, 0], logvar[0, 0]), "dimension"),
        (lambda: kernels.kl_backward(grad_kl[:9], mu, logvar), "shape"),
        (lambda: kernels.kl_backward(grad_kl.half(), mu, logvar), "Double"),
        (lambda: kernels.reparam_kl_backward(mu[:5], grad_kl, mu, logvar, state), "shape"),
        (lambda: kernels.reparam_kl_backward(mu.double(), grad_kl, mu, logvar, state), "dtype"),
        (lambda: kernels.reparam_kl_backward(mu, grad_kl[:9], mu, logvar, state), "shape"),
        (lambda: kernels.reparam_kl_backward(mu, grad_kl.float(), mu, logvar, state), "Double"),
        (lambda: kernels.reparam_kl_backward(mu, grad_kl, mu, logvar, state[:1]), "shape"),
    ]
    if device == "cuda":
        cases += [
            (lambda: kernels.reparam_forward(mu, logvar.cpu(), None), "CUDA"),
            (lambda: kernels.reparam_forward(mu, logvar, torch.Generator()), "cuda"),
            (lambda: kernels.reparam_kl_backward(mu, grad_kl.cpu(), mu, logvar, state), "CUDA"),
        ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()


# ---------------------------------------------------------------------------------------------------
# opcheck, torch.compile, the module


@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous"])
@pytest.mark.parametrize("backend, device", on(REFERENCE, CPU))
def test_opcheck(backend, device, layout):
    require_backend(backend, device)
    arrange = non_contiguous if layout == "non_contiguous" else (lambda t: t)
    mu, logvar = (arrange(t) for t in leaves((7, 20), torch.float32))
    assert mu.is_contiguous() == (layout == "contiguous")
    rng_state = new_rng_state(mu.device)
    ops = torch.ops.genfast
    with genfast.use_backend(backend):
        for op, args in (
            (ops.reparameterize.default, (mu, logvar)),
            (ops.reparameterize_kl.default, (mu, logvar)),
            (ops.kl_rows.default, (mu, logvar)),
            (ops.reparameterize_backward.default, (arrange(torch.randn(7, 20)), logvar.detach(), rng_state)),
            (
                ops.kl_rows_backward.default,
                (arrange(torch.randn(7, dtype=torch.float64)), mu.detach(), logvar.detach()),
            ),
            (
                ops.reparameterize_kl_backward.default,
                (
                    arrange(torch.randn(7, 20)),
                    torch.randn(7, dtype=torch.float64),
                    mu.detach(),
                    logvar.detach(),
                    rng_state,
                ),
            ),
        ):
            torch.library.opcheck(op, args)
    assert torch.Tag.nondeterministic_seeded in ops.reparameterize.default.tags
    assert torch.Tag.nondeterministic_seeded in ops.reparameterize_kl.default.tags


class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = genfast.nn.FusedLinear(12, 16)
        self.heads = torch.nn.Linear(16, 8)
        self.sample = genfast.nn.Reparameterize()
        self.decoder = genfast.nn.FusedLinear(4, 12, activation="none")

    def forward(self, x):
        mu, logvar = self.heads(self.encoder(x)).chunk(2, dim=-1)
        z = self.sample(mu, logvar)
        return self.decoder(z), genfast.kl_divergence(mu, logvar)


@pytest.mark.parametrize("backend, device", on(REFERENCE, CPU))
def test_compiled_vae_matches_eager(backend, device):
    require_backend(backend, device)
    eager = TinyVAE()
    compiled_copy = TinyVAE()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy, fullgraph=True)
    x = torch.randn(9, 12)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(5)
        with genfast.use_backend(backend):
            recon, kl = model(x)
            (recon.square().mean() + kl).backward()
        results.append((recon, kl, *(p.grad for p in model.parameters())))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][0], results[1][0]), "the same noise under compile"


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_compiled_step_matches_eager(kernels, backend, device):
    """torch.compile(fullgraph=True) calls the same kernels with the same generator state: the same z
    and KL bits, and gradients within the rule of eager genfast's (float64 reference, same eps)."""

    def step(mu, logvar):
        return genfast.reparameterize_kl(mu, logvar, reduction="none")

    mu, logvar = leaves((256, 32), torch.float32, device)
    grad_z, grad_kl = torch.randn(256, 32, device=device), torch.randn(256, device=device)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        torch.manual_seed(41)
        with genfast.use_backend(backend):
            z, kl = fn(mu, logvar)
        results.append((z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))))
    (z, kl, *eager_grads), (compiled_z, compiled_kl, *compiled_grads) = results
    assert torch.equal(compiled_z, z) and torch.equal(compiled_kl, kl)
    torch.manual_seed(41)
    eps = kernel_eps(
        kernels, kernels.reparam_forward(mu.detach(), logvar.detach(), None)[1], mu.shape
    ).double()
    m, lv, g = mu.detach().double(), logvar.detach().double(), grad_kl.double()[:, None]
    std = torch.exp(0.5 * lv)
    references = (grad_z.double() + g * m, 0.5 * grad_z.double() * eps * std + 0.5 * g * torch.expm1(lv))
    for label, eager, compiled, exact in zip(
        ("grad_mu", "grad_logvar"), eager_grads, compiled_grads, references
    ):
        assert_within_rule(f"compiled {label}", compiled, eager, exact)


def test_reparameterize_module_samples_in_training_only():
    layer = genfast.nn.Reparameterize()
    mu, logvar = (t.detach() for t in leaves((4, 3), torch.float32))
    assert not torch.equal(layer(mu, logvar), mu)
    layer.eval()
    assert layer(mu, logvar) is mu
    layer.sample_in_eval = True
    assert not torch.equal(layer(mu, logvar), mu)
    assert "sample_in_eval=True" in repr(layer) and not list(layer.parameters())


# ---------------------------------------------------------------------------------------------------
# Edge values and shapes: logvar +-80, NaN, empty tensors, indices past 2^31


@pytest.mark.parametrize(
    "backend, device, dtype",
    cases({pair: grid([torch.float32, torch.bfloat16, torch.float16]) for pair in (REFERENCE, CPU)}),
)
def test_logvar_plus_minus_80(backend, device, dtype):
    """exp(0.5 * 80) = 2.4e17 and exp(80) = 5.5e34 fit fp32 and bf16: z, KL and gradients stay finite. In
    fp16 (max 65504) z is +-inf wherever the exact result is beyond fp16's range (as in eager code), never
    NaN, and the KL and its logvar gradient overflow to +inf: reported, not silently clipped."""
    require_backend(backend, device)
    mu = torch.randn(64, 33).to(dtype)
    sign = torch.randint(0, 2, mu.shape) * 2 - 1
    logvar = (80.0 * sign).to(dtype)
    with genfast.use_backend(backend):
        z, rng_state = torch.ops.genfast.reparameterize(mu, logvar)
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        grad_logvar = torch.ops.genfast.reparameterize_backward(torch.ones_like(mu), logvar, rng_state)
    exact = mu.double() + torch.exp(0.5 * logvar.double()) * drawn_noise(rng_state, mu.shape).double()
    assert not z.isnan().any() and not kl.isnan().any() and not grad_logvar.isnan().any()
    if dtype == torch.float16:
        assert torch.equal(z.isinf(), exact.abs() > torch.finfo(dtype).max)
        assert bool(kl.isinf().all())
    else:
        assert bool(z.isfinite().all() and kl.isfinite().all() and grad_logvar.isfinite().all())
        torch.testing.assert_close(z.double(), exact, rtol=4 * torch.finfo(dtype).eps, atol=0)


# Not the Triton interpreter: NumPy's float32 exp(40) is 0.8 ulp off (torch's 0.2), more than the rule allows
# for z = mu + exp(40) eps against eager; compiled Triton calls libdevice's expf.
@pytest.mark.parametrize(
    "backend, device, dtype",
    cases({REFERENCE: grid(GPU_DTYPES), CPU: grid(GPU_DTYPES), CUDA: grid(GPU_DTYPES)}),
)
def test_kernel_logvar_plus_minus_80(kernels, backend, device, dtype):
    """exp(0.5 * 80) = 2.4e17 and exp(80) = 5.5e34 are finite in fp32: z, KL and gradients stay finite
    in fp32 and bf16; in fp16 z is +-inf exactly where the float64 result rounds to inf (as in eager)."""
    mu, _ = inputs((64, 33), dtype, device)
    sign = torch.randint(0, 2, mu.shape, device=device) * 2 - 1
    logvar = (80.0 * sign).to(dtype)
    z, rng_state, kl = kernels.reparam_kl_forward(mu, logvar, None)
    # With std = 2.4e17 an ulp of eps is far above the rule's 1e-6 floor: compare with the kernel's eps.
    eps = kernel_eps(kernels, rng_state, mu.shape)
    big = sign > 0
    exact = (mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()).to(dtype)
    assert torch.equal(z.isinf(), exact.isinf())
    if dtype == torch.float16:
        assert torch.equal(torch.sign(z[big]), torch.sign(eps[big]).to(dtype))
        check_sample("logvar -80", z[~big], mu[~big], logvar[~big], eps[~big])
    else:
        assert bool(torch.isfinite(z).all())
        check_sample("logvar +-80", z, mu, logvar, eps)
    assert bool(torch.isfinite(kl).all())
    check_kl(f"logvar +-80 {dtype}", kl, mu.float(), logvar.float())  # eager in fp32, compared in float64
    grad_z = torch.randn_like(mu)
    grad_logvar = kernels.reparam_backward(grad_z, logvar, rng_state)
    if dtype != torch.float16:
        check_sample_gradient("logvar +-80", grad_logvar, grad_z, logvar, eps)
    grad_mu, grad_logvar = kernels.kl_backward(torch.ones(64, device=device, dtype=torch.float64), mu, logvar)
    assert bool(torch.isfinite(grad_mu).all())
    assert bool(torch.isfinite(grad_logvar).all()) == (dtype != torch.float16), (
        "0.5 (e^80 - 1) overflows fp16 only"
    )


@pytest.mark.parametrize("backend, device", on(*ON_CPU))
def test_nan_in_gives_nan_out(backend, device):
    require_backend(backend, device)
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    mu[1, 3], logvar[2, 5] = float("nan"), float("nan")
    with genfast.use_backend(backend):
        z, kl = genfast.reparameterize_kl(mu, logvar, reduction="none")
    assert torch.equal(z.isnan(), mu.isnan() | logvar.isnan())
    assert kl.isnan().tolist() == [False, True, True, False]


@pytest.mark.parametrize("backend, device, shape", cases({pair: grid(EMPTY_SHAPES) for pair in ON_CPU}))
def test_empty_tensors(backend, device, shape):
    """Defined results and no noise drawn."""
    require_backend(backend, device)
    mu, logvar = (torch.empty(shape, requires_grad=True) for _ in range(2))
    state = torch.get_rng_state()
    with genfast.use_backend(backend):
        z = genfast.reparameterize(mu, logvar)
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        total = genfast.kl_divergence(mu, logvar, reduction="sum")
    assert z.shape == shape and kl.shape == shape[:-1] and float(total) == 0.0
    assert torch.equal(kl, torch.zeros(shape[:-1]))
    (z.sum() + total).backward()
    assert mu.grad.shape == shape
    if backend != "reference":
        assert torch.equal(state, torch.get_rng_state())


# Not the reference backend: its kernels draw a seed for an empty mu too (test_empty_tensors allows it).
@pytest.mark.parametrize(
    "backend, device, shape", cases({pair: grid(EMPTY_SHAPES) for pair in (CPU, TRITON, CUDA)})
)
def test_kernel_empty_tensors(kernels, backend, device, shape):
    """Defined results without a launch, and no noise drawn: rng_state is zeros."""
    mu, logvar = (torch.empty(shape, device=device) for _ in range(2))
    state = default_generator_state(device)
    z, rng_state = kernels.reparam_forward(mu, logvar, None)
    assert z.shape == shape and rng_state.shape == (2,)
    assert torch.equal(rng_state, torch.zeros(2, dtype=torch.int64, device=device))
    assert kernels.reparam_backward(z, logvar, rng_state).shape == shape
    rows = math.prod(shape[:-1])
    assert torch.equal(kernels.kl_forward(mu, logvar), torch.zeros(rows, device=device, dtype=torch.float64))
    grad_mu, grad_logvar = kernels.kl_backward(
        torch.ones(rows, device=device, dtype=torch.float64), mu, logvar
    )
    assert grad_mu.shape == shape and grad_logvar.shape == shape
    z, rng_state, kl = kernels.reparam_kl_forward(mu, logvar, None)
    assert z.shape == shape and torch.equal(kl, torch.zeros(rows, device=device, dtype=torch.float64))
    assert torch.equal(rng_state, torch.zeros(2, dtype=torch.int64, device=device))
    grads = kernels.reparam_kl_backward(z, torch.ones_like(kl), mu, logvar, rng_state)
    assert all(grad.shape == shape for grad in grads)
    assert default_generator_state(device) == state


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_indices_past_2_31(kernels, backend, device):
    """n = 2^31 + 8192 float32 elements (five 8 GiB tensors): with logvar = 0 and grad_z = 2,
    grad_logvar = eps exactly and z = mu + eps rounded once, so z == mu + grad_logvar bit for bit;
    a 32-bit index would wrap and repeat the first elements' noise."""
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs 48 GiB of GPU memory")
    n = (1 << 31) + 8192
    mu = torch.randn(n, device=device)
    logvar = torch.zeros(n, device=device)
    z, rng_state = kernels.reparam_forward(mu, logvar, None)
    grad_logvar = kernels.reparam_backward(torch.full_like(mu, 2.0), logvar, rng_state)
    for start in (0, (1 << 31) - 4096, n - 4096):
        window = slice(start, start + 4096)
        assert torch.equal(z[window], mu[window] + grad_logvar[window])
    assert not torch.equal(grad_logvar[(1 << 31) : (1 << 31) + 4096], grad_logvar[:4096])


@pytest.mark.parametrize("backend, device", on(CUDA))
def test_kl_rows_past_2_31(kernels, backend, device):
    """Two rows of 2^30 + 4096 bfloat16 elements: mu = 0.5, logvar = 0 make every term 0.25 and every
    partial sum exact, so kl = 2^27 + 512 per row exactly, in any order; grad_mu = grad_kl[row] * 0.5."""
    if torch.cuda.get_device_properties(0).total_memory < 32 * 2**30:
        pytest.skip("needs 32 GiB of GPU memory")
    shape = (2, (1 << 30) + 4096)
    mu = torch.full(shape, 0.5, device=device, dtype=torch.bfloat16)
    logvar = torch.zeros(shape, device=device, dtype=torch.bfloat16)
    expected = torch.full((2,), 2.0**27 + 512, device=device, dtype=torch.float64)
    assert torch.equal(kernels.kl_forward(mu, logvar), expected)
    grad_kl = torch.tensor([1.0, 2.0], device=device, dtype=torch.float64)
    grad_mu, grad_logvar = kernels.kl_backward(grad_kl, mu, logvar)
    assert bool((grad_mu[0] == 0.5).all()) and bool((grad_mu[1] == 1.0).all())
    assert not bool(grad_logvar.any())
    del grad_mu, grad_logvar
    torch.manual_seed(5)
    z, _, kl = kernels.reparam_kl_forward(mu, logvar, None)
    assert torch.equal(kl, expected)
    torch.manual_seed(5)
    assert torch.equal(z, kernels.reparam_forward(mu, logvar, None)[0])
