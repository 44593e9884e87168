"""Triton backend of the fused losses (contract and math in csrc/losses/losses.h).

ELBO: one program per row computes the row's reconstruction and KL sums (terms in fp32, summed in fp64
to match the accuracy of eager's CPU sums) and writes the row's gradients; reductions "mean"/"sum" then
take one single-program launch that adds the per-row sums in fp64 in index order. GAN (terms in fp64: a
scalar loss of a few logits is then correctly rounded, where fp32 terms would leave its last bit to
chance): one program per block of elements writes the gradients and the block's partial sums (or, for "none", each
element's loss); the same finishing launch adds the partials. Two launches at most, no atomics: the
same bits run to run.
Bytes as in losses.h, plus 16 bytes per row (ELBO) or per block (GAN) of fp64 partial sums.
exp, log1p and expm1 are genfast.triton._math's: accurate when compiled (unlike tl.exp/tl.log), log1p and
expm1 Kahan's forms, accurate near 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from genfast.loss_terms import RECON_LOSSES, REDUCTIONS, TERMS
from genfast.triton._math import INTERPRETED, exp, expm1, log1p, math_scalar, math_type

# Globals read inside kernels must be tl.constexpr for the compiler.
_RECON_BCE = tl.constexpr(RECON_LOSSES["bce"])
_BCE, _HINGE, _SQUARE = (tl.constexpr(TERMS[n]) for n in ("bce", "hinge", "square"))
_NONE, _MEAN = REDUCTIONS["none"], REDUCTIONS["mean"]
# Fixed block widths, whatever the sizes: one compiled variant per dtype and flags (tests compile them all).
# A GAN block of 1024 fp64 elements over 4 warps keeps both terms' math in registers (4096 spilled ~12 KB).
_MAX_BLOCK = 128 if INTERPRETED else 1024  # the interpreter is slow with wide blocks
_GAN_BLOCK = 1024


@triton.jit
def _relu(x):
    return tl.where(x < 0.0, 0.0, x)  # NaN stays NaN


@triton.jit
def _bce(x, t):
    """Loss (1 - t) x + relu(-x) + log1p(exp(-|x|)) (PyTorch's form, its NaN at infinite logits too) and
    its derivative sigmoid(x) - t."""
    e = exp(-tl.abs(x))
    sigmoid = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)
    return (1.0 - t) * x + _relu(-x) + log1p(e), sigmoid - t


@triton.jit
def _gan_term(x, p, TERM: tl.constexpr):
    """Term f(x; p) of losses.h and its derivative; a NaN x gives a NaN derivative."""
    if TERM == _BCE:
        loss, grad = _bce(x, p)
    elif TERM == _HINGE:
        h = 1.0 + p * x
        loss, grad = _relu(h), tl.where(h > 0.0, p, 0.0)
    elif TERM == _SQUARE:
        loss, grad = 0.5 * (x - p) * (x - p), x - p
    else:
        loss, grad = p * x, tl.zeros_like(x) + p
    return loss, tl.where(x != x, x, grad)


@triton.jit
def _elbo_row_kernel(
    x_ptr,
    t_ptr,
    mu_ptr,
    lv_ptr,
    gx_ptr,
    gmu_ptr,
    glv_ptr,
    loss_ptr,
    r_ptr,
    k_ptr,
    D,
    L,
    beta: tl.float64,
    t_scale: tl.float64,
    g_scale: tl.float64,
    RECON: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Row pid: its sums r and k (to loss/r/k in the dtype if PER_SAMPLE, else to fp64 r/k), gradients."""
    row = tl.program_id(0).to(tl.int64)
    r_acc = tl.zeros((BLOCK_D,), dtype=tl.float64)  # sums in fp64: eager's accuracy on long rows
    for j in range(0, D, BLOCK_D):
        cols = j + tl.arange(0, BLOCK_D)
        inside = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0).to(ACC)
        t = tl.load(t_ptr + row * D + cols, mask=inside, other=0).to(ACC) * math_scalar(t_scale, ACC)
        if RECON == _RECON_BCE:
            loss, grad = _bce(x, t)
        else:  # in fp64, where the difference of two fp32 values and its square are (nearly) exact
            d = x.to(tl.float64) - t.to(tl.float64)
            loss, grad = d * d, 2.0 * d
        r_acc += tl.where(inside, loss, 0.0).to(tl.float64)
        if NEED_GRAD:
            tl.store(
                gx_ptr + row * D + cols,
                (grad * math_scalar(g_scale, ACC)).to(gx_ptr.dtype.element_ty),
                mask=inside,
            )
    k_acc = tl.zeros((BLOCK_L,), dtype=tl.float64)
    for j in range(0, L, BLOCK_L):
        cols = j + tl.arange(0, BLOCK_L)
        inside = cols < L
        # In fp64: latent rows are short, and fp32 terms would leave the KL's last bit to chance.
        mu = tl.load(mu_ptr + row * L + cols, mask=inside, other=0.0).to(tl.float64)
        lv = tl.load(lv_ptr + row * L + cols, mask=inside, other=0.0).to(tl.float64)
        em1 = expm1(lv)
        k_acc += em1 - lv + mu * mu  # 0 outside the row
        if NEED_GRAD:
            tl.store(gmu_ptr + row * L + cols, (mu * g_scale).to(gmu_ptr.dtype.element_ty), mask=inside)
            tl.store(
                glv_ptr + row * L + cols, (0.5 * em1 * g_scale).to(glv_ptr.dtype.element_ty), mask=inside
            )
    r = tl.sum(r_acc, axis=0)
    k = 0.5 * tl.sum(k_acc, axis=0)
    if PER_SAMPLE:
        tl.store(loss_ptr + row, (r + beta * k).to(loss_ptr.dtype.element_ty))
        tl.store(r_ptr + row, r.to(r_ptr.dtype.element_ty))
        tl.store(k_ptr + row, k.to(k_ptr.dtype.element_ty))
    else:
        tl.store(r_ptr + row, r)
        tl.store(k_ptr + row, k)


