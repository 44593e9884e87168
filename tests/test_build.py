"""How genfast was built, and that every backend shares the one activation table."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genfast
from genfast import _extension
from genfast.activations import ACTIVATIONS


def test_build_info_reports_what_was_built():
    info = genfast.build_info()
    for key in ("version", "torch", "cuda", "cuda_archs", "triton", "backends"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert "reference" in info["backends"]
    assert info["cuda"] == _extension.has_cuda_kernels()
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_cpp_activation_list_is_the_python_table():
    table = {name: (code, saves.lower()) for name, (code, saves) in _extension._C.activation_table().items()}
    assert table == {name: (a.code, a.saves) for name, a in ACTIVATIONS.items()}


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_cpu_kernels_run_their_parallel_loops_on_pytorchs_openmp_threads():
    """Without -fopenmp, at::parallel_for compiles to a serial loop: a silent 2x-on-2-cores loss."""
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("PyTorch's parallel backend here is not OpenMP on Linux")
    assert genfast.build_info()["openmp"]


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_extension_was_built_for_this_torch():
    assert _extension._C.build_info()["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_cuda_kernels_are_compiled_when_a_toolkit_and_cuda_torch_are_present():
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("no CUDA toolkit or no CUDA PyTorch: a CPU-only build is expected")
    import os

    if os.environ.get("GENFAST_CUDA") == "0":
        pytest.skip("GENFAST_CUDA=0 forced a CPU-only build")
    assert genfast.build_info()["cuda"], (
        "CUDA toolkit and CUDA PyTorch present, but no CUDA kernels were built"
    )


def _cuobjdump() -> str | None:
    """Triton's own cuobjdump first (CUDA 13 toolkits may ship none), then PATH, then $CUDA_HOME/bin."""
    from torch.utils.cpp_extension import CUDA_HOME

    triton = importlib.util.find_spec("triton")
    packages = list(triton.submodule_search_locations or []) if triton else []
    candidates = [Path(p, "backends", "nvidia", "bin", "cuobjdump") for p in packages]
    candidates += [shutil.which("cuobjdump"), CUDA_HOME and Path(CUDA_HOME, "bin", "cuobjdump")]
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def test_cuda_build_embeds_ptx_for_gpus_newer_than_its_targets():
    """SASS alone (the old default 8.0;9.0) gives 'no kernel image' on sm_100/sm_120; PTX is JIT-compiled.
    The architectures the build was given, and where a cuobjdump exists, the PTX in the binary."""
    info = genfast.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no GPU code")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert any(arch.endswith("+PTX") for arch in info["cuda_archs"]), info["cuda_archs"]
    cuobjdump = _cuobjdump()
    if cuobjdump:
        listing = subprocess.run(
            [cuobjdump, "--list-ptx", _extension._C.__file__], capture_output=True, text=True, timeout=120
        )
        assert "sm_" in listing.stdout, listing.stdout[-2000:] + listing.stderr[-2000:]


# Kernels allowed a stack frame or local memory: part of the demangled name -> why it cannot do without.
_MISH_DZ = (
    "mish's derivative (one IEEE division, a subroutine call on the GPU) in the dense backward: "
    "across the calls of the unrolled row loop ptxas keeps one 64-bit loop value on the stack, stored once "
    "before the loop and loaded once after it (8-16 bytes a thread, no traffic in the loop)"
)
KERNELS_ALLOWED_LOCAL_MEMORY: dict[str, str] = {
    "dz_kernel<float, (genfast::Act)9>": _MISH_DZ,
    "dz_kernel<c10::Half, (genfast::Act)9>": _MISH_DZ,
    "dz_kernel<c10::BFloat16, (genfast::Act)9>": _MISH_DZ,
}


