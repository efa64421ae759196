"""VideoAlign's VideoReward (KwaiVGI, "Improving Video Generation with Human Feedback"): Qwen2-VL-2B fine-tuned with
LoRA to rate a generated video's visual quality (VQ), motion quality (MQ) and text alignment (TA), each read by a
bias-free linear head at a reward token of its prompt. OmniNFT's authors reward (VQ + TA) / 2 of the calibrated
ratings ((rating - mean) / std, model_config.json's inference_config), the default of `dimensions`.

Weights, all local: the release directory `path` (model_config.json and checkpoint-*/model.pth, the full PEFT-wrapped
state dict of transformers 4.45, whose LoRA is merged here, so peft is not needed) and the base Qwen2-VL-2B-Instruct
directory `base` (config.json, preprocessor_config.json, tokenizer; its weights are not read). Inputs as the
release's inference builds them, in torch: the clip sampled uniformly at `fps` (2, its training rate; OmniNFT's
authors passed 24, 12x the tokens), frames resized to at most `max_pixels` (200704) and patchified, the chat text
around PROMPT filled with the sample's `prompt_video`, flat position ids (engine.rewards.qwen2vl).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, one_line
from .base import Rollout, register
from .qwen2vl import (
    CHAT,
    QWEN2VL_2B,
    VIDEO_PAD,
    Backbone,
    JudgeReward,
    Tensors,
    load_backbone,
    load_strict,
    patchify,
    random_backbone,
    smart_resize,
    split_released,
    to_pixels,
    token_positions,
)

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")  # added to the tokenizer in this order
DEFAULT_DIMENSIONS = {"VQ": 0.5, "TA": 0.5}
PEFT_PREFIX = "base_model.model."

# The release's prompt (prompt_template.py, DETAILED_PROMPT_WITH_SPECIAL_TOKEN, "detailed_special"), byte for byte:
# the model was trained on this text, trailing spaces included.
PROMPT = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
    "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
    "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the "
    "others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a "
    "sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
    "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, "
    "or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing "
    "should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, "
    "mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
    "motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
    "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
    "where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions "
    "like talking or blinking) align with the described prompt. The motion should match the prompt in terms "
    "of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
    "checking if real-world locations or scenes are accurately represented, though some stylistic adaptation "
    "is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how "
    "well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
    "shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)


def sample_frames(total: int, source_fps: float, fps: float, step: int) -> Tensor:
    """Indices of the frames qwen-vl-utils samples from a clip of `total` frames at `source_fps` (uniform sampling):
    `total / source_fps * fps` frames, clamped to [4, min(768, total)] and rounded to a multiple of `step` (the
    temporal patch), evenly spaced from the first frame to the last."""
    least, most = math.ceil(4 / step) * step, math.floor(min(768, total) / step) * step
    count = min(round(min(max(total / source_fps * fps, least), most) / step) * step, total)
    if count < step:
        raise ValueError(f"a clip of {total} frames is too short for VideoAlign (it needs {step})")
    return torch.linspace(0, total - 1, count).round().long()


class VideoAlignJudge:
    """VideoReward: calibrated VQ, MQ, TA ratings of clips and their weighted sum."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Linear,
        calibration: Mapping[str, tuple[float, float]],
        dimensions: Mapping[str, float],
        fps: float,
        max_pixels: int,
    ) -> None:
        check_sampling(fps, max_pixels)
        self.backbone, self.head = backbone, head
        self.mean = torch.tensor([calibration[d][0] for d in DIMENSIONS])
        self.std = torch.tensor([calibration[d][1] for d in DIMENSIONS])
        self.weights = torch.tensor([check_dimensions(dimensions).get(d, 0.0) for d in DIMENSIONS])
        self.fps, self.max_pixels = fps, max_pixels
        self.reward_ids = [backbone.token_id(token) for token in REWARD_TOKENS]

    def to(self, device: torch.device | str) -> VideoAlignJudge:
        """Moves the model (a no-op when it is there)."""
        self.backbone.to(device)
        self.head.to(device)
        return self

    @torch.no_grad()
    def ratings(self, frames: Tensor, source_fps: float, prompts: Sequence[str]) -> Tensor:
        """(N, 3) calibrated VQ, MQ, TA of clips `frames` (N, F, H, W, 3) in [0, 1] at `source_fps` frames per
        second against their `prompts`, on the model's device (frames are moved there)."""
        patches = self.backbone.patches
        n, total, height, width = frames.shape[:4]
        device = self.head.weight.device
        index = sample_frames(total, source_fps, self.fps, patches.temporal).to(frames.device)
        size = smart_resize(height, width, patches.factor, 128 * patches.factor**2, self.max_pixels)
        pixels = to_pixels(frames[:, index].to(device).flatten(0, 1), size, separable=False)
        cut = [patchify(clip, patches) for clip in pixels.unflatten(0, (n, len(index)))]
        grids = torch.tensor([grid for _, grid in cut], device=device)
        texts = [CHAT.format(vision=VIDEO_PAD, text=PROMPT.format(text_prompt=prompt)) for prompt in prompts]
        ids, mask = self.backbone.encode(texts, VIDEO_PAD, [patches.tokens(grid) for _, grid in cut])
        hidden = self.backbone.hidden_states(ids, mask, torch.cat([rows for rows, _ in cut]), grids, video=True)
        at = torch.stack([token_positions(ids, token, name) for token, name in zip(self.reward_ids, REWARD_TOKENS)], 1)
        pooled = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, 3, D)
        raw = self.head(pooled)  # (N, 3, 1): one head for the three tokens, or (N, 3, 3): token d reads row d
        raw = raw[..., 0] if raw.shape[-1] == 1 else raw.diagonal(dim1=1, dim2=2)
        return (raw.float() - self.mean.to(device)) / self.std.to(device)

    def score(self, frames: Tensor, source_fps: float, prompts: Sequence[str]) -> Tensor:
        """(N,) the `dimensions`-weighted sum of `ratings`."""
        ratings = self.ratings(frames, source_fps, prompts)
        return ratings @ self.weights.to(ratings.device)


