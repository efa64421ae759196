"""Key layouts of LTX-2 DiT checkpoints, the official one and diffusers', and the config each carries (the
official safetensors header's `transformer` section, diffusers' config.json) as a ModelConfig and back.

Our module names are the official ones, so the official layout is our state dict under the
`model.diffusion_model.` prefix; the diffusers layout renames a few path components (the table
below is the whole difference).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from .config import ModelConfig

Layout = Literal["official", "diffusers"]
LAYOUTS = ("official", "diffusers")
OFFICIAL_PREFIX = "model.diffusion_model."
# Text connectors live under the DiT prefix in official files but are not part of the DiT.
_CONNECTOR_PREFIXES = tuple(OFFICIAL_PREFIX + n for n in ("video_embeddings_connector.", "audio_embeddings_connector."))

# Official path component -> diffusers path component (scripts/convert_ltx2_to_diffusers.py in diffusers).
_TO_DIFFUSERS = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
    # LTX-2.3 (diffusers' lora_conversion_utils names them so; `to_gate_logits` and the blocks' prompt tables
    # keep their official names).
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
_FROM_DIFFUSERS = {v: k for k, v in _TO_DIFFUSERS.items()}


def _rename(key: str, table: dict[str, str]) -> str:
    return ".".join(table.get(part, part) for part in key.split("."))


def to_layout(state: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Our (official, unprefixed) names -> names in `layout`."""
    if layout == "official":
        return {OFFICIAL_PREFIX + k: v for k, v in state.items()}
    if layout == "diffusers":
        return {_rename(k, _TO_DIFFUSERS): v for k, v in state.items()}
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def detect_layout(keys) -> Layout:
    """Official files carry the `model.diffusion_model.` prefix; diffusers files do not."""
    return "official" if any(k.startswith(OFFICIAL_PREFIX) for k in keys) else "diffusers"


