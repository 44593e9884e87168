"""The float math functions of csrc/common/cpu_math.h that replace SLEEF's (expm1 in the KL, log1p in the BCE
and softplus, exp in reparameterization and the BCE, Box-Muller's log, sin and cos), read through the CPU kernels that use them, against float64 over their whole range: at most
twice the error of PyTorch's own float32 evaluation of the same expression (the tolerance rule, in ulps),
special values as PyTorch's. Every CPU capability this machine runs (csrc/common/cpu_capability.h), each in
a child process.
"""

from __future__ import annotations

import pytest
import torch

from genfast import _extension
from tests.test_build import _supported_capabilities, run_pinned

pytestmark = pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-40, 88.0, 88.75, 89.0, -104.0, float("inf"), float("-inf")]


def _around(points: list[float]) -> torch.Tensor:
    """The floats next to each point (the series/exp switches at |x| = 1), 64 steps each way."""
    out = []
    for p in points:
        x = torch.tensor([p], dtype=torch.float32)
        up, down = x.clone(), x.clone()
        for _ in range(64):
            up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
            out += [up, down]
    return torch.cat(out)


def expm1_inputs() -> torch.Tensor:
    grid = torch.linspace(-30, 30, 300_001)
    small = torch.logspace(-30, 0, 3001)
    return torch.cat([grid, small, -small, _around([1.0, -1.0, 0.0]), torch.tensor(SPECIAL)])


def log1p_exp_inputs() -> torch.Tensor:
    """x >= 0: the BCE's log term log(1 + exp(-x)) alone (target 1, x >= 0)."""
    return torch.cat([torch.linspace(0, 110, 300_001), torch.logspace(-30, 2, 3001)])


def genfast_expm1(x: torch.Tensor) -> torch.Tensor:
    """expm1 as the KL kernels compute it: grad_logvar = 0.5 * grad_kl * expm1(logvar), grad_kl = 1."""
    from genfast._extension import _C

    lv = x.view(1, -1)
    grad_kl = torch.ones(1, dtype=torch.float64)
    return 2 * _C.kl_backward_cpu(grad_kl, torch.zeros_like(lv), lv)[1].view(-1)