def check_dimensions(dimensions: Mapping[str, float]) -> dict[str, float]:
    """The dimension weights as floats; ValueError for an unknown dimension, a non-finite weight or all weights 0."""
    if not isinstance(dimensions, Mapping) or not dimensions:
        raise ValueError(f"dimensions must be a non-empty mapping of {DIMENSIONS} to weights, got {dimensions!r}")
    unknown = sorted(set(map(str, dimensions)) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"dimensions has unknown {', '.join(unknown)}; expected some of {DIMENSIONS}")
    for key, value in dimensions.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"dimensions.{key} must be a finite number, got {value!r}")
    if not any(dimensions.values()):
        raise ValueError(f"dimensions weights are all 0: {dict(dimensions)}")
    return {key: float(value) for key, value in dimensions.items()}


def check_sampling(fps: float | None, max_pixels: int | None) -> None:
    """ValueError unless fps is None or a finite number > 0 and max_pixels None or an integer > 0."""
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < math.inf):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be an integer > 0, got {max_pixels!r}")


def merge_lora(file: str, tensors: Mapping[str, Tensor], alpha: float, rslora: bool) -> Tensors:
    """PEFT's wrapped state dict (`base_model.model.` + the model's keys; a LoRA-wrapped Linear `m` as
    `m.base_layer.weight` / `.bias`, `m.lora_A.default.weight` (r, in) and `m.lora_B.default.weight` (out, r)) as the
    plain model's keys, each LoRA merged in float32 when read: W = W0 + alpha / r * B @ A (alpha / sqrt(r) with
    rsLoRA), peft's merge_and_unload. CheckpointError for a key outside that layout."""
    getters, loras, unknown = {}, {}, []
    for key in tensors:
        name = key.removeprefix(PEFT_PREFIX)
        owner, _, part = name.partition(".base_layer.")
        if name == key:
            unknown.append(key)
        elif part:
            getters[f"{owner}.{part}"] = functools.partial(tensors.__getitem__, key)
        elif name.endswith((".lora_A.default.weight", ".lora_B.default.weight")):
            module, _, rest = name.rpartition(".lora_")
            loras.setdefault(module, set()).add(rest[0])  # "A" or "B"
        elif ".lora_" in name or ".modules_to_save." in name:
            unknown.append(key)
        else:
            getters[name] = functools.partial(tensors.__getitem__, key)
    broken = sorted(m for m, parts in loras.items() if parts != {"A", "B"} or f"{m}.weight" not in getters)
    if unknown or broken:
        raise CheckpointError(
            f"reward 'videoalign': {file} is not PEFT's LoRA-wrapped state dict (base_model.model.*, lora_A/lora_B "
            f".default on base_layer): unexpected {unknown[:6]}, incomplete LoRA on {broken[:6]}"
        )

    def merged(owner: str) -> Tensor:
        a = tensors[f"{PEFT_PREFIX}{owner}.lora_A.default.weight"].float()
        b = tensors[f"{PEFT_PREFIX}{owner}.lora_B.default.weight"].float()
        scale = alpha / (math.sqrt(a.shape[0]) if rslora else a.shape[0])
        return tensors[f"{PEFT_PREFIX}{owner}.base_layer.weight"].float() + scale * (b @ a)

    getters.update({f"{owner}.weight": functools.partial(merged, owner) for owner in loras})
    return Tensors(getters)


