"""Text conditioning of LTX-2: Gemma 3 hidden states -> the LTX-2 feature projection -> the two text
connectors -> the video and audio contexts the DiT cross-attends to.

The split follows where each part runs (../shared/research/diffusers-ltx2-datapath.md section 1):

- `PromptEncoder` (tokenizer, Gemma 3, the normalisation, the projection) is the heavy, prompt-only
  part: it runs once per prompt, ahead of training (`omninft encode-prompts`), and its output, the
  projected features of the prompt's real tokens, is what the embedding cache stores (a few hundred
  KB per prompt in bf16; engine.data.cache).
- `ContextConnectors` (the two 1-D connector transformers with their learnable registers) turn
  those rows into (video, audio) contexts of `text.max_length` tokens. They are small next to the
  DiT and run in the trainer, so Gemma never shares the GPU with the DiT.

Two releases, one split. LTX-2.0 (19B): per-layer masked mean/range normalisation and one projection
(`text_proj_in`) to caption_channels (3840), both connectors read the same rows, and the DiT's
`caption_projection`s take the contexts to its widths. LTX-2.3: per-token RMS normalisation and one
projection per modality straight to the DiT's widths (4096 video, 2048 audio), connectors of 8 gated
layers, and no caption projection in the DiT: the connectors' outputs are what its cross-attention
reads. Which one a checkpoint is comes from its own config (the official header's text-path keys,
`official_is_ltx23`; a diffusers folder's `per_modality_projections`).

Both wrap diffusers 0.42.1's `LTX2TextConnectors` and reproduce `LTX2Pipeline`'s `encode_prompt`
followed by `connectors(...)` exactly (tests/engine/data/test_text.py, test_text_ltx23.py). The
connectors' output depends on the padded length, so the trainer pads to the same `text.max_length`
the pipeline uses.
"""

from __future__ import annotations

import hashlib
import json
import math
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
# LTX_2_0_ / LTX_2_3_CONNECTORS_KEYS_RENAME_DICT; ltx-core's EMBEDDINGS_PROCESSOR_KEY_OPS): whole path
# components are renamed, prefixes replaced. LTX-2.0 has one projection (`aggregate_embed`), LTX-2.3 one per
# modality (`video_aggregate_embed`, `audio_aggregate_embed`).
OFFICIAL_CONNECTOR_PREFIXES = {
    "text_embedding_projection.aggregate_embed.": "text_proj_in.",
    "text_embedding_projection.video_aggregate_embed.": "video_text_proj_in.",
    "text_embedding_projection.audio_aggregate_embed.": "audio_text_proj_in.",
    "model.diffusion_model.video_embeddings_connector.": "video_connector.",
    "model.diffusion_model.audio_embeddings_connector.": "audio_connector.",
}
_OFFICIAL_PARTS = {"transformer_1d_blocks": "transformer_blocks", "q_norm": "norm_q", "k_norm": "norm_k"}
# The 19B release's connector shape (ARCHITECTURE.md section 0), for official files whose header lacks it.
_OFFICIAL_DEFAULTS = {"connector_num_attention_heads": 30, "connector_attention_head_dim": 128}
# The header keys that mark LTX-2.3's text path (ltx-core's FeatureExtractorV2 detection,
# encoder_configurator._create_feature_extractor): the caption projection moved before the connectors (one
# per modality, straight to the DiT's widths) and out of the DiT. All four with these values: 2.3; none: 2.0.
LTX23_TEXT_KEYS = {
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "caption_proj_input_norm": False,
    "caption_projection_second_linear": False,
}


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
    """The connector tensors of an official single file under diffusers names, and its header's
    `transformer` section (where ltx-core reads the connectors' config)."""
    state = {}
    with open_safetensors(path) as f:
        try:
            header = json.loads((f.metadata() or {}).get("config", "{}"))
        except ValueError as e:
            raise CheckpointError(f"{path}: the header's config is not JSON ({e})") from e
        header = header.get("transformer", {}) if isinstance(header, dict) else {}
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


def official_is_ltx23(header: dict, path: str | Path) -> bool:
    """Whether an official file's header (its `transformer` section) describes LTX-2.3's text path: all of
    LTX23_TEXT_KEYS with their values (2.3), or none of them (2.0, the projection inside the DiT), as ltx-core
    decides; anything in between is an error naming the keys."""
    present = {k: header[k] for k in LTX23_TEXT_KEYS if k in header}
    if not present:
        return False
    wrong = [f"{k}={header.get(k, '<absent>')!r}" for k, v in LTX23_TEXT_KEYS.items() if present.get(k, not v) != v]
    if wrong:
        raise CheckpointError(
            f"{path}: the header's text-path keys are neither LTX-2.0's (none of them) nor LTX-2.3's "
            f"({', '.join(f'{k}={v}' for k, v in LTX23_TEXT_KEYS.items())}): {', '.join(wrong)}"
        )
    return True


