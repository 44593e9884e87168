"""Triton backend of reparameterization sampling and the Gaussian KL (contract in csrc/reparam/reparam.h).

Noise: eps[i] = lane i % 4 of the four Box-Muller normals of one Philox4x32-10 call with key = seed and
counter = (offset_lo, offset_hi, g_lo, g_hi), g = i // 4 (csrc/common/philox.h). tl.philox takes the key
low word first and runs the rounds of at::Philox4_32, so every backend draws the same bits. rng_state =
(seed, offset = 0) comes from genfast.rng.new_rng_state: a fresh seed per forward, drawn on the
device by torch.randint. The kernels load seed and offset from that tensor: no host sync, and a CUDA
graph replays with whatever the tensor holds. Backward draws eps again from rng_state.

Kernels (e = bytes per element of mu's dtype, n = numel, r = rows; math in fp32, fp64 for fp64 inputs;
eps itself is always fp32):
  _sample_kernel       z = mu + exp(0.5 logvar) eps, or (backward) grad_logvar = 0.5 grad_z eps
                       exp(0.5 logvar). A program takes BLOCK Philox groups (4 BLOCK elements).
                                                                             reads 2en, writes en.
  _kl_rows_kernel      kl[r] = 0.5 sum_j (expm1(logvar) - logvar + mu^2); with SAMPLE, z as above in the
                       same pass (reparam_kl_forward). A program takes BLOCK_R rows.
                                                                             reads 2en, writes 8r (+ en).
  _kl_backward_kernel  grad_mu = g[r] mu, grad_logvar = 0.5 g[r] expm1(logvar).
                                                                             reads 2en + 8r, writes 2en.
  _sample_kl_backward_kernel  both of those plus the sampling gradient (grad_mu + grad_z, grad_logvar +
                       0.5 grad_z eps exp(0.5 logvar)), rounded once; in the steps of _kl_rows_kernel.
                                                                             reads 3en + 8r, writes 2en.
Configs by rule, no autotuning: these kernels are memory-bound, every config gives the same bits, and
a first call under CUDA-graph capture (or at a new size) must not stop to time candidates: a sample
program takes _SAMPLE_BLOCK groups, a row program the most rows (<= 128) whose tile of WIDTH-wide steps
holds <= _MAX_TILE elements (a quarter of that for fp64), with 8 warps for the largest tiles
(registers), else 4.
KL sums, the same bits whatever the config: a row is read in steps of WIDTH elements
aligned to Philox groups (WIDTH depends on the row length only), lane l of the step accumulating its
elements in row order in fp64, then the WIDTH lanes are added by a fixed pairwise tree of single adds.
Neither BLOCK_R nor num_warps changes the order, so the config cannot change the bits; tl.sum would
reduce in an order that follows the layout. Terms are in
the math type, the sum in fp64 and kl is fp64 for every input dtype (reparam.h says why). No atomics.
exp, log, sinpi and cospi are genfast.triton._math's: CUDA's own (libdevice) when compiled, so eps has the
CUDA kernel's values; expm1 is _math's too (Kahan's form, where exp(x) - 1 would cancel near 0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from genfast.loss_terms import KL_ROWS_DTYPE
from genfast.rng import new_rng_state
from genfast.triton._math import cospi, exp, expm1, log, math_type, sinpi

_LOG2_MAX_WIDTH = 7  # a row kernel's step covers at most 128 elements of a row (32 Philox groups)
_MAX_TILE = 4096  # elements of a row kernel's (BLOCK_R, WIDTH) tile
_MAX_ROWS = 128  # rows of a row kernel's program
_SAMPLE_BLOCK, _SAMPLE_WARPS = 256, 4  # Philox groups (4 elements each) of a sample program; its warps


def _row_block(log2_width: int, dtype: torch.dtype, max_tile: int = _MAX_TILE) -> tuple[int, int]:
    """(rows per program, warps) of a row kernel whose steps are 2^log2_width wide: short rows get many
    rows per program, long rows few; 8 warps where the tile is largest. Tiles hold at most max_tile
    elements, a quarter of that for fp64 (fp64 math at _MAX_TILE spilled registers)."""
    max_tile = max_tile // 4 if dtype == torch.float64 else max_tile
    rows = min(_MAX_ROWS, max_tile >> log2_width)
    return rows, 8 if rows << log2_width >= max_tile else 4


@triton.jit
def _uniform(bits):
    """((bits >> 8) + 0.5) 2^-24 in fp32: in (0, 1], never 0 (the log below stays finite)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _box_muller(radius_u, angle_u):
    radius = tl.sqrt_rn(-2.0 * log(radius_u))  # sqrt_rn: tl.sqrt may be approximate on the GPU
    half_turns = 2.0 * angle_u  # cos(2 pi u) = cospi(2 u): an exact argument, as in csrc/common/philox.h
    return radius * cospi(half_turns), radius * sinpi(half_turns)


