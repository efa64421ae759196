"""Audiobox Aesthetics (Meta, `audiobox-aesthetics` 0.0.4): four predicted 1-10 ratings of the sound,
Content Enjoyment (CE), Content Usefulness (CU), Production Complexity (PC) and Production Quality (PQ),
from a WavLM encoder. OmniNFT's authors reward (CE + CU + PQ - PC) / 40, the default of `axes`.

Only the package's model module (`audiobox_aesthetics.model.aes`, torch + huggingface_hub) is imported:
its inference module imports torchaudio, which does not load with our CPU torch. What that module does
is done here in torch on the waveform's device: mono, resampled to 16 kHz (the same windowed-sinc filter
as torchaudio's `resample`), cut into 10 s windows with a 10 s hop, the last one zero-padded and masked;
each axis is the mean over a clip's windows weighted by their unpadded length, de-normalised with the
checkpoint's `target_transform`.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers

import torch
from torch import Tensor

from ..errors import CheckpointError, one_line
from .audio import resample, to_mono
from .base import Reward, Rollout, local_dir, register, require_package

AXES = ("CE", "CU", "PC", "PQ")
DEFAULT_AXES = {"CE": 1 / 40, "CU": 1 / 40, "PQ": 1 / 40, "PC": -1 / 40}
SAMPLE_RATE = 16_000  # Hz, what the WavLM encoder was trained on
WINDOW = 10 * SAMPLE_RATE  # samples per window, also the hop


def _check_axes(axes: dict[str, float]) -> dict[str, float]:
    """The axis weights as floats; ValueError for an unknown axis, a non-finite weight or all weights 0."""
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"axes must be a non-empty mapping of {AXES} to weights, got {axes!r}")
    unknown = sorted(set(map(str, axes)) - set(AXES))
    if unknown:
        raise ValueError(f"axes has unknown axis {', '.join(unknown)}; expected some of {AXES}")
    for axis, value in axes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"axes.{axis} must be a finite number, got {value!r}")
    if not any(axes.values()):
        raise ValueError(f"axes weights are all 0: {axes}")
    return {axis: float(value) for axis, value in axes.items()}


@register
class AudioboxAesthetics(Reward):
    """A weighted sum of Audiobox Aesthetics' axes (`axes`, e.g. {"CE": 1, "PQ": 1}); higher is better."""

    name = "audiobox_aesthetics"
    modality = "audio"
    reads = frozenset({"waveform"})

    def __init__(self, weight: float = 1.0, *, path: str, axes: dict[str, float] | None = None) -> None:
        """Loads `AesMultiOutput` from the directory `path` (config.json + model.safetensors, the layout of
        facebook/audiobox-aesthetics), strictly: a missing or mis-shaped weight is a CheckpointError."""
        super().__init__(weight)
        self.axes = _check_axes(DEFAULT_AXES if axes is None else axes)
        aes = require_package(
            self.name, "audiobox_aesthetics.model.aes", "pip install --no-deps audiobox-aesthetics==0.0.4"
        )
        directory = local_dir(self.name, path, ("config.json", "model.safetensors"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints where it loads from
                model = aes.AesMultiOutput.from_pretrained(str(directory), strict=True)
        except Exception as e:  # RuntimeError for missing / mis-shaped keys, JSON and safetensors errors, ...
            raise CheckpointError(f"reward {self.name!r}: cannot load {path}: {one_line(e)}") from e
        transform = model.target_transform or {}
        if any(axis not in transform for axis in AXES):
            raise CheckpointError(
                f"reward {self.name!r}: {path}/config.json lacks target_transform (mean, std) for the axes {AXES}"
            )
        self.model = model.eval().requires_grad_(False)
        self.target_transform = transform

    @staticmethod
    def windows(waveforms: Tensor, sample_rate: int) -> tuple[Tensor, Tensor, Tensor]:
        """(N, channels, samples) at `sample_rate` -> the model's 16 kHz windows (N * W, 1, WINDOW), their
        validity masks (N * W, 1, WINDOW) bool, and the window weights (W,) = unpadded length / WINDOW."""
        audio = resample(to_mono(waveforms.float()), sample_rate, SAMPLE_RATE)  # (N, samples at 16 kHz)
        n, length = audio.shape
        count = -(-length // WINDOW)
        padded = torch.nn.functional.pad(audio, (0, count * WINDOW - length))
        position = torch.arange(count * WINDOW, device=audio.device)
        mask = (position < length).expand(n, -1)
        weights = (length - WINDOW * torch.arange(count, device=audio.device)).clamp(max=WINDOW) / WINDOW
        return padded.reshape(n * count, 1, WINDOW), mask.reshape(n * count, 1, WINDOW), weights

    def axis_scores(self, waveforms: Tensor, sample_rate: int) -> dict[str, Tensor]:
        """Each axis's rating of each sample, (N,) on the 1-10 scale: the windows' length-weighted mean."""
        windows, mask, weights = self.windows(waveforms, sample_rate)
        predictions = self.model({"wav": windows, "mask": mask})
        n = waveforms.shape[0]
        scores = {}
        for axis in AXES:
            stats = self.target_transform[axis]
            rating = predictions[axis] * stats["std"] + stats["mean"]
            scores[axis] = (rating.reshape(n, -1) * weights).sum(dim=1) / weights.sum()
        return scores

    def score(self, rollout: Rollout) -> Tensor:
        assert rollout.waveforms is not None and rollout.sample_rate is not None  # score_rewards checks `reads`
        self.model.to(rollout.waveforms.device)
        ratings = self.axis_scores(rollout.waveforms, rollout.sample_rate)
        return sum(weight * ratings[axis] for axis, weight in self.axes.items())
