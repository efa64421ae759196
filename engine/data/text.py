"""Text conditioning of LTX-2: Gemma 3 hidden states -> the LTX-2 feature projection -> the two text
connectors -> the video and audio contexts the DiT cross-attends to.

The split follows where each part runs (../shared/research/diffusers-ltx2-datapath.md section 1):

- `PromptEncoder` (tokenizer, Gemma 3, per-layer masked normalisation, `text_proj_in`) is the heavy,
  prompt-only part: it runs once per prompt, ahead of training (`omninft encode-prompts`), and its
  output, the projected features of the prompt's real tokens, is what the embedding cache stores
  (a few hundred KB per prompt in bf16; engine.data.cache).
- `ContextConnectors` (the two 1-D connector transformers with their learnable registers) turn
  those rows into (video, audio) contexts of `text.max_length` tokens. They are small next to the
  DiT and run in the trainer, so Gemma never shares the GPU with the DiT.

Both wrap diffusers 0.42.1's `LTX2TextConnectors` and reproduce `LTX2Pipeline`'s `encode_prompt`
followed by `connectors(...)` exactly (tests/engine/data/test_text.py). The connectors' output
depends on the padded length, so the trainer pads to the same `text.max_length` the pipeline uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.weights import check_finite, open_safetensors, raise_problems, shape_problems

from ..errors import CheckpointError, ConfigError
from ..fields import bounded, choice

if TYPE_CHECKING:
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NORM_SCALE = 8  # LTX-2.0's per-layer normalisation: 8 (x - mean) / (max - min)
CONNECTOR_FILE = "diffusion_pytorch_model.safetensors"

# Official single file -> diffusers LTX2TextConnectors names (diffusers' scripts/convert_ltx2_to_diffusers.py,
# LTX_2_0_CONNECTORS_KEYS_RENAME_DICT): whole path components are renamed, prefixes replaced.
OFFICIAL_CONNECTOR_PREFIXES = {
    "text_embedding_projection.aggregate_embed.": "text_proj_in.",
    "model.diffusion_model.video_embeddings_connector.": "video_connector.",
    "model.diffusion_model.audio_embeddings_connector.": "audio_connector.",
}
_OFFICIAL_PARTS = {"transformer_1d_blocks": "transformer_blocks", "q_norm": "norm_q", "k_norm": "norm_k"}
# The 19B release's connector shape (ARCHITECTURE.md section 0), for official files whose header lacks it.
_OFFICIAL_DEFAULTS = {"connector_num_attention_heads": 30, "connector_attention_head_dim": 128}


@dataclass
class TextConfig:
    """`text.*`: where the real text conditioning comes from. Without `encoder` the run uses the
    stand-in features of the embedded tiny task (engine.data.features)."""

    encoder: str | None = None  # Gemma 3 directory (transformers, with tokenizer) or an LTX-2 diffusers folder
    connectors: str | None = None  # official single file or diffusers folder; None: model.init
    max_length: int = bounded(1, None, default=1024)  # tokens, left padded (the pipeline's default)
    dtype: str = choice(*DTYPES, default="bfloat16")  # Gemma, projection and cached features
    negative_prompt: str = ""  # the negative prompt of records that have none (the pipeline's default)
    cache: str | None = None  # embedding cache directory (omninft encode-prompts writes it)
    on_missing: str = choice("encode", "error", default="encode")  # a prompt the cache lacks
    batch_size: int = bounded(1, None, default=8)  # prompts per Gemma forward

    def __post_init__(self) -> None:
        for key in ("encoder", "connectors"):
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"text.{key}: {value} does not exist")
        if self.on_missing == "error" and self.cache is None:
            raise ConfigError("text.on_missing=error needs text.cache (the embedding cache to read)")


# ---- loading ------------------------------------------------------------------------------------


def _text_stack():
    """diffusers' LTX-2 pipeline module, which also needs transformers: the `text` extra, imported only
    when a real encoder is used (the tiny task runs without it)."""
    try:
        import transformers  # noqa: F401
        from diffusers.pipelines import ltx2
    except ImportError as e:
        raise ConfigError(
            f"the real text path needs transformers and diffusers ({e.name} is missing): "
            f'pip install -c .ci/constraints.txt -e ".[text]"'
        ) from e
    return ltx2


def _subfolder(root: Path, name: str) -> Path:
    """`root/name` for a diffusers pipeline folder, else `root` itself."""
    return root / name if (root / name).is_dir() else root


def load_tokenizer(path: str | Path):
    """The Gemma tokenizer of a Gemma 3 directory or of a pipeline folder's `tokenizer/`."""
    _text_stack()
    from transformers import AutoTokenizer

    root = Path(path)
    folder = _subfolder(root, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"text.encoder: no tokenizer in {folder} ({str(e).splitlines()[0]})") from e


