"""fused_dense on every backend against the float64 reference, forward and all three gradients."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import reference
from genfast.activations import ACTIVATIONS
from tests.conftest import non_contiguous, require_backend
from tests.tolerance import assert_within_rule

ACTS = sorted(ACTIVATIONS)
SLOPE = 0.2
# (batch, in_features, out_features): each of 1, 7, 100, 784 and 1000+ appears in every role.
CPU_SHAPES = [(1, 1, 1), (7, 100, 7), (100, 784, 1000), (1031, 7, 100), (784, 1000, 784), (1000, 1, 1031)]
# The Triton interpreter is slow: small shapes, with 130 outputs to cross the 128-bit mask row.
TRITON_SHAPES = [(1, 1, 1), (7, 100, 7), (100, 7, 130)]
GPU_SHAPES = CPU_SHAPES + [(4096, 1024, 784)]


@pytest.fixture(autouse=True)
def _ieee_fp32_matmuls():
    """fp32 GEMMs in full precision on the GPU (TF32 is a different dtype for the tolerance rule)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def make_inputs(batch, n_in, n_out, dtype, device, bias=True, leading=()):
    x = torch.randn(*leading, batch, n_in, dtype=torch.float64, device=device)
    w = torch.randn(n_out, n_in, dtype=torch.float64, device=device) / math.sqrt(n_in)
    b = torch.randn(n_out, dtype=torch.float64, device=device) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def check_against_reference(backend, x, w, b, act, grad_seed_shape=None):
    """Forward and gradients of genfast (on `backend`) and of eager PyTorch at x's dtype, vs float64."""

    def leaves(dtype):
        return [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b)]

    grad = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64, device=x.device)
    results = {}
    for name, dtype in (("genfast", x.dtype), ("eager", x.dtype), ("reference", torch.float64)):
        inputs = leaves(dtype)
        if name == "genfast":
            with genfast.use_backend(backend):
                y = genfast.fused_dense(*inputs, activation=act, negative_slope=SLOPE)
        else:
            y = reference.fused_dense(*inputs, activation=act, negative_slope=SLOPE)
        y.backward(grad.to(dtype))
        results[name] = [y] + [None if t is None else t.grad for t in inputs]
    for label, ours, eager, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), *results.values()):
        if ref is not None:
            assert_within_rule(f"{backend} {act} {x.dtype} {label}", ours, eager, ref)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cpu_backends_match_reference(backend, shape, dtype, act):
    require_backend(backend, "cpu")
    bias = shape[0] != 7  # a shape without bias, every activation and dtype
    check_against_reference(backend, *make_inputs(*shape, dtype, "cpu", bias=bias), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_interpreted_matches_reference(shape, act):
    require_backend("triton", "cpu")
    check_against_reference("triton", *make_inputs(*shape, torch.float32, "cpu", bias=shape[0] != 7), act)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_three_dimensional_and_non_contiguous_input(backend, act):
    require_backend(backend, "cpu")
    x, w, b = make_inputs(7, 100, 13, torch.float32, "cpu", leading=(3,))
    check_against_reference(backend, x, w, b, act)
    wide = torch.randn(3, 200, 7, dtype=torch.float32)
    strided = wide[:, ::2, :].transpose(1, 2)  # (3, 7, 100), neither row- nor column-contiguous
    assert not strided.is_contiguous()
    check_against_reference(backend, strided, w, b, act)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("act", ACTS)
def test_eager_autograd_saves_only_x_weight_and_the_minimal_aux(backend, act):
    """What the eager path (C++ node for cpu, Python Function for triton) keeps for backward."""
    require_backend(backend, "cpu")
    x, w, b = (t.requires_grad_() for t in make_inputs(7, 100, 130, torch.float32, "cpu"))
    saved = []
    with (
        genfast.use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t
        ),
    ):
        genfast.fused_dense(x, w, b, activation=act)
    expected_aux = {
        "mask": ((7, 32), torch.uint8),
        "preact": ((7, 130), torch.float32),
        "output": ((7, 130), torch.float32),
        "none": ((0,), torch.float32),
    }[ACTIVATIONS[act].saves]
    # bias is kept by reference (no memory) for a backward that builds a graph.
    assert saved == [
        ((7, 100), torch.float32),
        ((130, 100), torch.float32),
        expected_aux,
        ((130,), torch.float32),
    ]


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid"])
def test_cpu_mask_and_bias_gradient_do_not_depend_on_the_thread_count(act):
    require_backend("cpu", "cpu")
    # Integer inputs: the GEMM (MKL/oneDNN, not genfast's) is exact in any summation order, so z, and
    # with it the saved y, is the same for every thread count; only genfast's own passes are tested.
    x = torch.randint(-3, 4, (1031, 100)).float()
    w = torch.randint(-3, 4, (130, 100)).float()
    b = torch.randint(-3, 4, (130,)).float()
    grad_y = torch.randn(1031, 130)
    code = ACTIVATIONS[act].code
    results = []
    threads = torch.get_num_threads()
    saved = None
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, aux = genfast._extension._C.dense_forward_cpu(x, w, b, code, SLOPE)
            # One saved tensor for every backward: sigmoid's y comes from ATen's sigmoid_, whose last
            # bits depend on where the threads split the tensor (as eager torch.sigmoid's do).
            if saved is None:
                saved = y if ACTIVATIONS[act].saves == "output" else aux
            grad_b = genfast._extension._C.dense_backward_cpu(
                grad_y, x, w, saved, code, SLOPE, False, False, True
            )[2]
            results.append((aux, grad_b))
    finally:
        torch.set_num_threads(threads)
    for aux, grad_b in results[1:]:
        assert torch.equal(aux, results[0][0]) and torch.equal(grad_b, results[0][1])


