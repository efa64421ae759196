"""DeSync: audio-visual desynchronisation by Synchformer (engine.rewards.synchformer), the paper's sync reward
and one of its evaluation metrics. DeSync is a clip's mean |predicted offset| in seconds over its windows (lower
is better); the reward is 1 / (1 + DeSync), in (0, 1], as OmniNFT's authors use it.

The contract is the paper's evaluation (JavisBench's `calc_desync_score`, from av-benchmark) and the authors'
reward (`av_desync.py`), computed here in torch on the media's device:

- Video: converted to 25 fps as ffmpeg's fps filter does (the reference decodes at `frame_rate=25`: output frame
  k shows the last frame that starts before (k + 1/2) / 25 s); each frame resized so its shorter side is 224
  px (bicubic, antialiased), centre-cropped to 224 x 224 and scaled to [-1, 1] (Normalize(0.5, 0.5)).
- Audio: channels averaged, resampled to 16 kHz (torchaudio's default windowed sinc, engine.rewards.audio).
- Padding: every clip is cut to its first `clip_seconds` = 8 s and a shorter one padded at the end with black
  frames (-1) and silence to 8 s: 200 frames and 128,000 samples, as the evaluation (`max_length_s=8`) and the
  authors' reward (`max_length_s` 8.0) do. The paper's clips (121 frames at 24 fps, 5.04 s: 126 frames at 25 fps)
  are thus judged with 74 black frames and 2.96 s of silence after them; padding every clip to one length gives
  every clip the same windows.
- Segments: 16 frames (0.64 s) with a hop of 8, and the matching 10,240 audio samples with a hop of 5,120: 24 of
  each for 8 s. Each audio segment's features: power spectrogram (n_fft 1024, Hann window 400, hop 160, centred
  with reflection: 65 frames), 128 HTK mel bands without normalisation (torchaudio's MelSpectrogram defaults),
  log(x + 1e-6), one zero column appended (66 frames), then (x + 4.2677393) / (2 * 4.5689974). Video segments
  wholly in the padding all equal one black segment, whose features are computed once (a third of the video
  encoder's work for a 5.04 s clip).
- Windows: the transformer compares 14 segments of each at once; the segments are taken in consecutive windows
  of 14, the last one shifted back to end at the last segment (24 segments: 0-13 and 10-23); a clip of fewer
  than 14 segments repeats its segments to fill one window.
- Reduction: each window's predicted offset is the grid value (-2.0, -1.8, ..., 2.0 s) of its largest logit;
  DeSync is the mean |offset| over the clip's windows. (JavisBench's batched version groups the per-window list
  by position rather than by clip when its batch holds several clips; its benchmark mean is unaffected. Each
  clip's own windows are averaged here.)

Departures: the reference reads an mp4 (H.264, 8-bit frames) and a wav the sampler wrote; the decoded tensors
are read here directly, so there is no lossy encoding and no rounding to 8 bits (the resized frames are clamped
to [0, 1], as the reference's rounding back to 8 bits clamps).

`DeSync.last_desync` holds the (N,) DeSync of the last scored rollout; `desync_from_scores` recovers it from the
reward's scores (also a remote reward's), which is how evaluation logs the metric.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models.weights import check_finite, shape_problems

from ..errors import CheckpointError, one_line
from .audio import htk_mel_filters, power_spectrogram, resample, to_mono
from .base import Reward, Rollout, register
from .synchformer import Synchformer, SynchformerConfig, randomize

VIDEO_FPS = 25.0  # frames per second the model was trained on
AUDIO_RATE = 16_000  # Hz
CLIP_SECONDS = 8.0  # the evaluation's max_length_s: every clip is cut or padded to this length
N_FFT, WIN_LENGTH, HOP = 1024, 400, 160  # the reference's MelSpectrogram
MEL_MEAN, MEL_STD = -4.2677393, 4.5689974  # AudioSet log-mel statistics the features are normalised with
LOG_FLOOR = 1e-6  # log(mel + LOG_FLOOR)
FRAME_CHUNK = 32  # frames resized at a time (bounds the float32 copy of 512 x 768 frames)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_LISTED = 8  # problems named in a load error


def resample_indices(num_frames: int, fps: float, new_fps: float = VIDEO_FPS) -> Tensor:
    """(round(num_frames * new_fps / fps),) indices of the frames a clip at `fps` shows at `new_fps`, as
    ffmpeg's fps filter picks them (rounding "near"): output frame k shows the last input frame whose timestamp,
    rounded to the output's frame grid, is at most k, i.e. the last one that starts before (k + 1/2) / new_fps."""
    count = max(1, math.floor(num_frames * new_fps / fps + 0.5))
    k = torch.arange(count, dtype=torch.float64)
    return (torch.ceil((k + 0.5) * fps / new_fps) - 1).clamp(0, num_frames - 1).long()