def genfast_log1p_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(-x)), x >= 0, as the ELBO kernel computes a one-element BCE row with target 1."""
    from genfast._extension import _C

    recon = x.view(-1, 1)
    zeros = torch.zeros_like(recon)
    return _C.losses_elbo_forward_cpu(recon, torch.ones_like(recon), zeros, zeros, 1.0, 0, 0, 1.0, False)[1]


def exp_inputs() -> torch.Tensor:
    """Past both ends of the inline range [-87, 88] (SLEEF's exp takes those vectors), up to 88.7, below
    float32's overflow of exp (ln(max) = 88.72): past it eager's eps * exp(x) is inf where the true
    product is finite for |eps| < 1, and its error, the limit, would be infinite."""
    return torch.cat([torch.linspace(-104, 88.7, 300_001), _around([-87.0, 0.0, 88.0])])


_NOISE_STATE = torch.tensor([1234567, 0], dtype=torch.int64)


def _kernel_noise(n: int) -> torch.Tensor:
    """The float32 eps the CPU kernel draws for n elements under _NOISE_STATE: its sampling gradient with
    grad_z = 2 and logvar = 0 is 0.5 * 2 * eps * exp(0) = eps exactly."""
    from genfast._extension import _C

    return _C.reparam_backward_cpu(torch.full((n,), 2.0), torch.zeros(n), _NOISE_STATE)


def genfast_exp_times_noise(x: torch.Tensor) -> torch.Tensor:
    """eps * exp(x), as the sampling gradient with grad_z = 2 and logvar = 2x computes it (0.5 * 2 * eps is
    eps exactly; one rounding of the product, as PyTorch's eps * exp(x) has)."""
    from genfast._extension import _C

    return _C.reparam_backward_cpu(torch.full_like(x, 2.0), 2 * x, _NOISE_STATE)


def softplus_inputs() -> torch.Tensor:
    return torch.cat(
        [torch.linspace(-110, 30, 300_001), torch.logspace(-30, 1.3, 3001), -torch.logspace(-30, 2, 3001)]
    )


def genfast_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus as the dense kernel's epilogue computes it: x (N, 1) times a weight of 1 is x exactly."""
    from genfast._extension import _C
    from genfast.activations import get_activation

    y = _C.dense_forward_cpu(x.view(-1, 1), torch.ones(1, 1), None, get_activation("softplus").code, 0.0)[0]
    return y.view(-1)


def ulps(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|value - exact| in units of the last place of float32 at exact (finite exact values)."""
    rounded = exact.float().abs()
    spacing = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
    return (value.double() - exact).abs() / spacing


FUNCTIONS = {
    # name: (genfast's, PyTorch's float32 evaluation of the same expression, float64 exact, inputs)
    "expm1": (genfast_expm1, torch.expm1, torch.expm1, expm1_inputs),
    "log1p_exp": (
        genfast_log1p_exp,
        lambda x: torch.log1p(torch.exp(-x)),
        lambda x: torch.log1p(torch.exp(-x)),
        log1p_exp_inputs,
    ),
    "exp_times_noise": (
        genfast_exp_times_noise,
        lambda x: _kernel_noise(x.numel()) * torch.exp(x),
        lambda x: _kernel_noise(x.numel()).double() * torch.exp(x),
        exp_inputs,
    ),
    "softplus": (
        genfast_softplus,
        torch.nn.functional.softplus,
        torch.nn.functional.softplus,
        softplus_inputs,
    ),
}


def check(name: str) -> str:
    ours, torchs, exact, inputs = FUNCTIONS[name]
    x = inputs()
    value, eager, truth = ours(x), torchs(x), exact(x.double())
    finite = truth.float().isfinite()
    assert torch.equal(value[~finite].isnan(), truth[~finite].isnan()), name
    assert torch.equal(value[~finite & ~truth.isnan()], truth[~finite & ~truth.isnan()].float()), name
    ours_ulps, eager_ulps = ulps(value[finite], truth[finite]), ulps(eager[finite], truth[finite])
    worst = int(ours_ulps.argmax())
    limit = 2 * max(float(eager_ulps.max()), 0.5)
    assert limit < float("inf"), f"{name}: PyTorch's error is unbounded on these inputs: no limit to check"
    assert float(ours_ulps.max()) <= limit, (
        f"{name}: {float(ours_ulps.max()):.2f} ulp at x = {float(x[finite][worst])!r}, "
        f"PyTorch's float32 {float(eager_ulps.max()):.2f} ulp"
    )
    return f"{name}: max {float(ours_ulps.max()):.2f} ulp, PyTorch {float(eager_ulps.max()):.2f} ulp"


def check_noise() -> str:
    """The CPU's Box-Muller (inline log, sin, cos) against float64 from the same uniforms and float32
    angle, in float32 ulps of the radius (sin and cos near 0 carry no relative accuracy in either):
    at most twice the error of PyTorch's float32 evaluation (genfast.reference.philox_normal)."""
    from genfast import reference

    n, seed = 1 << 20, int(_NOISE_STATE[0])
    groups = torch.arange((n + 3) // 4)
    uniform = [
        ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24 for bits in reference.philox_bits(seed, 0, groups)
    ]
    exact, radii = [], []
    for radius_u, angle_u in (uniform[0:2], uniform[2:4]):
        radius = torch.sqrt(-2.0 * torch.log(radius_u.double()))
        angle = (6.283185307179586 * angle_u).double()  # rounded to float32, as every CPU evaluation does
        exact += [radius * torch.cos(angle), radius * torch.sin(angle)]
        radii += [radius, radius]
    exact, radius = (torch.stack(t, dim=1).reshape(-1)[:n] for t in (exact, radii))
    spacing = (torch.nextafter(radius.float(), torch.tensor(float("inf"))) - radius.float()).double()
    ours = float(((_kernel_noise(n).double() - exact).abs() / spacing).max())
    eager = float(((reference.philox_normal(seed, 0, n).double() - exact).abs() / spacing).max())
    assert ours <= 2 * max(eager, 0.5), f"noise: {ours:.2f} ulp of the radius, PyTorch's float32 {eager:.2f}"
    return f"noise: max {ours:.2f} ulp of the radius, PyTorch {eager:.2f}"


_CHILD = """
import sys
from tests.test_cpu_math import check
print(check(sys.argv[1]))
"""


@pytest.mark.parametrize("capability", _supported_capabilities())
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_float_math_within_twice_pytorchs_error_over_the_whole_range(name, capability):
    print(capability, run_pinned(capability, _CHILD, name).strip())


@pytest.mark.parametrize("capability", _supported_capabilities())
def test_noise_within_twice_pytorchs_error(capability):
    print(capability, run_pinned(capability, _NOISE_CHILD).strip())


_NOISE_CHILD = """
from tests.test_cpu_math import check_noise
print(check_noise())
"""
