"""Bad input to fused_dense gets a clear exception (or, for an empty batch, an empty result)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import reference
from genfast.activations import mask_row_bytes
from tests.conftest import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def inputs(batch=4, n_in=6, n_out=5, dtype=torch.float32):
    return (
        torch.randn(batch, n_in, dtype=dtype),
        torch.randn(n_out, n_in, dtype=dtype),
        torch.randn(n_out, dtype=dtype),
    )


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda x, w, b: (x.int(), w, b), TypeError, "x: expected dtype"),
        (lambda x, w, b: (x, w.double(), b), TypeError, "weight has dtype torch.float64 but x"),
        (lambda x, w, b: (x, w, b.half()), TypeError, "bias has dtype"),
        (lambda x, w, b: (x, w.to("meta"), b), ValueError, "weight is on meta but x is on cpu"),
        (lambda x, w, b: (x[:, :5], w, b), ValueError, "x: expected shape (..., 6)"),
        (lambda x, w, b: (x, w[None], b), ValueError, "weight: expected 2 dimensions"),
        (lambda x, w, b: (x, w, b[:3]), ValueError, "bias: expected shape (5,)"),
        (lambda x, w, b: (x.numpy(), w, b), TypeError, "x: expected a torch.Tensor, got ndarray"),
        (lambda x, w, b: (x, w.numpy(), b), TypeError, "weight: expected a torch.Tensor, got ndarray"),
        (lambda x, w, b: (x, w, [1.0] * 5), TypeError, "bias: expected a torch.Tensor, got list"),
        (lambda x, w, b: (x[0, 0], w, b), ValueError, "x: expected shape (..., 6)"),
        (lambda x, w, b: (x.view(2, 2, 6).transpose(0, 2), w, b), ValueError, "x: expected shape (..., 6)"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_a_clear_error(backend, change, error, words):
    """The C++ eager entry (cpu) and the Python layer (reference, triton) check alike."""
    require_backend(backend, "cpu")
    with genfast.use_backend(backend):
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            genfast.fused_dense(*change(*inputs()), activation="relu")


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation: expected one of"):
        genfast.fused_dense(*inputs(), activation="swish")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "relu", "leaky_relu", "tanh"])
def test_empty_batch_gives_an_empty_result_and_zero_gradients(backend, act):
    """The defect: the reference backend's mask packing failed on an empty batch (relu, leaky_relu)."""
    require_backend(backend, "cpu")
    x, w, b = (t.requires_grad_() for t in inputs(batch=0))
    with genfast.use_backend(backend):
        y = genfast.fused_dense(x, w, b, activation=act)
        assert y.shape == (0, 5)
        y.sum().backward()
    assert x.grad.shape == (0, 6)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid", "leaky_relu"])
def test_nan_and_inf_propagate_like_eager(backend, act):
    require_backend(backend, "cpu")
    x, w, b = inputs()
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    with genfast.use_backend(backend):
        y = genfast.fused_dense(x, w, b, activation=act)
    expected = reference.fused_dense(x, w, b, activation=act)
    assert y[1].isnan().all(), "a NaN input must give NaN outputs in its row"
    # An inf input gives non-finite outputs in its row (inf, or NaN where inf - inf or 0 * inf occurs).
    assert torch.equal(y.isfinite(), expected.isfinite())
    finite = expected.isfinite()
    torch.testing.assert_close(y[finite], expected[finite])


def test_pinning_an_unusable_backend_raises():
    x, w, b = inputs()
    with genfast.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was pinned but cannot run"):
        genfast.fused_dense(x, w, b)
    with pytest.raises(ValueError, match="unknown backend"):
        with genfast.use_backend("tpu"):
            pass


def _run_with_backend_variable(value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENFAST_BACKEND": value}
    prelude = "import torch, genfast; from genfast.backend import select; x, w = torch.randn(4, 6), torch.randn(5, 6)\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_pins_the_backend_for_the_process():
    code = (
        "assert select(x.device) == 'reference'\n"
        "with genfast.use_backend('cpu'):\n"
        "    assert select(x.device) == 'cpu'\n"  # an explicit pin goes over the variable
        "assert select(x.device) == 'reference'\n"
    )
    result = _run_with_backend_variable("reference", code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "value, words", [("cuda", "'cuda' was pinned but cannot run"), ("tpu", "unknown backend")]
)
def test_environment_variable_naming_an_unusable_backend_raises_at_the_op(value, words):
    result = _run_with_backend_variable(value, "genfast.fused_dense(x, w)")
    assert result.returncode != 0 and words in result.stderr, result.stderr[-2000:]


def test_eager_calls_with_gradients_on_the_compiled_backends_take_the_cpp_node(monkeypatch):
    from genfast import _extension
    from genfast.ops.dense import FORWARD

    require_backend("cpu", "cpu")
    calls = []
    node = _extension._C.dense_node
    # The Op resolves its node once, on first use ("node" in its table of kernels): watch it there.
    monkeypatch.setitem(FORWARD._resolved, "node", lambda *a: calls.append(a) or node(*a))
    x, w, b = (t.requires_grad_() for t in inputs())
    torch.testing.assert_close(genfast.fused_dense(x, w, b), reference.fused_dense(x, w, b))
    assert len(calls) == 1, "an unpinned CPU call that needs gradients must run the C++ autograd node"
    with torch.no_grad():
        genfast.fused_dense(x, w, b)
    assert len(calls) == 1, "a call without gradients runs the kernel alone"
    with genfast.use_backend("reference"):
        genfast.fused_dense(x, w, b)
    assert len(calls) == 1, "a call pinned to reference must not"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid", "leaky_relu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_nan_propagates_like_eager(backend, act, dtype):
    """torch.relu keeps NaN (cuBLASLt's RELU epilogue, which the cuda backend no longer uses, makes it 0)."""
    require_backend(backend, "cuda")
    x, w, b = (t.to("cuda", dtype) for t in inputs(n_in=16, n_out=136))
    x[1, 2] = float("nan")
    with genfast.use_backend(backend):
        y = genfast.fused_dense(x, w, b, activation=act)
    assert y[1].isnan().all(), "a NaN input must give NaN outputs in its row"
    assert not y[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0)])
