"""What the Qwen2-VL reward judges (VideoAlign's VideoReward, HPSv3) share: Qwen2-VL's preprocessing done in torch
(resize, normalise, patchify into temporal patches), the chat text around the vision tokens, and the backbone,
transformers' `Qwen2VLModel` (vision encoder + language model, no LM head), loaded strictly from a checkpoint in the
released key layout or built with random weights at a real config's shape (for benchmarks).

Both judges were trained and served with transformers 4.45, whose `forward()` never computed Qwen2-VL's 3-D M-RoPE
positions (only `generate()` did): every token, vision tokens included, sat at its sequence index on all three rotary
axes. transformers 5 computes the 3-D positions itself, which changes every hidden state, so `Backbone.hidden_states`
passes the flat positions explicitly. One residual in bfloat16: 4.45 computed the vision encoder's rotary angles and
their cos/sin in the model's dtype, transformers 5 in float32 (in float32 the two agree). transformers 5's Qwen2-VL
image/video processors need torchvision (which does not load with our CPU torch), hence the preprocessing here.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, one_line
from .base import Reward, Rollout, local_dir, require_package

INSTALL = "pip install 'omninft[rewards]'"

# Qwen2-VL-*-Instruct's chat template with its default system prompt, one user turn (the vision placeholder, then
# the text) and the generation prompt: what both judges' processors built with apply_chat_template.
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>{vision}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"  # placeholders the processor repeats once per vision token

# The real backbones' config.json (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct), model fields only.
_TOKEN_IDS = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    image_token_id=151655,
    video_token_id=151656,
)
_SHARED = dict(
    model_type="qwen2_vl",
    hidden_act="silu",
    attention_dropout=0.0,
    initializer_range=0.02,
    max_position_embeddings=32768,
    max_window_layers=28,
    num_hidden_layers=28,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    sliding_window=32768,
    use_sliding_window=False,
    **_TOKEN_IDS,
)
_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14, spatial_merge_size=2)
QWEN2VL_2B = dict(
    _SHARED,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    vocab_size=151936,
    vision_config=dict(_VISION, hidden_size=1536, spatial_patch_size=14, temporal_patch_size=2),
)
QWEN2VL_7B = dict(
    _SHARED,
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    vocab_size=152064,
    vision_config=dict(_VISION, hidden_size=3584, spatial_patch_size=14, temporal_patch_size=2),
)
# Qwen2-VL's tokenizer: 151643 BPE tokens, then these specials; a judge's added tokens follow them.
QWEN2VL_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    IMAGE_PAD: 151655,
    VIDEO_PAD: 151656,
}
QWEN2VL_TOKENS = 151657  # len(tokenizer) of the base checkpoints


@dataclass(frozen=True)
class Patches:
    """How Qwen2-VL cuts pixels into vision tokens (preprocessor_config.json): `patch` x `patch` pixels by
    `temporal` frames per patch, `merge` x `merge` patches per language-model token, CLIP mean/std on [0, 1]."""

    patch: int = 14
    merge: int = 2
    temporal: int = 2
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def factor(self) -> int:
        """Pixels per side of one language-model token; resized frames are multiples of it."""
        return self.patch * self.merge

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """Language-model tokens of a (grid_t, grid_h, grid_w) patch grid."""
        return grid[0] * grid[1] * grid[2] // self.merge**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' output size (the judges' training pipelines): each side rounded to a multiple of `factor`,
    then scaled down (floor) when above `max_pixels`, else up (ceil) when below `min_pixels`, keeping the aspect."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames of {height}x{width} have an aspect ratio above 200, which Qwen2-VL refuses")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_pixels(frames: Tensor, size: tuple[int, int], separable: bool) -> Tensor:
    """(T, H, W, 3) in [0, 1] -> (T, 3, h, w) float32 8-bit levels in [0, 255] at `size` (h, w): quantised to 8 bits
    (the judges only ever saw frames decoded from files), resized bicubic with antialiasing and rounded to 8 bits.

    `separable` resizes as PIL does (HPSv3's pipeline): the width first, into an 8-bit image, then the height (within
    one level of PIL's output). Otherwise in one float pass, as torchvision's tensor resize does (VideoAlign's)."""
    pixels = frames.float().permute(0, 3, 1, 2).mul(255).round().clamp(0, 255)
    steps = [(pixels.shape[-2], size[1]), tuple(size)] if separable else [tuple(size)]
    for step in steps:
        if tuple(pixels.shape[-2:]) != step:
            pixels = F.interpolate(pixels, size=step, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.clamp(0, 255).round()
    return pixels


def patchify(pixels: Tensor, patches: Patches) -> tuple[Tensor, tuple[int, int, int]]:
    """(T, 3, h, w) 8-bit levels, h and w multiples of `patches.factor` -> the vision encoder's input
    (grid_t * grid_h * grid_w, 3 * temporal * patch * patch), rescaled to [0, 1] and normalised, and its grid.

    Rows go time slice by time slice, then merge block by merge block (row-major), then patch by patch within a
    block (row-major): the order in which the encoder's merger folds `merge`^2 neighbours into one token. A row holds
    channel, frame, pixel row, pixel column (the patch Conv3d's kernel layout). An odd frame count repeats the last
    frame, as the processors do (a single image becomes `temporal` identical frames)."""
    t, channels, h, w = pixels.shape
    p, m, tp = patches.patch, patches.merge, patches.temporal
    mean = torch.tensor(patches.mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(patches.std, device=pixels.device).view(1, -1, 1, 1)
    x = (pixels * (1 / 255) - mean) / std
    if t % tp:
        x = torch.cat([x, x[-1:].expand(tp - t % tp, -1, -1, -1)])
    grid = (x.shape[0] // tp, h // p, w // p)
    x = x.reshape(grid[0], tp, channels, grid[1] // m, m, p, grid[2] // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(grid[0] * grid[1] * grid[2], channels * tp * p * p), grid


def parse_dtype(name: str) -> torch.dtype:
    """A judge's `dtype` argument ("bfloat16", "float16", "float32") as a torch dtype."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def token_positions(ids: Tensor, token: int, name: str) -> Tensor:
    """(B,) index of `token` in each row of `ids` (B, L), which must hold it exactly once (a reward token)."""
    hits = ids == token
    counts = hits.sum(dim=1)
    if (counts != 1).any():
        raise ValueError(f"each sequence needs {name} exactly once, got counts {counts.tolist()}")
    return hits.int().argmax(dim=1)


class Tensors(Mapping[str, Tensor]):
    """Named tensors read (or computed) one at a time when asked for, so a checkpoint of many GB is never held in
    memory twice: values are functions of no arguments."""

    def __init__(self, getters: Mapping[str, Callable[[], Tensor]]) -> None:
        self.getters = dict(getters)

    def __getitem__(self, key: str) -> Tensor:
        return self.getters[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.getters)

    def __len__(self) -> int:
        return len(self.getters)

    def renamed(self, names: Mapping[str, str]) -> Tensors:
        """The tensors named old -> new by `names` (others dropped)."""
        return Tensors({new: self.getters[old] for old, new in names.items()})


def split_released(reward: str, file: str, tensors: Tensors) -> tuple[Tensors, Tensors, int]:
    """A judge's state dict in the released (transformers 4.45) layout -> (the backbone's tensors under
    `Qwen2VLModel`'s names, the head's without `rm_head.`, the embedding rows). `model.*` is the language model,
    `visual.*` the vision encoder, `rm_head.*` the reward head; `lm_head.weight` (next-token logits, tied to the
    embedding in the 2B) must be there but a reward never reads it. Any other key is a CheckpointError."""
    backbone, head, unknown = {}, {}, []
    for key in tensors:
        if key.startswith("model."):
            backbone[key] = "language_model." + key.removeprefix("model.")
        elif key.startswith("visual."):
            backbone[key] = key
        elif key.startswith("rm_head."):
            head[key] = key.removeprefix("rm_head.")
        elif key != "lm_head.weight":
            unknown.append(key)
    if unknown or "lm_head.weight" not in tensors or "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(
            f"reward {reward!r}: {file} is not a Qwen2-VL reward model in the released layout (model.*, visual.*, "
            f"lm_head.weight, rm_head.*): unexpected {unknown[:6]}, has lm_head.weight: {'lm_head.weight' in tensors}"
        )
    return tensors.renamed(backbone), tensors.renamed(head), tensors["model.embed_tokens.weight"].shape[0]


def load_strict(reward: str, file: str, module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copies `tensors` into `module`'s parameters and persistent buffers (cast to their dtype and device), one at a
    time; CheckpointError naming the reward and the file when a key is missing, unexpected or mis-shaped."""
    targets = module.state_dict()
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    misshaped = []
    if not missing and not unexpected:
        for key, target in targets.items():
            tensor = tensors[key]
            if tensor.shape != target.shape:
                misshaped.append(f"{key} {tuple(tensor.shape)} != {tuple(target.shape)}")
            else:
                target.copy_(tensor)
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"reward {reward!r}: {file} does not fit {type(module).__name__}: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
            f", mis-shaped {misshaped[:6]}"
        )


def _reset_rotary(model: nn.Module) -> None:
    """Recomputes the rotary inverse frequencies (non-persistent buffers, so never in a checkpoint) in float32 and
    stores them in the model's dtype: the judges ran with `model.to(bfloat16)`, which rounded them the same way."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq"):
            fresh = type(module)(module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def empty_model(reward: str, config: object, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`Qwen2VLModel(config)` in `dtype` on `device` with uninitialised weights (built on the meta device: a 7B
    backbone never exists twice) and its rotary frequencies set."""
    transformers = require_package(reward, "transformers", INSTALL)
    with torch.device("meta"):
        model = transformers.Qwen2VLModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        _reset_rotary(model)
    return model.eval().requires_grad_(False)


def read_patches(reward: str, directory: Path, config: object) -> Patches:
    """The base checkpoint's preprocessor_config.json as Patches; CheckpointError if it disagrees with config.json."""
    try:
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        patches = Patches(
            patch=int(pre["patch_size"]),
            merge=int(pre["merge_size"]),
            temporal=int(pre["temporal_patch_size"]),
            mean=tuple(float(v) for v in pre["image_mean"]),
            std=tuple(float(v) for v in pre["image_std"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"reward {reward!r}: {directory}/preprocessor_config.json: {one_line(e)}") from e
    vision = config.vision_config
    ours = (patches.patch, patches.merge, patches.temporal)
    theirs = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    if ours != theirs or len(patches.mean) != 3 or len(patches.std) != 3:
        raise CheckpointError(
            f"reward {reward!r}: {directory}: preprocessor_config.json (patch, merge, temporal) {ours} and 3-channel "
            f"mean/std do not fit config.json's vision_config {theirs}"
        )
    return patches


class Backbone:
    """A loaded Qwen2-VL: `Qwen2VLModel` with its tokenizer and patching, turning chat texts and vision patches into
    the last hidden states the judges' heads read."""

    def __init__(self, model: nn.Module, tokenizer: object, patches: Patches) -> None:
        self.model, self.tokenizer, self.patches = model, tokenizer, patches
        self.pad_id: int = tokenizer.pad_token_id
        config = model.config
        self.vision_ids = {VIDEO_PAD: config.video_token_id, IMAGE_PAD: config.image_token_id}

    def to(self, device: torch.device | str) -> Backbone:
        """Moves the model (a no-op when it is there)."""
        self.model.to(device)
        return self

    def token_id(self, token: str) -> int:
        """The id of a special token the tokenizer holds."""
        return self.tokenizer.convert_tokens_to_ids(token)

    def encode(self, texts: Sequence[str], placeholder: str, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) right-padded with the pad token, and the attention mask (B, L), on the model's device:
        each text holds `placeholder` once, repeated here to its vision token count (as the processors do)."""
        token = self.vision_ids[placeholder]
        rows = []
        for text, count in zip(texts, counts):
            ids = self.tokenizer(text)["input_ids"]
            at = [i for i, t in enumerate(ids) if t == token]
            if len(at) != 1:
                raise ValueError(
                    f"a chat text tokenises to {len(at)} {placeholder}, expected 1 (does a prompt hold it?)"
                )
            rows.append(ids[: at[0]] + [token] * count + ids[at[0] + 1 :])
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = self.model.get_input_embeddings().weight.device
        return ids.to(device), mask.to(device)

    def hidden_states(self, ids: Tensor, mask: Tensor, pixels: Tensor, grids: Tensor, video: bool) -> Tensor:
        """(B, L, D) last hidden states of token ids / mask (B, L) with the patches `pixels` (rows of all samples'
        grids, in order) scattered into their placeholders; positions 0..L-1 on all three M-RoPE axes (see the
        module's docstring: the 3-D positions transformers 5 would compute are not what the judges learned)."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        vision = (
            {"pixel_values_videos": pixels, "video_grid_thw": grids}
            if video
            else {"pixel_values": pixels, "image_grid_thw": grids}
        )
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **vision)
        return out.last_hidden_state


def load_backbone(
    reward: str,
    base: str | Path,
    tensors: Tensors,
    rows: int,
    added_tokens: Sequence[str],
    file: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Backbone:
    """The backbone from the base checkpoint directory `base` (config.json, preprocessor_config.json and the
    tokenizer; no weights read from it) with the backbone `tensors` of the judge's `file`. The tokenizer gets the
    judge's `added_tokens` (as its training did) and must then match the checkpoint's `rows` embedding rows."""
    transformers = require_package(reward, "transformers", INSTALL)
    directory = local_dir(reward, base, ("config.json", "preprocessor_config.json"))
    try:
        config = transformers.Qwen2VLConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors, ...
        raise CheckpointError(
            f"reward {reward!r}: cannot read the Qwen2-VL config or tokenizer in {base}: {one_line(e)}"
        ) from e
    if config.model_type != "qwen2_vl":
        raise CheckpointError(f"reward {reward!r}: {base}/config.json is a {config.model_type!r}, not qwen2_vl")
    patches = read_patches(reward, directory, config)
    tokenizer.add_tokens([t for t in added_tokens if t not in tokenizer.get_vocab()], special_tokens=True)
    specials = {
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
        IMAGE_PAD: config.image_token_id,
        VIDEO_PAD: config.video_token_id,
    }
    wrong = {t: i for t, i in specials.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong or len(tokenizer) != rows or tokenizer.pad_token_id is None:
        raise CheckpointError(
            f"reward {reward!r}: the tokenizer in {base} does not fit: {len(tokenizer)} tokens with "
            f"{list(added_tokens)} for {rows} embedding rows in {file}, config.json ids it disagrees with {wrong}, "
            f"pad token {tokenizer.pad_token!r}"
        )
    config.text_config.vocab_size = rows
    model = empty_model(reward, config, device, dtype)
    with torch.no_grad():
        load_strict(reward, file, model, tensors)
    return Backbone(model, tokenizer, patches)


def word_tokenizer(reward: str, added_tokens: Sequence[str]) -> object:
    """A stand-in for Qwen2-VL's tokenizer when none is on disk (random-weights benchmarks): one token (id 0) per word
    or punctuation run, about the BPE's count on English prose; the special tokens at their real ids and
    `added_tokens` after them (ids 151657, ...)."""
    tokenizers = require_package(reward, "tokenizers", INSTALL)
    transformers = require_package(reward, "transformers", INSTALL)
    specials = dict(QWEN2VL_SPECIAL_TOKENS)
    specials.update({token: QWEN2VL_TOKENS + i for i, token in enumerate(added_tokens)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={"[UNK]": 0, **specials}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>")


def random_backbone(
    reward: str,
    config: Mapping[str, object],
    added_tokens: Sequence[str],
    device: torch.device | str,
    dtype: torch.dtype,
) -> Backbone:
    """A backbone at `config`'s shape (QWEN2VL_2B, QWEN2VL_7B) with random weights (N(0, 0.02) matrices, unit norms,
    zero biases; seed with torch.manual_seed) and `word_tokenizer`, for timing a judge without its weights."""
    transformers = require_package(reward, "transformers", INSTALL)
    qwen_config = transformers.Qwen2VLConfig(**config)
    qwen_config.text_config.vocab_size = QWEN2VL_TOKENS + len(added_tokens)
    model = empty_model(reward, qwen_config, device, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return Backbone(model, word_tokenizer(reward, added_tokens), Patches())


class JudgeReward(Reward):
    """A Qwen2-VL judge (VideoAlign, HPSv3) as a reward: `load(device, dtype)` builds it on `device`, or on the
    CPU and then it moves to wherever the frames are when `device` is None; `dtype` is the backbone's
    ("bfloat16" as the authors ran them, "float32"). Subclasses say how their judge scores a rollout."""

    modality = "video"
    reads = frozenset({"frames", "text"})

    def __init__(
        self, weight: float, load: Callable[[torch.device | str, torch.dtype], object], device: str | None, dtype: str
    ) -> None:
        super().__init__(weight)
        self.device = None if device is None else torch.device(device)
        self.judge = load(self.device or "cpu", parse_dtype(dtype))

    @abc.abstractmethod
    def judge_scores(self, rollout: Rollout) -> Tensor:
        """(N,) scores of the judge, on its device, for the rollout's frames (not None: score_rewards checks)."""

    def score(self, rollout: Rollout) -> Tensor:
        assert rollout.frames is not None  # score_rewards checks `reads`
        self.judge.to(self.device or rollout.frames.device)
        return self.judge_scores(rollout).to(rollout.frames.device)
