"""The VideoAlign (VideoReward) reward on a tiny random Qwen2-VL saved as the release lays it out: the base directory
(config.json, preprocessor_config.json, tokenizer) and checkpoint-*/model.pth, a PEFT LoRA-wrapped state dict made
by peft itself from the release's recipe. The reference is peft's own (unmerged) LoRA forward in transformers'
Qwen2VLModel with the texts expanded the processor's way and the head read the release's way."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.errors import CheckpointError, ConfigError
from engine.rewards import build_rewards, reads_media, score_rewards
from engine.rewards.base import RewardSpec
from engine.rewards.qwen2vl import CHAT, VIDEO_PAD, Patches, patchify, smart_resize, to_pixels
from engine.rewards.videoalign import (
    PROMPT,
    REWARD_TOKENS,
    VideoAlignJudge,
    VideoAlignScore,
    load_videoalign,
    random_videoalign,
    sample_frames,
)
from tests.engine.rewards import qwen2vl_tiny as tiny
from tests.engine.rewards.rollouts import media_rollout

peft = pytest.importorskip("peft")
transformers = tiny.transformers

CALIBRATION = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 1.5}
PROMPTS = ("a red fox runs through snow", "a blue car parks by a lake")
SOURCE_FPS = 4.0  # a 9-frame clip at 4 fps is sampled to 4 frames at 2 fps


@dataclass
class Release:
    directory: Path  # model_config.json, checkpoint-7/model.pth
    base: Path
    tokenizer: object
    reference: nn.Module  # Qwen2VLModel whose language-model Linears carry peft's (unmerged) LoRA
    head: nn.Linear
    judge: VideoAlignJudge


def model_config(alpha: float) -> dict:
    """The release's model_config.json, the fields a loader reads (calibration made up)."""
    return {
        "data_config": {
            "fps": 2.0,
            "max_frame_pixels": 200704,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {"output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": alpha, "use_rslora": False},
        "inference_config": CALIBRATION,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    """The tiny release: the backbone wrapped as transformers 4.45's reward model (model / visual / lm_head / rm_head)
    with LoRA (r=4, alpha=8) on every language-model Linear, as the release's recipe targets them, B made non-zero."""
    root = tmp_path_factory.mktemp("videoalign")
    tok, config = tiny.write_base(root / "base")
    tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})  # what the release's training did
    rows = len(tok)
    model = tiny.backbone(config, rows, seed=0)
    wrapped = nn.Module()
    wrapped.model, wrapped.visual = model.language_model, model.visual
    wrapped.lm_head = nn.Linear(64, rows, bias=False)
    wrapped.rm_head = nn.Linear(64, 1, bias=False)
    excluded = ("lm_head", "rm_head", "embed_tokens", "visual")
    targets = [
        name
        for name, module in wrapped.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and not any(word in name for word in excluded)
    ]
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets, bias="none")
    peft_model = peft.get_peft_model(wrapped, lora).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "rm_head" in name:
                param.normal_(0, 0.3)
    (root / "release" / "checkpoint-7").mkdir(parents=True)
    torch.save(peft_model.state_dict(), root / "release" / "checkpoint-7" / "model.pth")
    (root / "release" / "model_config.json").write_text(json.dumps(model_config(alpha=8)))
    judge = load_videoalign(root / "release", root / "base", dtype=torch.float32)
    return Release(root / "release", root / "base", tok, model, wrapped.rm_head, judge)


