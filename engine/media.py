"""Writers for decoded media: an MP4 (H.264 video + AAC audio) and a 16-bit PCM WAV, each written atomically,
and the TensorBoard form of a clip.

Conventions (what the VAE / vocoder decoders hand over, after the caller maps them to these ranges):
frames are (F, H, W, 3) RGB floats in [0, 1]; a waveform is (channels, samples) floats in [-1, 1] with 1 or
2 channels ((samples,) is taken as mono). Values outside the range are clamped, because decoders overshoot a
little and 8/16-bit output saturates there anyway; non-finite values, integer dtypes, empty or misshapen
tensors are ValueErrors (an integer dtype usually means 0..255 frames, which clamping would turn white).

The MP4 path needs PyAV (`pip install omninft[media]`); PyAV's wheels bundle an FFmpeg with libx264 and its
native AAC encoder. WAV and TensorBoard need only the standard library and torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

VIDEO_CODEC = "libx264"  # H.264
AUDIO_CODEC = "aac"  # FFmpeg's native AAC encoder (1024 samples per frame)
PCM_SCALE = 32767  # float -> int16 by round(x * 32767): symmetric, so -1 and 1 map to -32767 and 32767


@contextlib.contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write to; once written it is fsynced and renamed onto `path`
    (a reader never sees half a file). On an error the temporary file is removed and `path` is left as it was.
    The file is created by the writer, so it gets the usual umask permissions (mkstemp's would be 0600); missing
    parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _float_tensor(x: torch.Tensor, name: str, shape: str) -> torch.Tensor:
    """`x` as a float32 CPU tensor after the checks every input shares (non-empty, floating, finite)."""
    x = torch.as_tensor(x)
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {shape} tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point ({shape}), got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return x


def _check_frames(frames: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """(F, H, W, 3) float32 in [0, 1] (clamped); (N, F, H, W, 3) when `batched` is allowed too."""
    shape = "(F, H, W, 3) or (N, F, H, W, 3)" if batched else "(F, H, W, 3)"
    frames = _float_tensor(frames, "frames", shape)
    if frames.dim() not in ((4, 5) if batched else (4,)) or frames.shape[-1] != 3:
        raise ValueError(f"frames must be {shape} RGB, got shape {tuple(frames.shape)}")
    return frames.clamp(0, 1)


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> 0..255 uint8, rounded to nearest."""
    return (frames * 255).round().to(torch.uint8)


def _check_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """(channels, samples) float32 in [-1, 1] (clamped), 1 or 2 channels; (samples,) becomes (1, samples)."""
    waveform = _float_tensor(waveform, "waveform", "(channels, samples)")
    if waveform.dim() == 1:
        waveform = waveform[None]
    if waveform.dim() != 2 or waveform.shape[0] not in (1, 2):
        hint = " (is it (samples, channels)?)" if waveform.dim() == 2 and waveform.shape[1] in (1, 2) else ""
        raise ValueError(
            f"waveform must be (channels, samples) with 1 or 2 channels, got {tuple(waveform.shape)}{hint}"
        )
    return waveform.clamp(-1, 1)


def _check_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    return int(sample_rate)


