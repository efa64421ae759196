"""`omninft reward-server`: any reward (built-in, custom class) behind HTTP, so a large judge runs on its own
GPU or machine and serves every trainer rank (engine.rewards.remote is the client).

    POST /score   a rollout as safetensors bytes (engine.rewards.wire) -> its (N,) scores, same format
    GET  /info    {name, modality, reads, min_video_grid, version, wire} as JSON
    GET  /health  {status, requests, samples, batches} as JSON (no token needed: a liveness probe)

Requests from all callers are batched: the first waits up to `max_wait_ms` for others, then the pending
requests (whole, up to `max_batch` samples; a larger request is scored alone, `max_batch` at a time) that share
a grid, fps, sample rate and shapes are concatenated and scored once, in a worker thread, under score_rewards'
rules (a raise or a non-finite score is an error); the scores are split back. A request that cannot be read or
does not fit the reward is a 400 with the reason; a failed scoring is a 500 with the reward's message for the
requests of that batch; a missing or wrong token (`Authorization: Bearer <token>`, when the server has one) is a
401. None of them stops the server; SIGTERM or SIGINT does, after the requests in flight are answered.

aiohttp is imported only here (the `serve` extra); the trainer and the client do not need it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError, RewardError, UserError, one_line
from . import wire
from .base import MEDIA, Reward, RewardSpec, Rollout, build_rewards, score_rewards

if TYPE_CHECKING:
    from aiohttp import web

INSTALL = 'pip install -c .ci/constraints.txt -e ".[serve]"'
MAX_BATCH = 32  # samples per scoring call
MAX_WAIT_MS = 5.0  # how long the first pending request waits for others to batch with
MAX_REQUEST_MB = 1024  # the largest request body (a rollout with decoded media is large)


def aiohttp_web():
    """aiohttp.web, or a UserError saying how to install it."""
    try:
        from aiohttp import web
    except ImportError as e:
        raise UserError(f"omninft reward-server needs aiohttp ({e}): {INSTALL}") from e
    return web


def version() -> str:
    """The installed omninft's version, for /info."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("omninft")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class _Pending:
    rollout: Rollout
    future: asyncio.Future  # its (N,) scores, or the scoring's exception


