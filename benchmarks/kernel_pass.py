"""One small pass over every genfast kernel, forward and backward, for compute-sanitizer (``make gpu-check``):

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.kernel_pass --backend cuda

Every op of genfast.ops on the chosen backends: fused_dense with each activation, with and without bias;
reparameterize, kl_divergence and reparameterize_kl with each reduction; elbo_loss (bce and mse, float and
uint8 targets) and the GAN losses of each kind, with each reduction; in float32, bfloat16, float16 and
float64 (``--light``: float32 and bfloat16, for the slow racecheck). The shapes are tiny but reach each
kernel's variants: rows past one block (dense backward's partial sums, the losses' last-block reduction),
widths not a multiple of 8 or 4 (mask bytes, unaligned groups), a row longer than the KL's 4096-element
chunk, and a view whose data pointer is not 16-byte aligned.

Outputs and gradients are compared, loosely, with genfast's reference in float64 on the CPU (references
on the CPU keep the sanitizer's work to genfast's own launches); the tests own the accuracy, this pass
hunts memory errors and races. Exits 1 on a mismatch or an error. ``--device cpu`` runs the same pass on
the CPU backends (Triton interpreted), which is how ``make gpu-check DRY=1`` checks this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

# torch and genfast are imported inside the functions: ``--help`` after the arguments (how the dry run checks
# a sanitizer step's command line) stays instant, and TRITON_INTERPRET is set before Triton loads.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
LIGHT_DTYPE_NAMES = ("float32", "bfloat16")
# Relative norm error allowed per dtype: far above each dtype's rounding, far below a wrong or unwritten output.
_TOLERANCE = {"float64": 1e-9, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
_REDUCTIONS = ("mean", "sum", "none")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_pass",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", nargs="+", choices=("cuda", "triton", "cpu"), default=["cuda"])
    parser.add_argument("--light", action="store_true", help="float32 and bfloat16 only")
    args = parser.parse_args(argv)
    if args.device == "cpu" and "triton" in args.backend:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import torch

    import genfast

    print(
        f"kernel pass on {args.device}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"genfast build {genfast.build_info()}",
        flush=True,
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel pass: torch sees no CUDA device", file=sys.stderr)
        return 1
    dtypes = LIGHT_DTYPE_NAMES if args.light else DTYPE_NAMES
    checker = _Checker(torch.device(args.device))
    for backend in args.backend:
        start, calls = time.monotonic(), checker.calls
        with genfast.use_backend(backend):  # raises, naming the reason, if this backend cannot run here
            for dtype in dtypes:
                _dense(checker, dtype)
                _reparam(checker, dtype)
                _losses(checker, dtype)
        print(
            f"kernel pass: backend {backend}: {checker.calls - calls} calls, forward and backward, "
            f"{time.monotonic() - start:.1f} s",
            flush=True,
        )
    if args.device == "cuda":
        torch.cuda.synchronize()  # a kernel's fault surfaces here at the latest
    for failure in checker.failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    print(f"kernel pass: {checker.calls} calls, {len(checker.failures)} mismatches")
    return 1 if checker.failures else 0


class _Checker:
    """Runs an op and its backward on the device and its reference in float64 on the CPU, then compares."""

    def __init__(self, device):
        self.device, self.calls, self.failures = device, 0, []

    def tensor(
        self, shape: tuple[int, ...], dtype: str, offset: int = 0, scale: float = 1.0, grad: bool = True
    ):
        """Random normal values on the device; `offset` elements into a larger buffer (an unaligned view)."""
        import math

        import torch

        flat = torch.randn(math.prod(shape) + offset, dtype=getattr(torch, dtype), device=self.device) * scale
        return flat[offset:].view(shape).requires_grad_(grad)  # a view: the offset stays

    def check(self, name: str, dtype: str, op: Callable, reference: Callable, inputs: tuple) -> None:
        """Compare op(*inputs) and its input gradients with reference(outputs, *float64 CPU copies of inputs)."""
        import torch

        self.calls += 1
        outputs = _as_tuple(op(*inputs))
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        # Positive seeds: random signs could cancel between outputs (a loss and its terms) to a gradient made
        # of rounding errors.
        seeds = [torch.rand_like(o) + 0.5 for o in outputs]
        grads = torch.autograd.grad(outputs, wrt, seeds)
        exact = tuple(
            t.detach().cpu().double().requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
            else t.cpu()
            if isinstance(t, torch.Tensor)
            else t
            for t in inputs
        )
        detached = tuple(o.detach().cpu().double() for o in outputs)
        want_outputs = _as_tuple(reference(detached, *exact))
        want_wrt = [t for t in exact if isinstance(t, torch.Tensor) and t.requires_grad]
        want_grads = torch.autograd.grad(want_outputs, want_wrt, [s.cpu().double() for s in seeds])
        for label, got, want in [
            *((f"output {i}", o, w) for i, (o, w) in enumerate(zip(outputs, want_outputs))),
            *((f"gradient {i}", g, w) for i, (g, w) in enumerate(zip(grads, want_grads))),
        ]:
            got = got.detach().cpu().double()
            error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            if got.shape != want.shape or not torch.isfinite(got).all() or not error <= _TOLERANCE[dtype]:
                self.failures.append(
                    f"{name} {dtype} {label}: shape {tuple(got.shape)} vs {tuple(want.shape)}, "
                    f"relative error {error:.2e} (allowed {_TOLERANCE[dtype]:.0e})"
                )


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _dense(checker: _Checker, dtype: str) -> None:
    import genfast
    from genfast import reference

    # (rows, in, out, bias): rows past the backward's 64-row blocks, out % 8 == 0 (the GELU epilogue);
    # then sizes cuBLASLt may refuse (odd, unaligned), no bias.
    for rows, n_in, n_out, bias in ((130, 24, 40, True), (7, 13, 5, False)):
        for activation in sorted(genfast.ACTIVATIONS):
            inputs = (
                checker.tensor((rows, n_in), dtype),
                checker.tensor((n_out, n_in), dtype, scale=n_in**-0.5),
                checker.tensor((n_out,), dtype) if bias else None,
            )
            checker.check(
                f"fused_dense {activation} {rows}x{n_in}->{n_out}",
                dtype,
                lambda x, w, b, a=activation: genfast.fused_dense(x, w, b, a, 0.1),
                lambda _, x, w, b, a=activation: reference.fused_dense(x, w, b, a, 0.1),
                inputs,
            )


def _reparam(checker: _Checker, dtype: str) -> None:
    import torch

    import genfast
    from genfast import reference

    def with_noise_of(z, mu, logvar):
        """The reference of a sample is mu + exp(logvar / 2) eps with the kernel's own eps, read off z."""
        eps = (z.detach() - mu.detach()) * torch.exp(-0.5 * logvar.detach())
        return mu + torch.exp(0.5 * logvar) * eps

    # (rows, cols, offset): aligned groups of 4; an unaligned view of odd width; a row past one chunk.
    for rows, cols, offset in ((5, 8, 0), (3, 7, 1), (2, 4099, 0)):
        shape = f"{rows}x{cols}" + (" unaligned" if offset else "")
        pair = (checker.tensor((rows, cols), dtype, offset), checker.tensor((rows, cols), dtype, offset, 0.5))
        checker.check(
            f"reparameterize {shape}",
            dtype,
            genfast.reparameterize,
            lambda out, mu, logvar: with_noise_of(out[0], mu, logvar),
            pair,
        )
        for reduction in _REDUCTIONS:
            checker.check(
                f"kl_divergence {reduction} {shape}",
                dtype,
                lambda mu, logvar, r=reduction: genfast.kl_divergence(mu, logvar, r),
                lambda _, mu, logvar, r=reduction: reference.kl_divergence(mu, logvar, r),
                pair,
            )
            checker.check(
                f"reparameterize_kl {reduction} {shape}",
                dtype,
                lambda mu, logvar, r=reduction: genfast.reparameterize_kl(mu, logvar, r),
                lambda out, mu, logvar, r=reduction: (
                    with_noise_of(out[0], mu, logvar),
                    reference.kl_divergence(mu, logvar, r),
                ),
                pair,
            )


