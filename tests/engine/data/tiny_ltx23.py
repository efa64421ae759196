"""Tiny random LTX-2.3 components (../shared/research/diffusers-ltx2-datapath.md sections 1.2 and 5): the 2.3
connectors (per-modality projections straight to the DiT's widths, gated attention), a 2.3-configured diffusers
DiT (no caption projection, gated attention, prompt AdaLN), the 2.3 video VAE (four upsamplers: space, time,
all x1, all x2), 2.0's audio VAE and the bandwidth-extension vocoder (16 kHz -> 48 kHz); and writers for a
diffusers pipeline folder and an official single file. The official names are written here by hand from
ltx-core's modules and key ops (EMBEDDINGS_PROCESSOR_KEY_OPS, the conv decoder's `up_blocks`, the vocoder's
`ups` / `resblocks` / `act_post` / `downsample.lowpass`), not from the engine's maps, and the header carries
ltx-core's config sections for 2.3 (its `transformer` text-path keys, `vae.decoder_blocks`, `vocoder` + `bwe`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..rewards import tiny_decoders
from . import tiny_ltx2

CAPTION, LAYERS, REGISTERS, MAX_LENGTH = tiny_ltx2.CAPTION, tiny_ltx2.LAYERS, tiny_ltx2.REGISTERS, tiny_ltx2.MAX_LENGTH
HEADS, VIDEO_HEAD_DIM, AUDIO_HEAD_DIM = 4, 8, 4
VIDEO_WIDTH, AUDIO_WIDTH = HEADS * VIDEO_HEAD_DIM, HEADS * AUDIO_HEAD_DIM  # the DiT's widths: 32 and 16
CONNECTOR_LAYERS = 3  # 8 in the release
LATENT = tiny_decoders.LATENT
MEL_BINS = tiny_decoders.MEL_BINS
BWE_MELS, BWE_FFT, BWE_HOP = 16, 128, 80
DECODER_LAYERS = (1, 2, 1, 1, 1)  # res_x layers, latent end last (uneven, so that the block order shows)


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every constant-initialised parameter (zero gates and biases, unit norms) moved off its constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def connectors(seed: int = 0):
    """LTX2TextConnectors of the 2.3 structure: per-token RMS norm, video and audio projections (with bias) to the
    DiT's widths, and connectors of that width with gated attention."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(seed)
    module = LTX2TextConnectors(
        caption_channels=CAPTION,
        text_proj_in_factor=LAYERS + 1,
        video_connector_num_attention_heads=HEADS,
        video_connector_attention_head_dim=VIDEO_HEAD_DIM,
        video_connector_num_layers=CONNECTOR_LAYERS,
        video_connector_num_learnable_registers=REGISTERS,
        video_gated_attn=True,
        audio_connector_num_attention_heads=HEADS,
        audio_connector_attention_head_dim=AUDIO_HEAD_DIM,
        audio_connector_num_layers=CONNECTOR_LAYERS,
        audio_connector_num_learnable_registers=REGISTERS,
        audio_gated_attn=True,
        connector_rope_base_seq_len=4096,
        rope_type="split",
        per_modality_projections=True,
        video_hidden_dim=VIDEO_WIDTH,
        audio_hidden_dim=AUDIO_WIDTH,
        proj_bias=True,
    )
    return _perturb(module, seed + 1)


def dit(seed: int = 3, perturbed_attn: bool = True):
    """diffusers' LTX2VideoTransformer3DModel configured as 2.3 (the conversion script's 2.3 flags) at tiny widths:
    its cross-attention reads the connectors' outputs directly (no caption_projection). `perturbed_attn` (the
    script's 2.3 setting) only swaps in STG-capable self-attention processors; no weights depend on it."""
    import diffusers

    torch.manual_seed(seed)
    module = diffusers.LTX2VideoTransformer3DModel(
        in_channels=LATENT,
        out_channels=LATENT,
        num_attention_heads=HEADS,
        attention_head_dim=VIDEO_HEAD_DIM,
        cross_attention_dim=VIDEO_WIDTH,
        gated_attn=True,
        cross_attn_mod=True,
        audio_in_channels=16,
        audio_out_channels=16,
        audio_num_attention_heads=HEADS,
        audio_attention_head_dim=AUDIO_HEAD_DIM,
        audio_cross_attention_dim=AUDIO_WIDTH,
        audio_gated_attn=True,
        audio_cross_attn_mod=True,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=CAPTION,
        rope_type="split",
        rope_double_precision=True,
        use_prompt_embeddings=False,
        perturbed_attn=perturbed_attn,
    )
    assert not hasattr(module, "caption_projection")
    return _perturb(module, seed + 1)


