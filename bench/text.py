"""Text conditioning throughput: prompts/s of `omninft encode-prompts`' encoder, the embedding cache's
bytes per prompt, and contexts/s of the connectors the trainer runs.

    python -m bench.text [--encoder DIR --connectors SRC] [--layers N] [--batch B] [--out PATH]

With `--encoder` and `--connectors` it times the real parts (Gemma 3 12B and the LTX-2 connectors of
a diffusers folder or the official file). Without them it builds random stand-ins of the real
widths: a Gemma 3 text model of hidden size 3840 (the 12B's heads, head dim and MLP; `--layers` of
its 48, default 48 on CUDA and 1 on a CPU) and the 19B connectors (2 x 2 blocks of 30 x 128 heads,
128 registers, `text_proj_in` from 3840 x (layers + 1)). The stand-in tokenizer gives one token per
character, about 4x Gemma's count for English, so its bytes per prompt are an upper bound; bytes
per token are exact (caption_channels x the element size). Prompts are the tiny task's, padded to
1024 tokens (the pipeline's length) in bf16 on CUDA; a CPU runs 2 of them at 256 tokens in fp32
(CPUs lack fast bf16 matmuls), enough for the bytes, not for the rates of a real run.

Writes bench/results/<device>-<date>-text.json with the device, shapes, times and rates.
"""

from __future__ import annotations

import argparse
import platform
import string
import tempfile
from datetime import date

import torch

from bench.measure import CUDA, DTYPE, device_label, package_versions, report, timer
from engine.data import DEFAULT_PROMPTS
from engine.data.cache import EmbeddingCache
from engine.data.text import ContextConnectors, PromptEncoder, TextConfig, load_connectors

GEMMA3_12B = dict(
    hidden_size=3840,
    intermediate_size=15360,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    num_hidden_layers=48,
    sliding_window=1024,
    vocab_size=262208,
)


def char_tokenizer():
    """A real GemmaTokenizer without files: BPE without merges, one token per character, BOS added."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for c in string.ascii_lowercase + ",.-'":
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def stand_ins(layers: int, width: int, device: torch.device, dtype: torch.dtype):
    """(tokenizer, Gemma 3 text model, LTX2TextConnectors) of the real widths, random weights."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from transformers import Gemma3TextConfig, Gemma3TextModel

    shape = {**GEMMA3_12B, "num_hidden_layers": layers, "vocab_size": 64}
    if width != GEMMA3_12B["hidden_size"]:  # the test's miniature: keep the head layout, shrink the widths
        shape.update(
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=width // 2,
        )
    config = Gemma3TextConfig(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the final dtype: a 12B fp32 init would double the memory
    try:
        with torch.device(device):
            gemma = Gemma3TextModel(config).eval().requires_grad_(False)
            real = width == GEMMA3_12B["hidden_size"]
            heads, registers = (30, 128) if real else (2, 8)
            connectors = LTX2TextConnectors(
                caption_channels=width,
                text_proj_in_factor=layers + 1,
                video_connector_num_attention_heads=heads,
                video_connector_attention_head_dim=width // heads,
                audio_connector_num_attention_heads=heads,
                audio_connector_attention_head_dim=width // heads,
                video_connector_num_learnable_registers=registers,
                audio_connector_num_learnable_registers=registers,
                rope_type="split",
            ).eval()
    finally:
        torch.set_default_dtype(default)
    return char_tokenizer(), gemma, connectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help="Gemma 3 directory or LTX-2 diffusers folder (default: random stand-ins)")
    parser.add_argument("--connectors", help="official single file or diffusers folder holding the connectors")
    parser.add_argument("--layers", type=int, default=None, help="stand-in Gemma layers (default 48 CUDA, 1 CPU)")
    parser.add_argument("--width", type=int, default=GEMMA3_12B["hidden_size"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8 if CUDA else 2, help="prompts per Gemma forward")
    parser.add_argument("--max-length", type=int, default=1024 if CUDA else 256, help="padded tokens")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 CUDA, 2 CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-text.json)")
    args = parser.parse_args(argv)
    if (args.encoder is None) != (args.connectors is None):
        parser.error("--encoder and --connectors go together")
    device = torch.device("cuda" if CUDA else "cpu")
    reps = args.reps or (10 if CUDA else 2)
    prompts = list(DEFAULT_PROMPTS)[: args.batch] * max(1, args.batch // len(DEFAULT_PROMPTS))
    if args.encoder:
        cfg = TextConfig(
            encoder=args.encoder,
            connectors=args.connectors,
            max_length=args.max_length,
            dtype="bfloat16" if CUDA else "float32",
            batch_size=args.batch,
        )
        connectors = load_connectors(args.connectors, DTYPE)
        encoder = PromptEncoder.load(cfg, connectors, device)
        source = {"encoder": args.encoder, "connectors": args.connectors}
    else:
        layers = args.layers or (48 if CUDA else 1)
        tokenizer, gemma, connectors = stand_ins(layers, args.width, device, DTYPE)
        encoder = PromptEncoder(tokenizer, gemma, connectors, args.max_length, args.batch, device)
        source = {"stand_in_gemma_layers": layers, "width": args.width}
    context = ContextConnectors(connectors, args.max_length).to(device=device, dtype=DTYPE)

    def sync(x):
        if CUDA:
            torch.cuda.synchronize()
        return x

    encode_s = timer(lambda: sync(encoder.encode(prompts)), reps)
    rows = encoder.encode(prompts)
    context_s = timer(lambda: sync(context(rows, device, DTYPE)), reps)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, "bench")
        for p, r in zip(prompts, rows):
            cache.put(p, r)
        sizes = [cache.path(p).stat().st_size for p in dict.fromkeys(prompts)]
    tokens = [r.shape[0] for r in rows]
    result = {
        "bench": "text",
        "device": device_label(device),
        "host": platform.node(),
        "date": date.today().isoformat(),
        "versions": package_versions("transformers", "diffusers"),
        "dtype": str(DTYPE).removeprefix("torch."),
        "source": source,
        "shapes": {
            "prompts": len(prompts),
            "max_length": args.max_length,
            "caption_channels": encoder.caption_channels,
            "gemma_hidden_states": encoder.gemma.config.num_hidden_layers + 1,
            "real_tokens_mean": sum(tokens) / len(tokens),
        },
        "encode_s": encode_s,
        "encode_prompts_per_s": len(prompts) / encode_s,
        "connectors_s": context_s,
        "connector_contexts_per_s": len(prompts) / context_s,
        "cache_bytes_per_token": encoder.caption_channels * rows[0].element_size(),
        "cache_bytes_per_prompt_mean": sum(sizes) / len(sizes),
        "connector_output_bytes_per_prompt_bf16": 2 * args.max_length * encoder.caption_channels * 2,
    }
    report(result, args.out, "text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
