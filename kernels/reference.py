"""Torch reference implementations of cross-attention with partial stop-gradient and attention mass."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward.

    Equivalent to a*sg(x) + (1-a)*x with scale = 1 - a, without materialising the mix.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """`x`, whose gradient is multiplied by `scale` (the partial stop-gradient as a hook); `x` itself at 1."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def _check_4d(name: str, t: Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B,H,N,D), got shape {tuple(t.shape)}")


def _check_qk(q: Tensor, k: Tensor) -> None:
    """q and k must agree on batch, heads and head dim; Nq and Nk are free."""
    _check_4d("q", q)
    _check_4d("k", k)
    if (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"k shape {tuple(k.shape)} must match q shape {tuple(q.shape)} in B, H and D")


def _check_key_mask(key_mask: Tensor, k: Tensor) -> None:
    """A fully masked row would make the softmax undefined (NaN), so it is rejected up front. On a
    GPU that check is a host sync, too dear once per attention call: there the caller checks its
    masks once (the model does at its entry)."""
    expected = (k.shape[0], k.shape[2])
    if tuple(key_mask.shape) != expected:
        raise ValueError(f"key_mask must have shape (B, Nk) = {expected}, got {tuple(key_mask.shape)}")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be bool, got {key_mask.dtype}")
    if key_mask.device.type == "cpu" and not bool(key_mask.any(dim=-1).all()):
        raise ValueError("key_mask must have at least one True per row")


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> None:
    """Every backend's input checks for `cross_attention`, so they reject bad inputs alike."""
    _check_qk(q, k)
    _check_4d("v", v)
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if not (k.dtype == v.dtype == q.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= kv_grad_scale <= 1.0:
        raise ValueError(f"kv_grad_scale must be in [0, 1], got {kv_grad_scale}")
    if key_mask is not None:
        _check_key_mask(key_mask, k)


def check_mass_inputs(
    q: Tensor, k: Tensor, key_mask: Tensor | None, lse: Tensor | None, out: Tensor | None, chunk_size: int
) -> None:
    """Every backend's input checks for `attention_mass`."""
    _check_qk(q, k)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype}, {k.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if key_mask is not None:
        _check_key_mask(key_mask, k)
    if lse is not None and tuple(lse.shape) != (batch, heads, n_q):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(batch, heads, n_q)}, got {tuple(lse.shape)}")
    if out is not None:
        if tuple(out.shape) != (batch, n_k) or out.dtype != torch.float32:
            raise ValueError(
                f"out must be float32 with shape (B, Nk) = {(batch, n_k)}, got {out.dtype} {tuple(out.shape)}"
            )


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """q (B,H,Nq,D), k and v (B,H,Nk,D) -> (B,H,Nq,D). Softmax scale 1/sqrt(D), no causal mask.

    key_mask: optional bool (B, Nk), True = attend (a key padding mask; each row must have at least one True).
    Forward is ordinary attention. Backward multiplies dK and dV by kv_grad_scale (dQ unchanged): this is the
    'partial stop-gradient' K~ = a*sg(K) + (1-a)*K with kv_grad_scale = 1 - a.
    """
    check_attention_inputs(q, k, v, kv_grad_scale, key_mask)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    k, v = scale_grad(k, kv_grad_scale), scale_grad(v, kv_grad_scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def cross_attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_grad_scale: float = 1.0,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`cross_attention` and the row log-sum-exp (B,H,Nq) float32 (float64 for float64 inputs) of its
    scaled, masked logits, without gradient: what `attention_mass(lse=...)` reuses. The Triton kernel
    writes the LSE in its forward; here it is one more chunked pass over the logits."""
    out = cross_attention(q, k, v, kv_grad_scale, key_mask)
    with torch.no_grad():
        return out, row_lse(q, k, key_mask)


def _logit_chunks(q: Tensor, k: Tensor, key_mask: Tensor | None, chunk_size: int):
    """(start, scaled masked logits of queries start..start+chunk_size) in float32 (float64 for float64
    inputs): the full Nq x Nk map never exists at once."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kt = k.to(compute_dtype).transpose(-1, -2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    masked = None if key_mask is None else ~key_mask[:, None, None, :]
    for start in range(0, q.shape[2], chunk_size):
        s = (q[:, :, start : start + chunk_size].to(compute_dtype) @ kt) * scale
        yield start, s if masked is None else s.masked_fill(masked, float("-inf"))


def row_lse(q: Tensor, k: Tensor, key_mask: Tensor | None, chunk_size: int = 1024) -> Tensor:
    """(B, H, Nq) log-sum-exp of the scaled, masked logits, `chunk_size` query rows at a time."""
    return torch.cat([torch.logsumexp(s, dim=-1) for _, s in _logit_chunks(q, k, key_mask, chunk_size)], dim=-1)


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
    """q (B,H,Nq,D), k (B,H,Nk,D) -> (B,Nk) float32: per key, softmax probability summed over queries.

    The per-head masses are averaged over heads; masked keys get probability 0. Queries are processed
    chunk_size rows at a time so the full Nq x Nk map never exists at once. lse: optional (B,H,Nq) row
    log-sum-exp of the scaled (masked) logits, e.g. from the forward; when None it is computed chunk by
    chunk first. out: optional float32 (B,Nk) buffer the result is ADDED into (accumulating across blocks
    and steps), and then returned. Runs without grad because it is a statistic, not a loss term.
    """
    check_mass_inputs(q, k, key_mask, lse, out, chunk_size)
    batch, heads, _, _ = q.shape
    n_k = k.shape[2]

    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = (row_lse(q, k, key_mask, chunk_size) if lse is None else lse).to(compute_dtype)
    mass = torch.zeros(batch, heads, n_k, dtype=compute_dtype, device=q.device)
    for s, logits in _logit_chunks(q, k, key_mask, chunk_size):
        mass += torch.exp(logits - lse[:, :, s : s + chunk_size, None]).sum(dim=2)
    result = mass.mean(dim=1).to(torch.float32)
    if out is None:
        return result
    return out.add_(result)
