"""engine.rewards.audio: the resampler against its defining sum and against analytic tones, the mel filters
against transformers' (librosa-compatible) filters, the spectrogram against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.rewards.audio import power_spectrogram, power_to_db, resample, slaney_mel_filters, to_mono

RATE_PAIRS = [(24000, 48000), (24000, 16000), (24000, 22050), (48000, 16000), (44100, 48000)]


def direct_resample(x: np.ndarray, orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """The definition, one output at a time: y[m] = sum_n x[n] h(m p / q - n), h the Hann-windowed sinc
    (torchaudio's sinc_interp_hann)."""
    g = math.gcd(orig, new)
    p, q = orig // g, new // g
    cutoff = min(p, q) * rolloff
    m = np.arange(-(-len(x) * q // p))[:, None]
    u = np.clip(cutoff * (m / q - np.arange(len(x))[None, :] / p), -zero_crossings, zero_crossings)
    h = np.sinc(u) * np.cos(u * np.pi / (2 * zero_crossings)) ** 2 * cutoff / p
    return h @ x


@pytest.mark.parametrize("orig,new", RATE_PAIRS)
def test_resample_is_its_defining_sum(orig, new):
    x = np.random.default_rng(0).standard_normal(700)
    ours = resample(torch.from_numpy(x), orig, new).numpy()
    np.testing.assert_allclose(ours, direct_resample(x, orig, new), rtol=0, atol=1e-12)


@pytest.mark.parametrize("orig,new", RATE_PAIRS)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_resample_reproduces_tones_in_the_passband(orig, new, fraction):
    """A tone at `fraction` of the lower Nyquist frequency, resampled, is the same tone sampled at the new
    rate: within 5e-3 (-46 dB; measured <= 3.4e-3, the passband ripple of a 6-crossing Hann-windowed sinc),
    away from the first and last 50 ms where the signal's zero extension rings."""
    freq = fraction * min(orig, new) / 2
    t = torch.arange(orig, dtype=torch.float64) / orig
    out = resample(torch.sin(2 * math.pi * freq * t + 0.3), orig, new)
    t_new = torch.arange(out.numel(), dtype=torch.float64) / new
    edge = new // 20
    err = (out - torch.sin(2 * math.pi * freq * t_new + 0.3))[edge:-edge].abs().max().item()
    assert err < 5e-3


def test_resample_removes_what_the_new_rate_cannot_hold():
    """A 12 kHz tone has no place at 16 kHz (Nyquist 8 kHz): it must vanish, not alias to 4 kHz."""
    t = torch.arange(48000, dtype=torch.float64) / 48000
    out = resample(torch.sin(2 * math.pi * 12000 * t), 48000, 16000)
    assert out[800:-800].abs().max() < 0.01


def test_resample_shapes_dtype_and_identity():
    x = torch.randn(2, 3, 1001)
    out = resample(x, 24000, 22050)
    assert out.shape == (2, 3, math.ceil(1001 * 22050 / 24000)) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 2], resample(x[1, 2], 24000, 22050))
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="sample rates"):
        resample(x, 0, 16000)


def test_to_mono_averages_channels():
    x = torch.tensor([[[1.0, 2.0], [3.0, -2.0]]])
    torch.testing.assert_close(to_mono(x), torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("rate,n_fft,n_mels,f_min,f_max", [(48000, 1024, 64, 50, 14000), (22050, 2048, 128, 0, 11025)])
def test_slaney_mel_filters_match_transformers(rate, n_fft, n_mels, f_min, f_max):
    """transformers' mel_filter_bank(norm="slaney", mel_scale="slaney") is librosa.filters.mel's (CLAP, onsets)."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    reference = audio_utils.mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=f_min,
        max_frequency=f_max,
        sampling_rate=rate,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = slaney_mel_filters(rate, n_fft, n_mels, f_min, f_max).numpy()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-14)


@pytest.mark.parametrize("pad_mode,np_mode", [("reflect", "reflect"), ("constant", "constant")])
def test_power_spectrogram_matches_numpy_frames(pad_mode, np_mode):
    x = np.random.default_rng(1).standard_normal(3000)
    n_fft, hop = 256, 100
    padded = np.pad(x, n_fft // 2, mode=np_mode)
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    frames = np.stack([padded[i : i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    reference = (np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2).T
    ours = power_spectrogram(torch.from_numpy(x)[None], n_fft, hop, pad_mode=pad_mode)[0].numpy()
    assert ours.shape == reference.shape == (n_fft // 2 + 1, 1 + 3000 // hop)
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_power_to_db_floors():
    power = torch.tensor([[[1.0, 1e-3, 0.0], [100.0, 1e-12, 10.0]]])
    db = power_to_db(power)
    torch.testing.assert_close(db, torch.tensor([[[0.0, -30.0, -100.0], [20.0, -100.0, 10.0]]]))
    torch.testing.assert_close(power_to_db(power, top_db=40.0).amin(), torch.tensor(-20.0))
