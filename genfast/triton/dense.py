"""Triton backend of the fused dense layer (contract in csrc/dense/dense.h).

Forward: z = x @ weight^T + bias, y = act(z), one GEMM with bias and activation in its epilogue,
which also writes what backward needs (genfast.activations says what): the packed bit mask of z > 0
(relu, leaky_relu), or z itself.
Backward: dz = grad_y * act'(saved) and grad_bias = sum_i dz[i] in one pass (per-block partial sums
reduced in a fixed order: deterministic, no atomics), then grad_x = dz @ weight and
grad_weight = dz^T @ x with the same GEMM kernel, transposes expressed as strides (no copies).
Bytes moved (e bytes per element, B = M * mask_row_bytes(N)): forward reads x, weight, bias and writes y,
e(MK + NK + N + MN), plus B mask bytes or e*MN for z; the epilogue adds no pass over y. Backward reads
grad_y and saved (B or e*MN) and writes dz (e*MN, skipped for "none"), then the GEMMs read dz, weight
and x and write grad_x (e*MK) and grad_weight (e*NK).
GEMMs accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use TF32 when
torch.backends.cuda.matmul.allow_tf32 is set, IEEE fp32 otherwise. The activation math is
genfast.triton.activations'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from genfast.activations import mask_row_bytes
from genfast.triton._math import INTERPRETED, math_scalar, math_type
from genfast.triton.activations import (
    LEAKY_RELU,
    MISH,
    NONE,
    SAVES_MASK,
    SAVES_OUTPUT,
    SAVES_PREACT,
    SOFTPLUS,
    act_derivative,
    act_forward,
    mask_bit,
    saves_code,
)

# Tiles by operand kind: tensor-core MMA (fp16, bf16, tf32), IEEE fp32 (FMA) and fp64 (DMMA). At most 64
# accumulator registers a thread (BLOCK_M * BLOCK_N / (32 * num_warps), twice that for fp64), so an
# epilogue that holds z and y at once still fits in 255 registers: 128-register tiles spill there. fp64
# tiles are small enough for sm_80's 163 KB of shared memory at 3 stages. tests/test_triton_compiled.py
# compiles each for sm_80 and sm_90 and checks both. Operands with a size or stride not divisible by 16
# (loads that cannot be vectorized or copied asynchronously) spilled at those tiles: they take one small
# tile, by rule. The longest epilogues (softplus's log1p, mish) hold more temporaries a value: with MMA
# operands they take tiles of 8 warps (32 accumulator registers a thread but for the largest), as the 4-warp
# 4-stage ones spilled on sm_90.
_HEAVY_EPILOGUES = (SOFTPLUS.value, MISH.value)
_TILES = {
    "mma": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
    "mma_heavy_epilogue": [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    "ieee": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],  # FMA: operands in registers too
    "fp64": [(64, 64, 16, 8, 3), (32, 64, 16, 4, 3)],
    "unaligned": [(64, 64, 16, 4, 3)],
}


def _config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    m, n, k, warps, stages = tile
    return triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


def _operand_kind(args: dict, precision: str, act: int) -> str:
    dtype = args["a_ptr"].dtype
    if dtype == torch.float64:
        return "fp64"
    if not args["aligned"]:
        return "unaligned"
    if dtype == torch.float32 and precision == "ieee":
        return "ieee"
    return "mma_heavy_epilogue" if act in _HEAVY_EPILOGUES else "mma"


def _aligned(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """Whether a (M, K) @ b (K, N) -> out loads and stores vectorize as Triton specializes them: every operand
    16-byte aligned, K, N and every stride 1 or divisible by 16 (M only bounds rows: it does not count)."""
    sizes = (a.shape[1], b.shape[1], *a.stride(), *b.stride(), *out.stride())
    return all(t.data_ptr() % 16 == 0 for t in (a, b, out)) and all(
        size % 16 == 0 or size == 1 for size in sizes
    )


def _configs() -> list[triton.Config]:
    # The interpreter can't time kernels (no device benchmarker): one config, small tiles.
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    return list(dict.fromkeys(_config(tile) for tiles in _TILES.values() for tile in tiles))


def _configs_for_operands(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's candidates for this launch: the tiles of its operand kind."""
    if len(configs) == 1:  # the interpreter's
        return configs
    kind = _operand_kind(named_args, kwargs["PRECISION"], kwargs["ACT"])
    tiles = {_config(tile) for tile in _TILES[kind]}
    return [config for config in configs if config in tiles]


