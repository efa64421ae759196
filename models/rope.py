"""Token positions and split rotary embeddings of LTX-2 (ARCHITECTURE.md section 3).

Video positions are (time in seconds, height in pixels, width in pixels) and audio positions are
time in seconds, each the midpoint of the token's causal span (`models.latents`). The cross-modal attentions use the
time axis alone, so their logits depend on the relative time between a frame and an audio token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig

Rope = tuple[Tensor, Tensor]  # cos, sin: (1, H, T, head_dim // 2)


def video_positions(cfg: ModelConfig, grid: tuple[int, int, int], fps: float, device: torch.device) -> Tensor:
    """(T, 3) float32 midpoints of each latent token's span: seconds, pixels, pixels; tokens f-major."""
    f, h, w = grid
    geometry = cfg.geometry
    axes = (
        geometry.frame_times(f, fps, torch.float32, device),
        geometry.pixel_centres(h, 0, device),
        geometry.pixel_centres(w, 1, device),
    )
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def audio_positions(cfg: ModelConfig, num_tokens: int, device: torch.device) -> Tensor:
    """(T, 1) float32 midpoints in seconds of each audio token's mel frames."""
    return cfg.geometry.audio_token_times(num_tokens, torch.float32, device)[:, None]


def split_rope(positions: Tensor, max_pos: tuple[float, ...], dim: int, heads: int, theta: float) -> Rope:
    """cos/sin for split RoPE over `dim` channels cut into `heads` slices.

    The frequency ladder theta^(j/(n-1)) * pi/2 is built in float64 (as the release does), the
    per-axis angles are interleaved per frequency, and the ladder is left-padded with identity
    rotations up to dim/2 before being cut per head: each head gets its own frequencies.
    """
    num_axes = positions.shape[1]
    n = dim // (2 * num_axes)
    ladder = theta ** torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=positions.device)
    freqs = (ladder * math.pi / 2.0).to(torch.float32)
    frac = torch.stack([positions[:, i] / max_pos[i] for i in range(num_axes)], dim=-1)  # (T, axes)
    angles = ((frac[..., None] * 2 - 1) * freqs).transpose(-1, -2).flatten(1)  # (T, n * axes)
    cos, sin = angles.cos(), angles.sin()
    pad = dim // 2 - angles.shape[-1]
    if pad:
        cos = torch.cat([torch.ones_like(cos[:, :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[:, :pad]), sin], dim=-1)
    t = positions.shape[0]
    return (cos.reshape(t, heads, -1).transpose(0, 1)[None], sin.reshape(t, heads, -1).transpose(0, 1)[None])


def apply_split_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotates (x[j], x[j + D/2]) by angle j within each head; x is (B, H, T, D), math in float32."""
    cos, sin = rope
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
