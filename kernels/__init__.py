"""Attention kernels used by the trainer; callers import from `kernels`, never from a backend.

Dispatch rule, decided by the query tensor: a CUDA tensor of a dtype and head dim that the Triton
kernels support (TRITON_DTYPES, TRITON_HEAD_DIMS) goes to Triton when triton is installed; anything
else (CPU tensors, float64, other head dims, no triton) goes to the torch reference in
`kernels.reference`, which stays the ground truth. TRITON_INTERPRET does not change the rule: the
interpreter is for tests, which call `kernels.triton_attention` and `kernels.triton_mass` directly
on CPU tensors. Triton is an optional extra, so it is imported only when a CUDA tensor needs it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kernels import reference

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (64, 128)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def uses_triton(q: Tensor) -> bool:
    """Whether `cross_attention` and `attention_mass` send this query tensor to Triton."""
    return HAS_TRITON and q.is_cuda and q.dim() == 4 and q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """`kernels.reference.cross_attention`, on Triton where `uses_triton(q)`."""
    if uses_triton(q):
        from kernels import triton_attention

        return triton_attention.cross_attention(q, k, v, kv_grad_scale, key_mask)
    return reference.cross_attention(q, k, v, kv_grad_scale, key_mask)


def cross_attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`cross_attention` and its row log-sum-exp (B, H, Nq) (no gradient), for `attention_mass(lse=...)`:
    the Triton forward writes it anyway, so the mass needs no second pass over the logits."""
    if uses_triton(q):
        from kernels import triton_attention

        return triton_attention.cross_attention_lse(q, k, v, kv_grad_scale, key_mask)
    return reference.cross_attention_lse(q, k, v, kv_grad_scale, key_mask)


def attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    key_mask: Tensor | None = None,
    lse: Tensor | None = None,
    out: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """`kernels.reference.attention_mass`, on Triton where `uses_triton(q)`."""
    if uses_triton(q):
        from kernels import triton_mass

        return triton_mass.attention_mass(q, k, key_mask=key_mask, lse=lse, out=out, chunk_size=chunk_size)
    return reference.attention_mass(q, k, key_mask=key_mask, lse=lse, out=out, chunk_size=chunk_size)


__all__ = ["attention_mass", "cross_attention", "cross_attention_lse", "uses_triton"]
