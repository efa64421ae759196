"""The CLAP reward against transformers' own pipeline (ClapProcessor's numpy feature extractor + ClapModel)
on a tiny random CLAP saved to disk and loaded back from its directory, as a real checkpoint is."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError
from engine.rewards import ClapScore, build_rewards, reads_media
from engine.rewards.base import RewardSpec
from tests.engine.rewards.rollouts import media_rollout

transformers = pytest.importorskip("transformers")
# Resolved here, at collection, so the lazy import of the CLAP modules is not charged to the first test.
ClapConfig, ClapModel, ClapProcessor = transformers.ClapConfig, transformers.ClapModel, transformers.ClapProcessor
ClapFeatureExtractor, RobertaTokenizer = transformers.ClapFeatureExtractor, transformers.RobertaTokenizer

PROMPTS = ("a dog barks twice", "rain on a tin roof", "an orchestra tunes")


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A tiny random unfused CLAP (0.1 M parameters) with a byte-level RoBERTa tokenizer and the
    laion/clap-htsat-unfused feature-extractor settings, saved like a hub checkpoint."""
    directory = tmp_path_factory.mktemp("clap")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for char in [chr(c) for c in range(97, 123)] + ["\u0120"]:  # a-z and RoBERTa's space marker
        vocab[char] = len(vocab)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[])
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            projection_dim=16,
        ),
        audio_config=dict(
            spec_size=256,  # the 1001 x 64 mel image is folded into 256 x 256, as the real model does
            patch_size=16,
            patch_stride=16,
            num_mel_bins=64,
            hidden_size=64,
            patch_embeds_hidden_size=32,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            window_size=4,
            projection_dim=16,
            enable_fusion=False,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(directory)
    extractor = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=48000,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clap(clap_dir) -> ClapScore:
    return ClapScore(path=str(clap_dir))


def noise(n: int, channels: int, samples: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, samples, generator=gen) * 0.2).clamp(-1, 1)