@pytest.mark.parametrize("act", ["relu", "sigmoid"])
@pytest.mark.parametrize("compiled", [False, True])
def test_zero_in_features_give_the_activated_bias_as_f_linear_does(backend, shape, act, compiled):
    """The defect: in_features == 0 raised an opaque reshape error; F.linear returns the broadcast bias."""
    require_backend(backend, "cpu")
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.randn(5, 0, requires_grad=True), torch.randn(5, requires_grad=True)
    fn = genfast.fused_dense
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    with genfast.use_backend(backend):
        y = fn(x, w, b, activation=act)
        y.sum().backward()
    b_plain = b.detach().requires_grad_()
    expected = reference.fused_dense(x.detach(), w.detach(), b_plain, activation=act)
    expected.sum().backward()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(b.grad, b_plain.grad)
    assert x.grad.shape == shape and w.grad.shape == (5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_gelu_tanh_gradient_at_large_preactivations_is_eagers(backend):
    """The defect: the reference backward computed z**2 in fp16, which overflows past |z| = 256: NaN
    where eager (fp32 math inside) gives the limits 1 and 0."""
    require_backend(backend, "cpu")
    if backend == "triton":
        pytest.skip("the Triton interpreter has no fp16 GEMM on the CPU")
    x = torch.tensor([[300.0], [-300.0], [2.0]], dtype=torch.float16, requires_grad=True)
    w = torch.ones(1, 1, dtype=torch.float16, requires_grad=True)
    with genfast.use_backend(backend):
        y = genfast.fused_dense(x, w, None, activation="gelu_tanh")
        (grad,) = torch.autograd.grad(y.sum(), x)
    x_eager = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.nn.functional.gelu(x_eager, approximate="tanh").sum(), x_eager)
    assert torch.equal(grad, expected), (grad, expected)


@pytest.mark.parametrize(
    "device, backend",
    [("cpu", b) for b in BACKENDS]
    + [pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("cuda", "triton")],
)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_gradient_at_a_nan_preactivation_is_eagers(device, backend, act):
    """Eager's relu backward (threshold_backward: z <= 0 ? 0 : g) passes the gradient at a NaN z;
    leaky_relu's (z > 0 ? g : slope g) scales it. genfast's mask bits follow the same comparisons."""
    require_backend(backend, device)
    # Small integers: z is exact (z == 0 included) on every backend and GEMM, so no bit is a coin flip.
    x, w, b = (t.mul(2).round().to(device) for t in inputs(n_in=6, n_out=20))
    x[1, 2] = float("nan")
    w, b = w.requires_grad_(), b.requires_grad_()
    grad_y = torch.randn(4, 20, device=device)
    with genfast.use_backend(backend):
        (gb,) = torch.autograd.grad(
            genfast.fused_dense(x, w, b, activation=act, negative_slope=0.2), b, grad_y
        )
    eager = torch.relu if act == "relu" else lambda z: torch.nn.functional.leaky_relu(z, 0.2)
    (expected,) = torch.autograd.grad(eager(torch.nn.functional.linear(x, w, b)), b, grad_y)
    assert torch.equal(gb.isnan(), expected.isnan())
    torch.testing.assert_close(gb, expected, equal_nan=True)


def test_meta_tensors_give_meta_results():
    """The defect: the reference backend (the one meta tensors get) asked autocast about meta and raised."""
    x, w, b = (t.to("meta") for t in inputs())
    y = genfast.fused_dense(x, w, b, activation="relu")
    assert y.device.type == "meta" and y.shape == (4, 5)
    with genfast.use_backend("reference"):
        assert genfast.fused_dense(x[:, None], w, b, activation="gelu").shape == (4, 1, 5)


def test_triton_backward_grid_fits_cuda_limits_for_millions_of_features(monkeypatch):
    """Grid axes 1 and 2 take at most 65535 blocks: the dz kernel once put N / 64 blocks on axis 1,
    which failed past N = 4,194,240. The launch is recorded, not run (the interpreter is too slow)."""
    pytest.importorskip("triton")
    from genfast.triton import dense as triton_dense

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_dense, "_dz_kernel", Recorder())
    n = 5_000_000
    grad_y, x, w = torch.randn(1, n), torch.randn(1, 1), torch.randn(n, 1)
    saved = torch.zeros(1, mask_row_bytes(n), dtype=torch.uint8)
    triton_dense.dense_backward(
        grad_y, x, w, saved, genfast.ACTIVATIONS["relu"].code, 0.0, False, False, True
    )
    assert grids and all(size < 65536 for grid in grids for size in grid[1:]), grids
