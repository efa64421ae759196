"""What every reward is: a scorer of rollouts that declares the modality it judges, so routing (SPEC 2)
can send its advantage only to the branch(es) it is about; the typed config entry that picks one;
and the call that scores a rollout with all of them, failing loudly (never a silent 0).
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.latents import LatentGeometry

from ..errors import ConfigError, RewardError

MODALITIES = ("video", "audio", "av")


@dataclass(frozen=True)
class Rollout:
    """What rewards score: clean latents of N samples."""

    video: Tensor  # (N, F*H*W, C) video latent tokens, f-major order (token index = (f*H + h)*W + w)
    audio: Tensor  # (N, T_a, C) audio latent tokens, 25 per second
    video_grid: tuple[int, int, int]  # (F, H, W) latent frames, height, width
    fps: float  # pixel frame rate
    prompts: tuple[str, ...]  # the prompt of each sample (length N)
    geometry: LatentGeometry = LatentGeometry()  # which pixel frames and audio samples each latent covers
    # The texts the video and audio rewards judge (the dataset's prompt_video / prompt_audio); () = `prompts`.
    video_prompts: tuple[str, ...] = ()
    audio_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Rejects inconsistent shapes here, so rewards can index the grid without re-checking."""
        if self.video.ndim != 3 or self.audio.ndim != 3:
            raise ValueError(
                f"video and audio must be (N, tokens, C); got {tuple(self.video.shape)} and {tuple(self.audio.shape)}"
            )
        n = self.video.shape[0]
        f, h, w = self.video_grid
        if self.video.shape[1] != f * h * w:
            raise ValueError(
                f"video has {self.video.shape[1]} tokens but video_grid {self.video_grid} implies {f * h * w}"
            )
        if self.audio.shape[0] != n or len(self.prompts) != n:
            raise ValueError(
                f"sample counts disagree: video {n}, audio {self.audio.shape[0]}, prompts {len(self.prompts)}"
            )
        for name in ("video_prompts", "audio_prompts"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.prompts)
            elif len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} texts for {n} samples")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {self.fps}")

    @property
    def num_samples(self) -> int:
        """N, the batch size every score must match."""
        return self.video.shape[0]

    def video_frames(self) -> Tensor:
        """Video latent as (N, F, H, W, C): the f-major token order makes this a plain reshape."""
        f, h, w = self.video_grid
        return self.video.reshape(self.num_samples, f, h, w, self.video.shape[-1])


def _check_weight(value: object, where: str) -> float:
    """Weights scale advantages; a non-positive or non-finite one would flip or poison them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


class Reward(abc.ABC):
    """A scorer of rollouts, typed by the modality it judges so routing can target its advantage."""

    name: str
    modality: str
    # The smallest latent grid (frames, height, width) the reward can score: checked when the config is read.
    min_video_grid: tuple[int, int, int] = (1, 1, 1)

    def __init__(self, weight: float = 1.0) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"reward {self.name!r} has modality {self.modality!r}; expected one of {MODALITIES}")
        self.weight = _check_weight(weight, f"{self.name}.weight")

    @abc.abstractmethod
    def score(self, rollout: Rollout) -> Tensor:
        """(N,) float scores, higher is better."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, weight={self.weight})"


@dataclass
class RewardSpec:
    """One entry of the config's `rewards` list: which reward, and the weight of its advantage."""

    __config_hints__ = {"modality": "a reward's modality is its own and cannot be set"}

    name: str
    weight: float = 1.0


REGISTRY: dict[str, type[Reward]] = {}


def register(cls: type[Reward]) -> type[Reward]:
    """Class decorator: makes a reward buildable from a config entry by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def check_video_grid(specs: Sequence[RewardSpec], grid: Sequence[int]) -> None:
    """ConfigError naming the first reward of `specs` that cannot score latents of `grid` (F, H, W)."""
    for i, spec in enumerate(specs):
        need = REGISTRY[spec.name].min_video_grid
        if any(g < n for g, n in zip(grid, need)):
            raise ConfigError(
                f"rewards[{i}]: {spec.name} needs task.video_grid of at least {list(need)} (latent frames, rows, "
                f"columns); got {list(grid)}"
            )


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """The rewards of the config's `rewards` list (ConfigError naming the entry, `rewards[i]...`).

    A reward's modality is part of what it measures, so a spec cannot override it. The loader calls
    this when it reads a config, so a bad entry fails before any model is built."""
    if not specs:
        raise ConfigError(f"rewards must name at least one reward; available: {sorted(REGISTRY)}")
    rewards: list[Reward] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name not in REGISTRY:
            raise ConfigError(f"rewards[{i}].name {spec.name!r} is unknown; available: {sorted(REGISTRY)}")
        if spec.name in seen:
            raise ConfigError(f"rewards[{i}].name {spec.name!r} is a duplicate; each reward may appear once")
        seen.add(spec.name)
        try:
            weight = _check_weight(spec.weight, f"rewards[{i}].weight")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        rewards.append(REGISTRY[spec.name](weight=weight))
    return rewards


def score_rewards(rewards: Sequence[Reward], rollout: Rollout) -> dict[str, Tensor]:
    """Runs every reward under torch.no_grad; returns name -> (N,) float32.

    A reward that raises, returns a wrong shape, or returns any non-finite value raises RewardError
    naming the reward (chained from the original exception). It never substitutes a 0: a silently
    zeroed reward would still shift group advantages and train on garbage.
    """
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward names must be unique, got duplicates {duplicates}")

    n = rollout.num_samples
    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for reward in rewards:
            try:
                out = reward.score(rollout)
            except Exception as exc:
                raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, Tensor):
                raise RewardError(f"reward {reward.name!r} returned {type(out).__name__}, expected a Tensor")
            if out.shape != (n,):
                raise RewardError(f"reward {reward.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
            out = out.float()
            if not torch.isfinite(out).all():
                raise RewardError(f"reward {reward.name!r} returned non-finite scores: {out.tolist()}")
            scores[reward.name] = out
    return scores
