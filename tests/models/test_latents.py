"""LTX-2 latent geometry: what each latent token covers in time and pixels, the audio length of a
clip, and the 48-block depth scale."""

from __future__ import annotations

import pytest
import torch

import models
from models.latents import REFERENCE_DEPTH, LatentGeometry, frame_ids, reference_block

FPS = 24.0


def test_video_frame_times():
    t = LatentGeometry().frame_times(4, FPS)
    assert t.dtype == torch.float64 and t.shape == (4,)
    assert t[0].item() == pytest.approx(0.5 / FPS)
    assert t[1].item() == pytest.approx(5 / FPS)  # frame 1 covers [1, 9) pixel frames
    assert t[3].item() == pytest.approx(21 / FPS)  # frame 3 covers [17, 25)
    assert LatentGeometry().frame_spans(3).tolist() == [[0, 1], [1, 9], [9, 17]]


def test_audio_token_times():
    t = LatentGeometry().audio_token_times(6)
    assert t.dtype == torch.float64 and t.shape == (6,)
    assert t[0].item() == pytest.approx(0.005)  # [0, 0.01]
    assert t[1].item() == pytest.approx(0.03)  # [0.01, 0.05]
    assert t[5].item() == pytest.approx(0.19)  # [0.17, 0.21]
    assert LatentGeometry().mel_spans(3).tolist() == [[0, 1], [1, 5], [5, 9]]


def test_clip_lengths():
    g = LatentGeometry()
    assert g.audio_tokens_per_second == 25.0
    assert g.pixel_frames(16) == 121  # the paper's 121-frame clips
    assert g.audio_tokens_for(16, 24.0) == 126  # 121 / 24 s at 25 tokens per second
    assert g.audio_tokens_for(1, 24.0) == 2  # never fewer than 2


def test_model_configs_carry_the_ltx2_geometry():
    for cfg in models.PRESETS.values():
        assert cfg.geometry == LatentGeometry()
    assert models.ModelConfig(vae_scale_factors=(4, 16, 16)).geometry.pixel_stride == (16, 16)


def test_reference_block_keeps_relative_depth():
    assert [reference_block(b, 4) for b in range(4)] == [0, 12, 24, 36]
    assert [reference_block(b, REFERENCE_DEPTH) for b in range(REFERENCE_DEPTH)] == list(range(REFERENCE_DEPTH))
    with pytest.raises(ValueError, match="num_layers"):
        reference_block(0, 0)


def test_frame_ids_are_f_major():
    assert frame_ids((3, 1, 2)).tolist() == [0, 0, 1, 1, 2, 2]
