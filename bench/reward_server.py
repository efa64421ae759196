"""Rewards as a service: scoring throughput in-process against through `omninft reward-server`, and what each
request costs on top (milliseconds and bytes).

    python -m bench.reward_server [--rewards NAME ...] [--batch-sizes N ...] [--reps N] [--threads N] [--out PATH]

For each reward (default: the embedded latent rewards) one server runs as a subprocess on 127.0.0.1, as users
run it, with `--max-wait-ms 0` (a lone caller waits for no batch); a RemoteReward scores random latents of the
tiny task's shapes (16 channels on a 7x3x4 grid, 51 audio tokens) at each batch size. The in-process times are
taken first, with no server running; both sides use `--threads` torch threads (default 1: with more, a
small CPU's OpenMP threads stall whenever another process takes a core). Per batch size: the median seconds of
one in-process score_rewards call and of one remote call, samples/s of each, the overhead of a request (remote
minus in-process, in ms: serialising, HTTP on the loopback, the server's parsing and batching) and its bytes
(the safetensors bodies of the request and of the answer; HTTP headers, about 200 bytes each way, are not
counted).

Writes bench/results/<device>-<date>-reward-server.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

from bench.measure import device_label, package_versions, report, timer
from engine.rewards import LATENT_REWARDS, REGISTRY, Rollout, score_rewards, wire
from engine.rewards.remote import RemoteReward
from models.latents import LatentGeometry

ROOT = Path(__file__).resolve().parents[1]
GRID, CHANNELS, FPS = (7, 3, 4), 16, 24.0  # the tiny task's


@contextmanager
def server(name: str) -> Iterator[str]:
    """`omninft reward-server --reward name --port 0` as a subprocess; yields its URL, stops it (SIGTERM)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        command = [sys.executable, "-m", "engine.cli", "reward-server", "--reward", name, "--port", "0"]
        command += ["--port-file", str(port_file), "--max-wait-ms", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the bench's own
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"reward-server --reward {name} did not start (exit status {proc.poll()})")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{int(port_file.read_text())}"
        finally:
            proc.terminate()
            proc.wait(30)


def rollout(n: int) -> Rollout:
    """N samples of random latents of the tiny task's shapes."""
    g = torch.Generator().manual_seed(n)
    f, h, w = GRID
    tokens = LatentGeometry().audio_tokens_for(f, FPS)
    return Rollout(
        video=torch.randn(n, f * h * w, CHANNELS, generator=g),
        audio=torch.randn(n, tokens, CHANNELS, generator=g),
        video_grid=GRID,
        fps=FPS,
        prompts=tuple(f"prompt {i}" for i in range(n)),
    )


def bench_reward(name: str, batch_sizes: list[int], reps: int) -> list[dict]:
    """One row per batch size: in-process and remote times, rates, overhead and bytes (the remote scores
    checked equal to the in-process ones first). The in-process times are taken before the server starts: on a
    small CPU its idle OpenMP threads would steal cores from them."""
    local = REGISTRY[name]()
    batches = {n: rollout(n) for n in batch_sizes}
    local_s = {n: timer(lambda b=b: score_rewards([local], b), reps) for n, b in batches.items()}
    rows = []
    with server(name) as url:
        remote = RemoteReward(name, url)
        for n, batch in batches.items():
            if not torch.equal(remote.score(batch), score_rewards([local], batch)[name]):
                raise AssertionError(f"{name}: remote scores differ from in-process ones at batch {n}")
            remote_s = timer(lambda b=batch: remote.score(b), reps)
            request = len(wire.encode_rollout(batch, local.reads))
            rows.append(
                {
                    "reward": name,
                    "batch": n,
                    "in_process_s": local_s[n],
                    "remote_s": remote_s,
                    "in_process_samples_per_s": n / local_s[n],
                    "remote_samples_per_s": n / remote_s,
                    "overhead_ms": (remote_s - local_s[n]) * 1e3,
                    "request_bytes": request,
                    "answer_bytes": len(wire.encode_scores(torch.zeros(n))),
                    "request_bytes_per_sample": request / n,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewards", nargs="+", default=list(LATENT_REWARDS), choices=sorted(LATENT_REWARDS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per point (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/<device>-<date>-reward-server.json)"
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = [row for name in args.rewards for row in bench_reward(name, args.batch_sizes, args.reps)]
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test session
    result = {
        "bench": "reward_server",
        "device": device_label(torch.device("cpu")),
        "host": platform.node(),
        "date": date.today().isoformat(),
        "versions": package_versions("aiohttp"),
        "torch_threads": args.threads,
        "reps": args.reps,
        "shapes": {"video_grid": list(GRID), "channels": CHANNELS, "audio_tokens": rollout(1).audio.shape[1]},
        "server": {"host": "127.0.0.1", "max_wait_ms": 0.0, "process": "subprocess"},
        "rows": rows,
        "overhead_ms_median": sorted(r["overhead_ms"] for r in rows)[len(rows) // 2],
    }
    report(result, args.out, "reward-server")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