def read_release(path: str | Path, checkpoint: str | None) -> tuple[Path, dict]:
    """(model.pth, model_config.json's content) of the release directory `path`: `checkpoint` names its
    checkpoint-* folder, by default the highest step (as the release's loader picks)."""
    directory = Path(path).expanduser()
    if not (directory / "model_config.json").is_file():
        raise CheckpointError(f"reward 'videoalign': {path} lacks model_config.json (the VideoReward release layout)")
    steps = sorted(
        (int(d.name.removeprefix("checkpoint-")), d.name)
        for d in directory.glob("checkpoint-*")
        if d.name.removeprefix("checkpoint-").isdigit()
    )
    name = checkpoint if checkpoint is not None else (steps[-1][1] if steps else "checkpoint-*")
    weights = directory / name / "model.pth"
    if not weights.is_file():
        raise CheckpointError(f"reward 'videoalign': {path} lacks {name}/model.pth")
    try:
        return weights, json.loads((directory / "model_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"reward 'videoalign': {path}/model_config.json: {one_line(e)}") from e


def release_settings(path: str | Path, config: dict) -> tuple[float, bool, dict, float, int]:
    """(LoRA alpha, rsLoRA, calibration {dimension: (mean, std)}, fps, max pixels) from model_config.json; a
    CheckpointError unless its prompt template and dimension order are the ones PROMPT and DIMENSIONS encode."""
    try:
        peft, data, inference = config["peft_lora_config"], config["data_config"], config["inference_config"]
        calibration = {d: (float(inference[f"{d}_mean"]), float(inference[f"{d}_std"])) for d in DIMENSIONS}
        settings = float(peft["lora_alpha"]), bool(peft.get("use_rslora", False))
        rate, pixels = float(data["fps"]), int(data["max_frame_pixels"])
        layout = (list(data["eval_dim"]), data["prompt_template_type"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"reward 'videoalign': {path}/model_config.json lacks {one_line(e)}") from e
    if layout != (list(DIMENSIONS), "detailed_special"):
        raise CheckpointError(
            f"reward 'videoalign': {path}/model_config.json has eval_dim / prompt_template_type {layout}; "
            f"only {list(DIMENSIONS)} with detailed_special (the VideoReward release) is supported"
        )
    return *settings, calibration, rate, pixels


def load_videoalign(
    path: str | Path,
    base: str | Path,
    *,
    checkpoint: str | None = None,
    dimensions: Mapping[str, float] | None = None,
    fps: float | None = None,
    max_pixels: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> VideoAlignJudge:
    """The judge from the release directory `path` and the base directory `base` (see the module docstring); `fps`
    and `max_pixels` default to model_config.json's data_config."""
    dimensions = check_dimensions(DEFAULT_DIMENSIONS if dimensions is None else dimensions)
    check_sampling(fps, max_pixels)
    weights_path, config = read_release(path, checkpoint)
    alpha, rslora, calibration, release_fps, release_pixels = release_settings(path, config)
    file = f"{weights_path.parent.name}/model.pth"
    try:
        state = torch.load(weights_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # pickle, zip and mmap errors
        raise CheckpointError(f"reward 'videoalign': cannot read {weights_path}: {one_line(e)}") from e
    backbone_tensors, head_tensors, rows = split_released("videoalign", file, merge_lora(file, state, alpha, rslora))
    backbone = load_backbone("videoalign", base, backbone_tensors, rows, REWARD_TOKENS, file, device, dtype)
    hidden = backbone.model.config.text_config.hidden_size
    outputs = head_tensors["weight"].shape[0] if "weight" in head_tensors else 1
    if outputs not in (1, 3):
        raise CheckpointError(f"reward 'videoalign': {file} rm_head.weight has {outputs} rows; expected 1 or 3")
    head = nn.Linear(hidden, outputs, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        load_strict("videoalign", f"{file} rm_head.*", head, head_tensors)
    return VideoAlignJudge(
        backbone,
        head,
        calibration,
        dimensions,
        release_fps if fps is None else fps,
        release_pixels if max_pixels is None else max_pixels,
    )


def random_videoalign(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    config: Mapping[str, object] = QWEN2VL_2B,
    fps: float = 2.0,
    max_pixels: int = 200704,
) -> VideoAlignJudge:
    """The judge at the real Qwen2-VL-2B shape (or `config`'s) with random weights (seed with torch.manual_seed), a
    word-level stand-in tokenizer and identity calibration, for timing: `judge.score(frames, fps, prompts)` is all the
    reward's work."""
    backbone = random_backbone("videoalign", config, REWARD_TOKENS, device, dtype)
    head = nn.Linear(config["hidden_size"], 1, bias=False, device=device, dtype=dtype).requires_grad_(False)
    identity = {d: (0.0, 1.0) for d in DIMENSIONS}
    return VideoAlignJudge(backbone, head, identity, DEFAULT_DIMENSIONS, fps, max_pixels)


@register
class VideoAlignScore(JudgeReward):
    """VideoReward's calibrated ratings of the clip against its `prompt_video`, weighted by `dimensions`
    (default (VQ + TA) / 2); higher is better."""

    name = "videoalign"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        path: str,
        base: str,
        checkpoint: str | None = None,
        dimensions: dict[str, float] | None = None,
        fps: float | None = None,
        max_pixels: int | None = None,
        device: str | None = None,
        dtype: str = "bfloat16",
    ) -> None:
        """Loads the judge (see the module docstring and `JudgeReward`)."""
        settings = dict(checkpoint=checkpoint, dimensions=dimensions, fps=fps, max_pixels=max_pixels)
        super().__init__(
            weight, lambda at, dt: load_videoalign(path, base, **settings, device=at, dtype=dt), device, dtype
        )

    def judge_scores(self, rollout: Rollout) -> Tensor:
        return self.judge.score(rollout.frames, rollout.fps, rollout.video_prompts)