@pytest.mark.parametrize("seconds", [5.04, 10.0, 12.0])
def test_matches_transformers_processor_and_model(clap, clap_dir, monkeypatch, seconds):
    """Same 48 kHz stereo clips (5.04 s: repeated then padded; 12 s: cut) and texts through transformers'
    processor and model. The extractor computes the STFT in float64 but stores it as complex64 and returns
    float32 dB; we round to float32 once: the features differ by a few float32 ulps (7.6e-6 at 64 dB;
    measured max 7.6e-6), the scores by ~1e-7 (measured 3e-8), so 1e-4 dB and 1e-6 bound them. The scores
    of the three pairs differ by ~1e-2, so the bound pins the pairing too."""
    waveforms = noise(3, 2, int(48000 * seconds))
    rollout = media_rollout(waveforms=waveforms, sample_rate=48000, prompts=PROMPTS)
    ours = clap.score(rollout)
    features, longer = clap.features(waveforms, 48000)

    # The extractor cuts a longer clip at np.random.randint(0, overflow + 1); we take the middle.
    monkeypatch.setattr(np.random, "randint", lambda low, high: (high - 1) // 2)
    processor = ClapProcessor.from_pretrained(clap_dir)
    mono = list(waveforms.double().mean(dim=1).numpy())
    inputs = processor(text=list(PROMPTS), audio=mono, sampling_rate=48000, return_tensors="pt", padding=True)
    model = ClapModel.from_pretrained(clap_dir).eval()
    with torch.no_grad():
        out = model(**inputs)
    reference = (((out.text_embeds * out.audio_embeds).sum(dim=-1) + 1) / 2).clamp(0, 1)

    assert features.shape == inputs.input_features.shape == (3, 1, 1001, 64)
    torch.testing.assert_close(features, inputs.input_features, rtol=0, atol=1e-4)
    assert longer.tolist() == inputs.is_longer.tolist() == [[seconds > 10]] * 3
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert ours.shape == (3,) and ((ours >= 0) & (ours <= 1)).all() and ours.std() > 1e-3


def test_other_rates_are_resampled_to_48k(clap):
    """A two-tone clip made at 24 and 16 kHz gives the log-mel features of the same clip made at 48 kHz,
    within 0.01 and 0.1 dB in the bands within 20 dB of the peak, away from the seams where repeatpad joins
    copies (measured 0.004 and 0.043 dB: the resampler's passband ripple)."""

    def tones(rate: int) -> torch.Tensor:
        t = torch.arange(int(rate * 5.04), dtype=torch.float64) / rate
        return (0.5 * torch.sin(2 * math.pi * 1000 * t) + 0.3 * torch.sin(2 * math.pi * 5000 * t + 1)).float()

    reference, _ = clap.features(tones(48000)[None, None], 48000)
    loud = reference[0, 0] > reference.max() - 20
    loud[:20] = loud[480:] = False  # repeats join at frame 504 (5.04 s at 100 frames/s)
    for rate, tolerance in [(24000, 0.01), (16000, 0.1)]:
        features, _ = clap.features(tones(rate)[None, None], rate)
        assert (features - reference)[0, 0][loud].abs().max() < tolerance


def test_judges_the_audio_prompts(clap):
    waveforms = noise(3, 1, 48000)
    by_audio_prompt = clap.score(
        media_rollout(waveforms=waveforms, sample_rate=48000, prompts=("x", "y", "z"), audio_prompts=PROMPTS)
    )
    by_prompt = clap.score(media_rollout(waveforms=waveforms, sample_rate=48000, prompts=PROMPTS))
    torch.testing.assert_close(by_audio_prompt, by_prompt)


def test_long_prompts_are_truncated_to_the_text_model(clap):
    """RoBERTa's positions start after the padding index: 64 positions hold 62 tokens."""
    assert clap.max_text_tokens == 62
    rollout = media_rollout(waveforms=noise(1, 1, 4800), sample_rate=48000, prompts=("dog " * 100,))
    assert torch.isfinite(clap.score(rollout)).all()


def test_built_from_the_config_entry(clap_dir):
    (reward,) = build_rewards([RewardSpec(name="clap", weight=0.5, args={"path": str(clap_dir)})])
    assert isinstance(reward, ClapScore) and reward.weight == 0.5 and reward.modality == "audio"
    assert reads_media([reward]) == {"waveform"} and reward.reads == {"waveform", "text"}


def edited_copy(clap_dir, tmp_path, edit) -> str:
    """A copy of the tiny checkpoint whose config.json dict `edit` changes in place."""
    copy = tmp_path / "clap"
    shutil.copytree(clap_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_missing_directory_or_weights_name_the_reward_and_path(clap_dir, tmp_path):
    with pytest.raises(CheckpointError, match=f"reward 'clap': {tmp_path}/nowhere is not a directory"):
        ClapScore(path=str(tmp_path / "nowhere"))
    copy = edited_copy(clap_dir, tmp_path, lambda config: None)
    (tmp_path / "clap" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"reward 'clap': cannot load {copy}: OSError"):
        ClapScore(path=copy)


def test_weights_that_do_not_fit_the_config(clap_dir, tmp_path):
    def wider_projection(config):
        for section in (config, config["text_config"], config["audio_config"]):
            section["projection_dim"] = 8

    with pytest.raises(CheckpointError, match="reward 'clap': cannot load .*RuntimeError"):
        ClapScore(path=edited_copy(clap_dir, tmp_path / "a", wider_projection))
    deeper = edited_copy(clap_dir, tmp_path / "b", lambda config: config["text_config"].update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"does not fit its config\.json.*text_model\.encoder\.layer\.2"):
        ClapScore(path=deeper)


def test_fused_checkpoints_are_refused(clap_dir, tmp_path):
    fused = edited_copy(clap_dir, tmp_path, lambda config: config["audio_config"].update(enable_fusion=True))
    with pytest.raises(CheckpointError, match="fused CLAP"):
        ClapScore(path=fused)
