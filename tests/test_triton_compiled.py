"""What compiled Triton does differently from the interpreter the other tests run it under.

Every kernel variant genfast can launch (each autotune config, dtype, activation, saved state, flag and
the argument specialization of aligned and odd sizes) is compiled for sm_80 and sm_90 with no GPU
(tests/triton_targets.py) and checked: it compiles, fits the target's shared memory, spills no register
(cuobjdump's resource usage of the cubin), and takes no fp32 float argument (a Python float becomes an
fp32 ``.param`` unless declared ``tl.float64``; the interpreter keeps the Python float). Kernels use
accurate exp/log/sin/cos when compiled (genfast.triton._math), and autotuning keys are size buckets.
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
    (
        genfast.discriminator_loss(real, fake, real_label_smoothing=0.1) + genfast.generator_loss(fake)
    ).backward()
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
    assert {"_matmul_kernel", "_dz_kernel", "_elbo_row_kernel", "_gan_kernel", "_finish_kernel"} <= set(
        kernels
    )
    undeclared = {}
    for kernel, names in floats.items():
        params = list(inspect.signature(kernels[kernel]).parameters.values())
        # Triton's own reading of each declaration (what the compiled launcher passes)
        kinds = {p.name: KernelParam(i, p, False, False) for i, p in enumerate(params)}
        bad = sorted(n for n in names if not kinds[n].is_constexpr and kinds[n].annotation_type != "fp64")
        if bad:
            undeclared[kernel] = bad
    assert not undeclared, f"float arguments compiled as fp32: {undeclared}"


def test_no_kernel_times_configs_again_for_a_new_batch_size_in_its_bucket():
    """Autotuning keys are power-of-two buckets of the sizes, never the exact sizes (a new batch or sequence
    length would time every config again, and fail if first seen inside CUDA-graph capture); the
    memory-bound kernels, whose configs all give the same bits, take theirs by rule."""
    from triton.runtime.autotuner import Autotuner

    from genfast.triton import dense, losses, reparam

    tuned = {
        f"{module.__name__}.{name}": kernel
        for module in (dense, losses, reparam)
        for name, kernel in vars(module).items()
        if isinstance(kernel, Autotuner)
    }
    assert set(tuned) == {"genfast.triton.dense._matmul_kernel"}, sorted(tuned)
    assert all(
        key.endswith(("_bucket", "_k_major")) or key in ("aligned", "PRECISION")
        for key in dense._matmul_kernel.keys
    ), dense._matmul_kernel.keys


# Every variant, compiled for the real targets by tests/triton_targets.py: one process per target, side by
# side (this machine has 2 cores). A cold Triton cache takes minutes, a warm one seconds.
_TARGETS = (80, 90)
# Kernels allowed a stack, up to how many bytes and registers, and why. Nothing else may spill or keep
# arrays in local memory.
_MICRO_SPILL = (
    "ptxas parks one 64-bit value in an 8-byte stack slot, stored and loaded once per program, at "
    "32 to 64 registers of the 255 it may use: its own scheduling choice, not register pressure"
)
_STACK_ALLOWED: dict[str, tuple[int, int, str]] = {
    "_gan_kernel": (8, 64, _MICRO_SPILL),  # fp64 square/linear terms; sm_80 and sm_90
    # relu, fp32, odd N, sm_80 (at 64 registers); mish's fp64 derivative (16 rows a step), sm_80, at 168
    "_dz_kernel": (8, 168, _MICRO_SPILL.replace("32 to 64", "64 to 168")),
    # The unaligned tile with an input that starts off a 16-byte boundary (fp16 gelu, fp32 relu; sm_80):
    # the same 8-byte slot, at the 168 registers ptxas aims at for occupancy.
    "_matmul_kernel": (8, 168, _MICRO_SPILL.replace("32 to 64", "168")),
}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    import json

    from tests.triton_targets import MAX_SHARED

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = {
        capability: subprocess.Popen(
            [sys.executable, "-m", "tests.triton_targets", str(capability)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for capability in _TARGETS
    }
    records = []
    for capability, worker in workers.items():
        out, err = worker.communicate(timeout=1200)
        assert worker.returncode == 0, f"sm_{capability}: {err[-4000:]}"
        records += [json.loads(line) for line in out.splitlines()]
    for record in records:
        record["max_shared"] = MAX_SHARED[record["capability"]]
    return records


def _variant(record: dict) -> str:
    return f"{record['kernel']} {record['specialization']} {sorted(record['constants'].items())}"


def test_every_triton_variant_compiles_for_sm80_and_sm90(compiled):
    kernels = {
        "_matmul_kernel",
        "_dz_kernel",
        "_sample_kernel",
        "_kl_rows_kernel",
        "_kl_backward_kernel",
        "_sample_kl_backward_kernel",
        "_elbo_row_kernel",
        "_gan_kernel",
        "_finish_kernel",
    }
    by_target = {c: {_variant(r) for r in compiled if r["capability"] == c} for c in _TARGETS}
    assert {r["kernel"] for r in compiled} == kernels
    assert by_target[80] == by_target[90], by_target[80] ^ by_target[90]
    seconds = sum(r["seconds"] for r in compiled)
    print(
        f"{len(compiled)} kernels compiled ({len(by_target[90])} variants per target), {seconds:.0f} s of compiling"
    )


def test_every_triton_variant_fits_the_shared_memory_of_its_target(compiled):
    too_big = [
        f"sm_{r['capability']}: {_variant(r)} needs {r['shared']} B (max {r['max_shared']})"
        for r in compiled
        if r["shared"] > r["max_shared"]
    ]
    assert not too_big, "\n".join(too_big)


def test_no_compiled_triton_kernel_takes_an_fp32_float_argument(compiled):
    """The PTX declares every float argument .f64 (a Python float undeclared would be .param .f32)."""
    fp32 = sorted({_variant(r) for r in compiled if r["fp32_params"]})
    assert not fp32, "\n".join(fp32)


def _allowed(record: dict) -> bool:
    stack, registers, _ = _STACK_ALLOWED.get(record["kernel"], (0, 0, ""))
    return record["local"] == 0 and (
        record["stack"] == 0 or record["stack"] <= stack and record["reg"] <= registers
    )


def test_no_triton_variant_spills_or_uses_local_memory(compiled):
    spills = [
        f"sm_{r['capability']}: {_variant(r)}: {r['reg']} registers, stack {r['stack']} B, local {r['local']} B"
        for r in compiled
        if not _allowed(r)
    ]
    assert not spills, "\n".join(spills)


def test_aligned_and_unaligned_launches_of_one_bucket_are_tuned_apart():
    """Unaligned operands (a size, stride or start not a multiple of 16) take one small tile: keyed apart, a
    first unaligned launch (K = 783) cannot leave that tile cached for the aligned launches of its bucket
    (K = 784), nor the reverse."""
    from genfast.triton import dense

    assert "aligned" in dense._matmul_kernel.keys
    weight = torch.empty(512, 784)
    assert dense._aligned(torch.empty(7, 784), weight.t(), torch.empty(7, 512))
    assert not dense._aligned(torch.empty(7, 783), torch.empty(512, 783).t(), torch.empty(7, 512))
    assert not dense._aligned(torch.empty(7 * 784 + 1)[1:].view(7, 784), weight.t(), torch.empty(7, 512))


def test_kernels_take_exp_log_sin_cos_from_the_accurate_helpers():
    """Compiled, tl.exp/tl.log/tl.sin/tl.cos (and tl.sigmoid, built on tl.exp) are the approximate
    instructions, ~1e-5 off at exp(150): kernels call genfast.triton._math's, libdevice's when compiled."""
    import ast
    from pathlib import Path

    approximate = {"exp", "exp2", "log", "log2", "sin", "cos", "sigmoid", "sqrt", "rsqrt", "erf"}
    calls = []
    for path in sorted((Path(genfast.__file__).parent / "triton").glob("*.py")):
        if path.name == "_math.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in approximate
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "tl"
            ):
                calls.append(f"{path.name}:{node.lineno} tl.{node.func.attr}")
    assert not calls, calls
