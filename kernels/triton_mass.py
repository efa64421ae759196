"""Triton attention mass: per key, softmax probability summed over queries, averaged over heads.

Each program keeps one key block in registers, streams the query blocks, recomputes the scaled
logits tile by tile and turns them into probabilities with the row log-sum-exp, so the Nq x Nk map
is never written; extra memory is the (B, H, Nq) LSE. Column sums are divided by H and added
atomically into the fp32 (B, Nk) buffer (one add per head), which is how masses accumulate across
blocks and steps. Without an LSE from the forward, the forward kernel computes it first (no O).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import check_mass_inputs
from kernels.triton_attention import (
    LOG2E,
    attention_forward,
    autotune,
    check_supported,
    key_valid,
    mask_args,
    tile_dot,
)

_LOG2E = tl.constexpr(LOG2E)


@autotune(
    [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
    key=["n_q", "n_k", "HEAD_DIM"],
    restore_value=["OUT"],
)
@triton.heuristics({"HAS_MASK": lambda a: a["MASK"] is not None})
@triton.jit
def _attention_mass_kernel(
    Q,
    K,
    LSE,
    MASK,
    OUT,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mn,
    stride_ob,
    stride_on,
    n_heads,
    n_q,
    n_k,
    qk_scale,
    inv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """OUT[b, keys] += sum over queries of P[b, h, :, keys] / H, for one key block and one head.

    Masked keys are not masked per tile: their column sums are simply never added.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off_b = bh // n_heads
    off_h = bh % n_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=cols[:, None] < n_k, other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_d[None, :] * stride_qd
    lse_base = LSE + off_b * stride_lb + off_h * stride_lh

    mass = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        rows = start_m + offs_m
        in_rows = rows < n_q
        q = tl.load(q_base + rows[:, None] * stride_qm, mask=in_rows[:, None], other=0.0)
        # An infinite LSE on padding rows makes their probabilities exactly 0.
        lse2 = tl.load(lse_base + rows * stride_lm, mask=in_rows, other=float("inf")) * _LOG2E
        pt = tl.exp2(tile_dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        mass += tl.sum(pt, 1)

    if HAS_MASK:
        valid = key_valid(MASK, off_b, cols, stride_mb, stride_mn, n_k)
    else:
        valid = cols < n_k
    tl.atomic_add(OUT + off_b * stride_ob + cols * stride_on, mass * inv_heads, mask=valid)


def _check_mass(
    q: Tensor, k: Tensor, key_mask: Tensor | None, lse: Tensor | None, out: Tensor | None, chunk_size: int
) -> None:
    check_mass_inputs(q, k, key_mask, lse, out, chunk_size)
    check_supported(q)


@torch.no_grad()
def attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    key_mask: Tensor | None = None,
    lse: Tensor | None = None,
    out: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Triton `kernels.reference.attention_mass`: same signature, checks and results.

    chunk_size is only checked: the kernel streams queries a block at a time whatever its value.
    """
    _check_mass(q, k, key_mask, lse, out, chunk_size)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    lse = attention_forward(q, k, None, key_mask)[1] if lse is None else lse.to(torch.float32)
    out = torch.zeros(batch, n_k, device=q.device, dtype=torch.float32) if out is None else out
    mask, stride_mb, stride_mn = mask_args(key_mask)
    grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    _attention_mass_kernel[grid](
        q,
        k,
        lse,
        mask,
        out,
        *q.stride(),
        *k.stride(),
        *lse.stride(),
        stride_mb,
        stride_mn,
        *out.stride(),
        heads,
        n_q,
        n_k,
        LOG2E / math.sqrt(dim),
        1.0 / heads,
        HEAD_DIM=dim,
    )
    return out