# Tuned per power-of-two bucket of each size, per operand layout and alignment (the *_bucket, *_k_major and
# aligned arguments, read by the autotuner only) and per precision (the dtypes are part of every key): a new
# batch size within a bucket neither times configs again nor, first seen inside CUDA-graph capture, fails
# there; an unaligned launch never leaves its small tile to the aligned launches of its bucket.
@triton.autotune(
    configs=_configs(),
    key=["m_bucket", "n_bucket", "k_bucket", "a_k_major", "b_k_major", "aligned", "PRECISION"],
    prune_configs_by={"early_config_prune": _configs_for_operands},
)
# The tuning keys and the bias flag are plain values, not specialized (Triton would compile a variant per
# value equal to 1 or divisible by 16).
@triton.jit(
    do_not_specialize=["m_bucket", "n_bucket", "k_bucket", "a_k_major", "b_k_major", "aligned", "has_bias"]
)
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    z_ptr,
    mask_ptr,
    M,
    N,
    K,
    n_grid,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    row_bytes,
    slope: tl.float64,
    m_bucket,
    n_bucket,
    k_bucket,
    a_k_major,
    b_k_major,
    aligned,
    has_bias,
    ACT: tl.constexpr,
    SAVES: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c (M, N) = act(a (M, K) @ b (K, N) + bias) with any strides; z and mask bits written per SAVES.

    The grid covers n_grid >= N columns: with a mask, the whole padded mask row.
    """
    # Grouped order: GROUP_M row-blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(n_grid, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % per_group) % group_size).to(tl.int64)
    pid_n = ((pid % per_group) // group_size).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # Column blocks past N exist only to write the mask row's zero padding: they skip the K loop.
    k_end = tl.where(pid_n * BLOCK_N < N, K, 0)
    for k in range(0, k_end, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < K - k) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # The bias as a masked load, not a branch: without one nothing is read and 0 added, and acc is never
    # held twice across a branch (which made tf32 tiles spill).
    acc += tl.load(bias_ptr + cols, mask=(cols < N) & (has_bias != 0), other=0.0).to(ACC)[None, :]
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    y = act_forward(acc, math_scalar(slope, ACC), ACT)
    tl.store(c_ptr + offsets, y.to(c_ptr.dtype.element_ty), mask=inside)
    if SAVES == SAVES_PREACT:
        tl.store(z_ptr + offsets, acc.to(z_ptr.dtype.element_ty), mask=inside)
    if SAVES == SAVES_MASK:
        # Out-of-range columns hold z = 0, so their bits (the row padding) come out 0.
        bits = tl.reshape(mask_bit(acc, ACT).to(tl.int32), (BLOCK_M, BLOCK_N // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        byte = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        tl.store(
            mask_ptr + rows[:, None] * row_bytes + byte[None, :],
            packed,
            mask=(rows[:, None] < M) & (byte[None, :] < row_bytes),
        )


@triton.jit
def _dz_kernel(
    g_ptr,
    s_ptr,
    dz_ptr,
    partial_ptr,
    M,
    N,
    row_bytes,
    slope: tl.float64,
    ACT: tl.constexpr,
    SAVES: tl.constexpr,
    STORE_DZ: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz = g * act'(saved) over ROWS rows; the column sums of those rows go to partial[pid_m]."""
    # One grid axis (axis 0 takes 2^31 - 1 programs; axes 1 and 2 only 65535): column block fastest.
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for r in range(0, ROWS, BLOCK_M):
        rows = pid_m * ROWS + r + tl.arange(0, BLOCK_M)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None] * N + cols[None, :]
        dz = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(ACC)
        if SAVES == SAVES_MASK:
            byte = tl.load(s_ptr + rows[:, None] * row_bytes + cols[None, :] // 8, mask=inside, other=0)
            passes = ((byte >> (cols[None, :] % 8).to(tl.uint8)) & 1) != 0
            if ACT == LEAKY_RELU:  # dz * slope, not a select of the slope: that would round it to fp32
                dz = tl.where(passes, dz, dz * math_scalar(slope, ACC))
            else:
                dz = tl.where(passes, dz, 0.0)
        if SAVES == SAVES_OUTPUT or SAVES == SAVES_PREACT:
            dz *= act_derivative(tl.load(s_ptr + offsets, mask=inside, other=0.0).to(ACC), ACT)
        if STORE_DZ:
            tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=inside)
        if REDUCE:
            col_sum += tl.sum(dz, axis=0)
    if REDUCE:
        tl.store(partial_ptr + pid_m * N + cols, col_sum, mask=cols < N)


