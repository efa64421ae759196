"""The decoders' weights in the official LTX-2 single file: their diffusers constructor arguments, from the file's
header (ltx-core's config formats, its defaults for absent keys) or the 19B release's values, and the key maps
from the file's names to diffusers'. engine.rewards.decode builds and loads the decoders with them.
"""

from __future__ import annotations

import math

# ---- configs of the official single file -------------------------------------------------------------------

# diffusers' scripts/convert_ltx2_to_diffusers.py, version 2.0 (the 19B release): used for every setting the
# file's header does not carry (timestep conditioning is read from the tensors instead).
VIDEO_VAE_19B = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=128,
    block_out_channels=(256, 512, 1024, 2048),
    decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    timestep_conditioning=False,
    patch_size=4,
    patch_size_t=1,
    resnet_norm_eps=1e-6,
    scaling_factor=1.0,
    encoder_causal=True,
    decoder_causal=False,  # the constructor's default is True: LTX-2 decodes non-causally
    encoder_spatial_padding_mode="zeros",
    decoder_spatial_padding_mode="reflect",
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)
AUDIO_VAE_19B = dict(
    base_channels=128,
    output_channels=2,
    ch_mult=(1, 2, 4),
    num_res_blocks=2,
    attn_resolutions=None,
    in_channels=2,
    resolution=256,
    latent_channels=8,
    norm_type="pixel",
    causality_axis="height",
    dropout=0.0,
    mid_block_add_attention=False,
    sample_rate=16000,
    mel_hop_length=160,
    is_causal=True,
    mel_bins=64,
    double_z=True,
)
VOCODER_19B = dict(
    in_channels=128,
    hidden_channels=1024,
    out_channels=2,
    upsample_kernel_sizes=[16, 15, 8, 4, 4],
    upsample_factors=[6, 5, 2, 2, 2],
    resnet_kernel_sizes=[3, 7, 11],
    resnet_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    act_fn="leaky_relu",
    leaky_relu_negative_slope=0.1,
    antialias=False,
    final_act_fn="tanh",
    final_bias=True,
    output_sampling_rate=24000,
)


# ltx-core's decoder blocks that grow the latent grid, and the diffusers upsample_type of each.
_UPSAMPLE_TYPES = {"compress_all": "spatiotemporal", "compress_time": "temporal", "compress_space": "spatial"}


