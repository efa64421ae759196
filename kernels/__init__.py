"""Attention kernels used by the trainer; callers import from `kernels`, never from a backend.

Each call goes to the implementation `kernels.dispatch` picks for it: on a GPU, what
`python -m bench.kernels` measured fastest for the device, dtype and shape class (torch SDPA and its
backends, flash-attn, or our Triton kernels), SDPA where nothing was measured; on a CPU the torch
reference in `kernels.reference`, which stays the ground truth. The Triton kernels are also tested
directly on CPU tensors under Triton's interpreter (`kernels.triton_attention`, `kernels.triton_mass`).
Triton is an optional extra, imported only when the dispatch sends a call to it.
"""

from __future__ import annotations

from torch import Tensor

from kernels import dispatch, reference
from kernels.dispatch import HAS_TRITON, TRITON_DTYPES, TRITON_HEAD_DIMS


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """`kernels.reference.cross_attention`, run by the implementation `kernels.dispatch` chooses."""
    impl = dispatch.choose(dispatch.attention_op(q, k, v, with_lse=False), q, k, kv_grad_scale, key_mask)
    return impl.attention(q, k, v, kv_grad_scale, key_mask)


def cross_attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`cross_attention` and its row log-sum-exp (B, H, Nq) (no gradient), for `attention_mass(lse=...)`:
    the Triton forward writes it anyway, so there the mass needs no second pass over the logits."""
    impl = dispatch.choose(dispatch.attention_op(q, k, v, with_lse=True), q, k, kv_grad_scale, key_mask)
    return impl.attention_lse(q, k, v, kv_grad_scale, key_mask)


def attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    key_mask: Tensor | None = None,
    lse: Tensor | None = None,
    out: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """`kernels.reference.attention_mass`, run by the implementation `kernels.dispatch` chooses."""
    impl = dispatch.choose("mass", q, k, key_mask=key_mask)
    return impl.mass(q, k, key_mask=key_mask, lse=lse, out=out, chunk_size=chunk_size)


__all__ = [
    "HAS_TRITON",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "attention_mass",
    "cross_attention",
    "cross_attention_lse",
    "reference",
]