def video_vae(seed: int = 40):
    """AutoencoderKLLTX2Video of the 2.3 block structure (the conversion script's 2.3 config, channels / 32)."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT,
        block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(8, 16, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=DECODER_LAYERS,
        spatio_temporal_scaling=(True,) * 4,
        decoder_spatio_temporal_scaling=(True,) * 4,
        decoder_inject_noise=(False,) * 5,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        upsample_residual=(False,) * 4,
        upsample_factor=(2, 2, 1, 2),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode="zeros",
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    return tiny_decoders._randomise(vae, seed + 1)


def vocoder(seed: int = 50):
    """LTX2VocoderWithBWE of the 2.3 structure (BigVGAN v2 x160 to 16 kHz, then the bandwidth extender x240 to
    48 kHz), hidden 64 and 32. The first stage clamps its output, as ltx-core's does (`use_tanh_at_final` false);
    the STFT bases are a causal Hann-windowed DFT and the mel filterbank random, so the extender sees a real
    spectrum."""
    from diffusers.pipelines.ltx2 import LTX2VocoderWithBWE

    torch.manual_seed(seed)
    module = LTX2VocoderWithBWE(
        in_channels=2 * MEL_BINS,
        hidden_channels=64,
        upsample_kernel_sizes=[11, 4, 4, 4, 4, 4],
        upsample_factors=[5, 2, 2, 2, 2, 2],
        final_act_fn="clamp",
        final_bias=False,
        bwe_in_channels=2 * BWE_MELS,
        bwe_hidden_channels=32,
        filter_length=BWE_FFT,
        hop_length=BWE_HOP,
        window_length=BWE_FFT,
        num_mel_channels=BWE_MELS,
    )
    tiny_decoders._randomise(module, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    n = torch.arange(BWE_FFT, dtype=torch.float64)
    k = torch.arange(BWE_FFT // 2 + 1, dtype=torch.float64)[:, None]
    window = torch.hann_window(BWE_FFT, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(2 * math.pi * k * n / BWE_FFT), -torch.sin(2 * math.pi * k * n / BWE_FFT)]) * window
    with torch.no_grad():
        stft = module.mel_stft.stft_fn
        stft.forward_basis.copy_(basis[:, None, :].float())
        stft.inverse_basis.copy_(torch.randn(stft.inverse_basis.shape, generator=g))
        module.mel_stft.mel_basis.copy_(torch.rand(module.mel_stft.mel_basis.shape, generator=g))
    return module


def write_pipeline(root: Path, text_model, tok, conn, vae=None, audio=None, voc=None) -> Path:
    """A diffusers LTX-2.3 pipeline folder: the text parts, and the decoders when given."""
    tiny_ltx2.write_pipeline(root, text_model, tok, conn)
    if vae is not None:
        tiny_decoders.write_folder(root, vae, audio, voc)
    return root


# ---- the official single file, names by hand ------------------------------------------------------------------


def official_connector_key(name: str) -> str:
    """ltx-core's name of a diffusers LTX2TextConnectors (2.3) tensor."""
    for ours, official in (
        ("video_text_proj_in.", "text_embedding_projection.video_aggregate_embed."),
        ("audio_text_proj_in.", "text_embedding_projection.audio_aggregate_embed."),
        ("video_connector.", "model.diffusion_model.video_embeddings_connector."),
        ("audio_connector.", "model.diffusion_model.audio_embeddings_connector."),
    ):
        if name.startswith(ours):
            rest = name[len(ours) :].replace("transformer_blocks.", "transformer_1d_blocks.")
            return official + rest.replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm.")
    raise KeyError(name)


def official_vocoder_key(name: str) -> str:
    """ltx-core's (`vocoder.`-less) name of a diffusers LTX2VocoderWithBWE tensor: VocoderWithBWE's `vocoder`,
    `bwe_generator` and `mel_stft`, each Vocoder's conv_pre / ups / resblocks / act_post / conv_post, each
    Activation1d's `downsample.lowpass.filter`."""
    parts = {"upsamplers": "ups", "resnets": "resblocks", "conv_in": "conv_pre", "conv_out": "conv_post"}
    parts["act_out"] = "act_post"
    name = name.replace(".downsample.filter", ".downsample.lowpass.filter")
    return ".".join(parts.get(p, p) for p in name.split("."))