@triton.jit
def _philox_bits(state_ptr, groups):
    """Philox4x32-10 of Philox groups (int64, any shape): key = seed, counter = (offset, group), the
    64-bit values as (low, high) words; seed and offset loaded from rng_state."""
    seed = tl.load(state_ptr)
    offset = tl.load(state_ptr + 1)
    zero = (groups * 0).to(tl.uint32)
    return tl.philox(
        seed,
        zero + (offset & 0xFFFFFFFF).to(tl.uint32),
        zero + (offset >> 32).to(tl.uint32),
        (groups & 0xFFFFFFFF).to(tl.uint32),
        (groups >> 32).to(tl.uint32),
    )


@triton.jit
def _normals(state_ptr, groups):
    """The fp32 eps of Philox groups (int64, any shape): shape groups.shape + (2, 2), [..., j, p] being
    eps[4 g + 2 j + p], so a reshape merging the last three axes lists the elements in order."""
    bits0, bits1, bits2, bits3 = _philox_bits(state_ptr, groups)
    n0, n1 = _box_muller(_uniform(bits0), _uniform(bits1))
    n2, n3 = _box_muller(_uniform(bits2), _uniform(bits3))
    return tl.join(tl.join(n0, n2), tl.join(n1, n3))


@triton.jit
def _z(mu, logvar, eps):
    """The sample; one expression for both kernels that draw z, so both compile it alike (FMA or not)."""
    return mu + exp(0.5 * logvar) * eps


