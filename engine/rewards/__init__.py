"""Rewards: the interface (`base`), the embedded latent rewards (`latent`) and the media rewards (`clap`,
`audiobox`, `av_align`, which read decoded frames or waveforms), registered by name. The media rewards
import their model packages only when built, so the engine runs without them."""

from .audiobox import AudioboxAesthetics
from .av_align import AVAlign
from .base import (
    MEDIA,
    MODALITIES,
    READS,
    REGISTRY,
    Reward,
    RewardSpec,
    Rollout,
    build_rewards,
    check_rewards,
    reads_media,
    register,
    score_rewards,
)
from .clap import ClapScore
from .latent import LATENT_REWARDS, AudioSteadiness, AVSync, VideoSharpness

__all__ = [
    "LATENT_REWARDS",
    "MEDIA",
    "MODALITIES",
    "READS",
    "REGISTRY",
    "AVAlign",
    "AVSync",
    "AudioSteadiness",
    "AudioboxAesthetics",
    "ClapScore",
    "Reward",
    "RewardSpec",
    "Rollout",
    "VideoSharpness",
    "build_rewards",
    "check_rewards",
    "reads_media",
    "register",
    "score_rewards",
]
