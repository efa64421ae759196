"""Triton cross-attention whose backward multiplies dK and dV by `kv_grad_scale` before storing them.

Forward: online softmax over key blocks, writing O and the row log-sum-exp (LSE, natural log, fp32
(B, H, Nq), so it is what `torch.logsumexp` and `kernels.attention_mass` expect). Backward: a
preprocess for delta = rowsum(dO * O), one kernel over key blocks for dK and dV (scaled in
registers, so the partial stop-gradient costs no pass over memory) and one over query blocks for dQ
(no atomics). The softmax runs in base 2 with log2(e) folded into the scale.

Each loop kernel may split its long loop over a third grid axis when the short side gives too few
programs to fill the GPU (A2V: 126 audio keys against 24576 video queries leaves the dK/dV kernel
with B*H*2 programs). A split writes fp32 partials that a small torch reduction combines; they are
as small as the short side, and without a split the kernels store the final tensors directly.

Any Nq and Nk, head dims 64 and 128, fp32/fp16/bf16 inputs with fp32 accumulation (fp32 dots in
IEEE precision, not TF32). Under TRITON_INTERPRET=1 (read when this module is imported) the kernels
run on CPU tensors; dot operands are then widened to fp32, because the interpreter's bf16 `tl.dot`
multiplies bit patterns as integers (triton-lang/triton#11584).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import TRITON_DTYPES, TRITON_HEAD_DIMS
from kernels.reference import check_attention_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST_DOTS = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(1.0 / LOG2E)


def _prune_fp32(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 operands take the FMA path (IEEE dots): its smallest tile, not minutes compiling the rest."""
    if named_args["Q"].dtype == torch.float32:
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return configs


def autotune(gpu: list[tuple[int, int, int, int]], key: list[str], **kwargs):
    """triton.autotune over (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates on a GPU; one 64x64
    config under the interpreter, where timing means nothing and one config is never benchmarked."""
    chosen = [(64, 64, 4, 1)] if INTERPRET else gpu
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_fp32}, **kwargs)


def num_splits(programs: int, inner_blocks: int, device: torch.device) -> int:
    """Programs sharing one loop so that about two waves of programs fill the GPU.

    Counted with typical block sizes (the autotuner picks the real ones later); a split that finds
    no block writes neutral partials, so close is enough. The interpreter has no SMs: a target of 8
    makes the small test shapes take both the split and the unsplit paths."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(target, programs), inner_blocks))


def mask_args(key_mask: Tensor | None) -> tuple[Tensor | None, int, int]:
    """Kernel arguments for an optional (B, Nk) bool key mask, read as bytes without a copy."""
    if key_mask is None:
        return None, 0, 0
    return key_mask.view(torch.uint8), key_mask.stride(0), key_mask.stride(1)


@triton.jit
def tile_dot(a, b, acc=None):
    """tl.dot with fp32 accumulation; fp32 operands in IEEE precision (TF32 would miss 1e-5)."""
    if _UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def key_valid(MASK, off_b, cols, stride_mb, stride_mn, n_k):
    """Which key columns are in range and True in the (B, Nk) key mask."""
    in_range = cols < n_k
    return in_range & (tl.load(MASK + off_b * stride_mb + cols * stride_mn, mask=in_range, other=0) != 0)


@autotune(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
    key=["n_q", "n_k", "HEAD_DIM", "WRITE_O"],
)
@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["MASK"] is not None,
        "MASK_N": lambda a: a["MASK"] is not None or a["n_k"] % a["BLOCK_N"] != 0,
    }
)
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    MASK,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mn,
    n_heads,
    n_q,
    n_k,
    n_split,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    WRITE_O: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """One query block against key blocks pid_z, pid_z + n_split, ...: O (when WRITE_O) and the LSE.

    O is (n_split, B, H, Nq, D) and LSE (n_split, B, H, Nq), both contiguous; with one split they are
    the results, otherwise fp32 partials (O normalised per split; LSE -inf where a split saw no key).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    off_b = bh // n_heads
    off_h = bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=rows[:, None] < n_q, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :] * stride_vd

    # A finite start keeps exp2(m_i - m_new) at 1, not NaN, while every key seen so far is masked.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(pid_z * BLOCK_N, n_k, n_split * BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=cols[:, None] < n_k, other=0.0)
        s = tile_dot(q, tl.trans(k)) * qk_scale
        if MASK_N:
            if HAS_MASK:
                valid = key_valid(MASK, off_b, cols, stride_mb, stride_mn, n_k)
            else:
                valid = cols < n_k
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WRITE_O:
            v = tl.load(v_base + cols[:, None] * stride_vn, mask=cols[:, None] < n_k, other=0.0)
            acc = tile_dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    seen = l_i > 0.0
    out_rows = (pid_z * tl.num_programs(1) + bh) * n_q + rows
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + out_rows, lse, mask=rows < n_q)
    if WRITE_O:
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_ptrs = O + out_rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=rows[:, None] < n_q)


