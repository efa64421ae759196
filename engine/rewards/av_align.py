"""AV-Align, a training-free audio-video synchrony score (Yariv et al., "Diverse and Aligned Audio-to-Video
Generation via Text-to-Video Model Adaptation", AAAI 2024; the metric of their TempoTokens code, also used
by JavisBench): the intersection over union of the audio's onsets and the video's motion peaks.

- Audio peaks: librosa's onset detection at its defaults, here in torch. The clip is mixed to mono and
  resampled to 22050 Hz (what `librosa.load` does); the onset strength is the mean over 128 Slaney mel
  bands of the positive frame-to-frame rise of the log-power mel spectrogram (n_fft 2048, hop 512, zero
  padded, dB floored 80 dB below the clip's peak), delayed by 3 frames as librosa centres it; onsets are
  the frames of the [0, 1]-normalised strength that equal the maximum of themselves and the frame before,
  exceed the mean of the 4 frames before to the 4 after (edges truncated) by 0.07, and come more than
  1 frame after the previous onset.
- Video peaks: frames i (1 <= i <= F-2) where the motion into frame i is a strict local maximum, at
  time i / fps; the motion into frame 0 is taken equal to that into frame 1, as the reference does.
- Score: the audio peaks with a video peak closer than one frame (1 / fps), divided by
  (audio peaks + video peaks - those matches). As in the reference, several onsets may match one
  video peak, so the score can exceed 1 when onsets cluster around few motion peaks. A clip with no
  peak at all scores 0 (no evidence of synchrony; the reference divides by zero).

Departure: the reference measures motion as the mean magnitude of Farneback optical flow between
consecutive grayscale frames (OpenCV). There is no optical flow library here, so motion is the mean
absolute difference of consecutive grayscale frames (ITU-R 601 luma, as OpenCV's BGR2GRAY). Both rise
when things move; the frame difference also rises with brightness changes (flashes, cuts) and scales
with the contrast of what moves rather than the distance it travels, so its peaks can differ from the
flow's when a low-contrast object moves fast next to a high-contrast one moving slowly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .audio import power_spectrogram, power_to_db, resample, slaney_mel_filters, to_mono
from .base import Reward, Rollout, register

AUDIO_RATE = 22_050  # Hz: librosa.load's default rate, at which the reference detects onsets
N_FFT, HOP, N_MELS = 2048, 512, 128  # librosa.onset.onset_strength's spectrogram
TOP_DB = 80.0  # librosa.power_to_db's floor below the clip's peak
# librosa.onset.onset_detect's peak picking, in frames of HOP / AUDIO_RATE (23.2 ms): its defaults
# (30 ms, 0 ms + 1, 100 ms, 100 ms + 1, 30 ms) floored to frames.
PRE_MAX = int(0.03 * AUDIO_RATE // HOP)  # 1
POST_MAX = int(0.00 * AUDIO_RATE // HOP + 1)  # 1
PRE_AVG = int(0.10 * AUDIO_RATE // HOP)  # 4
POST_AVG = int(0.10 * AUDIO_RATE // HOP + 1)  # 5
WAIT = int(0.03 * AUDIO_RATE // HOP)  # 1
DELTA = 0.07  # how far above the local mean an onset's normalised strength must be
LUMA = (0.299, 0.587, 0.114)  # R, G, B weights of OpenCV's BGR2GRAY


def onset_strength(audio: Tensor) -> Tensor:
    """(N, samples) mono at AUDIO_RATE -> (N, frames) librosa.onset.onset_strength at its defaults, frame k
    at time k * HOP / AUDIO_RATE s."""
    mel_filters = slaney_mel_filters(AUDIO_RATE, N_FFT, N_MELS, 0.0, AUDIO_RATE / 2, device=audio.device)
    power = power_spectrogram(audio.double(), N_FFT, HOP, pad_mode="constant")  # (N, bins, frames)
    db = power_to_db(mel_filters.T @ power, top_db=TOP_DB)  # (N, mels, frames)
    rise = (db[..., 1:] - db[..., :-1]).clamp(min=0).mean(dim=-2)  # (N, frames - 1)
    # librosa pads lag (1) + n_fft // (2 * hop) (2) zero frames in front so frames line up with the
    # centred spectrogram, then keeps the spectrogram's frame count.
    delay = 1 + N_FFT // (2 * HOP)
    return torch.nn.functional.pad(rise, (delay, 0))[..., : db.shape[-1]]


def onset_frames(strength: Tensor) -> list[list[int]]:
    """librosa.onset.onset_detect's peak picking of (N, frames) onset strengths -> each sample's onset frames."""
    frames = strength.shape[-1]
    lo = strength.amin(dim=-1, keepdim=True)
    x = strength - lo
    x = x / (x.amax(dim=-1, keepdim=True) + torch.finfo(torch.float32).tiny)
    # A frame is a local maximum if it equals the maximum of x[n - PRE_MAX : n + POST_MAX].
    padded = torch.nn.functional.pad(x, (PRE_MAX, POST_MAX - 1), value=-torch.inf)
    local_max = padded.unfold(-1, PRE_MAX + POST_MAX, 1).amax(dim=-1)
    # The mean of x[n - PRE_AVG : n + POST_AVG], truncated at both ends.
    cumulative = torch.nn.functional.pad(x.cumsum(dim=-1), (1, 0))
    n = torch.arange(frames, device=x.device)
    start, stop = (n - PRE_AVG).clamp(min=0), (n + POST_AVG).clamp(max=frames)
    local_mean = (cumulative[..., stop] - cumulative[..., start]) / (stop - start)
    candidate = (x > 0) & (x == local_max) & (x >= local_mean + DELTA)
    onsets = []
    for row in candidate.cpu():
        kept: list[int] = []
        for i in row.nonzero().flatten().tolist():
            if not kept or i > kept[-1] + WAIT:
                kept.append(i)
        onsets.append(kept)
    return onsets


def motion(frames: Tensor) -> Tensor:
    """(N, F, H, W, 3) RGB -> (N, F) motion into each frame: the mean absolute luma change from the frame
    before, with frame 0 given frame 1's value (the reference's trajectory)."""
    # Channel by channel: a float32 copy of one channel at a time, not of the whole (N, F, H, W, 3) video.
    luma = sum(weight * frames[..., c].float() for c, weight in enumerate(LUMA))  # (N, F, H, W)
    change = (luma[:, 1:] - luma[:, :-1]).abs().mean(dim=(2, 3))  # (N, F - 1)
    return torch.cat([change[:, :1], change], dim=1)


def motion_peaks(trajectory: Tensor) -> list[list[int]]:
    """(N, F) motion -> each sample's frames 1..F-2 that are strict local maxima."""
    inner = trajectory[:, 1:-1]
    peak = (inner > trajectory[:, :-2]) & (inner > trajectory[:, 2:])
    return [(row.nonzero().flatten() + 1).tolist() for row in peak.cpu()]