def header(conn) -> dict:
    """ltx-core's config sections of a 2.3 file at these sizes (the release's header, tiny widths)."""
    video = conn.video_connector
    stage = dict(
        resblock="AMP1",
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5]] * 3,
        stereo=True,
        use_tanh_at_final=False,
        activation="snakebeta",
        use_bias_at_final=False,
    )
    res = [["res_x", {"num_layers": n}] for n in DECODER_LAYERS]
    ups = [
        ["compress_space", {"multiplier": 2}],
        ["compress_time", {"multiplier": 2}],
        ["compress_all", {"multiplier": 1}],
        ["compress_all", {"multiplier": 2}],
    ]
    dd = dict(
        ch=tiny_decoders.AUDIO_LATENT * MEL_BINS // 4,
        out_ch=2,
        ch_mult=[1, 2, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        resolution=256,
        z_channels=tiny_decoders.AUDIO_LATENT,
        in_channels=2,
        double_z=True,
        norm_type="pixel",
        causality_axis="height",
        mid_block_add_attention=False,
        mel_bins=MEL_BINS,
    )
    audio = {
        "model": {"params": {"ddconfig": dd, "sampling_rate": 16000}},
        "preprocessing": {"stft": {"hop_length": 160, "causal": True}, "mel": {"n_mel_channels": MEL_BINS}},
    }
    return {
        "transformer": {
            "caption_channels": CAPTION,
            "num_attention_heads": HEADS,
            "attention_head_dim": VIDEO_HEAD_DIM,
            "audio_num_attention_heads": HEADS,
            "audio_attention_head_dim": AUDIO_HEAD_DIM,
            "connector_num_attention_heads": HEADS,
            "connector_attention_head_dim": VIDEO_HEAD_DIM,
            "audio_connector_num_attention_heads": HEADS,
            "audio_connector_attention_head_dim": AUDIO_HEAD_DIM,
            "connector_num_layers": len(video.transformer_blocks),
            "connector_num_learnable_registers": video.num_learnable_registers,
            "connector_positional_embedding_max_pos": [4096],
            "connector_apply_gated_attention": True,
            "connector_norm_output": True,
            "caption_proj_before_connector": True,
            "caption_projection_first_linear": False,
            "caption_projection_second_linear": False,
            "caption_proj_input_norm": False,
            "cross_attention_adaln": True,
            "apply_gated_attention": True,
            "text_encoder_norm_type": "per_token_rms",
            "rope_type": "split",
            "frequencies_precision": "float64",
            "positional_embedding_theta": 10000.0,
        },
        "vae": {
            "_class_name": "CausalVideoAutoencoder",
            "dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": LATENT,
            "decoder_blocks": [b for pair in zip(res, ups) for b in pair] + [res[-1]],
            "decoder_base_channels": 4,
            "norm_layer": "pixel_norm",
            "patch_size": 4,
            "causal_decoder": False,
            "timestep_conditioning": False,
            "scaling_factor": 1.0,
            "spatial_padding_mode": "zeros",
        },
        "audio_vae": audio,
        "vocoder": {
            "vocoder": dict(
                stage,
                upsample_initial_channel=64,
                upsample_rates=[5, 2, 2, 2, 2, 2],
                upsample_kernel_sizes=[11] + [4] * 5,
            ),
            "bwe": dict(
                stage,
                upsample_initial_channel=32,
                upsample_rates=[6, 5, 2, 2, 2],
                upsample_kernel_sizes=[12, 11, 4, 4, 4],
                apply_final_activation=False,
                input_sampling_rate=16000,
                output_sampling_rate=48000,
                hop_length=BWE_HOP,
                n_fft=BWE_FFT,
                win_size=BWE_FFT,
                num_mels=BWE_MELS,
            ),
        },
    }


def official_state(conn, vae=None, audio=None, voc=None) -> dict[str, torch.Tensor]:
    """The 2.3 components under the official file's names (the VAEs' through tiny_decoders' hand-written map,
    which covers any number of decoder blocks; the encoder's names left as diffusers', as decoding never reads
    them), with a DiT tensor beside them."""
    state = {official_connector_key(k): v for k, v in conn.state_dict().items()}
    if vae is not None:
        for name, value in vae.state_dict().items():
            state["vae." + (name if name.startswith("encoder.") else tiny_decoders.official_video_key(name))] = value
        state.update({"audio_vae." + tiny_decoders.official_audio_key(k): v for k, v in audio.state_dict().items()})
        state.update({"vocoder." + official_vocoder_key(k): v for k, v in voc.state_dict().items()})
    state["model.diffusion_model.patchify_proj.weight"] = torch.zeros(4, LATENT)
    return {k: v.contiguous() for k, v in state.items()}


def write_official(path: Path, conn, vae=None, audio=None, voc=None, config: dict | None = None) -> Path:
    """An official-layout 2.3 single file (connectors, and the decoders when given) with its header (`config`:
    another header instead)."""
    config = header(conn) if config is None else config
    save_file(official_state(conn, vae, audio, voc), str(path), metadata={"config": json.dumps(config)})
    return path