def fit_frames(frames: Tensor, size: int) -> Tensor:
    """(F, H, W, 3) in [0, 1] -> (F, 3, size, size) float32 in [-1, 1]: torchvision's Resize(size, bicubic,
    antialias) (shorter side to `size`, the longer int(size * long / short)), clamped to [0, 1], CenterCrop(size)
    and Normalize(0.5, 0.5)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    new_h, new_w = (size, long) if h <= w else (long, size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., top : top + size, left : left + size] * 2 - 1


def window_segments(count: int, window: int) -> Tensor:
    """(W, window) indices of the segments each window compares: consecutive windows, the last shifted back to
    end at segment count - 1; fewer than `window` segments are repeated (0, 1, .., count - 1, 0, 1, ..)."""
    if count < window:
        return torch.arange(window).remainder(count)[None]
    starts = torch.tensor([min(s, count - window) for s in range(0, count, window)])
    return starts[:, None] + torch.arange(window)


def log_mel_segments(audio: Tensor, segment: int, mel_frames: int, n_mels: int) -> Tensor:
    """(N, samples) mono 16 kHz -> (N, S, n_mels, mel_frames) normalised log-mel features of the segments of
    `segment` samples with a hop of segment // 2, each padded with zero columns (in the log domain, before
    normalising) or cut to mel_frames."""
    segments = audio.unfold(-1, segment, segment // 2)  # (N, S, segment)
    power = power_spectrogram(segments, N_FFT, HOP, pad_mode="reflect", win_length=WIN_LENGTH)
    filters = htk_mel_filters(AUDIO_RATE, N_FFT, n_mels, 0.0, AUDIO_RATE / 2, device=audio.device)
    mel = torch.log(filters.T.to(power.dtype) @ power + LOG_FLOOR)  # (N, S, n_mels, frames)
    frames = mel.shape[-1]
    mel = F.pad(mel, (0, mel_frames - frames)) if frames < mel_frames else mel[..., :mel_frames]
    return (mel - MEL_MEAN) / (2 * MEL_STD)


def desync_from_scores(scores: Tensor) -> Tensor:
    """DeSync (seconds) from the reward's scores 1 / (1 + DeSync): 1 / score - 1, per sample."""
    return 1.0 / scores - 1.0


def _config(config: dict | None) -> SynchformerConfig:
    """The architecture: the released one, with `config`'s fields (tests' tiny models) replaced."""
    try:
        return dataclasses.replace(SynchformerConfig(), **(config or {}))
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(SynchformerConfig)]
        raise ValueError(f"desync.config: {e}; fields are {fields}") from e


def load_synchformer(path: str | Path, cfg: SynchformerConfig | None = None) -> Synchformer:
    """The model of `cfg` (the released architecture by default) with the weights of the file `path` (a plain
    state dict, read with torch.load(weights_only=True)), strictly: a missing file, a file that is not a state
    dict, or any missing, unexpected or mis-shaped tensor is a one-line CheckpointError naming the file."""
    where = f"reward 'desync': {path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{where}: no such file (expected synchformer_state_dict.pth)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors of every kind
        raise CheckpointError(f"{where} is not a readable torch state dict: {one_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state dict of tensors")
    with torch.device("meta"):
        model = Synchformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_problems(expected, {str(k): tuple(v.shape) for k, v in state.items()})
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(
            f"{where} does not fit Synchformer ({len(problems)} problem(s)): {'; '.join(problems[:MAX_LISTED])}{more}"
        )
    check_finite(state, where)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model


