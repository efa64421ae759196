"""A reward scored by `omninft reward-server` (engine.rewards.server), on this machine or another: a config
entry with `url` (one URL, or replicas). The judges are large models (a 7B VLM), so they run apart from the
trainer and are shared by its ranks; this client makes them a dependable part of the loop.

- Start: every replica is asked for its /info (name, modality, reads, wire format), so an unreachable or
  mismatched server fails the run before any sampling, in one line naming the reward and the URL.
- `score` is blocking and thread-safe (the trainer may score chunks from several threads at once): it sends
  the rollout (engine.rewards.wire: only what the reward reads) to the replica with the fewest requests in
  flight (round robin among equals), at most `concurrency` requests in flight from this process, each within
  `timeout` seconds. Transient failures (connection errors, timeouts, HTTP 5xx) are retried `retries` times
  with exponential backoff, each retry on another replica (a failed replica is passed over for COOLDOWN_S
  seconds while another is up); a 4xx (a bad request, a refused token) and a malformed answer are not.
  What is left is a RewardError naming the reward, the URL and the cause: never a 0 in place of a score.

The stdlib HTTP client (one connection per request, in the calling thread): the trainer needs no aiohttp.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from urllib.parse import urlsplit

import torch
from torch import Tensor

from ..errors import RewardError, one_line
from . import wire
from .base import REGISTRY, Reward, RewardSpec, Rollout

log = logging.getLogger(__name__)
COOLDOWN_S = 10.0  # a replica that just failed is passed over for this long while another one is up


class _Transient(Exception):
    """A failure a retry may cure: no connection, no answer in time, an HTTP 5xx."""


@dataclass
class _Replica:
    url: str  # base URL, no trailing slash
    in_flight: int = 0  # requests of this process it is serving now
    failed_at: float = -math.inf  # time.monotonic() of its last transient failure (-inf: it answered since)


class RemoteReward(Reward):
    """A reward whose `score` is a request to a reward server (or one of several replicas); `modality` and
    `reads` are the server's, read from /info at construction."""

    remote = True

    def __init__(
        self,
        name: str,
        url: str | list[str],
        weight: float = 1.0,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        concurrency: int = 4,
        token: str | None = None,
        backoff: float = 0.5,
    ) -> None:
        """`timeout`: seconds per request (connect, send, answer); `retries` of transient failures, the k-th
        after `backoff` * 2^(k-1) seconds; `concurrency`: requests in flight from this process; `token`: the
        server's shared token. Asks every replica for /info: RewardError if one is unreachable, refuses the
        token, or disagrees with the others (or, for a built-in `name`, with its modality)."""
        self.name = name
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._token = token
        self._replicas = [_Replica(u.rstrip("/")) for u in ([url] if isinstance(url, str) else url)]
        self._lock = threading.Lock()  # guards the replicas' in_flight counts and the turn
        self._turn = 0  # the replica that wins a tie next: round robin among equally loaded replicas
        self._slots = threading.BoundedSemaphore(concurrency)
        infos = {r.url: self._info(r.url) for r in self._replicas}
        first_url, first = next(iter(infos.items()))
        for url, info in infos.items():
            if info != first:
                raise RewardError(f"reward {name!r}: replicas disagree: {first_url} serves {first}, {url} {info}")
        self.modality, self.reads = first["modality"], frozenset(first["reads"])
        try:
            super().__init__(weight)  # checks the declarations the server sent
        except ValueError as e:
            raise RewardError(f"reward {name!r}: {first_url}: {e}") from e
        local = REGISTRY.get(name)
        if local is not None and local.modality != self.modality:
            raise RewardError(
                f"reward {name!r}: {first_url} serves {first['name']!r} of modality {self.modality!r}, but the "
                f"built-in {name!r} is {local.modality!r}: is it the right server?"
            )

    @classmethod
    def from_spec(cls, spec: RewardSpec, weight: float) -> RemoteReward:
        """The reward of a checked config entry with `url` (the token read from `token_env`)."""
        token = None
        if spec.token_env is not None:
            token = os.environ.get(spec.token_env)
            if not token:
                raise RewardError(
                    f"reward {spec.name!r}: token_env {spec.token_env} is not set (the environment variable "
                    "holding the server's token)"
                )
        return cls(
            spec.name,
            spec.url,
            weight,
            timeout=spec.timeout,
            retries=spec.retries,
            concurrency=spec.concurrency,
            token=token,
        )

    def score(self, rollout: Rollout) -> Tensor:
        """(N,) float32 scores from a server; RewardError naming the reward and the URL when there are none."""
        if rollout.num_samples == 0:  # e.g. a rank without samples: nothing to ask
            return torch.empty(0)
        try:
            body = wire.encode_rollout(rollout, self.reads)
        except ValueError as e:
            raise RewardError(f"reward {self.name!r}: {e}") from e
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._slots:
                replica, failed = self._pick(), None
                try:
                    data = self._request(replica.url, "POST", "/score", body)
                except _Transient as e:
                    failed = e
                finally:
                    with self._lock:
                        replica.in_flight -= 1
                        replica.failed_at = time.monotonic() if failed is not None else -math.inf
            if failed is not None:
                if attempt < self.retries:
                    log.warning(
                        "reward %r: %s: %s; retry %d of %d", self.name, replica.url, failed, attempt + 1, self.retries
                    )
                continue
            try:
                return wire.decode_scores(data, rollout.num_samples)
            except ValueError as e:
                raise RewardError(f"reward {self.name!r}: malformed answer from {replica.url}: {e}") from e
        raise RewardError(
            f"reward {self.name!r}: scoring failed {self.retries + 1} times, the last at {replica.url}: {failed}"
        )

    def _pick(self) -> _Replica:
        """The replica to send to, counted in flight until the caller is done: among those that did not fail
        in the last COOLDOWN_S seconds (if any did not), the one with the fewest requests in flight, ties taken
        in turn (round robin). So a retry goes to another replica, and a dead one is left alone for a while."""
        with self._lock:
            n, now = len(self._replicas), time.monotonic()

            def rank(i: int) -> tuple:
                replica = self._replicas[i]
                return now - replica.failed_at < COOLDOWN_S, replica.in_flight, (i - self._turn) % n

            index = min(range(n), key=rank)
            self._turn = (index + 1) % n
            replica = self._replicas[index]
            replica.in_flight += 1
            return replica

    def _info(self, url: str) -> dict:
        """A replica's /info as {name, modality, reads, wire}, retried like a score; RewardError if unreachable."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                data = self._request(url, "GET", "/info", None)
                break
            except _Transient as e:
                cause = e
        else:
            raise RewardError(f"reward {self.name!r}: {url} unreachable ({cause})")
        try:
            info = json.loads(data)
            info = {k: info[k] for k in ("name", "modality", "reads", "wire")}
            if not isinstance(info["reads"], list) or not all(isinstance(r, str) for r in info["reads"]):
                raise ValueError(f"reads is {info['reads']!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise RewardError(
                f"reward {self.name!r}: {url} is not an omninft reward server (/info: {one_line(e)})"
            ) from e
        if info["wire"] != wire.VERSION:
            raise RewardError(
                f"reward {self.name!r}: {url} speaks wire format {info['wire']!r}, this client {wire.VERSION}: "
                "run the same omninft version on both sides"
            )
        return {**info, "reads": sorted(info["reads"])}

    def _request(self, url: str, method: str, path: str, body: bytes | None) -> bytes:
        """The body of a 200 answer to `method url+path`, all within `timeout` seconds. _Transient for what a
        retry may cure (no connection, no answer in time, 5xx); RewardError for what it cannot (4xx)."""
        parts = urlsplit(url)
        connection = HTTPSConnection if parts.scheme == "https" else HTTPConnection
        deadline = time.monotonic() + self.timeout
        conn = connection(parts.hostname, parts.port, timeout=self.timeout)
        headers = {"Content-Type": wire.CONTENT_TYPE}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.connect()
            # http.client sends the headers and a large body in two writes: no Nagle wait for the second.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.request(method, parts.path + path, body=body, headers=headers)
            status, data = _response(conn, deadline)
        except TimeoutError as e:
            raise _Transient(f"no answer within {self.timeout:g} s (timeout)") from e
        except (OSError, HTTPException) as e:
            raise _Transient(one_line(e, 200)) from e
        finally:
            conn.close()
        text = " ".join(data[:300].decode("utf-8", "replace").split())
        if status >= 500:
            raise _Transient(f"HTTP {status}: {text}")
        if status == 401:
            raise RewardError(
                f"reward {self.name!r}: {url} refused the token (HTTP 401: {text}); set token_env to the "
                "environment variable holding the server's token"
            )
        if status != 200:
            raise RewardError(f"reward {self.name!r}: {url}{path} answered HTTP {status}: {text}")
        return data


def _response(conn: HTTPConnection, deadline: float) -> tuple[int, bytes]:
    """The status and body of the answer on `conn`, read by chunks with the socket's timeout set to what is
    left before `deadline` (TimeoutError when nothing is): one timeout for the whole request, however the
    server trickles its bytes."""
    sock = conn.sock  # getresponse may hand the socket to the response and forget it

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        return remaining

    sock.settimeout(left())
    response = conn.getresponse()
    chunks = []
    while not response.isclosed():  # it closes itself once the body is read (and may close the socket)
        sock.settimeout(left())
        chunks.append(response.read(1 << 20))
    return response.status, b"".join(chunks)