def _resource_usage(so_path: str, cuobjdump: str) -> dict[str, dict[str, dict[str, int]]]:
    """{"sm_80": {mangled kernel: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}} of each SASS image."""
    dump = subprocess.run(
        [cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    elf, arch, function = False, None, None
    for line in map(str.strip, dump.splitlines()):
        if line.startswith("Fatbin "):
            elf, arch = line == "Fatbin elf code:", None  # PTX sections have an arch too, but no registers
        elif elf and (m := re.fullmatch(r"arch = (sm_\w+)", line)):
            arch = m[1]
            usage.setdefault(arch, {})
        elif arch and (m := re.fullmatch(r"Function (\S+):", line)):
            function = m[1]
        elif arch and function and line.startswith("REG:"):
            usage[arch][function] = {
                k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)
            }
            function = None
    return usage


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    return subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_cuda_kernels_have_no_stack_and_no_local_memory():
    """The ptxas report (-Xptxas -v), read from the binary that ships so that it cannot go stale: every
    kernel of genfast._C, for each SASS architecture, with its registers, stack frame and local memory
    (cuobjdump --dump-resource-usage). A stack frame or local memory means register spills or an array
    indexed at run time: per-thread traffic through L1/L2 in a kernel meant to be memory-bound on its
    inputs. Each architecture the build was given has SASS, all with the same kernels."""
    info = genfast.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no CUDA kernels")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump: not in Triton's package, on PATH or in $CUDA_HOME/bin")
    usage = _resource_usage(_extension._C.__file__, cuobjdump)
    archs = {"sm_" + arch.split("+")[0].replace(".", "") for arch in info["cuda_archs"]}
    assert set(usage) == archs, f"SASS for {sorted(usage)}, built for {info['cuda_archs']}"
    kernels = {arch: set(functions) for arch, functions in usage.items()}
    first = min(kernels)
    for arch in kernels:
        assert kernels[arch], f"no kernels in the {arch} SASS"
        differ = sorted(kernels[arch] ^ kernels[first])
        assert not differ, f"{arch} and {first} have different kernels: {_demangle(differ)}"
    offenders = [
        (arch, name, r)
        for arch, functions in sorted(usage.items())
        for name, r in sorted(functions.items())
        if r["STACK"] or r["LOCAL"]
    ]
    readable = _demangle([name for _, name, _ in offenders])
    report = [
        f"{arch} REG:{r['REG']} STACK:{r['STACK']} LOCAL:{r['LOCAL']} {name}"
        for (arch, _, r), name in zip(offenders, readable)
        if not any(allowed in name for allowed in KERNELS_ALLOWED_LOCAL_MEMORY)
    ]
    assert not report, "kernels with a stack frame or local memory:\n" + "\n".join(report)


# CPU capability variants (csrc/common/cpu_capability.h): every CPU kernel file is built for DEFAULT,
# AVX2 and AVX512 (x86-64), the best this CPU has runs, GENFAST_CPU_CAPABILITY pins one.
_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def _supported_capabilities() -> list[str]:
    """The variants this CPU can run: those up to ATen's own capability (which cpuinfo checks)."""
    aten = torch.backends.cpu.get_cpu_capability()
    if aten not in _CAPABILITY_ORDER:
        return ["DEFAULT"]
    built = genfast.build_info()["cpu_capabilities"]
    return [c for c in _CAPABILITY_ORDER[: _CAPABILITY_ORDER.index(aten) + 1] if c in built]


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_build_info_names_the_cpu_capability_in_use():
    info = genfast.build_info()
    assert "DEFAULT" in info["cpu_capabilities"]
    pinned = os.environ.get("GENFAST_CPU_CAPABILITY")
    expected = pinned.upper() if pinned else _supported_capabilities()[-1]
    assert info["cpu_capability"] == expected