def _frame_rate(fps: float) -> Fraction:
    """`fps` as the fraction the container stores: the nearest with a denominator <= 1001, so integer rates and
    NTSC ones (30000/1001 given as a float) are exact."""
    if not (isinstance(fps, int | float | Fraction) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _import_av() -> ModuleType:
    """PyAV, imported only when an MP4 is written (the `media` extra is optional)."""
    try:
        import av
    except ImportError as e:
        raise ImportError("writing MP4 needs PyAV: pip install 'omninft[media]' (or the av package)") from e
    return av


def write_mp4(
    path: str | os.PathLike,
    frames: torch.Tensor,
    fps: float,
    waveform: torch.Tensor | None = None,
    sample_rate: int | None = None,
) -> Path:
    """Writes `frames` (F, H, W, 3) RGB in [0, 1] as H.264 video (libx264, yuv420p, CRF 18: visually
    near-lossless) at `fps` frames/s, with an AAC track of `waveform` (channels, samples) in [-1, 1] at
    `sample_rate` Hz when given (both or neither). Returns the path written; `path` is replaced atomically.

    yuv420p (what browsers, TensorBoard and W&B play) needs even sizes: an odd H or W is padded by one
    bottom row / right column repeating the edge, so the video is (H + H % 2, W + W % 2). The sample rate
    must be one the AAC encoder takes (16000, 24000, 44100, 48000, ...). Each stream keeps its own length:
    F / fps seconds of video and samples / sample_rate of audio (AAC rounds up to its 1024-sample frames).
    """
    av = _import_av()
    frames = _check_frames(frames)
    rate = _frame_rate(fps)
    if (waveform is None) != (sample_rate is None):
        raise ValueError("write_mp4: give both waveform and sample_rate, or neither")
    if waveform is not None:
        waveform = _check_waveform(waveform)
        sample_rate = _check_sample_rate(sample_rate)
        allowed = av.codec.Codec(AUDIO_CODEC, "w").audio_rates
        if allowed and sample_rate not in allowed:
            raise ValueError(f"sample_rate {sample_rate} is not one AAC can encode: {sorted(allowed)}")
    _, height, width, _ = frames.shape
    pad = ((0, height % 2), (0, width % 2), (0, 0))  # bottom row / right column, repeating the edge
    with _atomic(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        video = container.add_stream(VIDEO_CODEC, rate=rate, options={"crf": "18"})
        video.width, video.height, video.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        if waveform is not None:
            audio = container.add_stream(AUDIO_CODEC, rate=sample_rate)
            audio.layout = "mono" if waveform.shape[0] == 1 else "stereo"
        for i, frame in enumerate(frames):  # one frame at a time: uint8 copies of a whole clip add up
            out = av.VideoFrame.from_ndarray(np.pad(_to_uint8(frame).numpy(), pad, mode="edge"), format="rgb24")
            out.pts = i
            container.mux(video.encode(out))
        container.mux(video.encode())
        if waveform is not None:
            # One frame of the whole waveform: PyAV's encoder re-chunks it into AAC's 1024-sample frames.
            out = av.AudioFrame.from_ndarray(waveform.contiguous().numpy(), format="fltp", layout=audio.layout.name)
            out.sample_rate, out.pts = sample_rate, 0
            container.mux(audio.encode(out))
            container.mux(audio.encode())
    return Path(path)


def write_wav(path: str | os.PathLike, waveform: torch.Tensor, sample_rate: int) -> Path:
    """Writes `waveform` (channels, samples) in [-1, 1], 1 or 2 channels, as 16-bit PCM WAV at `sample_rate` Hz
    (stdlib `wave`: no torchaudio). Samples are round(x * 32767), so k / 32767 round-trips exactly. Returns
    the path written; `path` is replaced atomically."""
    waveform = _check_waveform(waveform)
    sample_rate = _check_sample_rate(sample_rate)
    pcm = (waveform * PCM_SCALE).round().to(torch.int16).T.contiguous().numpy()  # (samples, channels): interleaved
    with _atomic(path) as tmp:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(pcm.shape[1])
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            f.writeframes(pcm.astype("<i2").tobytes())
    return Path(path)


def tensorboard_video(frames: torch.Tensor) -> torch.Tensor:
    """Frames (F, H, W, 3) or a batch (N, F, H, W, 3) RGB in [0, 1] -> the (N, F, 3, H, W) uint8 tensor
    `SummaryWriter.add_video` takes (N = 1 for a single clip)."""
    frames = _check_frames(frames, batched=True)
    if frames.dim() == 4:
        frames = frames[None]
    return _to_uint8(frames).permute(0, 1, 4, 2, 3).contiguous()


@functools.cache
def tensorboard_video_supported() -> bool:
    """Whether `SummaryWriter.add_video` can encode here. torch's writer encodes the GIF with moviepy 1.x's
    `moviepy.editor`; without moviepy, or with moviepy 2 (which removed `editor`), add_video only prints a
    warning and logs no video."""
    try:
        import moviepy.editor  # noqa: F401
    except ImportError:
        return False
    return True


def log_tensorboard_media(
    writer,
    tag: str,
    frames: torch.Tensor,
    fps: float,
    step: int,
    waveform: torch.Tensor | None = None,
    sample_rate: int | None = None,
    strip_frames: int = 8,
) -> str:
    """Logs one clip, `frames` (F, H, W, 3) in [0, 1], to the torch `SummaryWriter` `writer` as `{tag}/video`,
    and its `waveform` (channels, samples) in [-1, 1] at `sample_rate` Hz as `{tag}/audio` (averaged to mono:
    TensorBoard's audio summaries are mono). Returns which video form was used:

    - "video": `add_video` (an animated GIF at `fps`) when `tensorboard_video_supported()`;
    - "strip": otherwise an `add_image` of up to `strip_frames` evenly spaced frames side by side,
      (H, n * W, 3), first to last.
    """
    if waveform is not None:
        mono = _check_waveform(waveform).mean(0, keepdim=True)  # (1, samples), as add_audio takes it
        sample_rate = _check_sample_rate(sample_rate)
    if tensorboard_video_supported():
        writer.add_video(f"{tag}/video", tensorboard_video(frames), step, fps=float(_frame_rate(fps)))
        form = "video"
    else:
        if strip_frames < 1:
            raise ValueError(f"strip_frames must be >= 1, got {strip_frames}")
        frames = _check_frames(frames)
        count = frames.shape[0]
        pick = torch.linspace(0, count - 1, min(strip_frames, count)).round().long()
        strip = torch.cat(list(_to_uint8(frames[pick])), dim=1)  # (H, n * W, 3)
        writer.add_image(f"{tag}/video", strip, step, dataformats="HWC")
        form = "strip"
    if waveform is not None:
        writer.add_audio(f"{tag}/audio", mono, step, sample_rate=sample_rate)
    return form
