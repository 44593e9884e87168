"""What compiled Triton does differently from the interpreter the other tests run it under.

Float kernel arguments: a Python float becomes an fp32 ``.param`` of the compiled kernel unless the
parameter is declared ``tl.float64`` (the interpreter keeps the Python float, so only compiling shows
it): slopes, loss weights and scales would be rounded to fp32 before fp64 math.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import genfast
from tests.conftest import require_backend

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import KernelParam  # noqa: E402


def _launch_everything() -> None:
    """Each Triton kernel genfast launches, through the public ops (small shapes, interpreted)."""
    x, w, b = torch.randn(5, 7, requires_grad=True), torch.randn(4, 7, requires_grad=True), torch.randn(4)
    genfast.fused_dense(x, w, b, activation="leaky_relu", negative_slope=0.1).sum().backward()
    recon, mu, logvar = (torch.randn(3, n, requires_grad=True) for n in (6, 2, 2))
    genfast.elbo_loss(recon, torch.rand(3, 6), mu, logvar, beta=0.3).backward()
    real, fake = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    (genfast.discriminator_loss(real, fake, real_label_smoothing=0.1) + genfast.generator_loss(fake)).backward()
    z, kl = genfast.reparameterize_kl(mu, logvar)
    (z.sum() + kl).backward()


def test_every_float_argument_of_a_triton_kernel_is_declared_fp64(monkeypatch):
    require_backend("triton", "cpu")
    floats: dict[str, set[str]] = {}
    kernels: dict[str, object] = {}
    run = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        names = [n for n in self.arg_names]
        for name, value in [*zip(names, args), *kwargs.items()]:
            if isinstance(value, float):
                floats.setdefault(self.fn.__name__, set()).add(name)
        kernels[self.fn.__name__] = self.fn
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    with genfast.use_backend("triton"):
        _launch_everything()
    assert {"_matmul_kernel", "_dz_kernel", "_elbo_row_kernel", "_gan_kernel", "_finish_kernel"} <= set(kernels)
    undeclared = {}
    for kernel, names in floats.items():
        params = list(inspect.signature(kernels[kernel]).parameters.values())
        # Triton's own reading of each declaration (what the compiled launcher passes)
        kinds = {p.name: KernelParam(i, p, False, False) for i, p in enumerate(params)}
        bad = sorted(n for n in names if not kinds[n].is_constexpr and kinds[n].annotation_type != "fp64")
        if bad:
            undeclared[kernel] = bad
    assert not undeclared, f"float arguments compiled as fp32: {undeclared}"


# Compiling needs real JIT functions: a fresh interpreter without TRITON_INTERPRET, one per test.
_COMPILE_SLOPE = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import KernelParam
import genfast
from genfast.triton import dense

capability, dtype = int(sys.argv[1]), sys.argv[2]
acc = triton.language.float64 if dtype == "fp64" else triton.language.float32
consts = {"ACT": genfast.ACTIVATIONS["leaky_relu"].code, "HAS_BIAS": True, "SAVES": 1, "PRECISION": "ieee",
          "ACC": acc, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}
fn = dense._matmul_kernel.fn  # the autotuner's kernel
signature = {}
for i, p in enumerate(inspect.signature(fn.fn).parameters.values()):
    if p.name in consts:
        signature[p.name] = "constexpr"
    elif p.name.endswith("_ptr"):
        signature[p.name] = "*u8" if p.name == "mask_ptr" else "*" + dtype
    else:  # what the launcher passes: the declared type, else an int argument's i32
        signature[p.name] = KernelParam(i, p, False, False).annotation_type or "i32"
source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
ptx = triton.compile(source, target=GPUTarget("cuda", capability, 64)).asm["ptx"]
slope = fn.arg_names.index("slope")
print([line.strip() for line in ptx.splitlines() if ".param" in line and line.rstrip(",").endswith(f"_param_{slope}")])
"""


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_leaky_relu_slope_is_an_fp64_parameter_of_the_compiled_kernel(capability, dtype):
    """Compiled for a real target with no GPU: the PTX declares the slope .f64 (it was .f32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SLOPE, str(capability), dtype], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ".param .f64" in result.stdout, result.stdout


def test_no_kernel_times_configs_again_for_a_new_batch_size_in_its_bucket():
    """Autotuning keys are power-of-two buckets of the sizes, never the exact sizes (a new batch or sequence
    length would time every config again, and fail if first seen inside CUDA-graph capture); the
    memory-bound kernels, whose configs all give the same bits, take theirs by rule."""
    from triton.runtime.autotuner import Autotuner

    from genfast.triton import dense, losses, reparam

    tuned = {f"{module.__name__}.{name}": kernel for module in (dense, losses, reparam)
             for name, kernel in vars(module).items() if isinstance(kernel, Autotuner)}
    assert set(tuned) == {"genfast.triton.dense._matmul_kernel"}, sorted(tuned)
    assert all(key.endswith(("_bucket", "_k_major")) for key in dense._matmul_kernel.keys), dense._matmul_kernel.keys