def video_vae_kwargs(section: dict | None, timestep_conditioning: bool) -> dict:
    """AutoencoderKLLTX2Video arguments from the header's `vae` section (ltx-core's CausalVideoAutoencoder
    config, its defaults for absent keys), else the 19B values. `decoder_blocks` alternate `res_x` and an
    upsampler: `compress_all` (LTX-2.0: three, residual, x2 channels each), `compress_time` / `compress_space`
    (LTX-2.3: space, time, all x1, all x2, without residuals); the channels grow by each upsampler's multiplier
    from `decoder_base_channels`. ltx-core lists the blocks latent-last and runs them reversed; diffusers
    reverses every list itself but `upsample_type`, which is given in running order. The decoder pads with
    ltx-core's `spatial_padding_mode` (its default: reflect)."""
    kwargs = dict(VIDEO_VAE_19B, timestep_conditioning=timestep_conditioning)
    if section is None:
        return kwargs
    if section.get("norm_layer", "pixel_norm") != "pixel_norm":
        raise ValueError(f"norm_layer {section['norm_layer']!r} (LTX-2 uses pixel_norm)")
    latent = int(section.get("latent_channels", 128))
    padding = section.get("spatial_padding_mode", section.get("decoder_spatial_padding_mode", "reflect"))
    kwargs.update(
        latent_channels=latent,
        out_channels=int(section.get("out_channels", 3)),
        patch_size=int(section.get("patch_size", 4)),
        scaling_factor=float(section.get("scaling_factor", 1.0)),
        decoder_causal=bool(section.get("causal_decoder", False)),
        decoder_spatial_padding_mode=padding,
    )
    if "decoder_blocks" not in section:
        return kwargs
    blocks = [(name, {"num_layers": p} if isinstance(p, int) else dict(p)) for name, p in section["decoder_blocks"]]
    names = [name for name, _ in blocks]
    if (
        len(blocks) % 2 != 1
        or names[::2] != ["res_x"] * (len(blocks) // 2 + 1)
        or not set(names[1::2]) <= set(_UPSAMPLE_TYPES)
    ):
        raise ValueError(
            f"decoder_blocks {names} (only res_x alternating with {', '.join(_UPSAMPLE_TYPES)} is supported, "
            f"as in LTX-2.0 and 2.3)"
        )
    res, ups = [p for _, p in blocks[::2]], [p for _, p in blocks[1::2]]
    factors = tuple(int(p.get("multiplier", 1)) for p in ups)
    base = int(section.get("decoder_base_channels", latent))
    kwargs.update(
        decoder_layers_per_block=tuple(int(p["num_layers"]) for p in res),
        decoder_inject_noise=tuple(bool(p.get("inject_noise", False)) for p in res),
        decoder_block_out_channels=tuple(base * math.prod(factors[: i + 1]) for i in range(len(ups))),
        decoder_spatio_temporal_scaling=(True,) * len(ups),
        upsample_type=tuple(_UPSAMPLE_TYPES[name] for name in reversed(names[1::2])),
        upsample_residual=tuple(bool(p.get("residual", False)) for p in ups),
        upsample_factor=factors,
    )
    return kwargs


def audio_vae_kwargs(section: dict | None) -> dict:
    """AutoencoderKLLTX2Audio arguments from the header's `audio_vae` section (ltx-core: `model.params.ddconfig`
    with `ch`, `z_channels`, `out_ch`, ...; the mel and STFT settings under `preprocessing`; ltx-core's defaults
    for absent keys), else the 19B values."""
    if section is None:
        return dict(AUDIO_VAE_19B)
    params = section.get("model", {}).get("params", {})
    dd, pre = params.get("ddconfig", {}), section.get("preprocessing", {})
    attn = dd.get("attn_resolutions", (8, 16, 32))
    return dict(
        AUDIO_VAE_19B,
        base_channels=int(dd.get("ch", 128)),
        output_channels=int(dd.get("out_ch", 2)),
        ch_mult=tuple(dd.get("ch_mult", (1, 2, 4))),
        num_res_blocks=int(dd.get("num_res_blocks", 2)),
        attn_resolutions=tuple(attn) or None,
        in_channels=int(dd.get("in_channels", 2)),
        resolution=int(dd.get("resolution", 256)),
        latent_channels=int(dd.get("z_channels", 8)),
        norm_type=dd.get("norm_type", "pixel"),
        causality_axis=dd.get("causality_axis", "height"),
        mid_block_add_attention=bool(dd.get("mid_block_add_attention", True)),
        sample_rate=int(params.get("sampling_rate", 16000)),
        mel_hop_length=int(pre.get("stft", {}).get("hop_length", 160)),
        is_causal=bool(pre.get("stft", {}).get("causal", True)),
        mel_bins=int(dd.get("mel_bins") or pre.get("mel", {}).get("n_mel_channels") or 64),
        double_z=bool(dd.get("double_z", True)),
    )


def _hifigan_kwargs(section: dict, resblock: str, prefix: str = "") -> dict:
    """One ltx-core `Vocoder` (its flat config, its defaults) as LTX2Vocoder / LTX2VocoderWithBWE arguments
    (`prefix` "bwe_" for the bandwidth extender), checked as ltx-core checks it: HiFi-GAN (`resblock` "1", leaky
    ReLU; LTX-2.0) or BigVGAN v2 ("AMP1", anti-aliased snakebeta throughout; both stages of LTX-2.3), stereo;
    `use_tanh_at_final` picks tanh, else a clamp to [-1, 1]."""
    found = (section.get("resblock", "1"), section.get("stereo", True))
    if found != (resblock, True):
        raise ValueError(f"vocoder resblock {found[0]!r}, stereo {found[1]!r} (expected {resblock!r}, stereo)")
    amp = resblock == "AMP1"
    if amp and section.get("activation", "snake") != "snakebeta":
        raise ValueError(f"vocoder activation {section.get('activation', 'snake')!r} (LTX-2.3 uses snakebeta)")
    kwargs = dict(
        hidden_channels=int(section.get("upsample_initial_channel", 1024)),
        out_channels=2,
        upsample_kernel_sizes=list(section.get("upsample_kernel_sizes", [16, 15, 8, 4, 4])),
        upsample_factors=list(section.get("upsample_rates", [6, 5, 2, 2, 2])),
        resnet_kernel_sizes=list(section.get("resblock_kernel_sizes", [3, 7, 11])),
        resnet_dilations=[list(d) for d in section.get("resblock_dilation_sizes", [[1, 3, 5]] * 3)],
        act_fn="snakebeta" if amp else "leaky_relu",
        leaky_relu_negative_slope=0.1,
        antialias=amp,
        antialias_ratio=2,
        antialias_kernel_size=12,
        final_act_fn="tanh" if section.get("use_tanh_at_final", True) else "clamp",
        final_bias=bool(section.get("use_bias_at_final", True)),
    )
    return {prefix + k: v for k, v in kwargs.items()}


def vocoder_kwargs(section: dict | None, audio: dict) -> tuple[str, dict]:
    """The vocoder's diffusers class and arguments from the header's `vocoder` section, as ltx-core's
    VocoderConfigurator reads it: a flat HiFi-GAN config (LTX-2.0: LTX2Vocoder, x240 to 24 kHz), or `vocoder` +
    `bwe` sections (LTX-2.3: LTX2VocoderWithBWE, a BigVGAN v2 at 16 kHz, a log-mel STFT of its output and a
    bandwidth extender that adds to a 3x resampling of it, 48 kHz). No section: the 19B values. The first stage
    reads the audio VAE's mel, (channels x mel bins) wide; the extender its own STFT's `num_mels` per channel."""
    mel_in = audio["output_channels"] * audio["mel_bins"]
    if section is None:
        return "LTX2Vocoder", dict(VOCODER_19B, in_channels=mel_in)
    if "bwe" not in section:
        kwargs = dict(VOCODER_19B, in_channels=mel_in, **_hifigan_kwargs(section, "1"))
        rate = section.get("output_sample_rate", section.get("output_sampling_rate", 24000))
        return "LTX2Vocoder", dict(kwargs, output_sampling_rate=int(rate))
    bwe = section["bwe"]
    kwargs = dict(
        in_channels=mel_in,
        **_hifigan_kwargs(section.get("vocoder", {}), "AMP1"),
        bwe_in_channels=2 * int(bwe["num_mels"]),
        **_hifigan_kwargs(bwe, "AMP1", "bwe_"),
        filter_length=int(bwe["n_fft"]),
        hop_length=int(bwe["hop_length"]),
        window_length=int(bwe["n_fft"]),  # ltx-core's MelSTFT: win_length = n_fft
        num_mel_channels=int(bwe["num_mels"]),
        input_sampling_rate=int(bwe["input_sampling_rate"]),
        output_sampling_rate=int(bwe["output_sampling_rate"]),
    )
    kwargs["bwe_final_act_fn"] = None  # ltx-core: apply_final_activation=False (the sum is clamped instead)
    return "LTX2VocoderWithBWE", kwargs


# ---- key maps: official single file -> diffusers -------------------------------------------------------------

# Per-channel statistics the decode reads; the file's others (`channel`, `mean-of-stds`) are not used.
_STATISTICS = {"mean-of-means": "latents_mean", "std-of-means": "latents_std"}
_VOCODER_PARTS = {
    "ups": "upsamplers",
    "resblocks": "resnets",
    "conv_pre": "conv_in",
    "conv_post": "conv_out",
    "act_post": "act_out",
}


def official_video_vae_key(key: str) -> str | None:
    """diffusers `AutoencoderKLLTX2Video` name of an official `vae.`-less key; None for tensors decoding never
    reads (the encoder, unused statistics). The decoder's `up_blocks.0` is the mid block, odd blocks are the
    depth-to-space upsamplers of the following even blocks (`2k+1` -> `up_blocks.k.upsamplers.0`, `2k+2` ->
    `up_blocks.k`); `res_blocks` are `resnets`; `last_time_embedder` / `last_scale_shift_table` lose `last_`."""
    parts = key.split(".")
    if parts[0] == "encoder":
        return None
    if parts[0] == "per_channel_statistics":
        return _STATISTICS.get(".".join(parts[1:]))
    if parts[0] == "decoder" and len(parts) > 2 and parts[1] == "up_blocks" and parts[2].isdigit():
        j = int(parts[2])
        block = ["mid_block"] if j == 0 else ["up_blocks", str((j - 1) // 2)] + (["upsamplers", "0"] if j % 2 else [])
        parts = parts[:1] + block + parts[3:]
    elif parts[0] == "decoder" and len(parts) > 1 and parts[1] in ("last_time_embedder", "last_scale_shift_table"):
        parts[1] = parts[1].removeprefix("last_")
    return ".".join("resnets" if p == "res_blocks" else p for p in parts)


def official_audio_vae_key(key: str) -> str | None:
    """diffusers `AutoencoderKLLTX2Audio` name of an official `audio_vae.`-less key; None for the encoder and
    unused statistics (the decoder's names are diffusers' own)."""
    parts = key.split(".")
    if parts[0] == "encoder":
        return None
    if parts[0] == "per_channel_statistics":
        return _STATISTICS.get(".".join(parts[1:]))
    return key


def official_vocoder_key(key: str) -> str:
    """diffusers `LTX2Vocoder` / `LTX2VocoderWithBWE` name of an official `vocoder.`-less key (the conversion
    script's renames, applied to whole name components). LTX-2.3's keys (`vocoder.*`, `bwe_generator.*`,
    `mel_stft.*` under the file's `vocoder.`) keep their stage names; its anti-aliased activations' output
    filters lose the `lowpass` level (`downsample.lowpass.filter` -> `downsample.filter`) and `act_post` is
    `act_out`."""
    parts = key.split(".")
    parts = [p for i, p in enumerate(parts) if not (p == "lowpass" and i and parts[i - 1] == "downsample")]
    return ".".join(_VOCODER_PARTS.get(p, p) for p in parts)