def _capability_inputs():
    """Seeded inputs of the ops the variants run (run in each child process and in the parent)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((67, 129), (45, 129), (45,)))
    grad_y = torch.randn(67, 45, generator=g)
    recon, target = torch.randn(33, 77, generator=g), torch.rand(33, 77, generator=g)
    mu, logvar = torch.randn(33, 21, generator=g), torch.randn(33, 21, generator=g)
    return x, w, b, grad_y, recon, target, mu, logvar


def _capability_outputs(ops, math_dtype: torch.dtype | None = None) -> dict:
    """name -> output of the ops (genfast on the cpu backend, or genfast.reference) for fp32 and bf16
    inputs; math_dtype=torch.float64: the same inputs, rounded to each dtype, computed in float64."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = str(dtype).split(".")[1]
        x, w, b, grad_y, recon, target, mu, logvar = (
            t.to(dtype).to(math_dtype or dtype) for t in _capability_inputs()
        )
        dtype = math_dtype or dtype
        for act in ("relu", "leaky_relu", "gelu", "silu"):
            xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
            y = ops.fused_dense(xs, ws, bs, act)
            y.backward(grad_y.to(dtype))
            for name, value in (("y", y), ("gx", xs.grad), ("gw", ws.grad), ("gb", bs.grad)):
                out[f"dense_{act}_{d}_{name}"] = value.detach()
        rs, ms, ls = (t.to(dtype).requires_grad_() for t in (recon, mu, logvar))
        if hasattr(ops, "elbo_loss"):
            loss = ops.elbo_loss(rs, target.to(dtype), ms, ls, beta=0.5)
        else:  # genfast.reference
            loss = ops.elbo_terms(rs, target.to(dtype), ms, ls, beta=0.5)[0]
        loss.backward()
        out[f"elbo_{d}"], out[f"elbo_{d}_grecon"], out[f"elbo_{d}_gmu"] = loss.detach(), rs.grad, ms.grad
        out[f"elbo_{d}_glogvar"] = ls.grad
        out[f"kl_{d}"] = ops.kl_divergence(mu.to(dtype), logvar.to(dtype), reduction="none")
    return out


def run_pinned(capability: str, code: str, *args: str) -> str:
    """`python -c code args` from the repository root with GENFAST_CPU_CAPABILITY=capability; its stdout."""
    env = {**os.environ, "GENFAST_CPU_CAPABILITY": capability.lower()}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, f"{capability}: {done.stderr[-3000:]}"
    return done.stdout


_CAPABILITY_CHILD = """
import sys, torch, genfast
from genfast.backend import use_backend
from tests.test_build import _capability_outputs
assert genfast.build_info()["cpu_capability"] == sys.argv[2], genfast.build_info()
with use_backend("cpu"):
    out = _capability_outputs(genfast)
    z = genfast.reparameterize(*[torch.randn(33, 21, generator=torch.Generator().manual_seed(s)) for s in (1, 2)],
                               generator=torch.Generator().manual_seed(3))
torch.save({**out, "reparam": z.detach()}, sys.argv[1])
"""


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_every_cpu_capability_this_cpu_supports_agrees(tmp_path):
    """Each variant, pinned by GENFAST_CPU_CAPABILITY in a child process: within the tolerance rule of
    DESIGN.md (tests/tolerance.py) against float64, and bit for bit with DEFAULT where the math is the
    same whatever the lane count (relu and leaky_relu forward). The relu gradients are checked by the rule
    only: in this test's child processes they differed from DEFAULT by an ulp (not yet explained; called
    directly through _C or fused_dense alone they agree bit for bit)."""
    from genfast import reference
    from tests.tolerance import assert_within_rule

    runs = {}
    for capability in _supported_capabilities():
        path = tmp_path / f"{capability}.pt"
        run_pinned(capability, _CAPABILITY_CHILD, str(path), capability)
        runs[capability] = torch.load(path)
    eager, fp64 = _capability_outputs(reference), _capability_outputs(reference, torch.float64)
    for capability, out in runs.items():
        for name, value in out.items():
            exact = "relu" in name and name.endswith("_y")  # relu's math: a compare per element
            if exact or name == "reparam":  # reparam: the same Philox bits, an ulp of log/sin/cos
                tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 2e-6, "atol": 2e-6}
                torch.testing.assert_close(value, runs["DEFAULT"][name], **tol, msg=f"{capability}: {name}")
            else:
                assert_within_rule(f"{capability}: {name}", value, eager[name], fp64[name])