class RewardServer:
    """One reward behind an aiohttp app; `start` listens, `stop` answers what is in flight and closes."""

    def __init__(
        self,
        reward: Reward,
        *,
        max_batch: int = MAX_BATCH,
        max_wait_ms: float = MAX_WAIT_MS,
        token: str | None = None,
        max_request_mb: float = MAX_REQUEST_MB,
    ) -> None:
        check_limits(max_batch, max_wait_ms, max_request_mb)
        self.reward = reward
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.token = token
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.counts = {"requests": 0, "samples": 0, "batches": 0}  # scored successfully
        self._pending: list[_Pending] = []
        self._arrived: asyncio.Event | None = None  # set while requests are pending (made on the server's loop)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="reward")  # one scoring at a time: models are stateful
        self._runner: web.AppRunner | None = None
        self._batcher: asyncio.Task | None = None

    def info(self) -> dict:
        """What /info answers: enough for a client to check it reaches the reward it expects."""
        return {
            "name": self.reward.name,
            "modality": self.reward.modality,
            "reads": sorted(self.reward.reads),
            "min_video_grid": list(self.reward.min_video_grid),
            "version": version(),
            "wire": wire.VERSION,
        }

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: a free port) and returns the port."""
        web = aiohttp_web()

        @web.middleware
        async def auth(request: web.Request, handler) -> web.StreamResponse:
            """401 unless the request carries the server's token (/health needs none)."""
            if self.token is not None and request.path != "/health":
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                    raise web.HTTPUnauthorized(text="missing or wrong token: send Authorization: Bearer <token>")
            return await handler(request)

        app = web.Application(middlewares=[auth], client_max_size=self.max_request_bytes)
        app.router.add_post("/score", self._score)
        app.router.add_get("/info", self._info)
        app.router.add_get("/health", self._health)
        self._arrived = asyncio.Event()
        self._batcher = asyncio.create_task(self._batch_loop())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stops listening, answers the requests in flight (up to 30 s), then stops batching."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._batcher is not None:
            self._batcher.cancel()
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is stopping"))
        self._worker.shutdown(wait=False)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return aiohttp_web().json_response({"status": "ok", **self.counts})

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return aiohttp_web().json_response(self.info())

    async def _score(self, request: web.Request) -> web.StreamResponse:
        web = aiohttp_web()
        body = await request.read()
        loop = asyncio.get_running_loop()
        try:  # off the event loop: a rollout with decoded media is large
            rollout = await loop.run_in_executor(None, wire.decode_rollout, body)
            self._check_fits(rollout)
        except ValueError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
        item = _Pending(rollout, loop.create_future())
        self._pending.append(item)
        self._arrived.set()
        try:
            scores = await item.future
        except RewardError as e:
            raise web.HTTPInternalServerError(text=str(e)) from e
        except Exception as e:  # anything else the scoring raised: the caller learns what, the server goes on
            raise web.HTTPInternalServerError(text=f"reward {self.reward.name!r}: {one_line(e)}") from e
        return web.Response(body=wire.encode_scores(scores), content_type=wire.CONTENT_TYPE)

    def _check_fits(self, rollout: Rollout) -> None:
        """ValueError (a 400) for a rollout this reward cannot score whatever the server does: media it reads
        are missing, the latent grid is smaller than it needs, or there are no samples."""
        if rollout.num_samples == 0:
            raise ValueError("the rollout has no samples")
        present = {"frames": rollout.frames is not None, "waveform": rollout.waveforms is not None}
        lacking = sorted(m for m in self.reward.reads & MEDIA if not present[m])
        if lacking:
            raise ValueError(f"reward {self.reward.name!r} reads {' and '.join(lacking)}; the rollout has none")
        need = self.reward.min_video_grid
        if any(g < n for g, n in zip(rollout.video_grid, need)):
            raise ValueError(
                f"reward {self.reward.name!r} needs a latent grid of at least {list(need)} (frames, rows, columns), "
                f"got {list(rollout.video_grid)}"
            )

    async def _batch_loop(self) -> None:
        """Forever: wait for a request, give others `max_wait` to join (until `max_batch` samples), score the
        pending requests in groups that can be concatenated, and answer them."""
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while sum(p.rollout.num_samples for p in self._pending) < self.max_batch:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    break
            batch = self._take()
            if self._pending:  # beyond max_batch: the next batch, at once
                self._arrived.set()
            else:
                self._arrived.clear()
            for group in _groups(batch):
                await self._score_group(group)

    def _take(self) -> list[_Pending]:
        """The pending requests that make the next batch: whole requests, at least one, up to `max_batch`
        samples; those whose caller left (a cancelled future) are dropped."""
        self._pending = [p for p in self._pending if not p.future.done()]
        batch, size = [], 0
        while self._pending and (not batch or size + self._pending[0].rollout.num_samples <= self.max_batch):
            batch.append(self._pending.pop(0))
            size += batch[-1].rollout.num_samples
        return batch

    async def _score_group(self, group: list[_Pending]) -> None:
        """Scores `group`'s rollouts as one in the worker thread and answers each with its slice (or with the
        exception, whatever it is: the batcher itself must never die)."""
        try:
            rollout = _concat([p.rollout for p in group])
            scores = await asyncio.get_running_loop().run_in_executor(self._worker, self._score_all, rollout)
        except Exception as e:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        start = 0
        for p in group:
            n = p.rollout.num_samples
            if not p.future.done():
                p.future.set_result(scores[start : start + n])
            start += n
        self.counts["requests"] += len(group)
        self.counts["samples"] += rollout.num_samples
        self.counts["batches"] += 1

    def _score_all(self, rollout: Rollout) -> Tensor:
        """(N,) scores of `rollout`, `max_batch` samples per call, under score_rewards' rules."""
        parts = []
        for start in range(0, rollout.num_samples, self.max_batch):
            chunk = _slice(rollout, start, start + self.max_batch)
            parts.append(score_rewards([self.reward], chunk)[self.reward.name].cpu())
        return torch.cat(parts)


def _shape_key(rollout: Rollout) -> tuple:
    """What rollouts must share to be scored as one: everything but the sample axis."""
    tensors = (rollout.video, rollout.audio, rollout.frames, rollout.waveforms)
    shapes = tuple(None if t is None else (tuple(t.shape[1:]), t.dtype) for t in tensors)
    return rollout.video_grid, rollout.fps, rollout.geometry, rollout.sample_rate, shapes


