"""Real reward servers on 127.0.0.1 for tests: `ThreadServer` (a RewardServer on its own event loop in a
thread: quick to start, and it hosts any reward instance) and `ServerProcess` (`python -m engine.cli
reward-server ... --port 0` as a subprocess, as users run it: started, waited for, stopped with SIGTERM or
killed). Plus small rewards that the tests host: a slow one, one that reads texts and the waveform, a broken one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from torch import Tensor

from engine.rewards import Reward, Rollout
from engine.rewards.server import RewardServer
from tests.helpers import ROOT


class ThreadServer:
    """`RewardServer(reward, **options)` listening on 127.0.0.1:<free port> (`url`) while in the `with` block."""

    def __init__(self, reward: Reward, **options) -> None:
        self.server = RewardServer(reward, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Answers what is in flight, closes the port and ends the thread (again: nothing)."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class ServerProcess:
    """`omninft reward-server *args --port 0` in a subprocess, up (its /health answers) inside the `with`
    block; `url` is its address, `stop()` sends SIGTERM, `kill()` SIGKILL. Its stdout and stderr go to files
    in `tmp` (`output()`), so a failure to start shows the server's own error."""

    def __init__(
        self, args: list[str], tmp: Path, env: dict[str, str] | None = None, start_timeout: float = 60
    ) -> None:
        self.args, self.tmp, self.env, self.start_timeout = args, tmp, env, start_timeout
        self.port_file = tmp / "port"
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, "-m", "engine.cli", "reward-server", *self.args]
        command += ["--port", "0", "--port-file", str(self.port_file)]
        self._out = open(self.tmp / "server.out", "w")  # closed in __exit__
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})}
        )
        deadline = time.monotonic() + self.start_timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"reward-server did not start: {self.output()}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
        assert health(self.url)["status"] == "ok"
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._out.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        self._out.flush()
        return (self.tmp / "server.out").read_text()


def health(url: str) -> dict:
    """The server's /health (its counts of scored requests, samples and batches)."""
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        return json.loads(answer.read())


def latent_rollout(n: int, grid: tuple[int, int, int] = (7, 3, 4), seed: int = 0) -> Rollout:
    """N random samples: latents of 16 channels on `grid`, 30 audio tokens, 24 fps."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return Rollout(
        video=torch.randn(n, f * h * w, 16, generator=g),
        audio=torch.randn(n, 30, 16, generator=g),
        video_grid=grid,
        fps=24.0,
        prompts=tuple(f"prompt {seed}.{i}" for i in range(n)),
    )


def media_rollout(n: int, seed: int = 0) -> Rollout:
    """`latent_rollout` with decoded stand-ins: frames (N, 9, 8, 8, 3) in [0, 1], stereo 16 kHz waveforms of
    0.4 s, and audio prompts of their own."""
    g = torch.Generator().manual_seed(seed)
    base = latent_rollout(n, (2, 1, 1), seed)
    return Rollout(
        video=base.video,
        audio=base.audio,
        video_grid=base.video_grid,
        fps=base.fps,
        prompts=base.prompts,
        audio_prompts=tuple("x" * (i + 1) for i in range(n)),
        frames=torch.rand(n, 9, 8, 8, 3, generator=g),
        waveforms=torch.rand(n, 2, 6400, generator=g) * 2 - 1,
        sample_rate=16000,
    )


class Slow(Reward):
    """Minus the mean absolute audio latent, after `seconds` (or until `gate` is set, if given); touches the
    file `started` when a scoring begins, so a test knows a request is being scored."""

    name = "slow"
    modality = "audio"

    def __init__(self, weight: float = 1.0, *, seconds: float = 0.0, started: str | None = None, gate=None) -> None:
        super().__init__(weight)
        self.seconds, self.started, self.gate = seconds, started, gate

    def score(self, rollout: Rollout) -> Tensor:
        if self.started is not None:
            Path(self.started).touch()
        if self.gate is not None:
            self.gate.wait(self.seconds)
        else:
            time.sleep(self.seconds)
        return -rollout.audio.abs().mean(dim=(1, 2))


class PromptLength(Reward):
    """Characters of the audio prompt plus the waveform's mean and the sample rate in kHz: a score that is
    right only if texts, waveforms and their rate all travel."""

    name = "prompt_length"
    modality = "audio"
    reads = frozenset({"waveform", "text"})

    def score(self, rollout: Rollout) -> Tensor:
        lengths = torch.tensor([len(p) for p in rollout.audio_prompts], dtype=torch.float32)
        return lengths + rollout.waveforms.mean(dim=(1, 2)) + rollout.sample_rate / 1000


class NonFinite(Reward):
    """NaN for every sample: the server must answer 500 with score_rewards' message, and keep serving."""

    name = "non_finite"
    modality = "video"

    def score(self, rollout: Rollout) -> Tensor:
        return torch.full((rollout.num_samples,), float("nan"))