@triton.jit
def _gan_kernel(
    x0_ptr,
    x1_ptr,
    g0_ptr,
    g1_ptr,
    out_ptr,
    part0_ptr,
    part1_ptr,
    N0,
    N1,
    p0: tl.float64,
    p1: tl.float64,
    c0: tl.float64,
    c1: tl.float64,
    TERM0: tl.constexpr,
    TERM1: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    PER_ELEMENT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Block pid of both tensors: gradients, and each element's loss (PER_ELEMENT) or the block's sums."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in0, in1 = offs < N0, offs < N1
    f0, d0 = _gan_term(tl.load(x0_ptr + offs, mask=in0, other=0.0).to(ACC), p0, TERM0)
    f1, d1 = _gan_term(tl.load(x1_ptr + offs, mask=in1, other=0.0).to(ACC), p1, TERM1)
    f0, f1 = tl.where(in0, f0, 0.0), tl.where(in1, f1, 0.0)
    if NEED_GRAD:
        tl.store(g0_ptr + offs, (d0 * c0).to(g0_ptr.dtype.element_ty), mask=in0)
        tl.store(g1_ptr + offs, (d1 * c1).to(g1_ptr.dtype.element_ty), mask=in1)
    if PER_ELEMENT:
        tl.store(out_ptr + offs, (f0 + f1).to(out_ptr.dtype.element_ty), mask=in0)
    else:
        tl.store(part0_ptr + pid, tl.sum(f0.to(tl.float64), axis=0))
        tl.store(part1_ptr + pid, tl.sum(f1.to(tl.float64), axis=0))


@triton.jit
def _finish_kernel(
    a_ptr,
    b_ptr,
    n,
    out0_ptr,
    out1_ptr,
    out2_ptr,
    wa: tl.float64,
    wb: tl.float64,
    w1: tl.float64,
    w2: tl.float64,
    OUTPUTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: S_a = sum a, S_b = sum b in fp64, index order; out0 = wa S_a + wb S_b and, for three
    outputs, out1 = w1 S_a and out2 = w2 S_b (each term alone: an infinite S_b must not make out1 0 * inf)."""
    sum_a = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_b = tl.zeros((BLOCK,), dtype=tl.float64)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        sum_a += tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
        sum_b += tl.load(b_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
    s_a, s_b = tl.sum(sum_a, axis=0), tl.sum(sum_b, axis=0)
    tl.store(out0_ptr, (wa * s_a + wb * s_b).to(out0_ptr.dtype.element_ty))
    if OUTPUTS == 3:
        tl.store(out1_ptr, (w1 * s_a).to(out1_ptr.dtype.element_ty))
        tl.store(out2_ptr, (w2 * s_b).to(out2_ptr.dtype.element_ty))


def _finish(
    a: Tensor, b: Tensor, weights: tuple[float, float], terms: tuple[float, float] | None, dtype: torch.dtype
) -> list[Tensor]:
    """[wa sum(a) + wb sum(b)], plus [w1 sum(a), w2 sum(b)] for terms (w1, w2): 0-d tensors in `dtype`."""
    out = [a.new_empty((), dtype=dtype) for _ in range(1 if terms is None else 3)]
    _finish_kernel[(1,)](
        a, b, a.numel(), *(out * 3)[:3], *weights, *(terms or (0.0, 0.0)), OUTPUTS=len(out), BLOCK=_MAX_BLOCK
    )
    return out


def losses_elbo_forward(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float,
    recon_kind: int,
    reduction: int,
    target_scale: float,
    need_grad: bool,
):
    (b, d), latent = recon.shape, mu.shape[1]
    per_sample = reduction == _NONE
    g_scale = 1.0 / b if reduction == _MEAN else 1.0
    grads = [t.new_empty(t.shape if need_grad else (0,)) for t in (recon, mu, logvar)]
    if per_sample:
        loss, r, k = (recon.new_empty(b) for _ in range(3))
    else:
        loss, (r, k) = None, (recon.new_empty(b, dtype=torch.float64) for _ in range(2))
    if b > 0:
        _elbo_row_kernel[(b,)](
            recon,
            target,
            mu,
            logvar,
            *grads,
            loss,
            r,
            k,
            d,
            latent,
            beta,
            target_scale,
            g_scale,
            RECON=recon_kind,
            NEED_GRAD=need_grad,
            PER_SAMPLE=per_sample,
            ACC=math_type(recon.dtype),
            BLOCK_D=_MAX_BLOCK,
            BLOCK_L=_MAX_BLOCK,
        )
    if not per_sample:
        loss, r, k = _finish(r, k, (g_scale, beta * g_scale), (g_scale, g_scale), recon.dtype)
    return (loss, r, k, *grads)


def losses_gan_forward(
    first: Tensor,
    second: Tensor,
    term0: int,
    param0: float,
    term1: int,
    param1: float,
    reduction: int,
    need_grad: bool,
):
    n0, n1 = first.numel(), second.numel()
    per_element = reduction == _NONE
    scales = [1.0 / n if reduction == _MEAN and n else 1.0 for n in (n0, n1)]
    grads = [t.new_empty(t.shape if need_grad else (0,)) for t in (first, second)]
    blocks = triton.cdiv(max(n0, n1), _GAN_BLOCK)
    out = first.new_empty(first.shape) if per_element else None
    partial = [first.new_empty(blocks, dtype=torch.float64) for _ in range(2)]
    if blocks:
        _gan_kernel[(blocks,)](
            first,
            second,
            *grads,
            out,
            *partial,
            n0,
            n1,
            param0,
            param1,
            *scales,
            TERM0=term0,
            TERM1=term1,
            NEED_GRAD=need_grad,
            PER_ELEMENT=per_element,
            ACC=tl.float64,
            BLOCK=_GAN_BLOCK,
        )
    if not per_element:
        out = _finish(*partial, tuple(scales), None, first.dtype)[0]
    return (out, *grads)