def load_gemma(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Gemma 3's text model (the vision tower is dropped: text-only hidden states are identical),
    loaded strictly from a Gemma 3 directory or a pipeline folder's `text_encoder/`."""
    _text_stack()
    from transformers import AutoConfig, AutoModel, Gemma3ForConditionalGeneration

    folder = _subfolder(Path(path), "text_encoder")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"text.encoder: no Gemma 3 config in {folder} ({str(e).splitlines()[0]})") from e
    if config.model_type not in ("gemma3", "gemma3_text"):
        raise CheckpointError(
            f"text.encoder: {folder} holds a {config.model_type!r} model; LTX-2 needs Gemma 3 (gemma3 or gemma3_text)"
        )
    cls = Gemma3ForConditionalGeneration if config.model_type == "gemma3" else AutoModel
    model, info = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    problems = [f"missing: {k}" for k in sorted(info["missing_keys"])]
    problems += [f"unexpected: {k}" for k in sorted(info["unexpected_keys"])]
    problems += [f"shape: {k}" for k in sorted(str(m) for m in info.get("mismatched_keys", []))]
    if problems:
        raise_problems(f"text.encoder {folder}", problems, "Gemma 3")
    text_model = model.model.language_model if config.model_type == "gemma3" else model
    return text_model.to(device).eval().requires_grad_(False)


def _official_connector_state(path: Path) -> tuple[dict[str, Tensor], dict]:
    """The connector tensors of an official single file under diffusers names, and its header config."""
    state = {}
    with open_safetensors(path) as f:
        header = json.loads((f.metadata() or {}).get("config", "{}")).get("transformer", {})
        for key in f.keys():
            for prefix, ours in OFFICIAL_CONNECTOR_PREFIXES.items():
                if key.startswith(prefix):
                    rest = ".".join(_OFFICIAL_PARTS.get(p, p) for p in key[len(prefix) :].split("."))
                    state[ours + rest] = f.get_tensor(key)
    if not state:
        raise CheckpointError(
            f"{path} holds no text connectors (expected {', '.join(p + '*' for p in OFFICIAL_CONNECTOR_PREFIXES)})"
        )
    return state, header


def _official_connector_config(state: dict[str, Tensor], header: dict) -> dict:
    """LTX2TextConnectors arguments for an official 19B-style file: widths from the tensors, the head
    split from the header (the 19B values when it has none)."""
    if "text_proj_in.weight" not in state:
        raise CheckpointError("official connectors: text_embedding_projection.aggregate_embed.weight is missing")
    out_dim, in_dim = state["text_proj_in.weight"].shape
    cfg = {**_OFFICIAL_DEFAULTS, **header}
    heads, head_dim = cfg["connector_num_attention_heads"], cfg["connector_attention_head_dim"]
    layers = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("video_connector.transformer_blocks.")), default=-1
    )
    registers = state.get("video_connector.learnable_registers")
    return dict(
        caption_channels=out_dim,
        text_proj_in_factor=in_dim // out_dim,
        video_connector_num_attention_heads=heads,
        video_connector_attention_head_dim=head_dim,
        video_connector_num_layers=layers,
        video_connector_num_learnable_registers=None if registers is None else registers.shape[0],
        audio_connector_num_attention_heads=heads,
        audio_connector_attention_head_dim=head_dim,
        audio_connector_num_layers=layers,
        audio_connector_num_learnable_registers=None if registers is None else registers.shape[0],
        connector_rope_base_seq_len=int(cfg.get("connector_positional_embedding_max_pos", [4096])[0]),
        rope_theta=float(cfg.get("positional_embedding_theta", 10000.0)),
        rope_type=cfg.get("rope_type", "split"),
        per_modality_projections=False,
        proj_bias="text_proj_in.bias" in state,
    )


def _connector_files(folder: Path) -> list[Path]:
    """The weights of a diffusers connectors folder: its one file, or the shards its index names."""
    index = folder / f"{CONNECTOR_FILE}.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [folder / CONNECTOR_FILE]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{folder} is not a diffusers connectors folder: missing {', '.join(absent)}")
    return files


