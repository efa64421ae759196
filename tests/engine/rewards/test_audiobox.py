"""The Audiobox Aesthetics reward against the package's own model and inference rule, on a tiny random
WavLM (the package builds its encoder from the module-level DEFAULT_AUDIO_CFG, patched here) saved to
disk and loaded back from its directory, as facebook/audiobox-aesthetics is."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.errors import CheckpointError, ConfigError
from engine.rewards import AudioboxAesthetics, build_rewards, reads_media
from engine.rewards.audiobox import AXES, WINDOW
from engine.rewards.base import RewardSpec
from tests.engine.rewards.rollouts import media_rollout

aes = pytest.importorskip("audiobox_aesthetics.model.aes")
wavlm = pytest.importorskip("audiobox_aesthetics.model.wavlm")

TARGET_TRANSFORM = {axis: {"mean": 5.0 + i, "std": 1.5 + 0.1 * i} for i, axis in enumerate(AXES)}


def tiny_encoder() -> object:
    """WavLM with 2 layers 32 wide and 16 conv channels (the real strides: 320 samples a frame)."""
    cfg = dict(vars(aes.DEFAULT_AUDIO_CFG))
    cfg.update(
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=2,
        conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
        conv_pos=16,
        conv_pos_groups=4,
    )
    return wavlm.WavLMConfig(cfg)


@pytest.fixture(autouse=True)
def tiny_default(monkeypatch):
    """Every AesMultiOutput a test builds (through our loader too) gets the tiny encoder."""
    monkeypatch.setattr(aes, "DEFAULT_AUDIO_CFG", tiny_encoder())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint directory, the package's model, our reward loaded from the directory), all tiny."""
    directory = tmp_path_factory.mktemp("audiobox")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aes, "DEFAULT_AUDIO_CFG", tiny_encoder())
        torch.manual_seed(0)
        model = aes.AesMultiOutput(nth_layer=3, target_transform=TARGET_TRANSFORM).eval()
        model.save_pretrained(directory)
        reward = AudioboxAesthetics(path=str(directory))
    return directory, model, reward


def package_inference(model, waveforms: torch.Tensor) -> dict[str, list[float]]:
    """audiobox_aesthetics.infer's rule on 16 kHz audio (infer.py itself imports torchaudio): mono; windows
    of 10 s every 10 s, the last zero-padded with a mask; one forward per window; each axis de-normalised
    with Normalize.inverse and averaged over the windows weighted by their unpadded length."""
    ratings: dict[str, list[float]] = {axis: [] for axis in AXES}
    for wav in waveforms.mean(dim=1, keepdim=True):  # (1, samples)
        predictions, weights = [], []
        for start in range(0, wav.shape[-1], WINDOW):
            window = wav[..., start : start + WINDOW]
            length = window.shape[-1]
            window = F.pad(window, (0, WINDOW - length))
            mask = torch.zeros_like(window, dtype=torch.bool)
            mask[:, :length] = True
            with torch.no_grad():
                predictions.append(model({"wav": window[None], "mask": mask[None]}))
            weights.append(length / WINDOW)
        weight = torch.tensor(weights)
        for axis in AXES:
            values = torch.cat([aes.Normalize(**TARGET_TRANSFORM[axis]).inverse(p[axis]) for p in predictions])
            ratings[axis].append(((values * weight).sum() / weight.sum()).item())
    return ratings


def test_matches_the_package_inference(tiny):
    """12.5 s stereo clips at 16 kHz: two windows each (weights 1 and 0.25), batched here and one by one
    there; float32 throughout, so ratings on the 1-10 scale agree to 1e-5 (measured: bitwise)."""
    _, model, reward = tiny
    gen = torch.Generator().manual_seed(1)
    waveforms = (torch.randn(2, 2, 200_000, generator=gen) * 0.1).clamp(-1, 1)
    reference = package_inference(model, waveforms)
    with torch.no_grad():
        ours = reward.axis_scores(waveforms, 16000)
    for axis in AXES:
        torch.testing.assert_close(ours[axis], torch.tensor(reference[axis]), rtol=0, atol=1e-5)
    score = reward.score(media_rollout(waveforms=waveforms, sample_rate=16000))
    expected = (ours["CE"] + ours["CU"] + ours["PQ"] - ours["PC"]) / 40
    torch.testing.assert_close(score, expected)


def test_windows_at_other_rates():
    """5.04 s at 24 kHz is one 16 kHz window of 80,640 samples, zero-padded to 10 s."""
    windows, mask, weights = AudioboxAesthetics.windows(torch.zeros(3, 2, 120_960), 24000)
    assert windows.shape == mask.shape == (3, 1, WINDOW)
    assert mask.sum(dim=-1).flatten().tolist() == [80_640] * 3
    torch.testing.assert_close(weights, torch.tensor([80_640 / WINDOW]))
    windows, mask, weights = AudioboxAesthetics.windows(torch.zeros(1, 1, 2 * WINDOW + 1), 16000)
    assert windows.shape == (3, 1, WINDOW)
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 1 / WINDOW]))


def test_axes_select_and_weight(tiny):
    directory, _, reward = tiny
    waveforms = torch.randn(2, 1, 16000) * 0.1
    ratings = reward.axis_scores(waveforms, 16000)
    (chosen,) = build_rewards(
        [RewardSpec(name="audiobox_aesthetics", args={"path": str(directory), "axes": {"CE": 1, "PQ": 0.5}})]
    )
    rollout = media_rollout(waveforms=waveforms, sample_rate=16000)
    torch.testing.assert_close(chosen.score(rollout), ratings["CE"] + 0.5 * ratings["PQ"])
    assert reads_media([chosen]) == {"waveform"} and chosen.modality == "audio"


@pytest.mark.parametrize(
    "axes,match",
    [
        ({"XX": 1}, "unknown axis XX"),
        ({"CE": "1"}, "axes.CE must be a finite number"),
        ({"CE": float("nan")}, "axes.CE must be a finite number"),
        ({"CE": 0, "PQ": 0}, "all 0"),
        ({}, "non-empty mapping"),
    ],
)
def test_bad_axes_are_config_errors(tiny, axes, match):
    directory, _, _ = tiny
    with pytest.raises(ConfigError, match=rf"rewards\[0\]: building audiobox_aesthetics raised ValueError: .*{match}"):
        build_rewards([RewardSpec(name="audiobox_aesthetics", args={"path": str(directory), "axes": axes})])


def test_missing_directory_or_weights_name_the_reward_and_path(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=f"reward 'audiobox_aesthetics': {tmp_path} lacks config.json"):
        AudioboxAesthetics(path=str(tmp_path))
    with pytest.raises(CheckpointError, match="is not a directory"):
        AudioboxAesthetics(path=str(tmp_path / "nowhere"))


def test_weights_that_do_not_fit_are_refused(tiny, tmp_path):
    directory, _, _ = tiny
    deeper = tmp_path / "deeper"
    shutil.copytree(directory, deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "proj_num_layer": 2}))
    with pytest.raises(CheckpointError, match=f"(?s)cannot load {deeper}: RuntimeError.*proj_layer"):
        AudioboxAesthetics(path=str(deeper))
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    (bare / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "target_transform"}))
    with pytest.raises(CheckpointError, match="lacks target_transform"):
        AudioboxAesthetics(path=str(bare))
