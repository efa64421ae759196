"""Every random stream of a run, keyed by what it is for: (seed, iteration, prompt, sample, sigma
index). A draw never depends on how samples are spread over processes or batched, so a run's
iterations do not depend on its layout, and a resumed run draws what the uninterrupted one would."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text: the same on every process, rank and Python run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_normal(shape: Sequence[int], *seed_parts: object, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal draw of `shape` from a CPU generator seeded by `stable_seed(*seed_parts)`."""
    g = torch.Generator(device="cpu").manual_seed(stable_seed(*seed_parts))
    return torch.randn(*shape, generator=g).to(device)


def rollout_noise(
    seed: int, iteration: int, prompt: str, sample: int, video_shape: tuple[int, int], audio_shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Initial noise of one sample: (video (T_v, C), audio (T_a, C))."""
    return (
        seeded_normal(video_shape, seed, iteration, prompt, sample, "video"),
        seeded_normal(audio_shape, seed, iteration, prompt, sample, "audio"),
    )


def training_noise(
    seed: int,
    iteration: int,
    prompt: str,
    sample: int,
    sigma_index: int,
    video_shape: tuple[int, int],
    audio_shape: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Forward-process noise of one sample at the iteration's `sigma_index`-th training sigma."""
    return (
        seeded_normal(video_shape, seed, iteration, prompt, sample, "train", sigma_index, "video"),
        seeded_normal(audio_shape, seed, iteration, prompt, sample, "train", sigma_index, "audio"),
    )