def reference_ratings(release: Release, frames: torch.Tensor, prompts, flat: bool = True) -> torch.Tensor:
    """(N, 3) calibrated ratings the release's way: the processor's text (placeholder repeated as a string, then
    tokenised), transformers' forward with peft's LoRA layers, rm_head at the special tokens in sequence order."""
    patches = Patches()
    index = sample_frames(frames.shape[1], SOURCE_FPS, 2.0, 2)
    size = smart_resize(frames.shape[2], frames.shape[3], 28, 128 * 28 * 28, 200704)
    cut = [patchify(to_pixels(clip[index], size, separable=False), patches) for clip in frames]
    texts = [
        tiny.expand_placeholder(CHAT.format(vision=VIDEO_PAD, text=PROMPT.format(text_prompt=p)), VIDEO_PAD, n)
        for p, n in zip(prompts, [patches.tokens(grid) for _, grid in cut])
    ]
    batch = release.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids = batch["input_ids"]
    vision = {
        "pixel_values_videos": torch.cat([r for r, _ in cut]),
        "video_grid_thw": torch.tensor([g for _, g in cut]),
    }
    if flat:
        positions = {"position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    else:  # transformers 5's own 3-D M-RoPE positions
        positions = {"mm_token_type_ids": (ids == release.tokenizer.convert_tokens_to_ids(VIDEO_PAD)).int() * 2}
    with torch.no_grad():
        hidden = release.reference(input_ids=ids, attention_mask=batch["attention_mask"], **vision, **positions)
        logits = release.head(hidden.last_hidden_state)  # (N, L, 1)
    special = torch.zeros_like(ids, dtype=torch.bool)
    for token in release.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)):
        special |= ids == token
    raw = logits[special].view(len(prompts), 3)
    mean = torch.tensor([CALIBRATION[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
    std = torch.tensor([CALIBRATION[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
    return (raw - mean) / std


def test_release_loads_and_rates_as_peft_and_transformers_445_do(release):
    """The merged, renamed checkpoint gives peft's unmerged forward's ratings; transformers 5's 3-D positions
    would not (the position ids are what the checkpoint learnt with)."""
    frames = tiny.clips(2, 9, 56, 84, seed=1)
    ours = release.judge.ratings(frames, SOURCE_FPS, PROMPTS)
    expected = reference_ratings(release, frames, PROMPTS)
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)
    assert (expected - reference_ratings(release, frames, PROMPTS, flat=False)).abs().max() > 1e-3


def test_flat_positions_are_a_one_dimensional_rope(release):
    """transformers 4.45's forward: token embeddings with the vision features scattered in, then a decoder with
    ordinary 1-D RoPE (transformers' Qwen2Model with the same weights): our hidden states are its."""
    frames = tiny.clips(1, 4, 56, 56, seed=2)
    backbone = release.judge.backbone
    rows, grid = patchify(to_pixels(frames[0], (280, 364), separable=False), backbone.patches)
    text = CHAT.format(vision=VIDEO_PAD, text="rate it <|VQ_reward|>")
    ids, mask = backbone.encode([text], VIDEO_PAD, [backbone.patches.tokens(grid)])
    ours = backbone.hidden_states(ids, mask, rows, torch.tensor([grid]), video=True)

    model = backbone.model
    text_config = model.config.text_config
    qwen2 = transformers.Qwen2Model(
        transformers.Qwen2Config(
            vocab_size=text_config.vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
        )
    ).eval()
    qwen2.load_state_dict(model.language_model.state_dict())
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        video = model.visual(rows, grid_thw=torch.tensor([grid])).pooler_output
        embeds[ids == model.config.video_token_id] = video
        expected = qwen2(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_frames_are_sampled_and_sized_as_the_release_does():
    # The paper's clip, 121 frames at 24 fps and 512x768: 10 frames at 2 fps, 364x532, 1235 video tokens.
    assert sample_frames(121, 24.0, 2.0, 2).tolist() == [0, 13, 27, 40, 53, 67, 80, 93, 107, 120]
    assert smart_resize(512, 768, 28, 128 * 28 * 28, 200704) == (364, 532)
    assert Patches().tokens((5, 26, 38)) == 1235
    assert len(sample_frames(121, 24.0, 24.0, 2)) == 120  # OmniNFT's authors' fps=24: every frame but one
    assert sample_frames(9, SOURCE_FPS, 2.0, 2).tolist() == [0, 3, 5, 8]  # at least 4 frames, evenly spaced
    assert smart_resize(56, 84, 28, 128 * 28 * 28, 200704) == (280, 392)  # small frames are scaled up
    with pytest.raises(ValueError, match="too short"):
        sample_frames(1, 24.0, 2.0, 2)


def test_patchify_orders_rows_as_the_vision_encoder_merges_them():
    """Row i is the patch at (time slice, merge block row-major, patch within the block row-major); its features are
    channel, frame, pixel row, pixel column. 3 frames: the last is repeated to fill the second time slice."""
    pixels = torch.randint(0, 256, (3, 3, 56, 84), generator=torch.Generator().manual_seed(0)).float()
    patches = Patches()
    rows, grid = patchify(pixels, patches)
    assert grid == (2, 4, 6) and rows.shape == (48, 3 * 2 * 14 * 14)
    mean, std = torch.tensor(patches.mean).view(1, 3, 1, 1), torch.tensor(patches.std).view(1, 3, 1, 1)
    frames = (pixels / 255 - mean) / std
    frames = torch.cat([frames, frames[-1:]])
    i = 0
    for t in range(2):
        for block_y in range(2):
            for block_x in range(3):
                for y in range(2):
                    for x in range(2):
                        top, left = (2 * block_y + y) * 14, (2 * block_x + x) * 14
                        patch = frames[2 * t : 2 * t + 2, :, top : top + 14, left : left + 14].transpose(0, 1)
                        torch.testing.assert_close(rows[i], patch.reshape(-1), atol=1e-6, rtol=0)
                        i += 1


def test_prompt_is_the_release_text_inside_qwen2_vl_chat(release):
    # sha256 of prompt_template.py's DETAILED_PROMPT_WITH_SPECIAL_TOKEN in KwaiVGI/VideoAlign (219ab9d).
    assert hashlib.sha256(PROMPT.encode()).hexdigest() == (
        "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    )
    backbone = release.judge.backbone
    ids, mask = backbone.encode(
        [CHAT.format(vision=VIDEO_PAD, text=PROMPT.format(text_prompt="a fox"))], VIDEO_PAD, [3]
    )
    assert mask.all()
    assert release.tokenizer.decode(ids[0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|video_pad|>" * 3
        + "<|vision_end|>"
        + PROMPT.replace("{text_prompt}", "a fox")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_scores_are_deterministic_per_sample_and_react_to_frames_and_prompt(release):
    judge = release.judge
    frames = tiny.clips(2, 9, 56, 84, seed=3)
    both = judge.ratings(frames, SOURCE_FPS, PROMPTS)
    torch.testing.assert_close(judge.ratings(frames, SOURCE_FPS, PROMPTS), both, atol=0, rtol=0)
    alone = judge.ratings(frames[1:], SOURCE_FPS, PROMPTS[1:])
    torch.testing.assert_close(alone[0], both[1], atol=2e-5, rtol=0)  # right padding and causality: no cross-talk
    variants = torch.stack([frames[0], frames[0].flip(1)])  # (other prompt, same frames), (same prompt, mirrored)
    other_prompt, other_frames = judge.ratings(variants, SOURCE_FPS, ("an empty room at night", PROMPTS[0]))
    # The prompt comes after the VQ and MQ tokens (causal attention): only TA reads it; the frames move all three.
    torch.testing.assert_close(other_prompt[:2], both[0, :2], atol=2e-5, rtol=0)
    assert (other_prompt[2] - both[0, 2]).abs() > 1e-3
    assert (other_frames - both[0]).abs().min() > 1e-3
    # The default reward: (VQ + TA) / 2 of the calibrated ratings.
    torch.testing.assert_close(judge.score(frames, SOURCE_FPS, PROMPTS), (both[:, 0] + both[:, 2]) / 2)


def test_config_entry_scores_the_rollout(release):
    args = {"path": str(release.directory), "base": str(release.base), "dtype": "float32"}
    spec = RewardSpec(name="videoalign", weight=2.0, args=dict(args, dimensions={"MQ": 1.0}))
    (reward,) = build_rewards([spec])
    assert isinstance(reward, VideoAlignScore) and reward.weight == 2.0
    assert reads_media([reward]) == {"frames"}
    frames = tiny.clips(2, 9, 56, 84, seed=4)
    rollout = media_rollout(frames=frames, prompts=PROMPTS, fps=SOURCE_FPS)
    scores = score_rewards([reward], rollout)["videoalign"]
    torch.testing.assert_close(scores, release.judge.ratings(frames, SOURCE_FPS, PROMPTS)[:, 1])


def test_loader_names_the_file_and_keys_that_do_not_fit(release, tmp_path):
    state = torch.load(release.directory / "checkpoint-7" / "model.pth", weights_only=True)

    def attempt(edit, directory=None) -> str:
        broken = tmp_path / f"release{len(list(tmp_path.iterdir()))}"
        (broken / "checkpoint-3").mkdir(parents=True)
        shutil.copy(release.directory / "model_config.json", broken)
        torch.save(edit(dict(state)), broken / "checkpoint-3" / "model.pth")
        with pytest.raises(CheckpointError) as error:
            load_videoalign(directory or broken, release.base, dtype=torch.float32)
        return str(error.value)

    norm = "base_model.model.model.norm.weight"
    message = attempt(lambda s: {k: v for k, v in s.items() if k != norm})
    assert "checkpoint-3/model.pth" in message and "language_model.norm.weight" in message and "\n" not in message
    message = attempt(lambda s: {**s, "base_model.model.visual.extra.weight": torch.zeros(1)})
    assert "visual.extra.weight" in message
    lora_b = "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"
    assert "model.layers.0.mlp.up_proj" in attempt(lambda s: {k: v for k, v in s.items() if k != lora_b})
    assert "PEFT" in attempt(lambda s: {k.removeprefix("base_model.model."): v for k, v in s.items()})
    head = "base_model.model.rm_head.weight"
    assert "rm_head" in attempt(lambda s: {**s, head: torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match="lacks model_config.json"):
        load_videoalign(tmp_path, release.base)
    with pytest.raises(CheckpointError, match="lacks checkpoint-9/model.pth"):
        load_videoalign(release.directory, release.base, checkpoint="checkpoint-9")
    with pytest.raises(ConfigError, match="dimensions"):
        build_rewards([RewardSpec(name="videoalign", args={"path": "x", "base": "y", "dimensions": {"XQ": 1}})])


def test_random_builder_runs_at_a_given_shape():
    """random_videoalign (at the tiny shape here; the bench uses the real 2B) with its word-level tokenizer."""
    config = tiny.real_ids_config()
    torch.manual_seed(0)
    judge = random_videoalign("cpu", torch.float32, config=config)
    scores = judge.score(tiny.clips(2, 9, 56, 84, seed=5), SOURCE_FPS, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
