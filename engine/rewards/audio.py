"""Audio signal processing for the media rewards, in torch: mono mixing, band-limited resampling, power
and mel spectrograms (Slaney and HTK mel scales), decibels.

torchaudio and torchvision do not load with the CPU torch of our CI, and the reward models' own
pipelines (librosa, torchaudio, numpy feature extractors) would force a CPU round trip; these run on
whatever device the decoded media are on and are tested against the references they replace.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def to_mono(waveforms: Tensor) -> Tensor:
    """(N, channels, samples) -> (N, samples): the mean of the channels, as librosa and the reward
    models' loaders mix down."""
    return waveforms.mean(dim=1)


def resample(
    waveform: Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 6, rolloff: float = 0.99
) -> Tensor:
    """Band-limited resampling of (..., samples) from `orig_rate` to `new_rate` Hz: ceil(samples *
    new_rate / orig_rate) output samples, the signal taken as zero outside its span.

    Output sample m lies at input position x_m = m * p / q (p/q = orig_rate/new_rate reduced by
    their gcd) and is sum_n x[n] h(x_m - n), with h a low-pass sinc whose cutoff is `rolloff` times
    the lower of the two Nyquist frequencies, windowed by a Hann (cos^2) window that ends at
    `zero_crossings` zero crossings of the sinc. Output positions repeat their fractional part
    every q outputs, so h is tabulated once for each of the q phases and applied as one strided
    convolution (polyphase). The defaults are torchaudio's `functional.resample` defaults
    (`sinc_interp_hann`), which Audiobox Aesthetics' inference uses: same filter, same result.
    The table holds q x (p + 2 * zero_crossings * p / cutoff) taps: small for the usual audio rates
    (24 -> 48 kHz: 2 x 15; 24 -> 22.05 kHz: 147 x 174), huge for nearly coprime ones (16000 -> 16001).
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be > 0, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(int(orig_rate), int(new_rate))
    p, q = int(orig_rate) // gcd, int(new_rate) // gcd
    # Cutoff in cycles per input sample is cutoff_rate / (2p): h(t) = (cutoff_rate / p) sinc(cutoff_rate * t / p).
    cutoff_rate = min(p, q) * rolloff
    half_width = math.ceil(zero_crossings * p / cutoff_rate)  # input samples on each side where h is non-zero

    # Phase j (output m = k*q + j) reads inputs k*p + i, i in [-half_width, half_width + p), with tap h(j*p/q - i).
    taps = torch.arange(-half_width, half_width + p, dtype=torch.float64, device=waveform.device)
    phases = torch.arange(q, dtype=torch.float64, device=waveform.device)
    u = (cutoff_rate * (phases[:, None] / q - taps[None, :] / p)).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(u * math.pi / (2 * zero_crossings)).square()
    kernel = torch.sinc(u) * window * (cutoff_rate / p)  # (q, taps); torch.sinc is sin(pi u) / (pi u)

    shape = waveform.shape
    flat = waveform.reshape(-1, 1, shape[-1])
    padded = torch.nn.functional.pad(flat, (half_width, half_width + p))
    out = torch.nn.functional.conv1d(padded, kernel.to(waveform.dtype)[:, None, :], stride=p)  # (B, q, K)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave the phases: output k*q + j
    length = -(-shape[-1] * q // p)  # ceil(samples * q / p)
    return out[:, :length].reshape(*shape[:-1], length)


def power_spectrogram(
    waveform: Tensor, n_fft: int, hop_length: int, *, pad_mode: str, win_length: int | None = None
) -> Tensor:
    """|STFT|^2 of (..., samples) -> (..., n_fft // 2 + 1, frames), periodic Hann window of `win_length`
    (default n_fft; a shorter one is zero-padded to n_fft on both sides, as torch.stft and torchaudio's
    Spectrogram do), frames centred on multiples of `hop_length` (the signal padded by n_fft // 2 with
    `pad_mode`: "reflect" as transformers' feature extractors and torchaudio, "constant" (zeros) as
    librosa >= 0.10)."""
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    pad = n_fft // 2
    flat = torch.nn.functional.pad(flat[:, None], (pad, pad), mode=pad_mode)[:, 0]
    win_length = n_fft if win_length is None else win_length
    window = torch.hann_window(win_length, periodic=True, dtype=waveform.dtype, device=waveform.device)
    spec = torch.stft(
        flat, n_fft, hop_length=hop_length, win_length=win_length, window=window, center=False, return_complex=True
    )
    power = spec.real.square() + spec.imag.square()
    return power.reshape(*shape[:-1], *power.shape[-2:])


def _hz_to_slaney_mel(hz: Tensor) -> Tensor:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    linear = hz * 3.0 / 200.0
    log = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) * 27.0 / math.log(6.4)
    return torch.where(hz >= 1000.0, log, linear)


def _slaney_mel_to_hz(mel: Tensor) -> Tensor:
    linear = mel * 200.0 / 3.0
    log = 1000.0 * torch.exp((mel - 15.0) * math.log(6.4) / 27.0)
    return torch.where(mel >= 15.0, log, linear)


def slaney_mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, *, device: torch.device | None = None
) -> Tensor:
    """(n_fft // 2 + 1, n_mels) float64 triangular filters on Slaney's mel scale with Slaney's area
    normalisation: librosa.filters.mel(htk=False, norm="slaney"), which CLAP's unfused feature
    extractor and librosa's onset strength use. Each filter rises from mel point i to i + 1 and falls
    to i + 2 (n_mels + 2 points evenly spaced in mel between f_min and f_max), measured in Hz."""
    bounds = torch.tensor([f_min, f_max], dtype=torch.float64, device=device)
    mel_lo, mel_hi = _hz_to_slaney_mel(bounds).tolist()
    points = _slaney_mel_to_hz(torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64, device=device))
    filters = _triangles(points, sample_rate, n_fft)
    filters = filters * (2.0 / (points[2:] - points[:-2]))[:, None]  # equal area per filter
    return filters.T.contiguous()


def htk_mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, *, device: torch.device | None = None
) -> Tensor:
    """(n_fft // 2 + 1, n_mels) float64 triangular filters on the HTK mel scale (2595 log10(1 + f / 700)),
    peak 1, no area normalisation: torchaudio's `melscale_fbanks(norm=None, mel_scale="htk")`, the filters of
    its `MelSpectrogram` defaults (Synchformer's audio features)."""
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    mels = torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64, device=device)
    points = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    return _triangles(points, sample_rate, n_fft).T.contiguous()


def _triangles(points: Tensor, sample_rate: int, n_fft: int) -> Tensor:
    """(n_mels, n_fft // 2 + 1) triangles over the STFT bins' frequencies: filter i rises from points[i] to 1 at
    points[i + 1] and falls to 0 at points[i + 2] (`points`: n_mels + 2 band edges in Hz, float64)."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64, device=points.device)
    spacing = points.diff()  # (n_mels + 1,)
    offset = points[:, None] - fft_hz[None, :]  # (n_mels + 2, bins)
    rising = -offset[:-2] / spacing[:-1, None]
    falling = offset[2:] / spacing[1:, None]
    return torch.minimum(rising, falling).clamp(min=0)


def power_to_db(power: Tensor, *, amin: float = 1e-10, top_db: float | None = None) -> Tensor:
    """10 log10(max(power, amin)) (reference power 1); with `top_db`, floored at the maximum over the
    last two dimensions (one spectrogram) minus top_db, as librosa's power_to_db per signal."""
    db = 10.0 * torch.log10(power.clamp(min=amin))
    if top_db is not None:
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - top_db)
    return db