@triton.jit
def _sample_kernel(
    a_ptr, lv_ptr, out_ptr, state_ptr, n, BACKWARD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """Groups [pid BLOCK, (pid + 1) BLOCK): out = a + exp(0.5 lv) eps (a = mu), or with BACKWARD
    out = 0.5 a eps exp(0.5 lv) (a = grad_z)."""
    groups = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = 4 * groups[:, None] + tl.arange(0, 4)[None, :]
    inside = offs < n
    eps = tl.reshape(_normals(state_ptr, groups), (BLOCK, 4)).to(ACC)
    a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(ACC)
    lv = tl.load(lv_ptr + offs, mask=inside, other=0.0).to(ACC)
    if BACKWARD:
        out = 0.5 * a * eps * exp(0.5 * lv)
    else:
        out = _z(a, lv, eps)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _kl_rows_kernel(
    mu_ptr,
    lv_ptr,
    z_ptr,
    kl_ptr,
    state_ptr,
    rows,
    cols,
    steps,
    SAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    LOG2_WIDTH: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows [pid BLOCK_R, (pid + 1) BLOCK_R): kl, and z with SAMPLE. Step s of row r covers the groups
    first_r + s WIDTH / 4 + [0, WIDTH / 4), first_r = (r cols) // 4, of which only row r's elements count
    (a group cut by a row boundary is drawn by both rows, each writing its own elements)."""
    WIDTH: tl.constexpr = 2**LOG2_WIDTH
    GROUPS_W: tl.constexpr = WIDTH // 4
    rows_here = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    lo = rows_here * cols
    hi = tl.where(rows_here < rows, lo + cols, lo)  # rows past the end hold no element
    first = lo // 4
    acc = tl.zeros((BLOCK_R, WIDTH), dtype=tl.float64)
    for step in range(0, steps):
        groups = first + step * GROUPS_W
        offs = 4 * groups[:, None] + tl.arange(0, WIDTH)[None, :]
        inside = (offs >= lo[:, None]) & (offs < hi[:, None])
        mu = tl.load(mu_ptr + offs, mask=inside, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + offs, mask=inside, other=0.0).to(ACC)
        acc += tl.where(inside, (expm1(lv) - lv) + mu * mu, 0.0).to(tl.float64)
        if SAMPLE:
            step_groups = groups[:, None] + tl.arange(0, GROUPS_W)[None, :]
            eps = tl.reshape(_normals(state_ptr, step_groups), (BLOCK_R, WIDTH)).to(ACC)
            tl.store(z_ptr + offs, _z(mu, lv, eps).to(z_ptr.dtype.element_ty), mask=inside)
    for _ in tl.static_range(LOG2_WIDTH):  # the fixed pairwise tree: lanes (2k, 2k + 1) at each level
        left, right = tl.split(tl.reshape(acc, (BLOCK_R, acc.shape[1] // 2, 2)))
        acc = left + right
    kl = 0.5 * tl.reshape(acc, (BLOCK_R,))
    tl.store(kl_ptr + rows_here, kl.to(kl_ptr.dtype.element_ty), mask=rows_here < rows)


@triton.jit
def _kl_backward_kernel(
    g_ptr,
    mu_ptr,
    lv_ptr,
    gmu_ptr,
    glv_ptr,
    rows,
    cols,
    ACC: tl.constexpr,
    LOG2_WIDTH: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows [pid BLOCK_R, (pid + 1) BLOCK_R), 2^LOG2_WIDTH columns a step: no per-element division."""
    WIDTH: tl.constexpr = 2**LOG2_WIDTH
    rows_here = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_inside = rows_here < rows
    g = tl.load(g_ptr + rows_here, mask=row_inside, other=0.0).to(ACC)[:, None]
    for start in range(0, cols, WIDTH):
        col = start + tl.arange(0, WIDTH)
        offs = rows_here[:, None] * cols + col[None, :]
        inside = row_inside[:, None] & (col < cols)[None, :]
        mu = tl.load(mu_ptr + offs, mask=inside, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + offs, mask=inside, other=0.0).to(ACC)
        tl.store(gmu_ptr + offs, (g * mu).to(gmu_ptr.dtype.element_ty), mask=inside)
        tl.store(glv_ptr + offs, (0.5 * g * expm1(lv)).to(glv_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sample_kl_backward_kernel(
    gz_ptr,
    g_ptr,
    mu_ptr,
    lv_ptr,
    state_ptr,
    gmu_ptr,
    glv_ptr,
    rows,
    cols,
    steps,
    ACC: tl.constexpr,
    LOG2_WIDTH: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows [pid BLOCK_R, (pid + 1) BLOCK_R) in the steps of _kl_rows_kernel (aligned to Philox groups, so
    eps is drawn a group at a time): grad_mu = grad_z + g[r] mu, grad_logvar = 0.5 (grad_z eps
    exp(0.5 logvar) + g[r] expm1(logvar)), each rounded once."""
    WIDTH: tl.constexpr = 2**LOG2_WIDTH
    GROUPS_W: tl.constexpr = WIDTH // 4
    rows_here = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_inside = rows_here < rows
    lo = rows_here * cols
    hi = tl.where(row_inside, lo + cols, lo)
    first = lo // 4
    g = tl.load(g_ptr + rows_here, mask=row_inside, other=0.0).to(ACC)[:, None]
    for step in range(0, steps):
        groups = first + step * GROUPS_W
        offs = 4 * groups[:, None] + tl.arange(0, WIDTH)[None, :]
        inside = (offs >= lo[:, None]) & (offs < hi[:, None])
        gz = tl.load(gz_ptr + offs, mask=inside, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + offs, mask=inside, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + offs, mask=inside, other=0.0).to(ACC)
        step_groups = groups[:, None] + tl.arange(0, GROUPS_W)[None, :]
        eps = tl.reshape(_normals(state_ptr, step_groups), (BLOCK_R, WIDTH)).to(ACC)
        tl.store(gmu_ptr + offs, (gz + g * mu).to(gmu_ptr.dtype.element_ty), mask=inside)
        grad_logvar = 0.5 * (gz * eps * exp(0.5 * lv) + g * expm1(lv))
        tl.store(glv_ptr + offs, grad_logvar.to(glv_ptr.dtype.element_ty), mask=inside)


def _log2(power_of_two: int) -> int:
    return power_of_two.bit_length() - 1


def _launch(
    kernel, programs, rule: tuple[int, int], block: int | None, block_name: str, *args, **constants
) -> None:
    """kernel over programs(block size) programs, block size and warps by `rule`, or at `block` (tests)."""
    size, warps = rule if block is None else (block, rule[1])
    kernel[(programs(size),)](*args, **constants, **{block_name: size}, num_warps=warps)


def _sample(a: Tensor, logvar: Tensor, rng_state: Tensor, backward: bool, block: int | None) -> Tensor:
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        _launch(
            _sample_kernel,
            lambda b: triton.cdiv(n, 4 * b),
            (_SAMPLE_BLOCK, _SAMPLE_WARPS),
            block,
            "BLOCK",
            a,
            logvar,
            out,
            rng_state,
            n,
            BACKWARD=backward,
            ACC=math_type(a.dtype),
        )
    return out


def _row_steps(cols: int) -> tuple[int, int]:
    """(log2 of the step width, steps per row) of the kernels that walk rows in Philox-group-aligned steps."""
    # Groups a row can touch: rows start at phase (r cols) % 4, at most (4 - gcd(cols, 4)) % 4.
    groups = ((4 - math.gcd(cols, 4)) % 4 + cols - 1) // 4 + 1
    groups_w = min(triton.next_power_of_2(groups), 2**_LOG2_MAX_WIDTH // 4)
    return 2 + _log2(groups_w), triton.cdiv(groups, groups_w)


def _kl_rows(
    mu: Tensor, logvar: Tensor, rng_state: Tensor | None, block: int | None
) -> tuple[Tensor, Tensor]:
    """(z or None, kl): the row kernel, sampling when rng_state is given."""
    cols, rows = mu.shape[-1], math.prod(mu.shape[:-1])
    z = torch.empty_like(mu) if rng_state is not None else None
    kl = mu.new_zeros(rows, dtype=KL_ROWS_DTYPE)  # an empty row sums to 0
    if mu.numel():
        log2_width, steps = _row_steps(cols)
        _launch(
            _kl_rows_kernel,
            lambda b: triton.cdiv(rows, b),
            _row_block(log2_width, mu.dtype),
            block,
            "BLOCK_R",
            mu,
            logvar,
            z,
            kl,
            rng_state,
            rows,
            cols,
            steps,
            SAMPLE=rng_state is not None,
            ACC=math_type(mu.dtype),
            LOG2_WIDTH=log2_width,
        )
    return z, kl


def reparam_forward(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None, *, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """z = mu + exp(0.5 logvar) eps in mu's dtype and the int64 (2,) rng_state (seed, offset) of eps.

    mu, logvar: contiguous, same shape, dtype (float16/bfloat16/float32/float64) and device. An empty mu
    draws no seed: rng_state is zeros. block: groups per program instead of the rule's (tests).
    """
    if mu.numel() == 0:
        return torch.empty_like(mu), torch.zeros(2, dtype=torch.int64, device=mu.device)
    rng_state = new_rng_state(mu.device, generator)
    return _sample(mu, logvar, rng_state, False, block), rng_state


def reparam_backward(
    grad_z: Tensor, logvar: Tensor, rng_state: Tensor, *, block: int | None = None
) -> Tensor:
    """grad_logvar = 0.5 grad_z eps exp(0.5 logvar) in logvar's dtype, eps drawn again from rng_state."""
    return _sample(grad_z, logvar, rng_state, True, block)


def kl_forward(mu: Tensor, logvar: Tensor, *, block: int | None = None) -> Tensor:
    """kl (rows,) float64 = 0.5 sum over the last axis of expm1(logvar) - logvar + mu^2; rows = the product
    of the leading sizes. block: rows per program instead of the rule's (tests)."""
    return _kl_rows(mu, logvar, None, block)[1]


def kl_backward(
    grad_kl: Tensor, mu: Tensor, logvar: Tensor, *, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """grad_mu = g[r] mu and grad_logvar = 0.5 g[r] expm1(logvar) in mu's dtype, g = grad_kl (rows,)
    float64 rounded to the math type (as the CUDA kernel does)."""
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    cols, rows = mu.shape[-1], math.prod(mu.shape[:-1])
    if mu.numel():
        log2_width = min(_log2(triton.next_power_of_2(cols)), _LOG2_MAX_WIDTH)
        _launch(
            _kl_backward_kernel,
            lambda b: triton.cdiv(rows, b),
            _row_block(log2_width, mu.dtype),
            block,
            "BLOCK_R",
            grad_kl,
            mu,
            logvar,
            grad_mu,
            grad_logvar,
            rows,
            cols,
            ACC=math_type(mu.dtype),
            LOG2_WIDTH=log2_width,
        )
    return grad_mu, grad_logvar


def reparam_kl_forward(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None, *, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(z, rng_state, kl) in one pass over mu and logvar: z as reparam_forward draws it for rng_state, kl
    with the bits of kl_forward."""
    if mu.numel() == 0:
        return (*reparam_forward(mu, logvar, generator), kl_forward(mu, logvar))
    rng_state = new_rng_state(mu.device, generator)
    z, kl = _kl_rows(mu, logvar, rng_state, block)
    return z, rng_state, kl


def reparam_kl_backward(
    grad_z: Tensor,
    grad_kl: Tensor,
    mu: Tensor,
    logvar: Tensor,
    rng_state: Tensor,
    *,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """grad_mu = grad_z + g[r] mu, grad_logvar = 0.5 (grad_z eps exp(0.5 logvar) + g[r] expm1(logvar)) in
    mu's dtype, eps drawn again from rng_state, g = grad_kl (rows,) float64 rounded to the math type."""
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    cols, rows = mu.shape[-1], math.prod(mu.shape[:-1])
    if mu.numel():
        log2_width, steps = _row_steps(cols)
        # Half the tile of the other row kernels: with 3 inputs, eps and 2 outputs a 4096-element tile
        # took 255 registers and a stack frame (fp32, sm_90).
        _launch(
            _sample_kl_backward_kernel,
            lambda b: triton.cdiv(rows, b),
            _row_block(log2_width, mu.dtype, _MAX_TILE // 2),
            block,
            "BLOCK_R",
            grad_z,
            grad_kl,
            mu,
            logvar,
            rng_state,
            grad_mu,
            grad_logvar,
            rows,
            cols,
            steps,
            ACC=math_type(mu.dtype),
            LOG2_WIDTH=log2_width,
        )
    return grad_mu, grad_logvar
