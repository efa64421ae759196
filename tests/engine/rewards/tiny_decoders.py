"""Tiny random LTX-2 decoders (../shared/research/diffusers-ltx2-datapath.md section 5) that fit the `tiny` DiT
(16 video and 16 audio latent channels), and writers for both layouts engine.rewards.decode reads: a diffusers
pipeline folder and an official single file, whose keys invert the engine's maps and whose header carries
ltx-core's config sections, written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LATENT = 16  # video latent channels = the tiny DiT's in_channels
AUDIO_LATENT, MEL_BINS = 4, 16  # 4 channels x 16 / 4 latent mel bins = 16 packed = the DiT's audio_in_channels


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs every constant-initialised parameter (timestep multipliers, zero biases) and draws random latent
    statistics, so that nothing a decoder reads is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        if hasattr(module, "latents_mean"):
            module.latents_mean.copy_(0.5 * torch.randn(module.latents_mean.shape, generator=g))
            module.latents_std.copy_(0.5 + torch.rand(module.latents_std.shape, generator=g))
    return module.eval()


def video_vae(timestep_conditioning: bool = False, seed: int = 0):
    """AutoencoderKLLTX2Video of the 19B block structure at channels / 32 (decoder widths 32 -> 16 -> 8 -> 4)."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT,
        block_out_channels=(8, 16, 32, 64),
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True,) * 4,
        decoder_spatio_temporal_scaling=(True,) * 3,
        decoder_inject_noise=(False,) * 4,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal",) * 3,
        upsample_residual=(True,) * 3,
        upsample_factor=(2, 2, 2),
        timestep_conditioning=timestep_conditioning,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    return _randomise(vae, seed + 1)


def audio_vae(seed: int = 0):
    """AutoencoderKLLTX2Audio of the 19B structure; base_channels = the packed token width (its statistics are
    applied to packed tokens)."""
    from diffusers import AutoencoderKLLTX2Audio

    torch.manual_seed(seed)
    module = AutoencoderKLLTX2Audio(
        base_channels=AUDIO_LATENT * MEL_BINS // 4,
        latent_channels=AUDIO_LATENT,
        mel_bins=MEL_BINS,
        ch_mult=(1, 2, 4),
        resolution=256,
    )
    return _randomise(module, seed + 1)


def vocoder(seed: int = 0):
    """LTX2Vocoder of the 19B structure (x240 to 24 kHz), hidden 32, reading the stereo mel of `audio_vae`."""
    from diffusers.pipelines.ltx2 import LTX2Vocoder

    torch.manual_seed(seed)
    module = LTX2Vocoder(
        in_channels=2 * MEL_BINS,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[16, 15, 8, 4, 4],
        upsample_factors=[6, 5, 2, 2, 2],
        resnet_kernel_sizes=[3, 7, 11],
        resnet_dilations=[[1, 3, 5]] * 3,
        output_sampling_rate=24000,
    )
    return _randomise(module, seed + 1)


def write_folder(root: Path, vae, audio, voc) -> Path:
    """A diffusers pipeline folder with the decoders only (vae/, audio_vae/, vocoder/)."""
    vae.save_pretrained(root / "vae")
    audio.save_pretrained(root / "audio_vae")
    voc.save_pretrained(root / "vocoder")
    return root


# ---- the official single file: our maps inverted --------------------------------------------------------------

_STATISTICS = {
    "latents_mean": "per_channel_statistics.mean-of-means",
    "latents_std": "per_channel_statistics.std-of-means",
}
_VOCODER_PARTS = {"upsamplers": "ups", "resnets": "resblocks", "conv_in": "conv_pre", "conv_out": "conv_post"}


def official_video_key(name: str) -> str:
    """The official (`vae.`-less) name of a diffusers AutoencoderKLLTX2Video decoder tensor or statistic."""
    if name in _STATISTICS:
        return _STATISTICS[name]
    parts = name.split(".")
    if parts[:2] == ["decoder", "mid_block"]:
        parts = ["decoder", "up_blocks", "0"] + parts[2:]
    elif parts[:2] == ["decoder", "up_blocks"]:
        k = int(parts[2])
        if parts[3:5] == ["upsamplers", "0"]:
            parts = ["decoder", "up_blocks", str(2 * k + 1)] + parts[5:]
        else:
            parts = ["decoder", "up_blocks", str(2 * k + 2)] + parts[3:]
    elif parts[:2] in (["decoder", "time_embedder"], ["decoder", "scale_shift_table"]):
        parts[1] = "last_" + parts[1]
    return ".".join("res_blocks" if p == "resnets" else p for p in parts)