def load_connectors(path: str | Path, dtype: torch.dtype = torch.float32) -> LTX2TextConnectors:
    """diffusers' `LTX2TextConnectors` from an official single file or a diffusers folder (a pipeline
    folder's `connectors/`, or that folder itself), loaded strictly: every missing, unexpected or
    mis-shaped tensor is named in one error."""
    LTX2TextConnectors = _text_stack().LTX2TextConnectors  # noqa: N806 (a class)
    path = Path(path)
    if path.is_file():
        state, header = _official_connector_state(path)
        config = _official_connector_config(state, header)
        if config.get("per_modality_projections") or any(k.startswith("video_text_proj_in") for k in state):
            raise CheckpointError(f"{path}: LTX-2.3 connectors (per-modality projections) are not supported yet")
    else:
        folder = _subfolder(path, "connectors")
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder} is not a diffusers connectors folder (needs config.json and {CONNECTOR_FILE})"
            )
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name", "LTX2TextConnectors") != "LTX2TextConnectors":
            raise CheckpointError(f"{folder}/config.json describes a {config['_class_name']}, not LTX2TextConnectors")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if config.get("per_modality_projections"):
            raise CheckpointError(f"{folder}: LTX-2.3 connectors (per-modality projections) are not supported yet")
        state = {}
        for file in _connector_files(folder):
            with open_safetensors(file) as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    try:
        connectors = LTX2TextConnectors(**config)
    except TypeError as e:
        raise CheckpointError(f"{path}: connector config does not fit LTX2TextConnectors ({e})") from e
    expected = {k: tuple(v.shape) for k, v in connectors.state_dict().items()}
    raise_problems(
        str(path), shape_problems(expected, {k: tuple(v.shape) for k, v in state.items()}), "the text connectors"
    )
    check_finite(state, f"text connectors {path}")
    connectors.load_state_dict(state, strict=True)
    # nn.Module's own cast: diffusers' ModelMixin.to warns about fp32-pinned modules, which these lack.
    return torch.nn.Module.to(connectors, dtype=dtype).eval().requires_grad_(False)


