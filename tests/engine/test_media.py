"""engine.media: MP4 (H.264 + AAC) and WAV writers read back with PyAV / wave, and the TensorBoard forms."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from engine import media

pytestmark = pytest.mark.usefixtures("single_thread")


def _tone(channels: int, samples: int, sample_rate: int) -> torch.Tensor:
    """(channels, samples) sines of 220 Hz, 330 Hz ... at half amplitude."""
    t = torch.arange(samples) / sample_rate
    return torch.stack([0.5 * torch.sin(2 * torch.pi * 110 * (c + 2) * t) for c in range(channels)])


def _read(path: Path) -> dict:
    """Streams of an MP4: codec, frame count, duration (s), rate, and its decoded video (F, H, W, 3) uint8."""
    with av.open(str(path)) as c:
        streams = {
            s.type: {
                "codec": s.codec_context.name,
                "seconds": float(s.duration * s.time_base),
                "rate": s.average_rate if s.type == "video" else s.sample_rate,
                "layout": s.layout.name if s.type == "audio" else None,
            }
            for s in c.streams
        }
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    streams["frames"] = np.stack(frames)
    return streams


def test_mp4_video_and_audio_round_trip(tmp_path):
    fps, count, sample_rate = 24, 10, 16000
    samples = sample_rate * count // fps + 123  # audio a little longer than the video, not a whole AAC frame
    frames = torch.full((count, 32, 48, 3), 0.5)
    path = media.write_mp4(tmp_path / "clip.mp4", frames, fps, _tone(2, samples, sample_rate), sample_rate)
    assert path == tmp_path / "clip.mp4"
    got = _read(path)
    assert set(got) == {"video", "audio", "frames"}
    assert got["video"]["codec"] == "h264" and got["audio"]["codec"] == "aac"
    assert got["video"]["rate"] == fps and got["audio"]["rate"] == sample_rate
    assert got["audio"]["layout"] == "stereo"
    assert got["frames"].shape == (count, 32, 48, 3)
    assert abs(got["video"]["seconds"] - count / fps) <= 1 / fps
    assert abs(got["audio"]["seconds"] - samples / sample_rate) <= 1024 / sample_rate
    assert np.abs(got["frames"].astype(int) - 128).max() <= 3  # flat grey 0.5 -> 127.5 -> ~128 after H.264


def test_mp4_orientation_and_channel_order(tmp_path):
    """Red top half, blue bottom half: H/W not swapped and RGB not BGR (16-pixel blocks: 4:2:0 chroma safe)."""
    frames = torch.zeros(2, 32, 48, 3)
    frames[:, :16, :, 0] = 1
    frames[:, 16:, :, 2] = 1
    got = _read(media.write_mp4(tmp_path / "rb.mp4", frames, 8))["frames"].astype(int)
    top, bottom = got[:, 2:14].mean((0, 1, 2)), got[:, 18:30].mean((0, 1, 2))
    assert top[0] > 230 and top[1] < 25 and top[2] < 25
    assert bottom[2] > 230 and bottom[0] < 25 and bottom[1] < 25


def test_mp4_video_only_mono_and_ntsc_rate(tmp_path):
    fps = 30000 / 1001
    got = _read(media.write_mp4(tmp_path / "v.mp4", torch.rand(5, 16, 16, 3), fps))
    assert set(got) == {"video", "frames"} and got["video"]["rate"] == Fraction(30000, 1001)
    assert abs(got["video"]["seconds"] - 5 / fps) <= 1 / fps

    mono = media.write_mp4(tmp_path / "m.mp4", torch.rand(3, 16, 16, 3), 24, _tone(1, 2000, 24000)[0], 24000)
    assert _read(mono)["audio"]["layout"] == "mono"


def test_mp4_odd_size_padded_with_edge(tmp_path):
    frames = torch.zeros(3, 17, 23, 3)
    frames[:, 16, :] = 1  # the last row white: the padded row below it repeats it
    got = _read(media.write_mp4(tmp_path / "odd.mp4", frames, 12))["frames"]
    assert got.shape == (3, 18, 24, 3)
    assert got[:, 17, 4:20].mean() > 200 and got[:, 4:12, 4:20].mean() < 30


def test_mp4_clamps_overshoot(tmp_path):
    frames = torch.full((2, 16, 16, 3), 0.5)
    frames[:, :8] = 1.3  # a decoder's overshoot: saturates to white, as 1.0 would
    frames[:, 8:] = -0.2
    got = _read(media.write_mp4(tmp_path / "c.mp4", frames, 4))["frames"].astype(int)
    assert got[:, 1:6].min() > 245 and got[:, 10:15].max() < 10


def test_mp4_errors(tmp_path):
    path = tmp_path / "bad.mp4"
    ok = torch.rand(2, 16, 16, 3)
    bad = [
        (dict(frames=torch.rand(16, 16, 3)), r"\(F, H, W, 3\)"),
        (dict(frames=torch.rand(2, 3, 16, 16)), r"\(F, H, W, 3\)"),
        (dict(frames=torch.zeros(0, 16, 16, 3)), "non-empty"),
        (dict(frames=torch.full((2, 16, 16, 3), 128, dtype=torch.uint8)), "floating point"),
        (dict(frames=torch.full((2, 16, 16, 3), float("nan"))), "non-finite"),
        (dict(fps=0), "fps"),
        (dict(fps=float("inf")), "fps"),
        (dict(waveform=torch.zeros(2, 100)), "both"),
        (dict(sample_rate=16000), "both"),
        (dict(waveform=torch.zeros(100, 2), sample_rate=16000), r"\(samples, channels\)"),
        (dict(waveform=torch.zeros(3, 100), sample_rate=16000), "1 or 2 channels"),
        (dict(waveform=torch.zeros(2, 100), sample_rate=16001), "AAC"),
        (dict(waveform=torch.zeros(2, 100), sample_rate=16000.0), "positive integer"),
    ]
    for override, match in bad:
        args = dict(frames=ok, fps=24, waveform=None, sample_rate=None) | override
        with pytest.raises(ValueError, match=match):
            media.write_mp4(path, **args)
    assert list(tmp_path.iterdir()) == []  # checked before anything is created


def test_mp4_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"old")
    media.write_mp4(path, torch.rand(2, 16, 16, 3), 24)
    assert _read(path)["frames"].shape == (2, 16, 16, 3)
    written = path.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail)
    with pytest.raises(RuntimeError, match="encoder died"):
        media.write_mp4(path, torch.rand(2, 16, 16, 3), 24)
    assert path.read_bytes() == written and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(channels, samples) int16 and the sample rate of a 16-bit WAV."""
    import wave

    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2
        data = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, f.getnchannels()).T
        return data, f.getframerate()


