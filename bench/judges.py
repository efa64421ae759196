"""Seconds per clip and weight memory of the paper's judges: VideoAlign (Qwen2-VL-2B), HPSv3 (Qwen2-VL-7B) and
Synchformer DeSync, at the paper's clip shape with random weights.

    python -m bench.judges [--judges videoalign hpsv3 desync] [--frames 121] [--height 512] [--width 768]
                           [--fps 24] [--audio-seconds 5] [--dtype bfloat16] [--layers N] [--out PATH]

Each judge is built at its real shape with random weights (`random_videoalign`, `random_hpsv3`, `random_desync`:
the released configs, a stand-in tokenizer; what a clip costs does not depend on the weights' values) and scores
one clip: `--frames` RGB frames of `--height` x `--width` at `--fps`, and `--audio-seconds` of 24 kHz stereo (the
LTX-2 vocoder's output). Reported per judge: seconds for the clip (after one warm-up clip), parameters and their
bytes in the judge's dtype. `--layers N` cuts every transformer stack to N layers (a smoke test of this script;
the figures are then not the judges'). Writes bench/results/<device>-<date>-judges.json.

Where each should run: the weights (and activations) share the device with the DiT when in-process; a judge
that does not fit beside the policy's training state, or that would hold the trainer up, goes on a reward
server (`omninft reward-server`, README "Reward servers").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import date

import torch

from bench.measure import CUDA, device_label, package_versions, report
from engine.rewards import Rollout
from engine.rewards.desync import random_desync
from engine.rewards.hpsv3 import random_hpsv3
from engine.rewards.qwen2vl import QWEN2VL_2B, QWEN2VL_7B
from engine.rewards.videoalign import random_videoalign

JUDGES = ("videoalign", "hpsv3", "desync")
SAMPLE_RATE = 24_000  # the LTX-2 vocoder's


def _cut(config: dict, layers: int | None) -> dict:
    """A Qwen2-VL config with `layers` language layers and vision blocks (None: as released)."""
    if layers is None:
        return config
    return {**config, "num_hidden_layers": layers, "vision_config": {**config["vision_config"], "depth": layers}}


def build(judge: str, device: torch.device, dtype: torch.dtype, layers: int | None) -> tuple[Callable, list]:
    """The judge's scoring call on a Rollout and the parameters it holds."""
    torch.manual_seed(0)
    if judge == "desync":
        config = None if layers is None else {"video_depth": layers, "audio_depth": layers, "sync_depth": layers}
        reward = random_desync(device, str(dtype).removeprefix("torch."), config=config)
        return reward.score, list(reward.model.parameters())
    if judge == "videoalign":
        scorer = random_videoalign(device, dtype, config=_cut(QWEN2VL_2B, layers))
        params = list(scorer.backbone.model.parameters()) + list(scorer.head.parameters())
        return lambda r: scorer.score(r.frames, r.fps, list(r.video_prompts)), params
    scorer = random_hpsv3(device, dtype, config=_cut(QWEN2VL_7B, layers))
    params = list(scorer.backbone.model.parameters()) + list(scorer.head.parameters())
    return lambda r: scorer.score(r.frames, list(r.video_prompts)), params


def clip(args: argparse.Namespace, device: torch.device) -> Rollout:
    """One sample with random frames in [0, 1] and a random waveform in [-1, 1] (latents are placeholders)."""
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(1, args.frames, args.height, args.width, 3, generator=g).to(device)
    waveform = (torch.rand(1, 2, int(args.audio_seconds * SAMPLE_RATE), generator=g) * 2 - 1).to(device)
    prompt = "a dog barks twice in a quiet park while leaves rustle in the wind"
    return Rollout(
        video=torch.zeros(1, 1, 1),
        audio=torch.zeros(1, 1, 1),
        video_grid=(1, 1, 1),
        fps=args.fps,
        prompts=(prompt,),
        frames=frames,
        waveforms=waveform,
        sample_rate=SAMPLE_RATE,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judges", nargs="+", choices=JUDGES, default=list(JUDGES))
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--layers", type=int, help="cut every stack to N layers (smoke test; not the judges' figures)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, args.dtype)
    rollout = clip(args, device)
    rows = {}
    for judge in args.judges:
        score, params = build(judge, device, dtype, args.layers)
        with torch.no_grad():
            score(rollout)  # warm-up: kernels, caches
            if CUDA:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            value = score(rollout)
            if CUDA:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        count = sum(p.numel() for p in params)
        rows[judge] = {
            "seconds_per_clip": seconds,
            "parameters": count,
            "weight_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "score": float(value.reshape(-1)[0]),
        }
        print(
            f"{judge:10s} {seconds:8.2f} s/clip  {count / 1e9:6.3f} B parameters  {rows[judge]['weight_gib']:.2f} GiB"
        )
        del score, params
    result = {
        "bench": "judges",
        "device": device_label(device),
        "date": date.today().isoformat(),
        "figures": "CPU figures" if not CUDA else "GPU figures",
        "dtype": args.dtype,
        "clip": {
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "fps": args.fps,
            "audio_seconds": args.audio_seconds,
            "sample_rate": SAMPLE_RATE,
        },  # fmt: skip
        "layers": args.layers or "as released",
        "versions": package_versions("transformers"),
        "judges": rows,
    }
    report(result, args.out, "judges")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
