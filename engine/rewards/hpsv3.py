"""HPSv3 (MizzenAI, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B trained on human preferences
between generated images; a 3-layer head (float32) read at the <|Reward|> token of its prompt gives a Gaussian
(mu, sigma) of the preference, and mu is the score. OmniNFT's authors score a clip by 5 evenly spaced frames (first
and last included), each capped at 15, and reward the mean of the best 2 (ceil(0.3 * 5)): `num_frames`, `cap`,
`top_k`.

Weights, all local: `path`, the release's HPSv3.safetensors (transformers 4.45 layout: model.*, visual.*,
lm_head.weight, rm_head.{0,3,5}.*, no LoRA), and the base Qwen2-VL-7B-Instruct directory `base` (config.json,
preprocessor_config.json, tokenizer; its weights are not read), whose tokenizer gets <|Reward|> as in training.
Inputs as the release's inferencer builds them, in torch: each frame resized to about `pixels` (256 * 28^2 = 200704;
the release sets its min and max pixels both to it and its resize rounds down, so 512x768 becomes 364x532),
patchified as one image, the chat text around INSTRUCTION filled with the sample's `prompt_video` plus SUFFIX, flat
position ids (engine.rewards.qwen2vl).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, one_line
from .base import Rollout, register, require_package
from .qwen2vl import (
    CHAT,
    IMAGE_PAD,
    INSTALL,
    QWEN2VL_7B,
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

REWARD_TOKEN = "<|Reward|>"

# The release's text (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and prompt_with_special_token), byte for byte:
# the model was trained on it, trailing spaces included.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
    "worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a "
    "sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how "
    "well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance the "
    "subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the "
    "original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def ranknet_head(hidden: int) -> nn.Sequential:
    """HPSv3's `rm_head` (rm_head_type "ranknet" without kwargs), float32: hidden -> 1024 -> 16 -> (mu, sigma)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices evenly spaced over `total` frames, first and last included (round(i * (F - 1) / 4) for
    the authors' 5); one frame is the first."""
    return [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]