@triton.jit
def _attn_bwd_delta(
    O,
    DO,
    DELTA,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    n_heads,
    n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, the softmax-Jacobian term both gradient kernels need."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = rows[:, None] < n_q
    o = tl.load(O + (bh * n_q + rows[:, None]) * HEAD_DIM + offs_d[None, :], mask=in_rows, other=0.0)
    do_ptrs = (
        DO
        + (bh // n_heads) * stride_dob
        + (bh % n_heads) * stride_doh
        + rows[:, None] * stride_dom
        + offs_d[None, :] * stride_dod
    )
    do = tl.load(do_ptrs, mask=in_rows, other=0.0)
    tl.store(DELTA + bh * n_q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < n_q)


@autotune([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)], key=["n_q", "n_k", "HEAD_DIM"])
@triton.heuristics({"HAS_MASK": lambda a: a["MASK"] is not None})
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    MASK,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mn,
    n_heads,
    n_q,
    n_k,
    n_split,
    sm_scale,
    kv_grad_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """dK and dV of one key block over query blocks pid_z, pid_z + n_split, ..., times kv_grad_scale.

    Works on transposed tiles (keys x queries) so the key block stays in registers. Masked keys are
    not masked per tile: their rows of dK and dV are zeroed once before the store.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    off_b = bh // n_heads
    off_h = bh % n_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_cols = cols[:, None] < n_k

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=in_cols, other=0.0)
    v = tl.load(v_ptrs, mask=in_cols, other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_d[None, :] * stride_qd
    do_base = DO + off_b * stride_dob + off_h * stride_doh + offs_d[None, :] * stride_dod
    qk_scale = sm_scale * _LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(pid_z * BLOCK_M, n_q, n_split * BLOCK_M):
        rows = start_m + offs_m
        in_rows = rows < n_q
        q = tl.load(q_base + rows[:, None] * stride_qm, mask=in_rows[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom, mask=in_rows[:, None], other=0.0)
        # An infinite LSE on padding rows makes their probabilities exactly 0.
        lse2 = tl.load(LSE + bh * n_q + rows, mask=in_rows, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + bh * n_q + rows, mask=in_rows, other=0.0)
        pt = tl.exp2(tile_dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        dv = tile_dot(pt.to(do.dtype), do, dv)
        dst = pt * (tile_dot(v, tl.trans(do)) - delta[None, :])
        dk = tile_dot(dst.to(q.dtype), q, dk)

    dk = dk * (sm_scale * kv_grad_scale)
    dv = dv * kv_grad_scale
    if HAS_MASK:
        valid = key_valid(MASK, off_b, cols, stride_mb, stride_mn, n_k)[:, None]
        dk = tl.where(valid, dk, 0.0)
        dv = tl.where(valid, dv, 0.0)
    out = ((pid_z * tl.num_programs(1) + bh) * n_k + cols[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=in_cols)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_cols)


@autotune([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)], key=["n_q", "n_k", "HEAD_DIM"])
@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["MASK"] is not None,
        "MASK_N": lambda a: a["MASK"] is not None or a["n_k"] % a["BLOCK_N"] != 0,
    }
)
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    MASK,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mn,
    n_heads,
    n_q,
    n_k,
    n_split,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """dQ of one query block over key blocks pid_z, pid_z + n_split, ... (fp32 partials when split)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    off_b = bh // n_heads
    off_h = bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = rows < n_q

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod
    q = tl.load(q_ptrs, mask=in_rows[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=in_rows[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * n_q + rows, mask=in_rows, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + bh * n_q + rows, mask=in_rows, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :] * stride_vd
    qk_scale = sm_scale * _LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(pid_z * BLOCK_N, n_k, n_split * BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=cols[:, None] < n_k, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=cols[:, None] < n_k, other=0.0)
        p = tl.exp2(tile_dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASK_N:
            if HAS_MASK:
                valid = key_valid(MASK, off_b, cols, stride_mb, stride_mn, n_k)
            else:
                valid = cols < n_k
            p = tl.where(valid[None, :], p, 0.0)
        ds = p * (tile_dot(do, tl.trans(v)) - delta[:, None])
        dq = tile_dot(ds.to(k.dtype), k, dq)

    out = ((pid_z * tl.num_programs(1) + bh) * n_q + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_rows[:, None])


def check_supported(q: Tensor) -> None:
    """What the Triton kernels add to the reference's checks: dtype, head dim and device."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q dtype must be one of {TRITON_DTYPES} for the Triton kernels, got {q.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"q head dim must be one of {TRITON_HEAD_DIMS} for the Triton kernels, got {q.shape[-1]}")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("q must be a CUDA tensor for the Triton kernels (or TRITON_INTERPRET=1 set before import)")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> None:
    check_attention_inputs(q, k, v, kv_grad_scale, key_mask)
    check_supported(q)


def attention_forward(q: Tensor, k: Tensor, v: Tensor | None, key_mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """Launch the forward: (O in q's dtype, LSE fp32 (B, H, Nq)); with v None only the LSE is computed
    (the first pass of `attention_mass`). Inputs must already be checked."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    vv = k if v is None else v
    splits = num_splits(triton.cdiv(n_q, 128) * batch * heads, triton.cdiv(n_k, 128), q.device)
    lse = torch.empty(splits, batch, heads, n_q, device=q.device, dtype=torch.float32)
    o = None
    if v is not None:
        o = torch.empty(
            splits, batch, heads, n_q, dim, device=q.device, dtype=q.dtype if splits == 1 else torch.float32
        )
    mask, stride_mb, stride_mn = mask_args(key_mask)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads, splits)  # noqa: E731
    _attn_fwd[grid](
        q,
        k,
        vv,
        mask,
        o,
        lse,
        *q.stride(),
        *k.stride(),
        *vv.stride(),
        stride_mb,
        stride_mn,
        heads,
        n_q,
        n_k,
        splits,
        LOG2E / math.sqrt(dim),
        HEAD_DIM=dim,
        WRITE_O=v is not None,
    )
    if splits == 1:
        return (None if o is None else o[0]), lse[0]
    total = torch.logsumexp(lse, dim=0)
    if o is None:
        return None, total
    weights = torch.exp(lse - total)[..., None]
    return (weights * o).sum(dim=0).to(q.dtype), total


def _attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    key_mask: Tensor | None,
    kv_grad_scale: float,
    need_dq: bool,
    need_dkdv: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dQ, dK, dV in the input dtype (None where not needed). With kv_grad_scale 0, dK and dV are
    zeros without a launch (the authors' preset stops block 0's K/V gradient entirely)."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(dim)
    mask, stride_mb, stride_mn = mask_args(key_mask)
    delta = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(n_q, 64), batch * heads)](
        o,
        do,
        delta,
        *do.stride(),
        heads,
        n_q,
        HEAD_DIM=dim,
        BLOCK_M=64,
    )
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), stride_mb, stride_mn, heads, n_q, n_k)

    dq = None
    if need_dq:
        splits = num_splits(triton.cdiv(n_q, 128) * batch * heads, triton.cdiv(n_k, 64), q.device)
        dq = torch.empty(splits, *q.shape, device=q.device, dtype=q.dtype if splits == 1 else torch.float32)
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads, splits)  # noqa: E731
        _attn_bwd_dq[grid](q, k, v, do, lse, delta, mask, dq, *common, splits, sm_scale, HEAD_DIM=dim)
        dq = dq.sum(dim=0).to(q.dtype) if splits > 1 else dq[0]

    dk = dv = None
    if need_dkdv and kv_grad_scale == 0.0:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    elif need_dkdv:
        splits = num_splits(triton.cdiv(n_k, 128) * batch * heads, triton.cdiv(n_q, 64), q.device)
        dtype = k.dtype if splits == 1 else torch.float32
        dk = torch.empty(splits, *k.shape, device=k.device, dtype=dtype)
        dv = torch.empty(splits, *k.shape, device=k.device, dtype=dtype)
        grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads, splits)  # noqa: E731
        _attn_bwd_dkdv[grid](
            q,
            k,
            v,
            do,
            lse,
            delta,
            mask,
            dk,
            dv,
            *common,
            splits,
            sm_scale,
            kv_grad_scale,
            HEAD_DIM=dim,
        )
        dk, dv = (dk.sum(dim=0).to(k.dtype), dv.sum(dim=0).to(k.dtype)) if splits > 1 else (dk[0], dv[0])
    return dq, dk, dv


class _CrossAttention(torch.autograd.Function):
    """Saves q, k, v, O and the LSE; the backward recomputes the probabilities tile by tile."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        o, lse = attention_forward(q, k, v, key_mask)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.kv_grad_scale = kv_grad_scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _attention_backward(q, k, v, o, lse, do, key_mask, ctx.kv_grad_scale, need_q, need_k or need_v)
        return dq, dk, dv, None, None


def cross_attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`cross_attention` that also returns the row LSE (fp32 (B, H, Nq), not differentiable), which
    `attention_mass(..., lse=...)` takes to skip its first pass."""
    _check_attention(q, k, v, kv_grad_scale, key_mask)
    return _CrossAttention.apply(q, k, v, kv_grad_scale, key_mask)


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Triton `kernels.reference.cross_attention`: same signature, checks and results."""
    return cross_attention_lse(q, k, v, kv_grad_scale, key_mask)[0]