def _matmul(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    bias: Tensor | None = None,
    act: int = NONE,
    slope: float = 0.0,
    z: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """out = act(a @ b + bias) for 2-D views a (M, K), b (K, N) with any strides; fills z / mask if given."""
    (m, k), n = a.shape, b.shape[1]
    if out.numel() == 0:
        return out
    row_bytes = mask_row_bytes(n)
    cols = row_bytes * 8 if mask is not None else n
    fp32 = a.dtype == torch.float32
    precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    acc = math_type(a.dtype)
    saves = SAVES_MASK if mask is not None else SAVES_PREACT if z is not None else 0
    _matmul_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)](
        a,
        b,
        out,
        out if bias is None else bias,
        z,
        mask,
        m,
        n,
        k,
        cols,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        row_bytes,
        slope,
        *map(triton.next_power_of_2, (m, n, k)),
        int(a.stride(1) == 1),
        int(b.stride(0) == 1),
        int(_aligned(a, b, out)),
        int(bias is not None),
        ACT=act,
        SAVES=saves,
        PRECISION=precision,
        ACC=acc,
    )
    return out


def dense_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act_code: int, slope: float
) -> tuple[Tensor, Tensor]:
    """y = act(x (M, K) @ weight (N, K)^T + bias (N,)), and aux: mask bits, z, or an empty tensor."""
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty((m, n))
    saves = saves_code(act_code)
    mask = x.new_empty((m, mask_row_bytes(n)), dtype=torch.uint8) if saves == SAVES_MASK else None
    z = x.new_empty((m, n)) if saves == SAVES_PREACT else None
    _matmul(x, weight.t(), y, bias, act_code, slope, z, mask)
    aux = mask if mask is not None else z if z is not None else x.new_empty(0)
    return y, aux


def dense_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act_code: int,
    slope: float,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x (M, K), grad_weight (N, K), grad_bias (N,) from dz = grad_y * act'(saved).

    Each gradient not needed comes back as an empty tensor of its own (a custom op's outputs may not alias).
    """
    m, n = grad_y.shape
    saves = saves_code(act_code)
    store_dz = saves != 0 and (need_x or need_w)
    dz = grad_y.new_empty((m, n)) if store_dz else grad_y  # dz is grad_y itself for "none"
    grad_b = x.new_zeros(n) if need_b else x.new_empty(0)
    if (store_dz or need_b) and m * n > 0:
        # fp64 takes half the rows a step: mish's derivative on 32 x 64 fp64 values spilled (255 registers).
        rows, block_m, block_n = 256, 16 if x.dtype == torch.float64 else 32, 64
        acc = math_type(x.dtype)
        partial = (
            x.new_empty(
                (triton.cdiv(m, rows), n), dtype=torch.float64 if acc == tl.float64 else torch.float32
            )
            if need_b
            else None
        )
        _dz_kernel[(triton.cdiv(m, rows) * triton.cdiv(n, block_n),)](
            grad_y,
            saved if saves else None,
            dz,
            partial,
            m,
            n,
            mask_row_bytes(n),
            slope,
            ACT=act_code,
            SAVES=saves,
            STORE_DZ=store_dz,
            REDUCE=need_b,
            ACC=acc,
            ROWS=rows,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
        if need_b:
            # torch's sum over dim 0 is a fixed-order tree reduction: deterministic.
            grad_b = partial.sum(0).to(x.dtype)
    grad_x = _matmul(dz, weight, x.new_empty(x.shape)) if need_x else x.new_empty(0)
    grad_w = _matmul(dz.t(), x, weight.new_empty(weight.shape)) if need_w else x.new_empty(0)
    return grad_x, grad_w, grad_b