def official_audio_key(name: str) -> str:
    return _STATISTICS.get(name, name)


def official_vocoder_key(name: str) -> str:
    return ".".join(_VOCODER_PARTS.get(p, p) for p in name.split("."))


def official_state(vae, audio, voc) -> dict[str, torch.Tensor]:
    """The three components under the official single file's names, with what the release holds beside the
    decoders: the VAE encoders (under `vae.encoder.` / `audio_vae.encoder.`, their inner names left as
    diffusers' since decoding never reads them), the statistics decoding does not read, and a DiT tensor."""
    state = {}
    for name, value in vae.state_dict().items():
        key = (
            f"vae.encoder.{name[len('encoder.') :]}"
            if name.startswith("encoder.")
            else "vae." + official_video_key(name)
        )
        state[key] = value
    for name, value in audio.state_dict().items():
        state["audio_vae." + official_audio_key(name)] = value
    for name, value in voc.state_dict().items():
        state["vocoder." + official_vocoder_key(name)] = value
    for prefix, module in (("vae", vae), ("audio_vae", audio)):
        state[f"{prefix}.per_channel_statistics.channel"] = torch.arange(module.latents_mean.numel())
        state[f"{prefix}.per_channel_statistics.mean-of-stds"] = torch.ones_like(module.latents_mean)
    state["model.diffusion_model.patchify_proj.weight"] = torch.zeros(4, LATENT)
    return {k: v.contiguous() for k, v in state.items()}


def ltx_core_header(vae) -> dict:
    """The header sections ltx-core reads for these decoders, in its own formats (CausalVideoAutoencoder's
    `decoder_blocks`, the audio VAE's `model.params.ddconfig`, the flat HiFi-GAN vocoder config)."""
    res = {"num_layers": 1, "inject_noise": False}
    up = {"residual": True, "multiplier": 2}
    return {
        "vae": {
            "_class_name": "CausalVideoAutoencoder",
            "dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": LATENT,
            "decoder_blocks": [["res_x", res], ["compress_all", up]] * 3 + [["res_x", res]],
            "decoder_base_channels": 4,
            "norm_layer": "pixel_norm",
            "patch_size": 4,
            "causal_decoder": False,
            "timestep_conditioning": bool(vae.config.timestep_conditioning),
            "scaling_factor": 1.0,
        },
        "audio_vae": {
            "model": {
                "params": {
                    "ddconfig": {
                        "ch": AUDIO_LATENT * MEL_BINS // 4,
                        "out_ch": 2,
                        "ch_mult": [1, 2, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "resolution": 256,
                        "z_channels": AUDIO_LATENT,
                        "in_channels": 2,
                        "double_z": True,
                        "norm_type": "pixel",
                        "causality_axis": "height",
                        "mid_block_add_attention": False,
                        "mel_bins": MEL_BINS,
                    },
                    "sampling_rate": 16000,
                }
            },
            "preprocessing": {"stft": {"hop_length": 160, "causal": True}, "mel": {"n_mel_channels": MEL_BINS}},
        },
        "vocoder": {
            "upsample_initial_channel": 32,
            "upsample_rates": [6, 5, 2, 2, 2],
            "upsample_kernel_sizes": [16, 15, 8, 4, 4],
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "stereo": True,
            "resblock": "1",
            "output_sample_rate": 24000,
        },
    }


def write_official(path: Path, vae, audio, voc, header: bool = True) -> Path:
    """An official-layout single file of the three components; `header`: with ltx-core's config sections (else no
    config, so the loader falls back to the 19B configs)."""
    metadata = {"config": json.dumps(ltx_core_header(vae))} if header else None
    save_file(official_state(vae, audio, voc), str(path), metadata=metadata)
    return path
