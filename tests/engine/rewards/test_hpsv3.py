"""The HPSv3 reward on a tiny random Qwen2-VL saved as the release lays it out: HPSv3.safetensors (transformers 4.45
keys: model.*, visual.*, lm_head.weight, rm_head.{0,3,5}.*) and the base directory (config.json,
preprocessor_config.json, tokenizer). The reference is transformers' own pipeline: its PIL Qwen2-VL image processor
(resize, rescale, normalise, patchify), the processor's text expansion and Qwen2VLModel's forward."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError, ConfigError
from engine.rewards import build_rewards, reads_media, score_rewards
from engine.rewards.base import RewardSpec
from engine.rewards.hpsv3 import (
    INSTRUCTION,
    REWARD_TOKEN,
    SUFFIX,
    HPSv3Judge,
    HPSv3Score,
    frame_indices,
    load_hpsv3,
    random_hpsv3,
    ranknet_head,
)
from engine.rewards.qwen2vl import CHAT, IMAGE_PAD, Patches
from tests.engine.rewards import qwen2vl_tiny as tiny
from tests.engine.rewards.rollouts import media_rollout

safetensors = pytest.importorskip("safetensors.torch")
Image = pytest.importorskip("PIL.Image")  # transformers' PIL image processor is the reference
transformers = tiny.transformers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

PIXELS = 56 * 84  # the tests' frames are 56x84, which the resize keeps at PIXELS (the release uses 200704)
PROMPTS = ("a red fox runs through snow", "a blue car parks by a lake")


@dataclass
class Release:
    weights: Path  # HPSv3.safetensors
    base: Path
    tokenizer: object
    state: dict[str, torch.Tensor]
    reference: torch.nn.Module  # transformers' Qwen2VLModel with the released backbone weights
    head: torch.nn.Sequential
    judge: HPSv3Judge


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    root = tmp_path_factory.mktemp("hpsv3")
    tok, config = tiny.write_base(root / "base")
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # what the release's training did
    model = tiny.backbone(config, len(tok), seed=0)
    torch.manual_seed(1)
    head = ranknet_head(64).eval()
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.3)
    state = {key: value.clone() for key, value in tiny.released_layout(model, head).items()}
    assert sorted(k for k in state if k.startswith("rm_head.")) == [
        f"rm_head.{i}.{p}" for i in (0, 3, 5) for p in ("bias", "weight")
    ]
    safetensors.save_file(state, str(root / "HPSv3.safetensors"))
    judge = load_hpsv3(root / "HPSv3.safetensors", root / "base", pixels=PIXELS, dtype=torch.float32)
    return Release(root / "HPSv3.safetensors", root / "base", tok, state, model, head, judge)


def uint8_frames(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, height, width, 3) frames in [0, 1] on 8-bit levels, smooth plus fine detail (so resizing filters matter)."""
    frames = tiny.clips(1, n, height, width, seed)[0]
    noise = torch.rand(frames.shape, generator=torch.Generator().manual_seed(seed))
    return ((frames + 0.3 * noise).clamp(0, 1) * 255).round() / 255