def _official_connector_config(state: dict[str, Tensor], header: dict, path: Path) -> dict:
    """LTX2TextConnectors arguments for an official file, read as ltx-core reads its header (the connectors'
    heads, layers, registers, gating and RoPE; the 19B values where the header has none); widths the header
    lacks come from the tensors. LTX-2.3 (official_is_ltx23): per-token RMS norm, then the video and audio
    projections from Gemma's `caption_channels` x layers features straight to the DiT's widths."""
    cfg = {**_OFFICIAL_DEFAULTS, **header}
    ltx23 = official_is_ltx23(header, path)
    first = "video_text_proj_in.weight" if ltx23 else "text_proj_in.weight"
    if first not in state:
        official = "video_aggregate_embed" if ltx23 else "aggregate_embed"
        raise CheckpointError(
            f"{path}: the LTX-{'2.3' if ltx23 else '2.0'} text projection "
            f"text_embedding_projection.{official}.weight is missing"
        )
    out_dim, in_dim = state[first].shape
    caption = int(cfg.get("caption_channels", 3840)) if ltx23 else out_dim
    if in_dim % caption:
        raise CheckpointError(f"{path}: {first} takes {in_dim} features, not a multiple of caption_channels={caption}")

    def layers(prefix: str) -> int:
        return 1 + max(
            (int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}.transformer_blocks.")), default=-1
        )

    registers = cfg.get("connector_num_learnable_registers")
    if registers is None and "video_connector.learnable_registers" in state:
        registers = state["video_connector.learnable_registers"].shape[0]
    video_layers = int(cfg.get("connector_num_layers", layers("video_connector")))
    heads, head_dim = int(cfg["connector_num_attention_heads"]), int(cfg["connector_attention_head_dim"])
    gated = bool(cfg.get("connector_apply_gated_attention", False))
    config = dict(
        caption_channels=caption,
        text_proj_in_factor=in_dim // caption,
        video_connector_num_attention_heads=heads,
        video_connector_attention_head_dim=head_dim,
        video_connector_num_layers=video_layers,
        video_connector_num_learnable_registers=registers,
        video_gated_attn=gated,
        audio_connector_num_attention_heads=int(cfg.get("audio_connector_num_attention_heads", heads)),
        audio_connector_attention_head_dim=int(cfg.get("audio_connector_attention_head_dim", head_dim)),
        audio_connector_num_layers=int(cfg.get("audio_connector_num_layers", video_layers)),
        audio_connector_num_learnable_registers=registers,
        audio_gated_attn=gated,
        connector_rope_base_seq_len=int(cfg.get("connector_positional_embedding_max_pos", [4096])[0]),
        rope_theta=float(cfg.get("positional_embedding_theta", 10000.0)),
        rope_double_precision=cfg.get("frequencies_precision", "float64") == "float64",
        rope_type=cfg.get("rope_type", "split"),
        per_modality_projections=ltx23,
        proj_bias=ltx23 or "text_proj_in.bias" in state,
    )
    if ltx23:  # ltx-core: the DiT's widths; else the projections' own
        dims = {}
        for side, heads_key, dim_key in (
            ("video", "num_attention_heads", "attention_head_dim"),
            ("audio", "audio_num_attention_heads", "audio_attention_head_dim"),
        ):
            weight = state.get(f"{side}_text_proj_in.weight")
            if heads_key in cfg and dim_key in cfg:
                dims[side] = int(cfg[heads_key]) * int(cfg[dim_key])
            elif weight is not None:
                dims[side] = weight.shape[0]
            else:
                raise CheckpointError(f"{path}: text_embedding_projection.{side}_aggregate_embed.weight is missing")
        config.update(video_hidden_dim=dims["video"], audio_hidden_dim=dims["audio"])
    return config


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


def context_channels(connectors: LTX2TextConnectors) -> tuple[int, int]:
    """The widths of the (video, audio) contexts the connectors give: caption_channels for both in LTX-2.0
    (the DiT projects them), the DiT's video and audio widths in LTX-2.3."""
    c = connectors.config
    if c.per_modality_projections:
        return c.video_hidden_dim, c.audio_hidden_dim
    return c.caption_channels, c.caption_channels


def _width_problems(connectors: LTX2TextConnectors) -> list[str]:
    """Each connector runs at its projection's width: a config where they differ would fail mid-encoding."""
    inner = (connectors.video_connector.inner_dim, connectors.audio_connector.inner_dim)
    return [
        f"config: the {side} connector is {width} wide (heads x head dim) but its input {expected}"
        for side, width, expected in zip(("video", "audio"), inner, context_channels(connectors))
        if width != expected
    ]


