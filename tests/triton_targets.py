"""Compile every Triton kernel variant genfast can launch for a real GPU target, on a machine without one.

Run as ``python -m tests.triton_targets CAPABILITY`` (80 or 90) without ``TRITON_INTERPRET``; prints one
JSON record per compiled kernel. genfast's own launchers run on CPU tensors with a stand-in driver that
reports the target: every launch goes through Triton's real binder, so each kernel gets the argument
specialization (pointer alignment, sizes divisible by 16 or equal to 1) and the constexprs a launch with
those shapes gets on a GPU, and the autotuner's pruned configs are all compiled, none launched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Largest dynamic shared memory of one block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100/H200.
MAX_SHARED = {80: 166912, 90: 232448}


class TargetDriver:
    """What Triton's JIT asks of the active driver before it compiles: the target, a device, a stream."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def specialization(fn, source, constexprs: dict) -> str:
    """What the binder made of the argument values: pointer types, which are divisible by 16, which equal 1."""
    names = fn.arg_names
    pointers = [f"{name}:{kind}" for name, kind in source.signature.items() if kind.startswith("*")]
    divisible = sorted(names[path[0]] for path, attrs in source.attrs.items() if attrs)
    ones = sorted(names[path[0]] for path in source.constants if names[path[0]] not in constexprs)
    return (
        f"{' '.join(pointers)}; divisible by 16: {','.join(divisible) or '-'}; "
        f"equal to 1: {','.join(ones) or '-'}"
    )