def check_settings(num_frames: int, top_k: int, cap: float | None, pixels: int) -> None:
    """ValueError unless 1 <= top_k <= num_frames, cap is None or a finite number, and pixels is an integer > 0."""
    for key, value in (("num_frames", num_frames), ("top_k", top_k), ("pixels", pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if top_k > num_frames:
        raise ValueError(f"top_k ({top_k}) must be at most num_frames ({num_frames})")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not math.isfinite(cap)):
        raise ValueError(f"cap must be a finite number or None, got {cap!r}")


class HPSv3Judge:
    """HPSv3: (mu, sigma) of single frames, and the clip score of the authors' frame reduction."""

    def __init__(
        self, backbone: Backbone, head: nn.Sequential, pixels: int, num_frames: int, top_k: int, cap: float | None
    ) -> None:
        check_settings(num_frames, top_k, cap, pixels)
        self.backbone, self.head = backbone, head.eval().requires_grad_(False)
        self.pixels, self.num_frames, self.top_k, self.cap = pixels, num_frames, top_k, cap
        self.reward_id = backbone.token_id(REWARD_TOKEN)

    def to(self, device: torch.device | str) -> HPSv3Judge:
        """Moves the model (a no-op when it is there)."""
        self.backbone.to(device)
        self.head.to(device)
        return self

    def vision_input(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (M, H, W, 3) in [0, 1] as the vision encoder's input: patches (M * patches per image, 3 * 2 * 14^2)
        and grids (M, 3), each image resized to about `pixels` the way PIL does (HPSv3's pipeline), patchified."""
        patches = self.backbone.patches
        size = smart_resize(images.shape[1], images.shape[2], patches.factor, self.pixels, self.pixels)
        cut = [patchify(image[None], patches) for image in to_pixels(images, size, separable=True)]
        return torch.cat([rows for rows, _ in cut]), torch.tensor([grid for _, grid in cut], device=images.device)

    @torch.no_grad()
    def rate(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(M, 2) float32 (mu, sigma) of images (M, H, W, 3) in [0, 1] against their `prompts`, on the model's
        device (images are moved there)."""
        device = self.head[0].weight.device
        rows, grids = self.vision_input(images.to(device))
        texts = [
            CHAT.format(vision=IMAGE_PAD, text=INSTRUCTION.format(text_prompt=prompt) + SUFFIX) for prompt in prompts
        ]
        ids, mask = self.backbone.encode(texts, IMAGE_PAD, [self.backbone.patches.tokens(g) for g in grids.tolist()])
        hidden = self.backbone.hidden_states(ids, mask, rows, grids, video=False)
        pooled = hidden[torch.arange(len(ids), device=device), token_positions(ids, self.reward_id, REWARD_TOKEN)]
        return self.head(pooled.float())

    def score(self, frames: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) clip scores of `frames` (N, F, H, W, 3) in [0, 1]: the mean of the `top_k` best of `num_frames`
        evenly spaced frames' mu, each capped at `cap`."""
        n, total = frames.shape[:2]
        index = frame_indices(total, self.num_frames)
        mu = self.rate(frames[:, index].flatten(0, 1), [p for p in prompts for _ in index])[:, 0].view(n, len(index))
        if self.cap is not None:
            mu = mu.clamp(max=self.cap)
        return mu.topk(self.top_k, dim=1).values.mean(dim=1)


def load_hpsv3(
    path: str | Path,
    base: str | Path,
    *,
    num_frames: int = 5,
    top_k: int = 2,
    cap: float | None = 15.0,
    pixels: int = 200704,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> HPSv3Judge:
    """The judge from HPSv3.safetensors at `path` and the base directory `base` (see the module docstring)."""
    check_settings(num_frames, top_k, cap, pixels)
    safetensors = require_package("hpsv3", "safetensors", INSTALL)
    weights = Path(path).expanduser()
    if not weights.is_file():
        raise CheckpointError(f"reward 'hpsv3': {path} is not a file (expected HPSv3.safetensors)")
    try:
        handle = safetensors.safe_open(str(weights), framework="pt")
    except Exception as e:  # a header that is not safetensors'
        raise CheckpointError(f"reward 'hpsv3': cannot read {path}: {one_line(e)}") from e
    with handle:
        tensors = Tensors({key: functools.partial(handle.get_tensor, key) for key in handle.keys()})
        backbone_tensors, head_tensors, rows = split_released("hpsv3", weights.name, tensors)
        backbone = load_backbone("hpsv3", base, backbone_tensors, rows, (REWARD_TOKEN,), weights.name, device, dtype)
        head = ranknet_head(backbone.model.config.text_config.hidden_size).to(device).requires_grad_(False)
        with torch.no_grad():
            load_strict("hpsv3", f"{weights.name} rm_head.*", head, head_tensors)
    return HPSv3Judge(backbone, head, pixels, num_frames, top_k, cap)


def random_hpsv3(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    config: Mapping[str, object] = QWEN2VL_7B,
    num_frames: int = 5,
    top_k: int = 2,
    cap: float | None = 15.0,
    pixels: int = 200704,
) -> HPSv3Judge:
    """The judge at the real Qwen2-VL-7B shape (or `config`'s) with random weights (seed with torch.manual_seed) and a
    word-level stand-in tokenizer, for timing: `judge.score(frames, prompts)` is all the reward's work."""
    backbone = random_backbone("hpsv3", config, (REWARD_TOKEN,), device, dtype)
    head = ranknet_head(config["hidden_size"]).to(device)
    return HPSv3Judge(backbone, head, pixels, num_frames, top_k, cap)


@register
class HPSv3Score(JudgeReward):
    """HPSv3's preference for the clip's best frames given its `prompt_video`; higher is better."""

    name = "hpsv3"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        path: str,
        base: str,
        num_frames: int = 5,
        top_k: int = 2,
        cap: float | None = 15.0,
        pixels: int = 200704,
        device: str | None = None,
        dtype: str = "bfloat16",
    ) -> None:
        """Loads the judge (see the module docstring and `JudgeReward`)."""
        settings = dict(num_frames=num_frames, top_k=top_k, cap=cap, pixels=pixels)
        super().__init__(weight, lambda at, dt: load_hpsv3(path, base, **settings, device=at, dtype=dt), device, dtype)

    def judge_scores(self, rollout: Rollout) -> Tensor:
        return self.judge.score(rollout.frames, rollout.video_prompts)