def encoding_fingerprint(cfg: TextConfig, connectors: LTX2TextConnectors) -> str:
    """A short stable hash of everything a cached encoding depends on: Gemma's and the tokenizer's
    files (only those: new DiT or VAE weights in the same pipeline folder keep the cache), the
    transformers version that runs Gemma, the projection's weights, the padded length (the real
    tokens' states move by ~1e-6 with it) and the dtype. The trainer computes it without loading
    Gemma, to find its cache entries."""
    import transformers

    root = Path(cfg.encoder)
    folders = dict.fromkeys([_subfolder(root, "text_encoder"), _subfolder(root, "tokenizer")])
    weight = connectors.text_proj_in.weight.detach().to(DTYPES[cfg.dtype]).contiguous().cpu()
    parts = {
        "encoder": {str(f.relative_to(root)): _folder_fingerprint(f) for f in folders},
        "transformers": transformers.__version__,
        "projection": hashlib.sha256(weight.view(torch.uint8).numpy()).hexdigest(),  # its bytes, no copy
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
        "norm_scale": NORM_SCALE,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _folder_fingerprint(folder: Path) -> dict:
    """Configs and tokenizer files by content; weight files by their safetensors header (names, dtypes,
    shapes, offsets) and size: hashing 24 GB of Gemma weights per run would take minutes."""
    out = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(file.relative_to(folder))
        if file.suffix == ".safetensors":
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                out[rel] = [file.stat().st_size, hashlib.sha256(fh.read(n)).hexdigest()]
        elif file.suffix in (".json", ".model", ".txt", ".jinja"):
            out[rel] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


# ---- the two halves --------------------------------------------------------------------------------


class PromptEncoder:
    """Prompt text -> the LTX-2 projected text features of its real tokens, (n_tokens, caption_channels).

    `LTX2Pipeline._get_gemma_prompt_embeds` then the first half of `LTX2TextConnectors.forward`:
    left padding to `max_length` with BOS, all hidden states of Gemma 3 (embeddings + every layer,
    the last after the final norm), the per-layer masked mean/range normalisation (x8) and
    `text_proj_in`. Padded rows are zero after the normalisation, and the connectors replace them by
    registers anyway, so only the real rows are kept. Built from loaded parts (`load` reads them)."""

    def __init__(
        self,
        tokenizer,
        gemma: torch.nn.Module,
        connectors: LTX2TextConnectors,
        max_length: int,
        batch_size: int,
        device: torch.device | str = "cpu",
    ):
        self.tokenizer, self.gemma, self.max_length, self.batch_size = tokenizer, gemma, max_length, batch_size
        self.device, self.dtype = torch.device(device), next(gemma.parameters()).dtype
        self.proj = connectors.text_proj_in.to(device=self.device, dtype=self.dtype)
        self.caption_channels = connectors.config.caption_channels
        width, layers = gemma.config.hidden_size, gemma.config.num_hidden_layers + 1
        if width != self.caption_channels or width * layers != self.proj.in_features:
            raise CheckpointError(
                f"text.encoder: Gemma gives {layers} hidden states of width {width} ({width * layers} features) "
                f"but the connectors expect {self.proj.in_features} features of width {self.caption_channels}"
            )

    @classmethod
    def load(cls, cfg: TextConfig, connectors: LTX2TextConnectors, device: torch.device | str = "cpu") -> PromptEncoder:
        """The tokenizer and Gemma of `text.encoder`, in `text.dtype` on `device`."""
        if cfg.encoder is None:
            raise ConfigError("text.encoder is not set: point it at a Gemma 3 or LTX-2 diffusers folder")
        tokenizer = load_tokenizer(cfg.encoder)  # the cheap part first: a wrong folder fails fast
        gemma = load_gemma(cfg.encoder, DTYPES[cfg.dtype], device)
        return cls(tokenizer, gemma, connectors, cfg.max_length, cfg.batch_size, device)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, max_length), left padded with BOS, as the pipeline does."""
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        out = tok(
            [p.strip() for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def hidden_states(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Gemma's stacked hidden states (B, T, width * (layers + 1)), flat index d * (layers + 1) + l
        as the pipeline packs them, and the (B, T) token mask."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.gemma(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=-1).flatten(2, 3).to(self.dtype), mask

    @torch.no_grad()
    def batches(self, prompts: Sequence[str]) -> Iterator[tuple[Sequence[str], list[Tensor]]]:
        """(prompts, their projected features) per `batch_size` prompts, one Gemma forward each: callers
        that store results as they come (engine.data.conditioning.encode_into) keep what a killed run did."""
        from diffusers.pipelines.ltx2.connectors import per_layer_masked_mean_norm

        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            states, mask = self.hidden_states(chunk)
            normed = per_layer_masked_mean_norm(
                states.unflatten(2, (self.caption_channels, -1)),
                mask.sum(dim=-1),
                states.device,
                padding_side="left",
                scale_factor=NORM_SCALE,
            )
            projected = self.proj(normed)
            yield chunk, [p[m.bool()].cpu() for p, m in zip(projected, mask)]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        """Projected features of each prompt's real tokens: (n_tokens, caption_channels), on the CPU."""
        return [rows for _, batch in self.batches(prompts) for rows in batch]


class ContextConnectors(torch.nn.Module):
    """Projected prompt rows -> (video, audio) contexts, each (B, max_length, caption_channels): the
    second half of `LTX2TextConnectors.forward`. The returned mask of the pipeline is all ones (the
    registers fill every padded position), so none is returned."""

    def __init__(self, connectors: LTX2TextConnectors, max_length: int):
        super().__init__()
        registers = connectors.video_connector.num_learnable_registers
        if not registers:
            raise CheckpointError("text connectors without learnable registers are not LTX-2's (padding would leak)")
        if max_length % registers:
            raise ConfigError(
                f"text.max_length={max_length} must be a multiple of the connectors' {registers} registers"
            )
        self.video_connector, self.audio_connector = connectors.video_connector, connectors.audio_connector
        self.max_length = max_length
        self.channels = connectors.config.caption_channels

    def pad(self, rows: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Left-pads each (n, C) row set to max_length: (B, T, C) features and the (B, T) 0/1 mask."""
        t = self.max_length
        x = torch.zeros(len(rows), t, self.channels, device=device, dtype=dtype)
        mask = torch.zeros(len(rows), t, device=device, dtype=torch.int64)
        for i, r in enumerate(rows):
            n = r.shape[0]
            assert 0 < n <= t, f"{n} prompt tokens for a context of {t}"
            x[i, t - n :] = r.to(device=device, dtype=dtype)
            mask[i, t - n :] = 1
        return x, mask

    @torch.no_grad()
    def forward(self, rows: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        x, mask = self.pad(rows, device, next(self.parameters()).dtype)
        additive = ((mask - 1).to(x.dtype) * torch.finfo(x.dtype).max)[:, None, None, :]
        video, _ = self.video_connector(x, additive)
        audio, _ = self.audio_connector(x, additive)
        return video.to(dtype), audio.to(dtype)
