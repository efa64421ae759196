"""Scoring a rollout chunk by chunk, with the remote rewards' round trips hidden behind sampling.

The trainer samples its rollout in chunks (`train.rollout_chunk`). After each chunk it calls `Scoring.submit`:
rewards served over HTTP (`reward.remote`, engine.rewards.remote) score the chunk in background threads while
the next chunk samples; local rewards score it at once (they would share the device and the CPU with sampling
anyway). `Scoring.gather` then waits for every score, since routing needs them all, and reports how long it
waited and how much remote scoring sampling hid.

A failure is never a 0: `gather` returns it (reward name and message) beside the scores, and the trainer
either stops the run or, for rewards with `on_failure: skip`, drops the iteration (engine.trainer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import RewardError
from .base import Reward, Rollout, score_rewards


@dataclass
class Scores:
    """Every reward's scores of the rollout's chunks, in chunk order, and the time spent."""

    values: dict[str, Tensor]  # name -> (N,) float32 over the chunks, for the rewards that scored them all
    failures: dict[str, RewardError]  # name -> the first error of a reward that failed on some chunk
    seconds: dict[str, float]  # name -> seconds spent scoring (summed over chunks; remote: round trips)
    wait: float  # seconds `gather` waited for outstanding remote scores
    hidden: float  # seconds of remote scoring that ran while this rank sampled or scored locally


@dataclass
class _Chunk:
    local: dict[str, Tensor | RewardError] = field(default_factory=dict)
    remote: dict[str, Future] = field(default_factory=dict)


def join_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """The chunks of one rollout as one (latents and texts, in order; media are not kept)."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], frames=None, waveforms=None, sample_rate=None)
    texts = ("prompts", "video_prompts", "audio_prompts")
    return dataclasses.replace(
        parts[0],
        video=torch.cat([p.video for p in parts]),
        audio=torch.cat([p.audio for p in parts]),
        **{name: tuple(t for p in parts for t in getattr(p, name)) for name in texts},
        frames=None,
        waveforms=None,
        sample_rate=None,
    )


def _timed(reward: Reward, rollout: Rollout) -> tuple[Tensor | RewardError, float]:
    """The reward's scores of `rollout` (or its RewardError) and the seconds they took."""
    t0 = time.perf_counter()
    try:
        (value,) = score_rewards([reward], rollout).values()
    except RewardError as e:
        value = e
    return value, time.perf_counter() - t0


class Scoring:
    """One iteration's scoring: `submit` each chunk as it is sampled, then `gather` once."""

    def __init__(self, rewards: list[Reward], pool: ThreadPoolExecutor | None, sync: Callable[[], None] = lambda: None):
        self.rewards, self.pool, self.sync = rewards, pool, sync
        self.chunks: list[_Chunk] = []
        self.seconds = dict.fromkeys((r.name for r in rewards), 0.0)

    def submit(self, rollout: Rollout) -> None:
        """Starts the remote rewards on `rollout` (background threads) and scores it with the local ones."""
        chunk = _Chunk()
        for reward in self.rewards:
            if getattr(reward, "remote", False):
                chunk.remote[reward.name] = self.pool.submit(_timed, reward, rollout)
        for reward in self.rewards:
            if not getattr(reward, "remote", False):
                value, seconds = _timed(reward, rollout)
                self.sync()  # the device's queued work belongs to this reward's time
                chunk.local[reward.name] = value
                self.seconds[reward.name] += seconds
        self.chunks.append(chunk)

    def gather(self) -> Scores:
        """Waits for every chunk's remote scores; the scores of each reward concatenated over the chunks."""
        t0 = time.perf_counter()
        results = []
        remote_seconds = 0.0
        for chunk in self.chunks:
            done = dict(chunk.local)
            for name, future in chunk.remote.items():
                done[name], seconds = future.result()
                self.seconds[name] += seconds
                remote_seconds += seconds
            results.append(done)
        wait = time.perf_counter() - t0
        values, failures = {}, {}
        for reward in self.rewards:
            parts = [r[reward.name] for r in results]
            failed = [p for p in parts if isinstance(p, RewardError)]
            if failed:
                failures[reward.name] = failed[0]
            else:
                values[reward.name] = torch.cat(parts)
        return Scores(values, failures, dict(self.seconds), wait, max(0.0, remote_seconds - wait))