def processor_pixels(frames: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' PIL Qwen2-VL image processor on the frames as 8-bit PIL images, min = max = `pixels` (the
    release's setting): (patches, grid_thw)."""
    processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    images = [Image.fromarray((f * 255).round().to(torch.uint8).numpy()) for f in frames]
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def reference_mu_sigma(release: Release, frames: torch.Tensor, prompts, flat: bool = True) -> torch.Tensor:
    """(M, 2) the release's way: processor pixels and text (placeholder repeated as a string), transformers'
    forward, rm_head in float32 at <|Reward|>."""
    pixel_values, grids = processor_pixels(frames, PIXELS)
    counts = (grids.prod(-1) // 4).tolist()
    texts = [
        tiny.expand_placeholder(
            CHAT.format(vision=IMAGE_PAD, text=INSTRUCTION.format(text_prompt=p) + SUFFIX), IMAGE_PAD, n
        )
        for p, n in zip(prompts, counts)
    ]
    batch = release.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids = batch["input_ids"]
    if flat:
        positions = {"position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    else:  # transformers 5's own 3-D M-RoPE positions
        positions = {"mm_token_type_ids": (ids == release.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int()}
    with torch.no_grad():
        hidden = release.reference(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=pixel_values,
            image_grid_thw=grids,
            **positions,
        ).last_hidden_state
        at = (ids == release.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)).int().argmax(1)
        return release.head(hidden[torch.arange(len(ids)), at].float())


def test_pixels_are_the_transformers_image_processors(release):
    """At a size the resize keeps, the judge's vision input equals transformers' PIL processor's; resized (a 512x768
    frame goes to 364x532 as in the release), within one 8-bit level of PIL's bicubic resize."""
    frames = uint8_frames(2, 56, 84, seed=0)
    rows, grids = release.judge.vision_input(frames)
    expected, expected_grids = processor_pixels(frames, PIXELS)
    assert grids.tolist() == expected_grids.tolist() == [[1, 4, 6]] * 2
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)

    judge = HPSv3Judge(release.judge.backbone, release.head, 200704, num_frames=5, top_k=2, cap=15.0)
    frame = uint8_frames(1, 512, 768, seed=1)
    rows, grids = judge.vision_input(frame)
    expected, expected_grids = processor_pixels(frame, 200704)
    assert grids.tolist() == expected_grids.tolist() == [[1, 26, 38]]  # 364x532
    level = 1 / 255 / min(Patches().std)  # one 8-bit level, normalised
    difference = (rows - expected).abs()
    assert difference.max() <= level + 1e-5
    assert (difference > 1e-5).float().mean() < 0.01


def test_release_loads_and_rates_as_transformers_445_did(release):
    """mu and sigma from the strictly loaded safetensors equal transformers' forward with flat position ids;
    transformers 5's 3-D positions would give other values."""
    frames = uint8_frames(3, 56, 84, seed=2)
    prompts = (*PROMPTS, "an empty room at night")
    ours = release.judge.rate(frames, prompts)
    expected = reference_mu_sigma(release, frames, prompts)
    assert ours.shape == (3, 2) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)
    assert (expected - reference_mu_sigma(release, frames, prompts, flat=False)).abs().max() > 1e-3


def test_text_is_the_release_instruction_inside_qwen2_vl_chat(release):
    # sha256 of hpsv3 1.0.0's hpsv3/dataset/data_collator_qwen.py INSTRUCTION and prompt_with_special_token.
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == (
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    )
    assert hashlib.sha256(SUFFIX.encode()).hexdigest() == (
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    )
    assert SUFFIX == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def test_clip_score_is_the_mean_of_the_best_capped_frames(release):
    assert frame_indices(121, 5) == [0, 30, 60, 90, 120]  # OmniNFT's authors' round(i * (F - 1) / 4)
    assert frame_indices(9, 5) == [0, 2, 4, 6, 8]
    assert frame_indices(7, 5) == [0, 2, 3, 4, 6]  # round half to even, as Python's round
    clips = torch.stack([uint8_frames(9, 56, 84, seed=3), uint8_frames(9, 56, 84, seed=4)])
    prompts = [p for p in PROMPTS for _ in range(5)]
    mu = release.judge.rate(clips[:, [0, 2, 4, 6, 8]].flatten(0, 1), prompts)[:, 0].view(2, 5)
    cap = mu.flatten().sort().values[7].item()  # the 3 best frames of 10 are capped
    judge = HPSv3Judge(release.judge.backbone, release.judge.head, PIXELS, num_frames=5, top_k=2, cap=cap)
    expected = torch.stack([row.clamp(max=cap).sort(descending=True).values[:2].mean() for row in mu])
    scores = judge.score(clips, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=2e-5, rtol=0)
    assert scores[0] != scores[1]
    torch.testing.assert_close(judge.score(clips, PROMPTS), scores, atol=0, rtol=0)  # deterministic
    # Per sample (no cross-talk between the batch's sequences) and moved by the prompt (the release's cap, 15, is
    # above these mu): the first clip alone with another prompt, against its uncapped score.
    alone = release.judge.score(clips[:1], PROMPTS[:1])
    torch.testing.assert_close(alone[0], mu[0].sort(descending=True).values[:2].mean(), atol=2e-5, rtol=0)
    assert (release.judge.score(clips[:1], ("an empty room at night",)) - alone).abs() > 1e-4


def test_config_entry_scores_the_rollout(release):
    args = {"path": str(release.weights), "base": str(release.base), "pixels": PIXELS, "dtype": "float32"}
    (reward,) = build_rewards([RewardSpec(name="hpsv3", args=dict(args, top_k=1, cap=None))])
    assert isinstance(reward, HPSv3Score) and reads_media([reward]) == {"frames"}
    clips = torch.stack([uint8_frames(9, 56, 84, seed=5), uint8_frames(9, 56, 84, seed=6)])
    scores = score_rewards([reward], media_rollout(frames=clips, prompts=PROMPTS))["hpsv3"]
    mu = torch.stack([release.judge.rate(clip[[0, 2, 4, 6, 8]], [p] * 5)[:, 0] for clip, p in zip(clips, PROMPTS)])
    torch.testing.assert_close(scores, mu.max(dim=1).values, atol=1e-6, rtol=0)


def test_loader_names_the_file_and_keys_that_do_not_fit(release, tmp_path):
    def attempt(state: dict) -> str:
        path = tmp_path / f"broken{len(list(tmp_path.iterdir()))}.safetensors"
        safetensors.save_file(state, str(path))
        with pytest.raises(CheckpointError) as error:
            load_hpsv3(path, release.base, pixels=PIXELS, dtype=torch.float32)
        assert path.name in str(error.value) and "\n" not in str(error.value)
        return str(error.value)

    state = release.state
    assert "5.bias" in attempt({k: v for k, v in state.items() if k != "rm_head.5.bias"})
    assert "visual.merger.extra" in attempt({**state, "visual.merger.extra": torch.zeros(1)})
    assert "lm_head.weight" in attempt({k: v for k, v in state.items() if k != "lm_head.weight"})
    mis_shaped = {**state, "model.norm.weight": torch.zeros(65)}
    assert "language_model.norm.weight (65,) != (64,)" in attempt(mis_shaped)
    grown = {**state, "model.embed_tokens.weight": torch.zeros(len(release.tokenizer) + 1, 64)}
    assert "tokenizer" in attempt(grown)
    (tmp_path / "not.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hpsv3(tmp_path / "not.safetensors", release.base)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_hpsv3(tmp_path / "missing.safetensors", release.base)
    with pytest.raises(CheckpointError, match="lacks config.json, preprocessor_config.json"):
        load_hpsv3(release.weights, release.weights.parent)
    with pytest.raises(ConfigError, match="top_k"):
        build_rewards([RewardSpec(name="hpsv3", args={"path": "x", "base": "y", "top_k": 6})])


def test_random_builder_runs_at_a_given_shape():
    """random_hpsv3 (at the tiny shape here; the bench uses the real 7B) with its word-level tokenizer."""
    config = tiny.real_ids_config()
    torch.manual_seed(0)
    judge = random_hpsv3("cpu", torch.float32, config=config, pixels=PIXELS)
    clips = torch.stack([uint8_frames(9, 56, 84, seed=7), uint8_frames(9, 56, 84, seed=8)])
    scores = judge.score(clips, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