@register
class DeSync(Reward):
    """1 / (1 + DeSync): 1 for clips Synchformer finds in sync in every window, 1/3 for a 2 s offset."""

    name = "desync"
    modality = "av"
    reads = frozenset({"frames", "waveform"})

    def __init__(
        self,
        weight: float = 1.0,
        *,
        path: str,
        device: str | None = None,
        dtype: str = "float32",
        clip_seconds: float = CLIP_SECONDS,
        segment_batch: int = 24,
        config: dict | None = None,
    ) -> None:
        """Loads `path` (synchformer_state_dict.pth) strictly. `device`: where the model runs (None: where the
        media are); `dtype`: float32 (the reference's) or bfloat16; `clip_seconds`: the length clips are cut or
        padded to; `segment_batch`: segments per encoder call; `config`: architecture fields to replace (tests)."""
        super().__init__(weight)
        cfg = _config(config)
        self._configure(cfg, device, dtype, clip_seconds, segment_batch)
        self._attach(load_synchformer(path, cfg))

    @classmethod
    def from_model(
        cls,
        model: Synchformer,
        weight: float = 1.0,
        *,
        device: str | None = None,
        dtype: str = "float32",
        clip_seconds: float = CLIP_SECONDS,
        segment_batch: int = 24,
    ) -> DeSync:
        """The reward around a model already built (random weights for tests and benchmarks)."""
        reward = cls.__new__(cls)
        Reward.__init__(reward, weight)
        reward._configure(model.cfg, device, dtype, clip_seconds, segment_batch)
        reward._attach(model)
        return reward

    def _configure(
        self, cfg: SynchformerConfig, device: str | None, dtype: str, clip_seconds: float, segment_batch: int
    ) -> None:
        """Checks the options (ValueError naming the bad one) before any weights are read."""
        if dtype not in DTYPES:
            raise ValueError(f"desync.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"desync.device {device!r} is not a torch device: {e}") from e
        shortest = cfg.segment_frames / VIDEO_FPS  # one segment
        if (
            isinstance(clip_seconds, bool)
            or not isinstance(clip_seconds, numbers.Real)
            or not shortest <= clip_seconds < math.inf
        ):
            raise ValueError(f"desync.clip_seconds must be a number >= {shortest} (one segment), got {clip_seconds!r}")
        if isinstance(segment_batch, bool) or not isinstance(segment_batch, int) or segment_batch < 1:
            raise ValueError(f"desync.segment_batch must be an integer >= 1, got {segment_batch!r}")
        self.dtype = DTYPES[dtype]
        self.clip_frames = int(VIDEO_FPS * clip_seconds)
        self.clip_samples = int(AUDIO_RATE * clip_seconds)
        self.segment_batch = segment_batch
        self.last_desync: Tensor | None = None

    def _attach(self, model: Synchformer) -> None:
        self.model = model.eval().requires_grad_(False)
        self.cfg = model.cfg
        self._placed: torch.device | None = None
        self._padding: Tensor | None = None  # features of an all-black segment, on the model's device
        if self.device is not None:
            self._place(self.device)

    def _place(self, media_device: torch.device) -> torch.device:
        """The model on `device` (else the media's) in `dtype`, moved only when that changes."""
        device = media_device if self.device is None else self.device
        if self._placed != device:
            self.model.to(device=device, dtype=self.dtype)
            self._placed, self._padding = device, None
        return device

    def _padding_features(self) -> Tensor:
        """(video_tokens, dim) features of a segment of black frames: a clip's segments that lie wholly in its
        padding (8 of the 24 of a 5.04 s clip) all have these, so they are computed once."""
        if self._padding is None:
            size, device = self.cfg.image_size, self._placed
            black = torch.full((1, 3, self.cfg.segment_frames, size, size), -1.0, device=device, dtype=self.dtype)
            self._padding = self.model.video_features(black)[0]
        return self._padding

    def _batched(self, encode: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
        """`encode` over the first axis of `inputs` in chunks of segment_batch, in the model's dtype."""
        chunks = inputs.split(self.segment_batch)
        return torch.cat([encode(chunk.to(self.dtype).contiguous()) for chunk in chunks])

    def clip_video(self, frames: Tensor, fps: float) -> tuple[Tensor, int]:
        """(F, H, W, 3) in [0, 1] at `fps` -> (clip_frames, 3, size, size) in [-1, 1] at 25 fps (converted,
        resized, cropped, cut to the clip length or padded with black (-1) frames) and how many are the clip's."""
        index = resample_indices(frames.shape[0], fps)[: self.clip_frames].to(frames.device)
        size = self.cfg.image_size
        video = torch.cat([fit_frames(frames[chunk], size) for chunk in index.split(FRAME_CHUNK)])
        pad = video.new_full((self.clip_frames - video.shape[0], 3, size, size), -1.0)
        return torch.cat([video, pad]), video.shape[0]

    def clip_audio(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        """(N, channels, samples) at `sample_rate` -> (N, clip_samples) float64 mono at 16 kHz, cut to the clip
        length or padded with silence."""
        audio = resample(to_mono(waveforms.double()), sample_rate, AUDIO_RATE)[:, : self.clip_samples]
        return F.pad(audio, (0, self.clip_samples - audio.shape[-1]))

    @torch.no_grad()
    def window_logits(self, rollout: Rollout) -> Tensor:
        """(N, W, offset_classes) float32: the offset logits of each clip's windows."""
        frames, waveforms, rate = rollout.frames, rollout.waveforms, rollout.sample_rate
        if frames is None or waveforms is None or rate is None:
            raise ValueError("desync reads frames and waveforms; the rollout lacks them")
        device = self._place(frames.device)
        cfg, n = self.cfg, rollout.num_samples
        step = cfg.segment_frames // 2
        video = []
        for sample in frames:  # one clip's frames at a time: 200 x 3 x 224 x 224 float32 is 120 MB
            clip, content = self.clip_video(sample.to(device), rollout.fps)
            segments = clip.unfold(0, cfg.segment_frames, step).permute(0, 1, 4, 2, 3)  # (S, 3, T, H, W)
            real = min(segments.shape[0], -(-content // step))  # segments holding some of the clip's frames
            features = self._batched(self.model.video_features, segments[:real])
            padding = self._padding_features().expand(segments.shape[0] - real, -1, -1)
            video.append(torch.cat([features, padding]))
        segment_samples = round(cfg.segment_frames * AUDIO_RATE / VIDEO_FPS)
        audio = self.clip_audio(waveforms.to(device), rate)
        mels = log_mel_segments(audio, segment_samples, cfg.mel_frames, cfg.n_mels).float()
        audio_features = self._batched(self.model.audio_features, mels.flatten(0, 1)).unflatten(0, (n, -1))
        video_features = torch.stack(video)  # (N, S, video_tokens, D)
        count = min(video_features.shape[1], audio_features.shape[1])
        index = window_segments(count, cfg.window_segments).to(device)  # (W, window)
        logits = self.model.offset_logits(
            video_features[:, index].flatten(0, 1), audio_features[:, index].flatten(0, 1)
        )
        return logits.float().unflatten(0, (n, -1))

    def offsets(self, rollout: Rollout) -> Tensor:
        """(N, W) float64: each window's predicted audio-visual offset in seconds (the grid value of its argmax)."""
        logits = self.window_logits(rollout)
        return self.model.offset_grid().to(logits.device)[logits.argmax(dim=-1)]

    def desync(self, rollout: Rollout) -> Tensor:
        """(N,) float32 DeSync in seconds: the mean |offset| over each clip's windows (the evaluation metric)."""
        return self.offsets(rollout).abs().mean(dim=-1).float()

    def score(self, rollout: Rollout) -> Tensor:
        self.last_desync = self.desync(rollout)
        return 1.0 / (1.0 + self.last_desync)


def random_desync(
    device: str | torch.device | None = None,
    dtype: str = "float32",
    *,
    seed: int = 0,
    config: dict | None = None,
    **options,
) -> DeSync:
    """The reward around a Synchformer with random weights (`randomize(seed)`), full size unless `config` says
    otherwise, built directly on `device` (default the CPU): for benchmarks, where only the cost matters."""
    with torch.device("meta"):
        model = Synchformer(_config(config))
    randomize(model.to_empty(device=device or "cpu"), seed)
    return DeSync.from_model(model, device=None if device is None else str(device), dtype=dtype, **options)