def _losses(checker: _Checker, dtype: str) -> None:
    import torch

    import genfast
    from genfast import reference
    from genfast.loss_terms import GAN_KINDS

    rows, width, latent = 300, 33, 5  # 300 rows: past one 256-thread block, so the last-block reduction runs
    for recon_loss in ("bce", "mse"):
        for uint8_target in (False, True):
            target = (
                torch.randint(0, 256, (rows, width), dtype=torch.uint8, device=checker.device)
                if uint8_target
                else torch.rand(rows, width, dtype=getattr(torch, dtype), device=checker.device)
            )
            inputs = (
                checker.tensor((rows, width), dtype),
                target,
                checker.tensor((rows, latent), dtype),
                checker.tensor((rows, latent), dtype, scale=0.5),
            )
            for reduction in _REDUCTIONS:
                checker.check(
                    f"elbo_loss {recon_loss} {reduction} {target.dtype} target",
                    dtype,
                    lambda *a, k=recon_loss, r=reduction: genfast.elbo_loss(*a, 0.5, k, r, True),
                    lambda _, *a, k=recon_loss, r=reduction: reference.elbo_terms(*a, 0.5, k, r),
                    inputs,
                )
    # 2500 logits: three of the GAN kernels' 1024-element blocks, the last one partial.
    logits = (checker.tensor((2500,), dtype), checker.tensor((2500,), dtype))
    for kind in sorted(GAN_KINDS):
        smoothing = 0.1 if GAN_KINDS[kind].smoothable else 0.0
        for reduction in _REDUCTIONS:
            checker.check(
                f"discriminator_loss {kind} {reduction}",
                dtype,
                lambda real, fake, k=kind, s=smoothing, r=reduction: genfast.discriminator_loss(
                    real, fake, k, s, r
                ),
                lambda _, real, fake, k=kind, s=smoothing, r=reduction: reference.discriminator_loss(
                    real, fake, k, s, r
                ),
                logits,
            )
            checker.check(
                f"generator_loss {kind} {reduction}",
                dtype,
                lambda fake, k=kind, r=reduction: genfast.generator_loss(fake, k, r),
                lambda _, fake, k=kind, r=reduction: reference.generator_loss(fake, k, r),
                logits[1:],
            )


if __name__ == "__main__":
    sys.exit(main())
