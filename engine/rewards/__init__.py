"""Rewards: the interface (`base`), the embedded latent rewards (`latent`) and the media rewards (`clap`,
`audiobox`, `av_align`, and the paper's judges `videoalign`, `hpsv3` (Qwen2-VL, `qwen2vl`) and `desync`
(our Synchformer, `synchformer`), which read decoded frames or waveforms), registered by name. The media
rewards import their model packages only when built, so the engine runs without them.

Any of them can run as a service: `omninft reward-server` (`server`, aiohttp: the `serve` extra) hosts one,
a config entry with `url` scores through it (`remote.RemoteReward`, stdlib HTTP), and `wire` is what travels."""

from .audiobox import AudioboxAesthetics
from .av_align import AVAlign
from .base import (
    MEDIA,
    MODALITIES,
    ON_FAILURE,
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
from .desync import DeSync
from .hpsv3 import HPSv3Score
from .latent import LATENT_REWARDS, AudioSteadiness, AVSync, VideoSharpness
from .remote import RemoteReward
from .videoalign import VideoAlignScore

__all__ = [
    "LATENT_REWARDS",
    "MEDIA",
    "MODALITIES",
    "ON_FAILURE",
    "READS",
    "REGISTRY",
    "AVAlign",
    "AVSync",
    "AudioSteadiness",
    "AudioboxAesthetics",
    "ClapScore",
    "DeSync",
    "HPSv3Score",
    "RemoteReward",
    "Reward",
    "RewardSpec",
    "Rollout",
    "VideoAlignScore",
    "VideoSharpness",
    "build_rewards",
    "check_rewards",
    "reads_media",
    "register",
    "score_rewards",
]