def compile_only(records: list[dict]) -> None:
    """Make every launch compile instead of run, and the autotuner compile each config it would time."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        cached = len(self.device_caches[0][0])
        start = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if len(self.device_caches[0][0]) > cached:  # a new variant, not one this process compiled already
            constants = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in kwargs.items()
            }
            records.append(
                {
                    "kernel": self.fn.__name__,
                    "constants": constants,
                    "specialization": specialization(self, kernel.src, kwargs),
                    "shared": kernel.metadata.shared,
                    "seconds": time.perf_counter() - start,
                    "fp32_params": kernel.asm["ptx"].count(".param .f32"),
                    "cubin": kernel.asm["cubin"],
                }
            )
        return kernel

    def autotune_all(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run = compile_run
    Autotuner.run = autotune_all


# Sizes: aligned ones (every size and row stride divisible by 16, as in most training) for every variant,
# and odd ones (no size divisible by 16) for fp32, which compile the unaligned loads and stores (the dense
# layer's for every dtype: its unaligned GEMMs take other tiles).


def _shapes(aligned: list, odd: list, dtype) -> list:
    import torch

    return aligned + odd if dtype == torch.float32 else aligned


def launch_dense() -> None:
    import torch

    from genfast.activations import ACTIVATIONS, mask_row_bytes
    from genfast.triton import dense

    modes = [
        (torch.float16, False),
        (torch.bfloat16, False),
        (torch.float32, False),
        (torch.float32, True),
        (torch.float64, False),
    ]
    for dtype, tf32 in modes:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        # Unaligned operands take one small tile: every dtype, fully odd and only N odd (a 10-class head).
        for m, k, n in [(256, 784, 512), (7, 100, 130), (7, 784, 10)]:
            for name, act in ACTIVATIONS.items():
                if m == 7 and name not in ("gelu", "relu"):  # the heaviest epilogue and the mask packing
                    continue
                x, w, b = (
                    torch.empty(m, k, dtype=dtype),
                    torch.empty(n, k, dtype=dtype),
                    torch.empty(n, dtype=dtype),
                )
                for bias in (b, None):
                    dense.dense_forward(x, w, bias, act.code, 0.01)
                saved = {
                    "mask": torch.empty(m, mask_row_bytes(n), dtype=torch.uint8),
                    "none": torch.empty(0),
                    "output": torch.empty(m, n, dtype=dtype),
                    "preact": torch.empty(m, n, dtype=dtype),
                }
                for need in [(True, True, True), (True, True, False), (False, False, True)]:
                    dense.dense_backward(
                        torch.empty(m, n, dtype=dtype), x, w, saved[act.saves], act.code, 0.01, *need
                    )
        # An input that starts off a 16-byte boundary (a contiguous view into a buffer) takes that tile too.
        x = torch.empty(7 * 784 + 1, dtype=dtype)[1:].view(7, 784)
        for name in ("gelu", "relu"):
            dense.dense_forward(x, torch.empty(512, 784, dtype=dtype), None, ACTIVATIONS[name].code, 0.01)
    torch.backends.cuda.matmul.allow_tf32 = False


def launch_reparam() -> None:
    import torch

    from genfast.triton import reparam

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        # Row lengths giving every step width of the row kernels (1 to 128 columns a step).
        for rows, cols in _shapes(
            [(1024, 1), (1024, 2), (1024, 8), (1024, 16), (1024, 32), (1024, 64), (1024, 128), (1024, 784)],
            [(1000, 3), (1000, 13), (1000, 100)],
            dtype,
        ):
            mu, logvar = torch.empty(rows, cols, dtype=dtype), torch.empty(rows, cols, dtype=dtype)
            z, state = reparam.reparam_forward(mu, logvar)
            reparam.reparam_backward(z, logvar, state)
            reparam.kl_backward(reparam.kl_forward(mu, logvar), mu, logvar)
            z, state, kl = reparam.reparam_kl_forward(mu, logvar)
            reparam.reparam_kl_backward(z, kl, mu, logvar, state)


def launch_losses() -> None:
    import torch

    from genfast.loss_terms import GAN_KINDS, NO_TERM, RECON_LOSSES, REDUCTIONS, real_term
    from genfast.triton import losses

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for (b, d, latent), n in _shapes([((128, 784, 16), 4096)], [((7, 100, 3), 1000)], dtype):
            recon, mu, logvar = (torch.empty(b, size, dtype=dtype) for size in (d, latent, latent))
            for target_dtype in (dtype, torch.uint8, torch.bool):
                target = torch.empty(b, d, dtype=target_dtype)
                for recon_kind in RECON_LOSSES.values():
                    for reduction in REDUCTIONS.values():
                        for need_grad in (True, False):
                            losses.losses_elbo_forward(
                                recon, target, mu, logvar, 1.0, recon_kind, reduction, 1.0, need_grad
                            )
            logits = torch.empty(n, dtype=dtype)
            for kind in GAN_KINDS:  # each kind's discriminator and generator loss, as genfast.ops calls them
                calls = [
                    (real_term(kind, 0.0), GAN_KINDS[kind].fake, logits),
                    (GAN_KINDS[kind].generator, NO_TERM, logits.new_empty(0)),
                ]
                for first, second, other in calls:
                    for reduction in REDUCTIONS.values():
                        for need_grad in (True, False):
                            losses.losses_gan_forward(
                                logits,
                                other,
                                first.code,
                                first.param,
                                second.code,
                                second.param,
                                reduction,
                                need_grad,
                            )


def cuobjdump() -> str:
    """Triton's bundled cuobjdump (the CUDA toolkit here has none)."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump") or "cuobjdump"


def resource_usage(cubin: bytes, tool: str, scratch: Path) -> dict[str, int]:
    """REG, STACK and LOCAL of the cubin's one kernel (STACK or LOCAL above 0: spills or local arrays)."""
    path = scratch / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run(
        [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    )
    line = next(line for line in out.stdout.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"reg": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def main(capability: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compiling needs TRITON_INTERPRET unset"
    from triton.runtime import driver

    driver.set_active(TargetDriver(capability))
    records: list[dict] = []
    compile_only(records)
    for launch in (launch_dense, launch_reparam, launch_losses):
        launch()
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as scratch:
        for record in records:
            record.update(resource_usage(record.pop("cubin"), tool, Path(scratch)))
            record["capability"] = capability
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
