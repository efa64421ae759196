"""Model configuration for the LTX-2 audio-video DiT: one dataclass, named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .latents import LatentGeometry


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the dual-stream DiT (field meanings follow ../shared/ltx2/ARCHITECTURE.md section 0).

    Both cross-modal attentions use the audio head layout, so video and audio share `num_heads`
    (LTX-2 asserts the same). With `caption_projection` (the 19B release) text contexts enter at
    `caption_channels` and are projected to each stream's width inside the model; without it (LTX-2.3,
    whose connectors project them) they enter at the stream widths (`video_context_dim`,
    `audio_context_dim`).

    LTX-2.3 is three flags on the same model (ARCHITECTURE.md sections 0, 1): `gated_attention` (each of
    the six attentions scales its per-head outputs by 2 sigmoid(to_gate_logits(x)) before `to_out`),
    `cross_attention_adaln` (the text cross-attention gets adaLN: shift, scale and gate of its queries
    from rows 6-8 of 9-row tables, shift and scale of its contexts from the prompt adaLN-single and the
    blocks' 2-row prompt tables) and `caption_projection=False`.
    """

    num_layers: int = 48
    num_heads: int = 32
    video_head_dim: int = 128
    audio_head_dim: int = 64
    in_channels: int = 128
    audio_in_channels: int = 128
    caption_channels: int = 3840
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_pos: tuple[float, float, float] = (20.0, 2048.0, 2048.0)
    audio_rope_max_pos: float = 20.0
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)
    audio_scale_factor: int = 4
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    causal_offset: int = 1
    timestep_scale_multiplier: float = 1000.0
    av_ca_timestep_scale_multiplier: float = 1000.0
    timestep_embed_dim: int = 256
    gated_attention: bool = False  # LTX-2.3: per-head output gates (`to_gate_logits`) on every attention
    cross_attention_adaln: bool = False  # LTX-2.3: adaLN on the text cross-attention (prompt adaLN, 9-row tables)
    caption_projection: bool = True  # the 19B's in-DiT caption projections; LTX-2.3 has none (its connectors project)

    @property
    def video_dim(self) -> int:
        return self.num_heads * self.video_head_dim

    @property
    def audio_dim(self) -> int:
        return self.num_heads * self.audio_head_dim

    @property
    def modulation_rows(self) -> int:
        """Rows of each stream's adaLN-single output and block table: 6, or 9 with text cross-attention adaLN."""
        return 9 if self.cross_attention_adaln else 6

    @property
    def video_context_dim(self) -> int:
        """Width of the video text context the model takes: caption_channels, or the video width without
        caption projection (LTX-2.3's connectors give it at that width)."""
        return self.caption_channels if self.caption_projection else self.video_dim

    @property
    def audio_context_dim(self) -> int:
        """Width of the audio text context the model takes (see video_context_dim)."""
        return self.caption_channels if self.caption_projection else self.audio_dim

    @property
    def geometry(self) -> LatentGeometry:
        """How this model's latents map to seconds and pixels (models.latents)."""
        return LatentGeometry(
            frame_stride=self.vae_scale_factors[0],
            pixel_stride=tuple(self.vae_scale_factors[1:]),
            mel_stride=self.audio_scale_factor,
            hop_length=self.audio_hop_length,
            sampling_rate=self.audio_sampling_rate,
            causal_offset=self.causal_offset,
        )

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "num_heads",
            "video_head_dim",
            "audio_head_dim",
            "in_channels",
            "audio_in_channels",
            "caption_channels",
            "timestep_embed_dim",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        for key in ("gated_attention", "cross_attention_adaln", "caption_projection"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("video_head_dim", "audio_head_dim"):
            if getattr(self, key) % 2:
                raise ValueError(f"model.{key} must be even (split RoPE rotates half-dims), got {getattr(self, key)}")
        # Split RoPE pads the frequency ladder to dim/2 and cuts it per head: there must be room for it.
        if self.video_dim // 6 * 3 > self.video_dim // 2 or self.video_dim // 6 == 0:
            raise ValueError(f"model: video width {self.video_dim} is too small for 3-axis RoPE")


# What LTX-2.3 changes in the DiT (its widths, depth and RoPE are the 19B's).
LTX23 = dict(gated_attention=True, cross_attention_adaln=True, caption_projection=False)
# CPU-sized: same topology (dual stream, shared heads, split RoPE on every axis), tiny widths.
_TINY = ModelConfig(
    num_layers=4,
    num_heads=4,
    video_head_dim=16,
    audio_head_dim=8,
    in_channels=16,
    audio_in_channels=16,
    caption_channels=32,
)
PRESETS: dict[str, ModelConfig] = {
    "ltx2-19b": ModelConfig(),
    "ltx2.3-22b": ModelConfig(**LTX23),  # 18,988,838,144 DiT parameters; "22B" counts its text connectors too
    "tiny": _TINY,
    "tiny-2.3": dataclasses.replace(_TINY, **LTX23),
}


def resolve_config(name_or_config: str | ModelConfig | dict) -> ModelConfig:
    """A preset name, a ModelConfig, or a dict of ModelConfig fields (optionally with `preset` as the base)."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {name_or_config!r}")
        return PRESETS[name_or_config]
    if isinstance(name_or_config, dict):
        fields = dict(name_or_config)
        base = resolve_config(fields.pop("preset", "ltx2-19b"))
        allowed = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}; allowed: preset, {', '.join(sorted(allowed))}")
        for key in ("rope_max_pos", "vae_scale_factors"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return dataclasses.replace(base, **fields)
    raise TypeError(f"expected a preset name, ModelConfig or dict, got {type(name_or_config).__name__}")