def load_connectors(path: str | Path, dtype: torch.dtype = torch.float32) -> LTX2TextConnectors:
    """diffusers' `LTX2TextConnectors` from an official single file or a diffusers folder (a pipeline
    folder's `connectors/`, or that folder itself), loaded strictly: every missing, unexpected or
    mis-shaped tensor is named in one error. LTX-2.0 or 2.3, as the official header (official_is_ltx23)
    or `config.json` (`per_modality_projections`) says."""
    LTX2TextConnectors = _text_stack().LTX2TextConnectors  # noqa: N806 (a class)
    path = Path(path)
    if path.is_file():
        state, header = _official_connector_state(path)
        config = _official_connector_config(state, header, path)
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
        state = {}
        for file in _connector_files(folder):
            with open_safetensors(file) as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    try:
        with torch.device("meta"):
            connectors = LTX2TextConnectors(**config)
    except TypeError as e:
        raise CheckpointError(f"{path}: connector config does not fit LTX2TextConnectors ({e})") from e
    expected = {k: tuple(v.shape) for k, v in connectors.state_dict().items()}
    problems = _width_problems(connectors) + shape_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    raise_problems(str(path), problems, "the text connectors")
    check_finite(state, f"text connectors {path}")
    connectors.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # nn.Module's own cast: diffusers' ModelMixin.to warns about fp32-pinned modules, which these lack.
    return torch.nn.Module.to(connectors, dtype=dtype).eval().requires_grad_(False)


def _digest(t: Tensor, dtype: torch.dtype) -> str:
    """sha256 of a tensor's bytes in `dtype` (viewed, not copied, once contiguous on the CPU)."""
    return hashlib.sha256(t.detach().to(dtype).contiguous().cpu().view(torch.uint8).numpy()).hexdigest()


