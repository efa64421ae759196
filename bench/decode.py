"""Decoding and media rewards: clips/s of the LTX-2 decoders, and the share of a training iteration spent
decoding and scoring, per reward.

    python -m bench.decode [--divisor D] [--grid F H W] [--iterations N] [--out PATH]

1. Throughput: random stand-ins of the 19B decoders (`engine.rewards.decode`'s conversion-script configs, the
   video VAE's and vocoder's channel widths divided by `--divisor`: 1 on CUDA, 32 on a CPU; the audio VAE at full
   width, as its statistics fix its base width) are saved as a diffusers folder and loaded through
   `Decoders`, then timed on one clip of `--grid` latents (CUDA: 16x16x24, the paper's 121 frames at
   768x512; CPU: 3x4x6, 17 frames at 192x128) with its 25-per-second audio tokens, in bf16 on CUDA.
2. Iteration share: `--iterations` of the tiny task with the embedded latent rewards and `av_align`
   (which reads frames and waveforms) on a random pipeline folder (the tiny DiT, stand-in decoders / 32);
   the metrics' `time/decode` and
   `time/reward/<name>` over `time/iteration`, averaged after the first iteration.

Writes bench/results/<device>-<date>-decode.json with the device, shapes, times and rates.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

import models
from bench.measure import CUDA, device_label, package_versions, report, timer
from engine.config import load_config
from engine.rewards.decode import DecodeConfig, Decoders
from engine.rewards.decoder_files import AUDIO_VAE_19B, VIDEO_VAE_19B, VOCODER_19B
from engine.trainer import Trainer
from models.latents import LatentGeometry
from models.layouts import diffusers_config


def stand_in_folder(
    root: Path, divisor: int, latent_channels: int = 128, audio_latent_channels: int = 8, mel_bins: int = 64
) -> Path:
    """A diffusers folder with random decoders of the 19B structure: the video VAE's and vocoder's channel
    widths / `divisor`; the audio VAE's base width is latent channels x mel bins / 4, the packed token width its
    statistics are applied to (128 for 19B)."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2 import LTX2Vocoder

    video = dict(VIDEO_VAE_19B, latent_channels=latent_channels)
    for key in ("block_out_channels", "decoder_block_out_channels"):
        video[key] = tuple(c // divisor for c in video[key])
    audio = dict(
        AUDIO_VAE_19B,
        latent_channels=audio_latent_channels,
        mel_bins=mel_bins,
        base_channels=audio_latent_channels * mel_bins // 4,
    )
    vocoder = dict(VOCODER_19B, in_channels=2 * mel_bins, hidden_channels=VOCODER_19B["hidden_channels"] // divisor)
    torch.manual_seed(0)
    AutoencoderKLLTX2Video(**video).save_pretrained(root / "vae")
    AutoencoderKLLTX2Audio(**audio).save_pretrained(root / "audio_vae")
    LTX2Vocoder(**vocoder).save_pretrained(root / "vocoder")
    return root


def throughput(divisor: int, grid: tuple[int, int, int], fps: float, reps: int) -> dict:
    device = torch.device("cuda" if CUDA else "cpu")
    cfg = DecodeConfig()  # dtype auto: bf16 on CUDA, fp32 on a CPU
    tokens = LatentGeometry().audio_tokens_for(grid[0], fps)
    with tempfile.TemporaryDirectory() as tmp:
        decoders = Decoders(cfg, str(stand_in_folder(Path(tmp), divisor)), device)
    f, h, w = grid
    video = torch.randn(1, f * h * w, 128)
    audio = torch.randn(1, tokens, 128)

    def sync(x):
        if CUDA:
            torch.cuda.synchronize()
        return x

    video_s = timer(lambda: sync(decoders.frames(video, grid, noise_keys=[(0,)])), reps)
    audio_s = timer(lambda: sync(decoders.waveforms(audio)), reps)
    frames = decoders.frames(video, grid, noise_keys=[(0,)])
    wave = decoders.waveforms(audio)
    return {
        "divisor": divisor,
        "dtype": str(decoders.dtype).removeprefix("torch."),
        "video_grid": list(grid),
        "frames": list(frames.shape[1:]),
        "audio_tokens": tokens,
        "waveform": list(wave.shape[1:]),
        "sample_rate": decoders.sample_rate,
        "video_decode_s": video_s,
        "video_clips_per_s": 1 / video_s,
        "audio_decode_s": audio_s,
        "audio_clips_per_s": 1 / audio_s,
    }


def iteration_share(iterations: int) -> dict:
    """Mean shares of an iteration (after the first) spent decoding and in each reward, on the tiny task."""
    from diffusers import LTX2VideoTransformer3DModel

    tiny = models.PRESETS["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pipe"
        torch.manual_seed(0)
        LTX2VideoTransformer3DModel(**diffusers_config(tiny)).save_pretrained(root / "transformer")
        # Decoders that fit the tiny DiT: 16 video latent channels, 4 audio channels x 16 / 4 mel bins = 16.
        stand_in_folder(root, divisor=32, latent_channels=tiny.in_channels, audio_latent_channels=4, mel_bins=16)
        cfg = load_config(
            None,
            [
                f"model.init={root}",
                f"run_dir={Path(tmp) / 'run'}",
                f"iterations={iterations}",
                "rewards=[{name: video_sharpness}, {name: audio_steadiness}, {name: av_sync}, {name: av_align}]",
                "decode.dtype=float32",
                "checkpoint_every=0",
                "log.progress=false",
                "log.tensorboard=false",
                "log.plot=false",
            ],
        )
        history = Trainer(cfg).run()
    history = history[1:] or history  # the first iteration pays one-off costs
    keys = ["time/decode", *sorted(k for k in history[0] if k.startswith("time/reward/"))]
    total = sum(row["time/iteration"] for row in history)
    return {
        "iterations": len(history),
        "samples_per_iteration": cfg.train.prompts_per_iteration * cfg.train.group_size,
        "video_grid": cfg.task.video_grid,
        "dtype": "float32",
        "iteration_s": total / len(history),
        "share": {k.removeprefix("time/"): sum(row[k] for row in history) / total for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divisor", type=int, default=1 if CUDA else 32, help="decoder channel widths / this")
    parser.add_argument("--grid", type=int, nargs=3, default=[16, 16, 24] if CUDA else [3, 4, 6])
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--iterations", type=int, default=3, help="tiny-task iterations for the share (0: skip)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 CUDA, 2 CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-decode.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    result = {
        "bench": "decode",
        "device": device_label(device),
        "host": platform.node(),
        "date": date.today().isoformat(),
        "versions": package_versions("diffusers"),
        "throughput": throughput(args.divisor, tuple(args.grid), args.fps, args.reps or (5 if CUDA else 2)),
    }
    if args.iterations:
        result["iteration"] = iteration_share(args.iterations)
    report(result, args.out, "decode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