def test_cpu_kernels_without_avx512_match_reference():
    """The 8-lane (AVX2) relu/leaky_relu passes, which CPUs without AVX-512 run, in a child process."""
    require_backend("cpu", "cpu")
    code = (
        "import torch; from tests.test_dense import check_against_reference, make_inputs\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n"
        "for shape in [(1, 1, 1), (7, 100, 7), (100, 784, 1000), (1031, 7, 100)]:\n"
        "    for act in ('relu', 'leaky_relu'):\n"
        "        for dtype in (torch.float32, torch.bfloat16):\n"
        "            check_against_reference('cpu', *make_inputs(*shape, dtype, 'cpu'), act)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("act", ACTS)
def test_saved_tensors_are_the_minimal_ones(backend, act):
    """Mask bits for relu/leaky_relu, z for gelu/gelu_tanh/silu, nothing extra otherwise."""
    require_backend(backend, "cpu")
    x, w, b = make_inputs(7, 100, 130, torch.float32, "cpu")
    code = ACTIVATIONS[act].code
    with genfast.use_backend(backend):
        y, aux = torch.ops.genfast.fused_dense(x, w, b, code, SLOPE)
    z = F.linear(x.double(), w.double(), b.double())
    saves = ACTIVATIONS[act].saves
    if saves == "mask":
        assert aux.dtype == torch.uint8 and aux.shape == (7, 32)
        # Bits may differ only where z is within float rounding of 0.
        differ = reference.unpack_mask(aux, 130) != (z > 0)
        assert (z.abs()[differ] < 1e-5).all()
        assert torch.equal(aux, reference.pack_mask(reference.unpack_mask(aux, 130))), (
            "padding bits must be 0"
        )
    elif saves == "preact":
        assert aux.shape == (7, 130) and aux.dtype == x.dtype
        torch.testing.assert_close(aux.double(), z, rtol=0, atol=1e-5)
    else:
        assert aux.numel() == 0


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    require_backend("cpu", "cpu")
    x, w, b = make_inputs(5, 9, 11, torch.float64, "cpu")
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    with genfast.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda *t: genfast.fused_dense(*t, activation=act, negative_slope=SLOPE), inputs
        )


# In float64, where the comparison is exact: Triton's erf/tanh/exp are fp32-accurate approximations
# (no libdevice), so it takes the activations it computes exactly; leaky_relu among them now that its
# slope arrives in fp64 (it came as fp32, 1.5e-8 off). The penalty is a scalar of ~1e2, whose float32
# rounding alone would decide a comparison in float32.
@pytest.mark.parametrize(
    "backend, act",
    [(b, a) for b in ("reference", "cpu") for a in ACTS]
    + [("triton", a) for a in ("relu", "leaky_relu", "none")],
)
def test_gradient_penalty_double_backward_matches_reference(backend, act):
    """R1 / WGAN-GP: the gradient of ||d y / d x||^2 w.r.t. the weights, through create_graph=True."""
    require_backend(backend, "cpu")
    x, w, b = make_inputs(7, 100, 13, torch.float64, "cpu")
    results = []
    for fn in (genfast.fused_dense, reference.fused_dense):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        with genfast.use_backend(backend):
            y = fn(xs, ws, bs, activation=act, negative_slope=SLOPE)
            (grad_x,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
            penalty = grad_x.square().sum()
            results.append((grad_x, penalty, *torch.autograd.grad(penalty, (ws, bs))))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_gradgradcheck_float64(act):
    require_backend("cpu", "cpu")
    x, w, b = (t.requires_grad_() for t in make_inputs(3, 5, 4, torch.float64, "cpu"))
    with genfast.use_backend("cpu"):
        assert torch.autograd.gradgradcheck(
            functools.partial(genfast.fused_dense, activation=act, negative_slope=SLOPE), (x, w, b)
        )


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh", "none"])
def test_opcheck(backend, act):
    require_backend(backend, "cpu")
    x, w, b = make_inputs(7, 10, 12, torch.float32, "cpu")
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), ACTIVATIONS[act].code, SLOPE)
    with genfast.use_backend(backend):
        torch.library.opcheck(torch.ops.genfast.fused_dense.default, args)
        torch.library.opcheck(
            torch.ops.genfast.fused_dense.default, (x, w, None, ACTIVATIONS[act].code, SLOPE)
        )
        strided = (non_contiguous(x), non_contiguous(w), non_contiguous(b), ACTIVATIONS[act].code, SLOPE)
        torch.library.opcheck(torch.ops.genfast.fused_dense.default, strided)
        y, aux = torch.ops.genfast.fused_dense(
            x.detach(), w.detach(), b.detach(), ACTIVATIONS[act].code, SLOPE
        )
        saved = y if ACTIVATIONS[act].saves == "output" else aux
        for need in ((True, True, True), (False, True, False), (True, False, False), (False, False, True)):
            torch.library.opcheck(
                torch.ops.genfast.fused_dense_backward.default,
                (
                    non_contiguous(torch.randn_like(y)),
                    x.detach(),
                    w.detach(),
                    saved,
                    ACTIVATIONS[act].code,
                    SLOPE,
                    *need,
                ),
            )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_reference(backend, shape, act, dtype):
    require_backend(backend, "cuda")
    check_against_reference(backend, *make_inputs(*shape, dtype, "cuda", bias=shape[0] != 7), act)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("act", ACTS)
