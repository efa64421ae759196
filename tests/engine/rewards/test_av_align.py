"""AV-Align on synthetic media with known events: a square that jumps at chosen frames, clicks at chosen
times. (Parity of the onset detector with librosa 0.11 was measured outside CI, where librosa is absent:
identical onset frames on 30 random click tracks, onset strength within 4e-7 relative.)"""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError, RewardError
from engine.rewards import AVAlign, RewardSpec, reads_media, score_rewards
from engine.rewards.audio import resample
from engine.rewards.av_align import (
    AUDIO_RATE,
    HOP,
    intersection_over_union,
    motion,
    motion_peaks,
    onset_frames,
    onset_strength,
)
from engine.rewards.base import check_video_grid
from tests.engine.rewards.rollouts import FPS, media_rollout

RATE = 24_000  # the LTX-2 vocoder's rate: the reward resamples to 22050 Hz
NUM_FRAMES = 72  # 3 s at 24 fps
EVENTS = [12, 30, 48, 60]  # frames where the square jumps: motion peaks at 0.5, 1.25, 2.0, 2.5 s
EVENT_TIMES = [f / FPS for f in EVENTS]


def jumping_square(events: list[int], size: int = 16) -> torch.Tensor:
    """(NUM_FRAMES, size, size, 3): a white 4x4 square on black that stays put except at `events`, where it
    jumps 5 pixels right: the frame difference is 0 except into those frames."""
    frames = torch.zeros(NUM_FRAMES, size, size, 3)
    column = 0
    for f in range(NUM_FRAMES):
        if f in events:
            column = (column + 5) % (size - 4)
        frames[f, 4:8, column : column + 4] = 1.0
    return frames


def clicks(times: list[float], seed: int = 0) -> torch.Tensor:
    """(NUM_FRAMES / FPS seconds at RATE,) silence with a 50 ms burst of decaying noise at each time."""
    gen = torch.Generator().manual_seed(seed)
    audio = torch.zeros(int(NUM_FRAMES / FPS * RATE))
    length = int(0.05 * RATE)
    decay = torch.exp(-torch.arange(length) / (0.01 * RATE))
    for t in times:
        start = round(t * RATE)
        burst = torch.randn(length, generator=gen) * decay * 0.5
        audio[start : start + length] += burst[: audio.numel() - start]
    return audio


def test_scores_aligned_shifted_partial_and_silent_clips():
    """Same video (4 motion peaks); audio clicks on all 4 (IoU 1), all 0.25 s late (0), 2 on and 2 late
    (2 / (4 + 4 - 2)), none (0 / 4). Stereo at 24 kHz, so mixing and resampling are on the path."""
    audio = {
        "aligned": EVENT_TIMES,
        "late": [t + 0.25 for t in EVENT_TIMES],
        "half": EVENT_TIMES[:2] + [t + 0.25 for t in EVENT_TIMES[2:]],
        "silent": [],
    }
    frames = jumping_square(EVENTS).expand(len(audio), -1, -1, -1, -1)
    waveforms = torch.stack([clicks(times) for times in audio.values()])[:, None].repeat(1, 2, 1)
    rollout = media_rollout(frames=frames, waveforms=waveforms, sample_rate=RATE)
    scores = score_rewards([AVAlign()], rollout)["av_align"]
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 1 / 3, 0.0]))


def test_onsets_land_within_a_frame_of_the_clicks():
    times = [0.3, 0.9, 1.6, 2.45]
    (onsets,) = onset_frames(onset_strength(resample(clicks(times)[None].double(), RATE, AUDIO_RATE)))
    found = torch.tensor(onsets) * HOP / AUDIO_RATE
    assert len(onsets) == len(times)
    assert (found - torch.tensor(times)).abs().max() < 1.5 * HOP / AUDIO_RATE


def test_motion_trajectory_and_peaks():
    frames = jumping_square([3, 5]).unsqueeze(0)[:, :8]
    trajectory = motion(frames)
    assert trajectory.shape == (1, 8)
    jump = 2 * 16 / 256  # 16 pixels turn off, 16 turn on, luma 1, over 16 x 16
    torch.testing.assert_close(trajectory[0], torch.tensor([0, 0, 0, jump, 0, jump, 0, 0]))
    assert motion_peaks(trajectory) == [[3, 5]]
    # Frame 0 copies frame 1's motion, so a jump into frame 1 is no peak (as in the reference).
    assert motion_peaks(motion(jumping_square([1, 4]).unsqueeze(0))) == [[4]]


def test_intersection_over_union_follows_the_reference():
    fps = 24.0
    assert intersection_over_union([0.5, 1.0], [0.51, 2.0], fps) == 1 / 3
    assert intersection_over_union([0.5], [0.75], 4.0) == 0.0  # strictly within one frame
    assert intersection_over_union([], [], fps) == 0.0
    # Several onsets may match one motion peak: the reference's count can exceed the union.
    assert intersection_over_union([0.50, 0.52, 0.54], [0.52], fps) == 3.0


def test_reads_both_media_and_needs_two_frames():
    reward = AVAlign()
    assert reward.modality == "av" and reads_media([reward]) == {"frames", "waveform"}
    with pytest.raises(RewardError, match="'av_align' reads frames"):
        score_rewards([reward], media_rollout(waveforms=torch.zeros(1, 1, 100), sample_rate=RATE))
    one_frame = media_rollout(frames=torch.zeros(1, 1, 4, 4, 3), waveforms=torch.zeros(1, 1, 100), sample_rate=RATE)
    with pytest.raises(RewardError, match="av_align.*at least 2 video frames"):
        score_rewards([reward], one_frame)
    with pytest.raises(ConfigError, match=r"rewards\[0\]: av_align needs task\.video_grid of at least \[2, 1, 1\]"):
        check_video_grid([RewardSpec(name="av_align")], [1, 4, 4])