def encoding_fingerprint(cfg: TextConfig, connectors: LTX2TextConnectors) -> str:
    """A short stable hash of everything a cached encoding depends on: Gemma's and the tokenizer's
    files (only those: new DiT or VAE weights in the same pipeline folder keep the cache), the
    transformers version that runs Gemma, the projection's weights, the padded length (the real
    tokens' states move by ~1e-6 with it) and the dtype. LTX-2.3 (per-modality projections) also hashes
    both projections' weights, biases and shapes, Gemma's width and its per-token RMS norm; an LTX-2.0
    encoding without a projection bias hashes exactly what it always did, so its caches stay valid. The
    trainer computes it without loading Gemma, to find its cache entries."""
    import transformers

    root = Path(cfg.encoder)
    folders = dict.fromkeys([_subfolder(root, "text_encoder"), _subfolder(root, "tokenizer")])
    dtype = DTYPES[cfg.dtype]
    parts = {
        "encoder": {str(f.relative_to(root)): _folder_fingerprint(f) for f in folders},
        "transformers": transformers.__version__,
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
    }
    if connectors.config.per_modality_projections:
        parts["norm"] = "per_token_rms"
        parts["caption_channels"] = connectors.config.caption_channels
        parts["projection"] = {
            side: {
                "shape": list(proj.weight.shape),
                "weight": _digest(proj.weight, dtype),
                "bias": None if proj.bias is None else _digest(proj.bias, dtype),
            }
            for side, proj in (("video", connectors.video_text_proj_in), ("audio", connectors.audio_text_proj_in))
        }
    else:
        parts["norm_scale"] = NORM_SCALE
        parts["projection"] = _digest(connectors.text_proj_in.weight, dtype)
        if connectors.text_proj_in.bias is not None:
            parts["projection_bias"] = _digest(connectors.text_proj_in.bias, dtype)
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
    """Prompt text -> the LTX-2 projected text features of its real tokens, (n_tokens, feature_channels).

    `LTX2Pipeline._get_gemma_prompt_embeds` then the first half of `LTX2TextConnectors.forward`:
    left padding to `max_length` with BOS, all hidden states of Gemma 3 (embeddings + every layer,
    the last after the final norm), then
    - LTX-2.0: the per-layer masked mean/range normalisation (x8) and `text_proj_in`, to caption_channels;
    - LTX-2.3: the per-token RMS norm of each layer's states, then `video_text_proj_in` and
      `audio_text_proj_in` on the norm scaled by sqrt(width / caption_channels), straight to the DiT's video
      and audio widths; the two are concatenated, video first (feature_channels = video + audio width).
    Padded rows are zero after the normalisation, and the connectors replace them by registers anyway,
    so only the real rows are kept (2.3's norm is per token, so only they are computed). Built from loaded
    parts (`load` reads them)."""

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
        self.per_modality = bool(connectors.config.per_modality_projections)
        names = ("video_text_proj_in", "audio_text_proj_in") if self.per_modality else ("text_proj_in",)
        self.projections = [getattr(connectors, n).to(device=self.device, dtype=self.dtype) for n in names]
        self.caption_channels = connectors.config.caption_channels  # Gemma's width
        self.feature_channels = sum(p.out_features for p in self.projections)
        width, layers = gemma.config.hidden_size, gemma.config.num_hidden_layers + 1
        in_features = self.projections[0].in_features
        if width != self.caption_channels or width * layers != in_features:
            raise CheckpointError(
                f"text.encoder: Gemma gives {layers} hidden states of width {width} ({width * layers} features) "
                f"but the connectors expect {in_features} features of width {self.caption_channels}"
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
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            states, mask = self.hidden_states(chunk)
            rows = self._ltx23_rows(states, mask) if self.per_modality else self._ltx20_rows(states, mask)
            yield chunk, [r.cpu() for r in rows]

    def _ltx20_rows(self, states: Tensor, mask: Tensor) -> list[Tensor]:
        from diffusers.pipelines.ltx2.connectors import per_layer_masked_mean_norm

        normed = per_layer_masked_mean_norm(
            states.unflatten(2, (self.caption_channels, -1)),
            mask.sum(dim=-1),
            states.device,
            padding_side="left",
            scale_factor=NORM_SCALE,
        )
        projected = self.projections[0](normed)
        return [p[m.bool()] for p, m in zip(projected, mask)]

    def _ltx23_rows(self, states: Tensor, mask: Tensor) -> list[Tensor]:
        """The real tokens of the batch, each normalised on its own (RMS over Gemma's width, per layer), then
        both projections on their rescaled norms; the rows are split back per prompt."""
        from diffusers.pipelines.ltx2.connectors import per_token_rms_norm

        real = states[mask.bool()].unflatten(1, (self.caption_channels, -1))  # (tokens, width, layers)
        normed = per_token_rms_norm(real[None]).flatten(2, 3)[0]  # (tokens, width * layers)
        parts = [p(normed * math.sqrt(p.out_features / self.caption_channels)) for p in self.projections]
        return list(torch.cat(parts, dim=-1).split(mask.sum(dim=-1).tolist()))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        """Projected features of each prompt's real tokens: (n_tokens, feature_channels), on the CPU."""
        return [rows for _, batch in self.batches(prompts) for rows in batch]


class ContextConnectors(torch.nn.Module):
    """Projected prompt rows -> (video, audio) contexts of `max_length` tokens: the second half of
    `LTX2TextConnectors.forward`. LTX-2.0: both connectors read the same rows and give caption_channels-wide
    contexts (the DiT projects them); LTX-2.3: the rows' video part (its first `context_channels[0]` features)
    goes through the video connector and the rest through the audio connector, giving contexts at the DiT's
    video and audio widths (`context_channels`). The returned mask of the pipeline is all ones (the
    registers fill every padded position), so none is returned."""

    def __init__(self, connectors: LTX2TextConnectors, max_length: int):
        super().__init__()
        registers = connectors.video_connector.num_learnable_registers
        if not registers or not connectors.audio_connector.num_learnable_registers:
            raise CheckpointError("text connectors without learnable registers are not LTX-2's (padding would leak)")
        if max_length % registers:
            raise ConfigError(
                f"text.max_length={max_length} must be a multiple of the connectors' {registers} registers"
            )
        self.video_connector, self.audio_connector = connectors.video_connector, connectors.audio_connector
        self.max_length = max_length
        self.per_modality = bool(connectors.config.per_modality_projections)
        self.context_channels = context_channels(connectors)
        self.channels = sum(self.context_channels) if self.per_modality else connectors.config.caption_channels

    def pad(self, rows: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Left-pads each (n, channels) row set to max_length: (B, T, channels) features and the (B, T) 0/1 mask."""
        t = self.max_length
        x = torch.zeros(len(rows), t, self.channels, device=device, dtype=dtype)
        mask = torch.zeros(len(rows), t, device=device, dtype=torch.int64)
        for i, r in enumerate(rows):
            n = r.shape[0]
            assert 0 < n <= t, f"{n} prompt tokens for a context of {t}"
            if r.shape[1] != self.channels:
                raise ValueError(f"prompt features are {r.shape[1]} wide; these connectors read {self.channels}")
            x[i, t - n :] = r.to(device=device, dtype=dtype)
            mask[i, t - n :] = 1
        return x, mask

    @torch.no_grad()
    def forward(self, rows: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        x, mask = self.pad(rows, device, next(self.parameters()).dtype)
        additive = ((mask - 1).to(x.dtype) * torch.finfo(x.dtype).max)[:, None, None, :]
        video_in, audio_in = x.split(self.context_channels, dim=-1) if self.per_modality else (x, x)
        video, _ = self.video_connector(video_in, additive)
        audio, _ = self.audio_connector(audio_in, additive)
        return video.to(dtype), audio.to(dtype)
