"""CLAP text-audio agreement (LAION's CLAP through transformers' `ClapModel`), the audio reward of
OmniNFT's authors: score = (cos(text embedding, audio embedding) + 1) / 2, clipped to [0, 1], with
the text the sample's `audio_prompts`.

The model and its tokenizer come from one local directory (e.g. `laion/clap-htsat-unfused`: config,
weights, tokenizer files, preprocessor_config.json). Audio preprocessing is transformers'
`ClapFeatureExtractor` contract for the unfused checkpoints, computed here in torch on the waveform's
device: mono, resampled to the extractor's rate (48 kHz), repeated and zero-padded to its 10 s
("repeatpad") or cut to 10 s, then a log-mel spectrogram (Hann window 1024, hop 480, 64 Slaney mel
bands from 50 to 14000 Hz, dB). One departure: the extractor cuts a longer clip at a random offset
(`rand_trunc`), which would make the reward noisy; we take the middle 10 s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CheckpointError, one_line
from .audio import power_spectrogram, power_to_db, resample, slaney_mel_filters, to_mono
from .base import Reward, Rollout, local_dir, register, require_package

PADDINGS = ("repeatpad", "repeat", "pad")  # ClapFeatureExtractor's ways to fill a short clip to max_length_s


@register
class ClapScore(Reward):
    """How well the audio matches its prompt in CLAP's joint embedding space, in [0, 1]."""

    name = "clap"
    modality = "audio"
    reads = frozenset({"waveform", "text"})

    def __init__(self, weight: float = 1.0, *, path: str) -> None:
        """Loads model, tokenizer and feature-extractor settings from the directory `path`."""
        super().__init__(weight)
        transformers = require_package(self.name, "transformers", "pip install 'omninft[rewards]'")
        directory = local_dir(self.name, path, ("config.json",))
        try:
            model, info = transformers.ClapModel.from_pretrained(
                directory, local_files_only=True, output_loading_info=True
            )
            extractor = transformers.ClapFeatureExtractor.from_pretrained(directory, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, RuntimeError (shape mismatch), ...
            raise CheckpointError(f"reward 'clap': cannot load {path}: {one_line(e)}") from e
        if model.config.audio_config.enable_fusion or extractor.truncation != "rand_trunc":
            raise CheckpointError(
                f"reward 'clap': {path} is a fused CLAP (enable_fusion / truncation={extractor.truncation!r}); "
                "only the unfused checkpoints (truncation rand_trunc, e.g. laion/clap-htsat-unfused) are supported"
            )
        untrained = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if untrained:
            raise CheckpointError(
                f"reward 'clap': {path} does not fit its config.json; weights missing or mis-shaped: {untrained[:8]}"
                + (f" and {len(untrained) - 8} more" if len(untrained) > 8 else "")
            )
        if extractor.padding not in PADDINGS:
            raise CheckpointError(
                f"reward 'clap': {path} has padding {extractor.padding!r}; expected one of {PADDINGS}"
            )
        self.model = model.eval().requires_grad_(False)
        self.sample_rate: int = extractor.sampling_rate
        self.max_samples: int = extractor.nb_max_samples
        self.padding: str = extractor.padding
        self.n_fft: int = extractor.fft_window_size
        self.hop_length: int = extractor.hop_length
        self.top_db: float | None = extractor.top_db
        self.mel_filters = slaney_mel_filters(
            extractor.sampling_rate,
            extractor.fft_window_size,
            extractor.feature_size,
            extractor.frequency_min,
            extractor.frequency_max,
        )  # (bins, mels) float64
        # RoBERTa positions start after the padding index 1, so a text fills at most max_position_embeddings - 2.
        self.max_text_tokens = min(
            self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings - 2
        )

    def fit_length(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(N, samples) at `sample_rate` -> (N, max_samples) and is_longer (N, 1) bool: a longer clip keeps
        its middle max_samples, a shorter one is filled as the extractor's `padding` says."""
        n, length = audio.shape
        longer = torch.full((n, 1), length > self.max_samples, dtype=torch.bool, device=audio.device)
        if length > self.max_samples:
            start = (length - self.max_samples) // 2
            return audio[:, start : start + self.max_samples], longer
        if self.padding == "repeat":
            audio = audio.repeat(1, self.max_samples // length + 1)[:, : self.max_samples]
        elif self.padding == "repeatpad":
            audio = audio.repeat(1, self.max_samples // length)
        return torch.nn.functional.pad(audio, (0, self.max_samples - audio.shape[1])), longer

    def features(self, waveforms: Tensor, sample_rate: int) -> tuple[Tensor, Tensor]:
        """(N, channels, samples) at `sample_rate` -> the model's input_features (N, 1, frames, mels) float32
        log-mel in dB, and is_longer (N, 1). Computed in float64, as the extractor's numpy STFT."""
        audio = resample(to_mono(waveforms.double()), sample_rate, self.sample_rate)
        audio, longer = self.fit_length(audio)
        power = power_spectrogram(audio, self.n_fft, self.hop_length, pad_mode="reflect")  # (N, bins, frames)
        mel = self.mel_filters.to(power.device).T @ power
        db = power_to_db(mel, top_db=self.top_db)  # (N, mels, frames)
        return db.transpose(1, 2)[:, None].float(), longer

    def score(self, rollout: Rollout) -> Tensor:
        assert rollout.waveforms is not None and rollout.sample_rate is not None  # score_rewards checks `reads`
        device = rollout.waveforms.device
        self.model.to(device)
        features, longer = self.features(rollout.waveforms, rollout.sample_rate)
        text = self.tokenizer(
            list(rollout.audio_prompts),
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(device)
        text_embeds = self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        audio_embeds = self.model.get_audio_features(input_features=features, is_longer=longer)
        # Both pooler outputs are L2-normalised projections, so their dot product is the cosine.
        cosine = (text_embeds.pooler_output * audio_embeds.pooler_output).sum(dim=-1)
        return ((cosine + 1) / 2).clamp(0, 1)
