"""Tiny random LTX-2 text components (../shared/research/diffusers-ltx2-datapath.md section 5): a real
Gemma tokenizer without files, Gemma 3, and the 19B-structured connectors, plus writers for both
weight layouts the engine reads (a diffusers pipeline folder, the official single file)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.text import char_tokenizer
from engine.data.text import OFFICIAL_CONNECTOR_PREFIXES

CAPTION = 32  # Gemma width = caption_channels
LAYERS = 2  # Gemma layers: 3 hidden states, 96 features
REGISTERS = 8
MAX_LENGTH = 16  # a multiple of REGISTERS
# LTX2Pipeline settings for what the engine does not implement, switched off (STG has its own parity test),
# and the 19B's own timestep handling (`use_cross_timestep=False`, diffusers' "legacy LTX-2.0 behaviour").
PIPELINE_EXTRAS_OFF = dict(
    stg_scale=0.0,
    audio_stg_scale=0.0,
    modality_scale=1.0,
    audio_modality_scale=1.0,
    guidance_rescale=0.0,
    audio_guidance_rescale=0.0,
    use_cross_timestep=False,
)


def tokenizer():
    """A real GemmaTokenizer: BPE without merges, so one token per character (BOS added)."""
    return char_tokenizer()


def gemma(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=64,
            hidden_size=CAPTION,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=8,
            rope_theta=1e4,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=60,
        eoi_token_index=61,
        image_token_index=62,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def connectors(seed: int = 0):
    """LTX2TextConnectors of the 19B structure, with every constant-initialised parameter perturbed."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(seed)
    module = LTX2TextConnectors(
        caption_channels=CAPTION,
        text_proj_in_factor=LAYERS + 1,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=2,
        video_connector_num_learnable_registers=REGISTERS,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=2,
        audio_connector_num_learnable_registers=REGISTERS,
        connector_rope_base_seq_len=4096,
        rope_type="split",
        per_modality_projections=False,
        proj_bias=False,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def official_connector_state(module) -> dict[str, torch.Tensor]:
    """The connectors under the official single file's names (the inverse of the engine's map)."""
    inverse = {v: k for k, v in OFFICIAL_CONNECTOR_PREFIXES.items()}
    parts = {"transformer_blocks": "transformer_1d_blocks", "norm_q": "q_norm", "norm_k": "k_norm"}
    out = {}
    for key, value in module.state_dict().items():
        prefix = next(p for p in inverse if key.startswith(p))
        rest = ".".join(parts.get(x, x) for x in key[len(prefix) :].split("."))
        out[inverse[prefix] + rest] = value.contiguous()
    return out


def write_pipeline(root: Path, text_model, tok, conn, transformer=None) -> Path:
    """A diffusers LTX-2 pipeline folder with the text parts (and the transformer when given)."""
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root / "tokenizer")
    text_model.save_pretrained(root / "text_encoder")
    conn.save_pretrained(root / "connectors")
    if transformer is not None:
        transformer.save_pretrained(root / "transformer")
    return root


def write_official(path: Path, conn, dit_state: dict[str, torch.Tensor] | None = None) -> Path:
    """An official-layout single file: connectors, the DiT under model.diffusion_model., a stand-in
    VAE tensor, and a header naming the connector's head split."""
    state = official_connector_state(conn)
    state.update({f"model.diffusion_model.{k}": v.contiguous() for k, v in (dit_state or {}).items()})
    state["vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
    header = {"transformer": {"connector_num_attention_heads": 4, "connector_attention_head_dim": 8}}
    save_file(state, str(path), metadata={"config": json.dumps(header)})
    return path