def intersection_over_union(audio_times: list[float], video_times: list[float], fps: float) -> float:
    """The reference's IoU: audio peaks within one frame of some video peak, over the union's count."""
    matched = sum(any(v - 1 / fps < a < v + 1 / fps for v in video_times) for a in audio_times)
    union = len(audio_times) + len(video_times) - matched
    return matched / union if union else 0.0


@register
class AVAlign(Reward):
    """AV-Align: how many of the audio onsets coincide (within a frame) with peaks of the video motion."""

    name = "av_align"
    modality = "av"
    reads = frozenset({"frames", "waveform"})
    min_video_grid = (2, 1, 1)  # one latent frame decodes to one pixel frame: no motion to measure

    def score(self, rollout: Rollout) -> Tensor:
        assert rollout.frames is not None and rollout.waveforms is not None  # score_rewards checks `reads`
        assert rollout.sample_rate is not None  # Rollout checks it comes with the waveforms
        if rollout.frames.shape[1] < 2:
            raise ValueError(f"av_align needs at least 2 video frames, got {rollout.frames.shape[1]}")
        audio = resample(to_mono(rollout.waveforms.double()), rollout.sample_rate, AUDIO_RATE)
        onsets = onset_frames(onset_strength(audio))
        peaks = motion_peaks(motion(rollout.frames))
        fps = rollout.fps
        scores = [
            intersection_over_union([k * HOP / AUDIO_RATE for k in a], [i / fps for i in v], fps)
            for a, v in zip(onsets, peaks)
        ]
        return torch.tensor(scores, dtype=torch.float32, device=rollout.frames.device)
