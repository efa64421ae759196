"""Rewards: the interface (`base`) and the embedded latent rewards (`latent`), registered by name."""

from .base import MODALITIES, REGISTRY, Reward, RewardSpec, Rollout, build_rewards, register, score_rewards
from .latent import LATENT_REWARDS, AudioSteadiness, AVSync, VideoSharpness

__all__ = [
    "LATENT_REWARDS",
    "MODALITIES",
    "REGISTRY",
    "AVSync",
    "AudioSteadiness",
    "Reward",
    "RewardSpec",
    "Rollout",
    "VideoSharpness",
    "build_rewards",
    "register",
    "score_rewards",
]