def test_gpu_saved_tensors_match_the_cpu_layout(backend, act):
    require_backend(backend, "cuda")
    x, w, b = make_inputs(33, 100, 130, torch.float32, "cuda")
    with genfast.use_backend(backend):
        _, aux = torch.ops.genfast.fused_dense(x, w, b, ACTIVATIONS[act].code, SLOPE)
    _, expected = reference.dense_forward(x.double(), w.double(), b.double(), ACTIVATIONS[act].code, SLOPE)
    assert aux.shape == expected.shape
    if aux.dtype == torch.uint8:
        z = F.linear(x.double(), w.double(), b.double())
        differ = reference.unpack_mask(aux, 130) != reference.unpack_mask(expected, 130)
        assert (z.abs()[differ] < 1e-5).all()
    elif aux.numel():
        torch.testing.assert_close(aux.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_gpu_non_contiguous_and_3d():
    require_backend("cuda", "cuda")
    x, w, b = make_inputs(7, 100, 13, torch.bfloat16, "cuda", leading=(3,))
    check_against_reference("cuda", x.transpose(0, 1), w, b, "gelu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_eager_path_and_custom_op_agree_bit_for_bit(backend, act):
    """Eager mode calls the kernels through a light autograd.Function, compiled code through the op."""
    require_backend(backend, "cpu")
    x, w, b = (t.requires_grad_() for t in make_inputs(9, 20, 11, torch.float32, "cpu"))
    grad = torch.randn(9, 11)
    code = ACTIVATIONS[act].code
    with genfast.use_backend(backend):
        y_eager = genfast.fused_dense(x, w, b, activation=act)
        grads_eager = torch.autograd.grad(y_eager, (x, w, b), grad)
        y_op, _ = torch.ops.genfast.fused_dense(x, w, b, code, 0.01)
        grads_op = torch.autograd.grad(y_op, (x, w, b), grad)
    assert torch.equal(y_eager, y_op)
    for a, c in zip(grads_eager, grads_op):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n_out", [1, 7, 100, 128, 129, 784])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_mask_bytes_equal_the_cpu_backend(backend, n_out, bias):
    """The bit order, the mask rule and the zero padding of the GPU kernels, byte for byte."""
    require_backend(backend, "cuda")
    require_backend("cpu", "cpu")
    # Small integers: z is exact in fp32 on every backend, so the masks must be identical.
    x = torch.randint(-3, 4, (37, 16)).float()
    w = torch.randint(-3, 4, (n_out, 16)).float()
    b = torch.randint(-3, 4, (n_out,)).float() if bias else None
    code = ACTIVATIONS["relu"].code
    with genfast.use_backend("cpu"):
        _, expected = torch.ops.genfast.fused_dense(x, w, b, code, SLOPE)
    with genfast.use_backend(backend):
        _, mask = torch.ops.genfast.fused_dense(
            x.cuda(), w.cuda(), None if b is None else b.cuda(), code, SLOPE
        )
    assert torch.equal(mask.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_offset_views_and_deterministic_bias_gradient(backend):
    require_backend(backend, "cuda")
    storage = torch.randn(1 + 255 * 100, device="cuda")
    x = storage[1:].view(255, 100)  # a storage offset of one element: unaligned for vector loads
    w, b = torch.randn(784, 100, device="cuda") / 10, torch.randn(784, device="cuda")
    check_against_reference(backend, x, w, b, "gelu")
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with genfast.use_backend(backend):
            genfast.fused_dense(*leaves, activation="relu").backward(torch.ones(255, 784, device="cuda"))
        grads.append(leaves[2].grad)
    assert torch.equal(grads[0], grads[1]), "the bias gradient must be the same bits run to run"
