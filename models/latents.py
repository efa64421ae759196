"""LTX-2 latent geometry in one place: which pixel frames, pixels and audio samples each latent token
covers, and where a block sits on the 48-block scale of the reference model.

The causal video VAE gives latent frame 0 one pixel frame and every later frame `frame_stride` (8),
so latent frame f covers pixel frames [max(0, 8f-7), 8f+1). The audio VAE maps `mel_stride` (4) mel
frames of `hop_length / sampling_rate` seconds (10 ms) to one token, shifted causally the same way:
token i covers mel frames [max(0, 4i-3), 4i+1). Token positions (RoPE), reward timing, audio length
of a clip and the surgery / reweighting depth rules all read these functions, so they cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

REFERENCE_DEPTH = 48  # blocks of the LTX-2 release; per-block presets are stated on this scale


def reference_block(block: int, num_layers: int) -> int:
    """Block `block` of a `num_layers`-deep model on the 48-block scale: floor(block * 48 / num_layers),
    so "the first fifth of the network" stays the first fifth at any depth."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return block * REFERENCE_DEPTH // num_layers


@dataclass(frozen=True)
class LatentGeometry:
    """How latents map to time and pixels (defaults: LTX-2's VAEs; `ModelConfig.geometry` gives a
    model's own)."""

    frame_stride: int = 8  # pixel frames per latent frame (the first latent frame covers one)
    pixel_stride: tuple[int, int] = (32, 32)  # pixels per latent token along height, width
    mel_stride: int = 4  # mel frames per audio token
    hop_length: int = 160  # audio samples per mel frame
    sampling_rate: int = 16000  # audio samples per second
    causal_offset: int = 1  # the first latent of each stream covers this many frames

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames of a clip of `latent_frames` latent frames: 8 (F - 1) + 1."""
        return self.frame_stride * (latent_frames - 1) + self.causal_offset

    def frame_spans(self, latent_frames: int, device: torch.device | str | None = None) -> Tensor:
        """(F, 2) int64 [first, end) pixel frame of each latent frame."""
        f = torch.arange(latent_frames, dtype=torch.int64, device=device)
        s = self.frame_stride
        return torch.stack([(f * s + self.causal_offset - s).clamp(min=0), f * s + self.causal_offset], dim=-1)

    def frame_times(
        self,
        latent_frames: int,
        fps: float,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """(F,) midpoint in seconds of each latent frame's pixel frames at `fps`."""
        spans = self.frame_spans(latent_frames, device).to(dtype)
        return (spans[:, 0] / fps + spans[:, 1] / fps) / 2

    def mel_spans(self, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
        """(T_a, 2) int64 [first, end) mel frame of each audio token."""
        i = torch.arange(num_tokens, dtype=torch.int64, device=device)
        s = self.mel_stride
        return torch.stack([(i * s + self.causal_offset - s).clamp(min=0), i * s + self.causal_offset], dim=-1)

    def audio_token_times(
        self, num_tokens: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """(T_a,) midpoint in seconds of each audio token's mel frames."""
        seconds = self.mel_spans(num_tokens, device).to(dtype) * self.hop_length / self.sampling_rate
        return (seconds[:, 0] + seconds[:, 1]) / 2

    @property
    def audio_tokens_per_second(self) -> float:
        """25 for LTX-2: 16000 Hz / 160 samples per mel frame / 4 mel frames per token."""
        return self.sampling_rate / self.hop_length / self.mel_stride

    def audio_tokens_for(self, latent_frames: int, fps: float) -> int:
        """Audio tokens covering a clip of `latent_frames` latent frames at `fps` (at least 2)."""
        return max(2, round(self.pixel_frames(latent_frames) / fps * self.audio_tokens_per_second))

    def pixel_centres(self, tokens: int, axis: int, device: torch.device | str | None = None) -> Tensor:
        """(tokens,) float32 centre in pixels of each latent row (axis 0) or column (axis 1)."""
        s = self.pixel_stride[axis]
        start = torch.arange(tokens, dtype=torch.float32, device=device) * s
        return (start + (start + s)) / 2


def frame_ids(video_grid: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
    """(F*H*W,) latent frame of each video token (tokens are f-major)."""
    f, h, w = video_grid
    return torch.arange(f * h * w, device=device) // (h * w)