def test_wav_round_trips_exactly(tmp_path):
    pcm = torch.randint(-32767, 32768, (2, 4801), generator=torch.Generator().manual_seed(0))
    pcm[:, :2] = torch.tensor([[-32767, 32767], [0, 1]])
    path = media.write_wav(tmp_path / "a.wav", pcm.double() / media.PCM_SCALE, 48000)
    data, rate = _read_wav(path)
    assert rate == 48000 and np.array_equal(data, pcm.numpy())
    again = media.write_wav(tmp_path / "b.wav", torch.from_numpy(data / media.PCM_SCALE), 48000)
    assert again.read_bytes() == path.read_bytes()


def test_wav_mono_clamps_and_errors(tmp_path):
    data, rate = _read_wav(media.write_wav(tmp_path / "m.wav", torch.tensor([0.0, 1.5, -2.0, 0.5]), 16000))
    assert rate == 16000 and data.tolist() == [[0, 32767, -32767, 16384]]
    for waveform, rate, match in [
        (torch.zeros(4800, 2), 16000, r"\(samples, channels\)"),
        (torch.zeros(2, 3, 4), 16000, "1 or 2 channels"),
        (torch.zeros(2, 0), 16000, "non-empty"),
        (torch.zeros(2, 10, dtype=torch.int16), 16000, "floating point"),
        (torch.tensor([0.0, float("inf")]), 16000, "non-finite"),
        (torch.zeros(2, 10), 0, "positive integer"),
        (torch.zeros(2, 10), True, "positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            media.write_wav(tmp_path / "bad.wav", waveform, rate)
    assert not (tmp_path / "bad.wav").exists()


def test_tensorboard_video_layout():
    frames = torch.rand(5, 6, 8, 3)
    video = media.tensorboard_video(frames)
    assert video.shape == (1, 5, 3, 6, 8) and video.dtype == torch.uint8
    assert torch.equal(video[0, 2, 1], (frames[2, :, :, 1] * 255).round().to(torch.uint8))
    assert media.tensorboard_video(torch.rand(2, 5, 6, 8, 3)).shape == (2, 5, 3, 6, 8)
    with pytest.raises(ValueError, match="RGB"):
        media.tensorboard_video(torch.rand(5, 3, 6, 8))


def test_tensorboard_strip_and_audio_without_moviepy(tmp_path, monkeypatch):
    """Here add_video cannot encode (no moviepy 1.x): a frame strip and the mono audio are logged instead."""
    monkeypatch.setattr(media, "tensorboard_video_supported", lambda: False)
    frames = torch.rand(20, 6, 8, 3)
    with SummaryWriter(str(tmp_path)) as writer:
        form = media.log_tensorboard_media(writer, "sample", frames, 24, 3, _tone(2, 1600, 16000), 16000)
    assert form == "strip"
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "audio": 0})
    events.Reload()
    (image,) = events.Images("sample/video")
    assert (image.step, image.height, image.width) == (3, 6, 8 * 8)
    (audio,) = events.Audio("sample/audio")
    assert (audio.step, audio.sample_rate, audio.length_frames) == (3, 16000, 1600)


def test_tensorboard_add_video_when_supported(monkeypatch):
    monkeypatch.setattr(media, "tensorboard_video_supported", lambda: True)
    calls = []

    class Writer:
        def add_video(self, tag, video, step, fps):
            calls.append((tag, video.shape, video.dtype, step, fps))

    assert media.log_tensorboard_media(Writer(), "s", torch.rand(4, 6, 8, 3), 12, 7) == "video"
    assert calls == [("s/video", (1, 4, 3, 6, 8), torch.uint8, 7, 12.0)]