def _groups(batch: list[_Pending]) -> list[list[_Pending]]:
    """`batch` split into groups of concatenable rollouts, in arrival order."""
    groups: dict[tuple, list[_Pending]] = {}
    for item in batch:
        groups.setdefault(_shape_key(item.rollout), []).append(item)
    return list(groups.values())


def _concat(rollouts: Sequence[Rollout]) -> Rollout:
    """One rollout of the samples of `rollouts` (which share `_shape_key`), in order."""
    if len(rollouts) == 1:
        return rollouts[0]

    def cat(name: str):
        parts = [getattr(r, name) for r in rollouts]
        if parts[0] is None:
            return None
        return torch.cat(parts) if isinstance(parts[0], Tensor) else sum(parts, ())

    fields = ("video", "audio", "frames", "waveforms", "prompts", "video_prompts", "audio_prompts")
    return dataclasses.replace(rollouts[0], **{name: cat(name) for name in fields})


def _slice(rollout: Rollout, start: int, stop: int) -> Rollout:
    """Samples [start, stop) of `rollout`."""
    if start == 0 and stop >= rollout.num_samples:
        return rollout
    fields = ("video", "audio", "frames", "waveforms", "prompts", "video_prompts", "audio_prompts")
    parts = {name: getattr(rollout, name) for name in fields}
    return dataclasses.replace(rollout, **{k: v if v is None else v[start:stop] for k, v in parts.items()})


def check_limits(max_batch: int, max_wait_ms: float, max_request_mb: float) -> None:
    """ConfigError unless max_batch >= 1, max_wait_ms >= 0 and max_request_mb > 0."""
    if max_batch < 1 or not max_wait_ms >= 0 or not max_request_mb > 0:
        raise ConfigError(
            f"reward-server needs --max-batch >= 1, --max-wait-ms >= 0 and --max-request-mb > 0; got {max_batch}, "
            f"{max_wait_ms} and {max_request_mb}"
        )


def build_reward(name: str | None, cls: str | None, args: dict) -> Reward:
    """The reward to serve, built like a config entry (`{name: ...}` or `{class: ...}` with `args`), so its
    errors are the config's (ConfigError naming the reward and the argument)."""
    try:
        (reward,) = build_rewards([RewardSpec(name=name, cls=cls, args=args)])
    except ConfigError as e:
        raise ConfigError(f"reward-server: {e}") from e
    return reward


def serve(
    build: Callable[[], Reward],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_batch: int = MAX_BATCH,
    max_wait_ms: float = MAX_WAIT_MS,
    token_env: str | None = None,
    max_request_mb: float = MAX_REQUEST_MB,
    port_file: str | None = None,
) -> None:
    """Serves the reward `build()` makes until SIGTERM or SIGINT. Everything else is checked before it is built
    (a judge may take minutes to load): aiohttp, the limits, the token in the environment variable `token_env`.
    Prints one line when listening, "omninft reward-server: NAME on http://HOST:PORT", and writes the port to
    `port_file` (atomically) for scripts and tests that pass port 0."""
    aiohttp_web()
    check_limits(max_batch, max_wait_ms, max_request_mb)
    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError(f"--token-env {token_env}: the environment variable is not set")
    reward = build()
    server = RewardServer(
        reward, max_batch=max_batch, max_wait_ms=max_wait_ms, token=token, max_request_mb=max_request_mb
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            bound = await server.start(host, port)
        except OSError as e:
            raise ConfigError(f"reward-server cannot listen on {host}:{port}: {one_line(e)}") from e
        shown = f"[{host}]" if ":" in host else host
        print(f"omninft reward-server: {reward.name} on http://{shown}:{bound}", flush=True)
        if port_file is not None:
            tmp = Path(f"{port_file}.tmp")
            tmp.write_text(f"{bound}\n")
            tmp.replace(port_file)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())


def parse_args(items: Sequence[str], path: str | None) -> dict:
    """Constructor arguments from `key=value` items (YAML values, dotted keys nest: `axes.PC=-1`) and the
    `--path` shorthand for `path=`."""
    from ..config import parse_override

    args: dict = {}
    for item in items:
        keys, value = parse_override(item)
        node = args
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"argument {item!r}: {key} is not a mapping")
        node[keys[-1]] = value
    if path is not None:
        if "path" in args:
            raise ConfigError("give --path or path=..., not both")
        args["path"] = path
    return args
