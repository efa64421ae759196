"""Training, evaluation and sampling with a reward that reads decoded media, on tiny random LTX-2 weights
in one diffusers pipeline folder (DiT, video VAE, audio VAE, vocoder): decoding happens only then, the
media rewards score real frames and waveforms, and media land as mp4 + wav files and tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import models
from engine.cli import main
from engine.config import load_config
from engine.metrics import read_metrics
from engine.rewards import Reward, Rollout
from engine.trainer import Trainer
from models.layouts import diffusers_config
from tests.helpers import SMALL

from .rewards import tiny_decoders

diffusers = pytest.importorskip("diffusers")
av = pytest.importorskip("av")

MEDIA = [
    "rewards=[{name: video_sharpness}, {name: av_align}]",
    "decode.dtype=float32",
    "task.eval_prompts=[a cat purrs]",
    "eval.samples_per_prompt=2",
    "eval.sampler.steps=2",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("media") / "pipe"
    torch.manual_seed(0)
    diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"])).save_pretrained(
        root / "transformer"
    )
    tiny_decoders.write_folder(root, tiny_decoders.video_vae(), tiny_decoders.audio_vae(), tiny_decoders.vocoder())
    return root


def _streams(path) -> dict[str, float]:
    with av.open(str(path)) as f:
        return {s.type: float(s.duration * s.time_base) for s in f.streams}


def test_media_rewards_decode_score_and_save(pipeline, tmp_path) -> None:
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *SMALL,
            f"run_dir={run}",
            f"model.init={pipeline}",
            "iterations=1",
            "eval.every=1",
            "log.media_every=1",
            *MEDIA,
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.media_parts == {"frames", "waveform"} and trainer.decoders is not None
    (metrics,) = trainer.run()
    assert metrics["time/decode"] > 0 and "time/reward/av_align" in metrics
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("reward/av_align", "eval/reward/av_align", "loss"))
    assert read_metrics(run / "metrics.jsonl")[0]["eval/reward/av_align"] == metrics["eval/reward/av_align"]
    # Media of training (first two samples) and of evaluation: 17 frames at 24 fps with a 24 kHz track.
    for kind in ("train_000000", "eval_000000"):
        for k in range(2):
            streams = _streams(run / "media" / kind / f"sample_{k:03d}.mp4")
            assert set(streams) == {"video", "audio"} and abs(streams["video"] - 17 / 24) < 1e-3
            assert (run / "media" / kind / f"sample_{k:03d}.wav").is_file()

    # A latent-only reward set never loads a decoder.
    plain = Trainer(load_config(None, [*SMALL, f"run_dir={tmp_path / 'plain'}", f"model.init={pipeline}"]))
    assert plain.decoders is None and plain.media_parts == set()


def test_sample_writes_media_tensors_and_files(pipeline, tmp_path, capsys) -> None:
    out = tmp_path / "samples"
    assert main(["sample", "--out", str(out), "--prompt", "a dog barks", f"model.init={pipeline}", *SMALL, *MEDIA]) == 0
    with safe_open(str(out / "samples.safetensors"), "pt") as f:
        meta, video, audio = f.metadata(), f.get_tensor("video"), f.get_tensor("audio")
    assert video.shape == (3, 17, 64, 64, 3) and video.dtype == torch.float32 and 0 <= video.min() <= video.max() <= 1
    assert audio.shape[:2] == (3, 2) and json.loads(meta["sample_rate"]) == 24000
    assert abs(_streams(out / "sample_002.mp4")["audio"] - audio.shape[-1] / 24000) < 0.05
    assert (out / "sample_000.wav").is_file()
    # Weights without decoders: latents only, said in one line; --media on makes it an error.
    dit = tmp_path / "dit.safetensors"
    models.save_model(models.build_model("tiny"), dit)
    argv = ["sample", "--out", str(tmp_path / "latents"), f"model.init={dit}", *SMALL]
    assert main(argv) == 0 and "media: none" in capsys.readouterr().out
    assert main([*argv[:3], "--media", "on", *argv[3:]]) == 2


class Loudness(Reward):
    """A reward that reads the waveform only: the run loads the audio decoders alone."""

    name, modality, reads = "loudness", "audio", frozenset({"waveform"})

    def score(self, rollout: Rollout) -> torch.Tensor:
        return rollout.waveforms.pow(2).mean(dim=(1, 2))


def test_audio_only_rewards_load_audio_decoders_and_evaluate(pipeline, tmp_path) -> None:
    audio_only = ["rewards=[{class: tests.engine.test_media_run:Loudness}]", *MEDIA[1:]]
    run = tmp_path / "run"
    cfg = load_config(
        None, [*SMALL, f"run_dir={run}", f"model.init={pipeline}", "iterations=1", "eval.every=1", *audio_only]
    )
    trainer = Trainer(cfg)
    assert trainer.decoders.vae is None and trainer.decoders.vocoder is not None
    (metrics,) = trainer.run()
    assert metrics["eval/reward/loudness"] > 0
    assert (run / "media" / "eval_000000" / "sample_000.wav").is_file()  # no frames: a wav alone
    assert not list((run / "media" / "eval_000000").glob("*.mp4"))
    # --media off skips the files, not the decoding the rewards need.
    out = tmp_path / "samples"
    assert main(["sample", "--out", str(out), "--media", "off", f"model.init={pipeline}", *SMALL, *audio_only]) == 0
    assert not list(out.glob("*.mp4")) and "reward/loudness" in load_file(out / "samples.safetensors")
