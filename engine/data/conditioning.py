"""What the trainer asks of text: the (video, audio) contexts of a batch of prompts.

Two sources behind one call: the stand-in features of the embedded tiny task (no text model), and
the real LTX-2 path (engine.data.text), whose prompt features come from the embedding cache or are
encoded once, before training, and then dropped with Gemma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .cache import EmbeddingCache
from .features import prompt_features
from .text import DTYPES, ContextConnectors, PromptEncoder, TextConfig, encoding_fingerprint, load_connectors


class Conditioning(Protocol):
    # (video, audio) context widths: (caption_channels, caption_channels) for a DiT that projects its text
    # (LTX-2.0), the DiT's own video and audio widths for one that does not (LTX-2.3).
    context_channels: tuple[int, int]

    def contexts(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(video, audio) contexts, (B, T_ctx, context_channels[0]) and (B, T_ctx, context_channels[1]), for B
        prompts."""


class StandInConditioning:
    """The tiny task's seeded per-prompt features (engine.data.features). Video and audio share them, unless
    `audio_channels` asks for audio contexts of another width (a DiT without caption projection, as LTX-2.3's,
    reads each stream's contexts at that stream's width)."""

    def __init__(self, tokens: int, channels: int, audio_channels: int | None = None):
        self.tokens, self.channels = tokens, channels
        self.context_channels = (channels, channels if audio_channels is None else audio_channels)
        self._memo: dict[tuple[str, int], Tensor] = {}

    def _features(self, prompts: Sequence[str], channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        for p in prompts:
            if (p, channels) not in self._memo:
                self._memo[p, channels] = prompt_features(p, self.tokens, channels)
        return torch.stack([self._memo[p, channels] for p in prompts]).to(device=device, dtype=dtype)

    def contexts(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        video_width, audio_width = self.context_channels
        video = self._features(prompts, video_width, device, dtype)
        return video, video if audio_width == video_width else self._features(prompts, audio_width, device, dtype)


def connectors_source(cfg: TextConfig, model_init: str | None) -> str:
    """`text.connectors`, defaulting to the `model.init` weights (the official file carries them, and
    so does a diffusers pipeline folder)."""
    source = cfg.connectors or model_init
    if source is None:
        raise ConfigError("text.connectors: set it (or model.init) to the LTX-2 weights that hold the text connectors")
    return source


def encode_into(
    encoder: PromptEncoder,
    prompts: Sequence[str],
    store: Callable[[str, Tensor], None],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Encodes `prompts` in `text.batch_size` chunks and hands each result to `store` as it is made,
    so a killed run keeps what it finished."""
    for chunk, rows in encoder.batches(prompts):
        for p, features in zip(chunk, rows):
            store(p, features)
        if progress is not None:
            progress(len(chunk))


class TextConditioning:
    """The real LTX-2 text path: cached (or freshly encoded) prompt features through the connectors.

    The contexts are `context_channels` wide: (caption_channels, caption_channels) for LTX-2.0, whose DiT
    projects them; the DiT's video and audio widths for LTX-2.3 (per-modality projections in the connectors,
    none in the DiT). `caption_channels` is Gemma's width (the connectors' input) in both.

    `prompts` are all the texts the run will condition on (training prompts and negative prompts).
    Those the cache lacks are encoded here with Gemma on `device`, before the DiT trains, when
    `text.on_missing=encode`; Gemma is then released. With `on_missing=error` they are an error that
    points to `omninft encode-prompts`. Under torchrun each rank encodes its share of them into the
    cache (the caller waits for every rank before reading it: `ProcessLayout.collectively`).
    """

    def __init__(
        self,
        cfg: TextConfig,
        model_init: str | None,
        prompts: Sequence[str],
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ):
        connectors = load_connectors(connectors_source(cfg, model_init), DTYPES[cfg.dtype])
        self.fingerprint = encoding_fingerprint(cfg, connectors)
        self.cache = EmbeddingCache(cfg.cache, self.fingerprint) if cfg.cache else None
        self._memory: dict[str, Tensor] = {}
        wanted = list(dict.fromkeys(p.strip() for p in prompts))
        missing = set(self.cache.missing(wanted) if self.cache else wanted)
        if missing and cfg.on_missing == "error":
            shown = ", ".join(repr(p) for p in [w for w in wanted if w in missing][:3]) + " ..." * (len(missing) > 3)
            raise DataError(
                f"text.cache: {len(missing)} prompt(s) are not encoded in {self.cache.dir} ({shown}): run omninft "
                f"encode-prompts with this config (entries are keyed by the encoder's files, the connectors' "
                f"projection(s), text.max_length and text.dtype), or set text.on_missing=encode"
            )
        # Without a cache every rank needs every text in memory; with one, each encodes its share into it.
        mine = [p for i, p in enumerate(wanted) if p in missing and (self.cache is None or i % world == rank)]
        if mine:
            encoder = PromptEncoder.load(cfg, connectors, device)
            encode_into(encoder, mine, self._memory.__setitem__ if self.cache is None else self.cache.put)
            del encoder  # Gemma leaves the device before the DiT is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.connectors = ContextConnectors(connectors, cfg.max_length).to(device)
        self.caption_channels = connectors.config.caption_channels
        self.context_channels = self.connectors.context_channels

    def check_complete(self, prompts: Sequence[str]) -> None:
        """After every rank encoded its share: all of `prompts` are readable here (a cache on a disk
        that other ranks cannot see would otherwise fail mid-rollout)."""
        if self.cache is None:
            return
        missing = self.cache.missing([p.strip() for p in prompts])
        if missing:
            raise DataError(
                f"text.cache: {len(missing)} entries that other ranks wrote are not visible in {self.cache.dir} "
                f"(e.g. {missing[0]!r}): put text.cache on a filesystem every rank shares"
            )

    def features(self, prompt: str) -> Tensor:
        prompt = prompt.strip()
        return self._memory[prompt] if prompt in self._memory else self.cache.get(prompt)

    def contexts(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.connectors([self.features(p) for p in prompts], device, dtype)


def run_texts(records: Sequence, negative_default: str) -> list[str]:
    """Every text a run conditions on, in order, once: each record's prompt and negative prompt."""
    texts = []
    for r in records:
        texts += [r.prompt, negative_default if r.negative_prompt is None else r.negative_prompt]
    return list(dict.fromkeys(t.strip() for t in texts))
