"""Rollouts that carry decoded media, for the media rewards' tests (their latents are placeholders)."""

from __future__ import annotations

import torch

from engine.rewards import Rollout

FPS = 24.0


def media_rollout(
    *,
    frames: torch.Tensor | None = None,
    waveforms: torch.Tensor | None = None,
    sample_rate: int | None = None,
    prompts: tuple[str, ...] | None = None,
    audio_prompts: tuple[str, ...] = (),
    fps: float = FPS,
) -> Rollout:
    """A rollout of N samples (N from the media or the prompts) with 1-token latents and the given media:
    frames (N, F, H, W, 3) in [0, 1], waveforms (N, channels, samples) at sample_rate."""
    n = next(t.shape[0] for t in (frames, waveforms) if t is not None) if prompts is None else len(prompts)
    return Rollout(
        video=torch.zeros(n, 1, 4),
        audio=torch.zeros(n, 1, 4),
        video_grid=(1, 1, 1),
        fps=fps,
        prompts=prompts if prompts is not None else tuple(f"prompt {i}" for i in range(n)),
        audio_prompts=audio_prompts,
        frames=frames,
        waveforms=waveforms,
        sample_rate=sample_rate,
    )