def our_name(key: str, layout: Layout) -> str | None:
    """A file key in `layout` -> our parameter name; None for official keys outside the DiT (VAE, connectors)."""
    if layout == "official":
        if not key.startswith(OFFICIAL_PREFIX) or key.startswith(_CONNECTOR_PREFIXES):
            return None
        return key[len(OFFICIAL_PREFIX) :]
    if layout == "diffusers":
        return _rename(key, _FROM_DIFFUSERS)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_layout(state: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Names in `layout` -> our names. Official keys outside the DiT (VAE, connectors) are dropped."""
    renamed = {our_name(k, layout): v for k, v in state.items()}
    renamed.pop(None, None)
    return renamed


def diffusers_config(cfg: ModelConfig) -> dict:
    """Keyword arguments for `diffusers.LTX2VideoTransformer3DModel` describing the same model."""
    if cfg.timestep_embed_dim != 256:
        raise ValueError(f"timestep_embed_dim={cfg.timestep_embed_dim} has no diffusers equivalent (fixed at 256)")
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.video_head_dim,
        cross_attention_dim=cfg.video_dim,
        vae_scale_factors=cfg.vae_scale_factors,
        pos_embed_max_pos=int(cfg.rope_max_pos[0]),
        base_height=int(cfg.rope_max_pos[1]),
        base_width=int(cfg.rope_max_pos[2]),
        audio_in_channels=cfg.audio_in_channels,
        audio_out_channels=cfg.audio_in_channels,
        audio_num_attention_heads=cfg.num_heads,
        audio_attention_head_dim=cfg.audio_head_dim,
        audio_cross_attention_dim=cfg.audio_dim,
        audio_scale_factor=cfg.audio_scale_factor,
        audio_pos_embed_max_pos=int(cfg.audio_rope_max_pos),
        audio_sampling_rate=cfg.audio_sampling_rate,
        audio_hop_length=cfg.audio_hop_length,
        num_layers=cfg.num_layers,
        norm_eps=cfg.norm_eps,
        caption_channels=cfg.caption_channels,
        rope_theta=cfg.rope_theta,
        causal_offset=cfg.causal_offset,
        timestep_scale_multiplier=int(cfg.timestep_scale_multiplier),
        cross_attn_timestep_scale_multiplier=int(cfg.av_ca_timestep_scale_multiplier),
        rope_type="split",
        gated_attn=cfg.gated_attention,
        audio_gated_attn=cfg.gated_attention,
        cross_attn_mod=cfg.cross_attention_adaln,
        audio_cross_attn_mod=cfg.cross_attention_adaln,
        use_prompt_embeddings=cfg.caption_projection,
        use_prompt_adaln_single=True,
    )


# diffusers config values our model does not implement (LTX-2.5 features, legacy RoPE): key -> required value.
_DIFFUSERS_REQUIRED = {
    "patch_size": 1,
    "patch_size_t": 1,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "rope_type": "split",
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "attention_out_bias": True,
    "use_prompt_adaln_single": True,  # False (LTX-2.5): prompt modulation from the tables alone
    "rope_double_precision": True,
    "ff_bias": True,
    "audio_ff_bias": True,
    "use_keyframes_abs_pos_embedding": False,
    "perturbed_attn": False,
}


def config_from_diffusers(dcfg) -> ModelConfig:
    """The ModelConfig of a diffusers LTX-2 transformer config; unsupported variants fail naming the key.

    LTX-2.3 is `gated_attn`/`audio_gated_attn` (gated_attention), `cross_attn_mod`/`audio_cross_attn_mod`
    (cross_attention_adaln) and `use_prompt_embeddings=False` (no caption projection); keys a config lacks take
    diffusers' defaults (the 19B's). The official layout sets each feature for both streams at once, so a
    config that sets it for one stream only is refused."""
    for key, want in _DIFFUSERS_REQUIRED.items():
        if key in dcfg and dcfg[key] != want:
            raise ValueError(f"diffusers config {key}={dcfg[key]!r} is not supported (need {want!r})")
    if dcfg["num_attention_heads"] != dcfg["audio_num_attention_heads"]:
        raise ValueError("diffusers config: num_attention_heads must equal audio_num_attention_heads")
    flags = {}
    for video, audio in (("gated_attn", "audio_gated_attn"), ("cross_attn_mod", "audio_cross_attn_mod")):
        flags[video] = dcfg.get(video, False)
        if dcfg.get(audio, False) != flags[video] or not isinstance(flags[video], bool):
            raise ValueError(
                f"diffusers config {video}={flags[video]!r}, {audio}={dcfg.get(audio, False)!r}: both streams must "
                f"be true or both false (the official layout has one flag for both)"
            )
    caption_projection = dcfg.get("use_prompt_embeddings", True)
    if not isinstance(caption_projection, bool):
        raise ValueError(f"diffusers config use_prompt_embeddings={caption_projection!r} must be true or false")
    cfg = ModelConfig(
        num_layers=dcfg["num_layers"],
        num_heads=dcfg["num_attention_heads"],
        video_head_dim=dcfg["attention_head_dim"],
        audio_head_dim=dcfg["audio_attention_head_dim"],
        in_channels=dcfg["in_channels"],
        audio_in_channels=dcfg["audio_in_channels"],
        caption_channels=dcfg["caption_channels"],
        norm_eps=dcfg["norm_eps"],
        rope_theta=dcfg["rope_theta"],
        rope_max_pos=(float(dcfg["pos_embed_max_pos"]), float(dcfg["base_height"]), float(dcfg["base_width"])),
        audio_rope_max_pos=float(dcfg["audio_pos_embed_max_pos"]),
        vae_scale_factors=tuple(dcfg["vae_scale_factors"]),
        audio_scale_factor=dcfg["audio_scale_factor"],
        audio_sampling_rate=dcfg["audio_sampling_rate"],
        audio_hop_length=dcfg["audio_hop_length"],
        causal_offset=dcfg["causal_offset"],
        timestep_scale_multiplier=float(dcfg["timestep_scale_multiplier"]),
        av_ca_timestep_scale_multiplier=float(dcfg["cross_attn_timestep_scale_multiplier"]),
        gated_attention=flags["gated_attn"],
        cross_attention_adaln=flags["cross_attn_mod"],
        caption_projection=caption_projection,
    )
    for key, ours in (("cross_attention_dim", cfg.video_dim), ("audio_cross_attention_dim", cfg.audio_dim)):
        if dcfg[key] != ours:
            raise ValueError(f"diffusers config {key}={dcfg[key]} must equal the stream width {ours}")
    for key, ours in (("out_channels", cfg.in_channels), ("audio_out_channels", cfg.audio_in_channels)):
        if dcfg.get(key) not in (None, ours):
            raise ValueError(f"diffusers config {key}={dcfg[key]} must equal the input channels {ours}")
    return cfg


# The official header's `transformer` values that describe the DiT we implement. ltx-core checks most of them
# with `check_config_value` (which wants them present), so an export carries them all; a file that sets one to
# anything else is a variant we do not implement (the 2.5 bias-free FFN, keyframe embeddings, ...). The LTX-2.3
# switches are ModelConfig fields (_OFFICIAL_FLAGS).
_OFFICIAL_REQUIRED = {
    "dropout": 0.0,
    "attention_bias": True,
    "num_vector_embeds": None,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "cross_attention_norm": True,
    "double_self_attention": False,
    "upcast_attention": False,
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "qk_norm": "rms_norm",
    "positional_embedding_type": "rope",
    "use_audio_video_cross_attention": True,
    "share_ff": False,
    "av_cross_ada_norm": True,
    "use_middle_indices_grid": True,
    "causal_temporal_positioning": True,
    "rope_type": "split",
    "frequencies_precision": "float64",
    "ff_bias": True,
    "audio_ff_bias": True,
    "use_keyframes_abs_pos_embedding": False,
}
# Official `transformer` switches of LTX-2.3 -> (ModelConfig field, whether the field is the negation). ltx-core
# reads each with a default of False.
_OFFICIAL_FLAGS = {
    "apply_gated_attention": ("gated_attention", False),
    "cross_attention_adaln": ("cross_attention_adaln", False),
    "caption_proj_before_connector": ("caption_projection", True),
}
# The caption features LTX-2.3's header describes beside `caption_proj_before_connector=True` (ltx-core's text
# encoder configurator reads the four together: projection before the connectors, no linears or norm after them).
_PROJECTION_BEFORE_CONNECTOR = {
    "caption_projection_first_linear": False,
    "caption_projection_second_linear": False,
    "caption_proj_input_norm": False,
}
# ModelConfig fields with no official `transformer` key (official files keep the latent geometry in their `vae` and
# `audio_vae` sections, and fix the timestep features at 256): stored under our names, which ltx-core ignores.
_OWN_FIELDS = (
    "vae_scale_factors",
    "audio_scale_factor",
    "audio_sampling_rate",
    "audio_hop_length",
    "causal_offset",
    "timestep_embed_dim",
)


def official_config(cfg: ModelConfig) -> dict:
    """The official header's `transformer` section describing `cfg` (official key names, so ltx-core builds the
    same DiT from our exports), plus the fields the official section has no key for."""
    own = {k: getattr(cfg, k) for k in _OWN_FIELDS}
    flags = {key: getattr(cfg, field) != negated for key, (field, negated) in _OFFICIAL_FLAGS.items()}
    return {
        **_OFFICIAL_REQUIRED,
        **flags,
        **({} if cfg.caption_projection else _PROJECTION_BEFORE_CONNECTOR),
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.video_head_dim,
        "audio_num_attention_heads": cfg.num_heads,
        "audio_attention_head_dim": cfg.audio_head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "audio_in_channels": cfg.audio_in_channels,
        "audio_out_channels": cfg.audio_in_channels,
        "cross_attention_dim": cfg.video_dim,
        "audio_cross_attention_dim": cfg.audio_dim,
        "caption_channels": cfg.caption_channels,
        "norm_eps": cfg.norm_eps,
        "positional_embedding_theta": cfg.rope_theta,
        "positional_embedding_max_pos": list(cfg.rope_max_pos),
        "audio_positional_embedding_max_pos": [cfg.audio_rope_max_pos],
        "timestep_scale_multiplier": cfg.timestep_scale_multiplier,
        "av_ca_timestep_scale_multiplier": cfg.av_ca_timestep_scale_multiplier,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in own.items()},
    }


def config_from_official(tcfg: dict) -> ModelConfig:
    """The ModelConfig of an official header's `transformer` section; unsupported variants fail naming the key.

    A key the section lacks takes the value ltx-core's `LTXModelConfigurator` gives it (the 19B value, except
    `av_ca_timestep_scale_multiplier`, 1), so we build the DiT ltx-core would build from the same file; widths
    that follow from others (`cross_attention_dim`, `out_channels`, ...) are only checked when present."""
    for key, want in _OFFICIAL_REQUIRED.items():
        if key in tcfg and tcfg[key] != want:
            raise ValueError(f"official config {key}={tcfg[key]!r} is not supported (need {want!r})")
    if tcfg.get("use_prompt_adaln_single", True) is not True:  # LTX-2.5: prompt modulation from the tables alone
        raise ValueError(
            f"official config use_prompt_adaln_single={tcfg['use_prompt_adaln_single']!r} is not supported"
        )
    flags = {}
    for key, (field, negated) in _OFFICIAL_FLAGS.items():
        value = tcfg.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"official config {key}={value!r} must be true or false")
        flags[field] = value != negated
    heads = tcfg.get("num_attention_heads", 32)
    if heads != tcfg.get("audio_num_attention_heads", 32):
        raise ValueError("official config: num_attention_heads must equal audio_num_attention_heads")
    audio_max_pos = tcfg.get("audio_positional_embedding_max_pos", [20])
    if len(audio_max_pos) != 1:
        raise ValueError(f"official config audio_positional_embedding_max_pos={audio_max_pos} must hold one value")
    rope_max_pos = tuple(float(p) for p in tcfg.get("positional_embedding_max_pos", [20, 2048, 2048]))
    if len(rope_max_pos) != 3:
        raise ValueError(f"official config positional_embedding_max_pos={list(rope_max_pos)} must hold 3 values")
    own = {k: tuple(v) if isinstance(v, list) else v for k, v in tcfg.items() if k in _OWN_FIELDS}
    cfg = ModelConfig(
        num_layers=tcfg.get("num_layers", 48),
        num_heads=heads,
        video_head_dim=tcfg.get("attention_head_dim", 128),
        audio_head_dim=tcfg.get("audio_attention_head_dim", 64),
        in_channels=tcfg.get("in_channels", 128),
        audio_in_channels=tcfg.get("audio_in_channels", 128),
        caption_channels=tcfg.get("caption_channels", 3840),
        norm_eps=tcfg.get("norm_eps", 1e-6),
        rope_theta=float(tcfg.get("positional_embedding_theta", 10000.0)),
        rope_max_pos=rope_max_pos,
        audio_rope_max_pos=float(audio_max_pos[0]),
        timestep_scale_multiplier=float(tcfg.get("timestep_scale_multiplier", 1000)),
        av_ca_timestep_scale_multiplier=float(tcfg.get("av_ca_timestep_scale_multiplier", 1)),
        **flags,
        **own,
    )
    expected = {
        "cross_attention_dim": cfg.video_dim,
        "audio_cross_attention_dim": cfg.audio_dim,
        "out_channels": cfg.in_channels,
        "audio_out_channels": cfg.audio_in_channels,
    }
    for key, ours in expected.items():
        if tcfg.get(key, ours) != ours:
            raise ValueError(f"official config {key}={tcfg[key]} does not fit the model (need {ours})")
    return cfg
