"""Layers of the LTX-2 DiT. Module names follow the official checkpoint layout, so a state dict
needs no renaming to be written in it (diffusers' names are a rename in `models.layouts`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import TorchBackend
from .rope import Rope, apply_split_rope

# Called by an attention after its kernel with the post-RoPE (B, H, Nq, D) queries, (B, H, Nk, D)
# keys and the kernel's row log-sum-exp (B, H, Nq): how the V2A mass is recorded without a second
# pass over the logits (models.transformer.V2AProbe).
AttentionProbe = Callable[[Tensor, Tensor, Tensor], None]


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Parameter-free RMSNorm (every pre-norm inside a block), statistics in float32."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of `t` (any shape), cos first: (..., dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[..., None] * torch.exp(exponent)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, backend: TorchBackend, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = backend.linear(in_dim, dim)
        self.linear_2 = backend.linear(dim, dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class _Embedding(nn.Module):
    """Holds `timestep_embedder` so parameter names match the checkpoint (`<adaln>.emb.timestep_embedder.*`)."""

    def __init__(self, backend: TorchBackend, in_dim: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(backend, in_dim, dim)


class AdaLNSingle(nn.Module):
    """PixArt adaLN-single: one MLP maps the (per-token) timestep to `k` modulation rows of width
    `dim`; each block adds its own learned table to them."""

    def __init__(self, backend: TorchBackend, dim: int, k: int, features: int):
        super().__init__()
        self.k, self.features = k, features
        self.emb = _Embedding(backend, features, dim)
        self.linear = backend.linear(dim, k * dim)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """timestep (B, T) -> modulation (B, T, k*dim) and the embedded timestep (B, T, dim)."""
        embedded = self.emb.timestep_embedder(timestep_features(timestep, self.features).to(dtype))
        return self.linear(F.silu(embedded)), embedded


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm across all heads and optional split RoPE on Q and K; with
    `gated` (LTX-2.3), each head's output is scaled by 2 sigmoid of its logit from `to_gate_logits(x)`
    (a (heads, query_dim) linear on the query input, 1 when the logits are 0) before `to_out`.

    `skip_rows` (B,) bool marks batch rows whose attention is skipped, as in the perturbed pass of
    LTX-2's spatio-temporal guidance (STG): those rows get to_out(to_v(context)), the values in
    place of the attention output (diffusers' LTX2PerturbedAttnProcessor). The attention still runs
    on every row and the rows are selected after it, so the other rows are bit-identical to a call
    without the mask, with any backend or kernel; the selection is per batch row, which every
    tensor- or sequence-parallel rank holds whole (its heads, all tokens after the column linears).
    The gate applies to the skipped rows' values too (diffusers' LTX2PerturbedAttnProcessor).
    """

    def __init__(
        self,
        backend: TorchBackend,
        query_dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        eps: float,
        gated: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.backend, self.heads = backend, backend.sharding.local_heads(heads)  # this rank's heads
        self.q_norm = backend.qk_norm(inner, eps)
        self.k_norm = backend.qk_norm(inner, eps)
        self.to_q = backend.linear(query_dim, inner, role="column")
        self.to_k = backend.linear(context_dim, inner, role="column")
        self.to_v = backend.linear(context_dim, inner, role="column")
        # LTX-2.3 gated attention: one logit per head from the query input, split over the ranks with the heads.
        self.to_gate_logits = backend.linear(query_dim, heads, role="column") if gated else None
        self.to_out = nn.ModuleList([backend.linear(inner, query_dim, role="row")])

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        q_rope: Rope | None = None,
        k_rope: Rope | None = None,
        key_mask: Tensor | None = None,
        kv_grad_scale: float = 1.0,
        probe: AttentionProbe | None = None,
        skip_rows: Tensor | None = None,
    ) -> Tensor:
        context = x if context is None else context
        q = self._heads(self.q_norm(self.to_q(x)))
        k = self._heads(self.k_norm(self.to_k(context)))
        v = self._heads(self.to_v(context))
        if q_rope is not None:
            q = apply_split_rope(q, q_rope)
            k = apply_split_rope(k, q_rope if k_rope is None else k_rope)
        if probe is None:
            out = self.backend.attention(q, k, v, key_mask=key_mask, kv_grad_scale=kv_grad_scale)
        else:
            out, lse = self.backend.attention(q, k, v, key_mask=key_mask, kv_grad_scale=kv_grad_scale, with_lse=True)
            probe(q.detach(), k.detach(), lse.detach())
        if skip_rows is not None:  # (B, H, N, D) values of the skipped rows in place of their attention output
            out = torch.where(skip_rows[:, None, None, None], v.to(out.dtype), out)
        if self.to_gate_logits is not None:  # (B, N, H) logits: each head's output times 2 sigmoid(logit)
            gates = 2.0 * torch.sigmoid(self.to_gate_logits(x))
            out = out * gates.transpose(1, 2)[..., None].to(out.dtype)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class _Projection(nn.Module):
    """`net.0` of the FFN: a linear followed by tanh-GELU (checkpoint name `net.0.proj`)."""

    def __init__(self, backend: TorchBackend, dim: int, hidden: int):
        super().__init__()
        self.proj = backend.linear(dim, hidden, role="column")

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """tanh-GELU MLP, 4x wide; `net` mirrors the checkpoint layout (net.0.proj, net.2)."""

    def __init__(self, backend: TorchBackend, dim: int):
        super().__init__()
        self.net = nn.ModuleList(
            [_Projection(backend, dim, 4 * dim), nn.Identity(), backend.linear(4 * dim, dim, role="row")]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class CaptionProjection(nn.Module):
    """Text features (caption_channels) to a stream's width: linear, tanh-GELU, linear."""

    def __init__(self, backend: TorchBackend, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = backend.linear(in_dim, dim)
        self.linear_2 = backend.linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))
