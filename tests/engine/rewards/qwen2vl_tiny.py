"""Tiny Qwen2-VL checkpoints for the VideoAlign and HPSv3 tests, as the judges' releases lay them out: a base
directory (config.json in transformers 4.45's flat format, preprocessor_config.json, a byte-level BPE Qwen2 tokenizer
with Qwen2-VL's special tokens, its merges learnt on the judges' prompts so sequences stay short) and backbone state
dicts in the released (4.45) key layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from engine.rewards.hpsv3 import INSTRUCTION, SUFFIX  # noqa: E402
from engine.rewards.qwen2vl import QWEN2VL_SPECIAL_TOKENS  # noqa: E402
from engine.rewards.videoalign import PROMPT  # noqa: E402

SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PATCHES = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def tokenizer() -> object:
    """A Qwen2 tokenizer (Qwen2-VL's pre-tokenizer) with a byte-level BPE learnt to completion on the judges' prompts
    (about 1200 tokens) and Qwen2-VL's special tokens after it."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([PROMPT, INSTRUCTION, SUFFIX], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_tokens(list(SPECIALS), special_tokens=True)
    tok.pad_token = "<|endoftext|>"
    return tok


def base_config(tok: object, vocab_size: int = 2000) -> dict:
    """config.json of a tiny Qwen2-VL in the released flat format (vocab_size, as in the real ones, is not the
    judge's embedding size): 2 layers 64 wide (head dim 16), a 2-block vision encoder 32 wide."""
    ids = dict(zip(SPECIALS, tok.convert_tokens_to_ids(list(SPECIALS))))
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_chans": 3,
            "hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }


def write_base(directory: Path) -> tuple[object, dict]:
    """Writes the base checkpoint directory (no weights); returns its tokenizer and config.json."""
    tok = tokenizer()
    config = base_config(tok)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config))
    preprocessor = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        **PATCHES,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tok, config


def backbone(config: dict, rows: int, seed: int) -> nn.Module:
    """transformers' Qwen2VLModel for `config` with `rows` embedding rows and random weights (N(0, 0.1), wider than
    transformers' 0.02 so the tiny judges' outputs move visibly with their inputs)."""
    qwen_config = transformers.Qwen2VLConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})  # float32
    qwen_config.text_config.vocab_size = rows
    torch.manual_seed(seed)
    model = transformers.Qwen2VLModel(qwen_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0, 0.1)
    return model


def released_layout(model: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone + head as a transformers 4.45 Qwen2VL reward model's state dict: model.* (language model),
    visual.*, lm_head.weight (the embedding, as the 2B ties them), rm_head.*."""
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace("language_model.", "model.", 1) if key.startswith("language_model.") else key] = value
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state.update({f"rm_head.{key}": value for key, value in head.state_dict().items()})
    return state


def clips(n: int, frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, frames, height, width, 3) smooth random clips in [0, 1] (coarse noise upsampled), on 8-bit levels."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, frames, max(height // 16, 2), max(width // 16, 2), generator=generator)
    video = nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear")
    return (video.permute(0, 2, 3, 4, 1) * 255).round() / 255


def expand_placeholder(text: str, placeholder: str, count: int) -> str:
    """What Qwen2-VL's processor does to the chat text: one placeholder per vision token."""
    return text.replace(placeholder, placeholder * count)


def real_ids_config() -> dict:
    """The tiny config.json with Qwen2-VL's real special token ids, which the random builders' stand-in tokenizer
    uses."""
    config = base_config(tokenizer())
    config.update(
        vision_start_token_id=QWEN2VL_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN2VL_SPECIAL_TOKENS["<|vision_end|>"],
        vision_token_id=QWEN2VL_SPECIAL_TOKENS["<|vision_pad|>"],
        image_token_id=QWEN2VL_SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=QWEN2VL_SPECIAL_TOKENS["<|video_pad|>"],
    )
    return config
