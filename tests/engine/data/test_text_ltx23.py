"""LTX-2.3 text conditioning against diffusers' LTX2Pipeline on tiny random components (fp32): the contexts our
cache and connectors give equal what the 2.3-configured pipeline (per-modality projections in the connectors,
a DiT without caption projection) hands its transformer, from a diffusers folder and from the official single
file; 2.3 is read from the weights' own config; the cache point, the fingerprint and the strict loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.data.cache import EmbeddingCache
from engine.data.conditioning import StandInConditioning, TextConditioning
from engine.data.text import (
    ContextConnectors,
    PromptEncoder,
    TextConfig,
    _official_connector_config,
    load_connectors,
    official_is_ltx23,
)
from engine.errors import CheckpointError
from engine.sampler import ltx2_sigmas

from ..rewards import tiny_decoders
from . import tiny_ltx2, tiny_ltx23

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a dog barks", "  rain, at night  ", "a very long prompt the tokenizer must truncate"]
NEGATIVES = ["", "blurry", "silent"]
WIDTHS = (tiny_ltx23.VIDEO_WIDTH, tiny_ltx23.AUDIO_WIDTH)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx23")
    gemma, tok, conn = tiny_ltx2.gemma(), tiny_ltx2.tokenizer(), tiny_ltx23.connectors()
    folder = tiny_ltx23.write_pipeline(root / "pipe", gemma, tok, conn)
    official = tiny_ltx23.write_official(root / "ltx-2.3-tiny.safetensors", conn)
    return dict(root=root, folder=folder, official=official, gemma=gemma, tok=tok, conn=conn)


def _config(parts, source, **kw) -> TextConfig:
    return TextConfig(
        encoder=str(parts["folder"]), connectors=str(source), max_length=tiny_ltx2.MAX_LENGTH, dtype="float32", **kw
    )


def _pipeline_contexts(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a 2.3-configured LTX2Pipeline passes its transformer on the first step under CFG: the video and audio
    contexts of cat([negative, positive]) and their mask (the denoising output is not used)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    transformer = tiny_ltx23.dit()
    pipe = diffusers.LTX2Pipeline(
        scheduler=scheduler,
        vae=tiny_ltx23.video_vae(),
        audio_vae=tiny_decoders.audio_vae(),
        text_encoder=parts["gemma"],
        tokenizer=parts["tok"],
        connectors=parts["conn"],
        transformer=transformer,
        vocoder=tiny_ltx23.vocoder(),
    )
    seen = []
    handle = transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    sigmas = ltx2_sigmas(2)
    with torch.no_grad():
        pipe(
            prompt=PROMPTS,
            negative_prompt=NEGATIVES,
            height=64,
            width=64,
            num_frames=9,
            frame_rate=24.0,
            sigmas=sigmas[:-1].tolist(),
            num_inference_steps=len(sigmas) - 1,
            guidance_scale=3.0,
            audio_guidance_scale=7.0,
            **tiny_ltx2.PIPELINE_EXTRAS_OFF,
            max_sequence_length=tiny_ltx2.MAX_LENGTH,
            output_type="latent",
            return_dict=False,
        )
    handle.remove()
    first = seen[0]
    return first["encoder_hidden_states"], first["audio_encoder_hidden_states"], first["encoder_attention_mask"]


@pytest.fixture(scope="module")
def reference(parts):
    return _pipeline_contexts(parts)


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_contexts_equal_what_the_pipeline_gives_its_transformer(parts, reference, layout) -> None:
    """Connectors from the pipeline folder or from the official file, Gemma from the folder; the rows go through
    the embedding cache (as in training) and come back as the contexts the 2.3 DiT cross-attends to."""
    ref_video, ref_audio, ref_mask = reference
    assert ref_video.shape == (6, tiny_ltx2.MAX_LENGTH, WIDTHS[0]) and ref_audio.shape[-1] == WIDTHS[1]
    assert bool(ref_mask.all()) and ref_video.abs().max() > 0.1 and ref_audio.abs().max() > 0.1
    source = parts["folder"] if layout == "diffusers" else parts["official"]
    cpu = torch.device("cpu")
    text = TextConditioning(
        _config(parts, source, cache=str(parts["root"] / f"cache-{layout}")), None, PROMPTS + NEGATIVES, cpu
    )
    assert text.context_channels == WIDTHS and text.caption_channels == tiny_ltx2.CAPTION
    negative, positive = text.contexts(NEGATIVES, cpu, torch.float32), text.contexts(PROMPTS, cpu, torch.float32)
    video, audio = (torch.cat([n, p]) for n, p in zip(negative, positive))
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-5)
    torch.testing.assert_close(audio, ref_audio, rtol=0, atol=1e-5)


def test_cache_point_is_both_projections_of_the_real_tokens(parts) -> None:
    """The cache holds, per prompt, the real tokens' video and audio projections side by side (32 + 16 features
    here, 4096 + 2048 in the release): what LTX2TextConnectors computes before its connectors, on those rows."""
    from diffusers.pipelines.ltx2.connectors import per_token_rms_norm

    cfg = _config(parts, parts["official"], cache=str(parts["root"] / "cache-point"))
    text = TextConditioning(cfg, None, PROMPTS, torch.device("cpu"))
    rows = [text.cache.get(p) for p in PROMPTS]
    assert [tuple(r.shape) for r in rows] == [(12, 48), (15, 48), (16, 48)]  # BOS + characters; truncated
    encoder = PromptEncoder.load(cfg, load_connectors(parts["official"]))
    assert (encoder.caption_channels, encoder.feature_channels) == (tiny_ltx2.CAPTION, sum(WIDTHS))
    states, mask = encoder.hidden_states(PROMPTS[:1])
    conn = parts["conn"]
    normed = per_token_rms_norm(states.unflatten(2, (tiny_ltx2.CAPTION, -1))).flatten(2, 3)[mask.bool()]
    with torch.no_grad():
        video = conn.video_text_proj_in(normed * (WIDTHS[0] / tiny_ltx2.CAPTION) ** 0.5)
        audio = conn.audio_text_proj_in(normed * (WIDTHS[1] / tiny_ltx2.CAPTION) ** 0.5)
    torch.testing.assert_close(rows[0], torch.cat([video, audio], dim=-1), rtol=0, atol=1e-6)


def test_ltx23_is_read_from_the_weights_config(parts, tmp_path) -> None:
    """The official header's text-path keys (ltx-core's detection) or the folder's per_modality_projections, not
    the tensors: a 2.3 file without those keys is read as 2.0 and fails on its missing 2.0 projection; keys
    half-way between the releases are named."""
    official, folder = load_connectors(parts["official"]), load_connectors(parts["folder"])
    assert official.config.per_modality_projections and folder.config.per_modality_projections
    assert official.config.video_gated_attn and official.config.audio_connector_num_layers == 3
    a, b = official.state_dict(), folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    state = tiny_ltx23.official_state(parts["conn"])
    bare = tiny_ltx23.header(parts["conn"])
    for key in ("caption_proj_before_connector", "caption_projection_first_linear"):
        bare["transformer"].pop(key)
    save_file(state, str(tmp_path / "partial.safetensors"), metadata={"config": json.dumps(bare)})
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: the header's text-path keys .*<absent>"):
        load_connectors(tmp_path / "partial.safetensors")
    for key in ("caption_projection_second_linear", "caption_proj_input_norm"):
        bare["transformer"].pop(key)
    save_file(state, str(tmp_path / "v1.safetensors"), metadata={"config": json.dumps(bare)})
    with pytest.raises(CheckpointError, match=r"v1\.safetensors: the LTX-2\.0 text projection .*aggregate_embed"):
        load_connectors(tmp_path / "v1.safetensors")
    assert not official_is_ltx23({}, "x") and official_is_ltx23(tiny_ltx23.header(parts["conn"])["transformer"], "x")


def test_release_header_gives_the_conversion_scripts_connectors() -> None:
    """The released 2.3 file's `transformer` header (as third-party loaders quote it) with tensors of the
    release's shapes (on the meta device) gives the connectors config of diffusers' conversion script for 2.3."""
    header = {
        "caption_channels": 3840,
        "num_attention_heads": 32,
        "attention_head_dim": 128,
        "audio_num_attention_heads": 32,
        "audio_attention_head_dim": 64,
        "connector_attention_head_dim": 128,
        "connector_num_attention_heads": 32,
        "connector_num_layers": 8,
        "connector_positional_embedding_max_pos": [4096],
        "connector_num_learnable_registers": 128,
        "connector_norm_output": True,
        "connector_apply_gated_attention": True,
        "caption_projection_first_linear": False,
        "caption_projection_second_linear": False,
        "caption_proj_input_norm": False,
        "caption_proj_before_connector": True,
        "audio_connector_attention_head_dim": 64,
        "audio_connector_num_attention_heads": 32,
        "text_encoder_norm_type": "per_token_rms",
        "rope_type": "split",
        "frequencies_precision": "float64",
        "positional_embedding_theta": 10000.0,
    }
    with torch.device("meta"):
        state = {
            "video_text_proj_in.weight": torch.empty(4096, 3840 * 49),
            "audio_text_proj_in.weight": torch.empty(2048, 3840 * 49),
        }
    config = _official_connector_config(state, header, "ltx-2.3.safetensors")
    script = dict(  # scripts/convert_ltx2_to_diffusers.py, get_ltx2_connectors_config("2.3")
        caption_channels=3840,
        text_proj_in_factor=49,
        video_connector_num_attention_heads=32,
        video_connector_attention_head_dim=128,
        video_connector_num_layers=8,
        video_connector_num_learnable_registers=128,
        video_gated_attn=True,
        audio_connector_num_attention_heads=32,
        audio_connector_attention_head_dim=64,
        audio_connector_num_layers=8,
        audio_connector_num_learnable_registers=128,
        audio_gated_attn=True,
        connector_rope_base_seq_len=4096,
        rope_theta=10000.0,
        rope_double_precision=True,
        rope_type="split",
        per_modality_projections=True,
        video_hidden_dim=4096,
        audio_hidden_dim=2048,
        proj_bias=True,
    )
    assert config == script


def test_fingerprint_covers_both_projections(parts, tmp_path) -> None:
    """A 2.3 encoding is keyed apart from a 2.0 one with the same Gemma, and by each projection's weights and
    bias: a different audio bias alone is another cache."""
    cpu = torch.device("cpu")
    fp = TextConditioning(_config(parts, parts["official"]), None, [], cpu).fingerprint
    assert fp == TextConditioning(_config(parts, parts["folder"]), None, [], cpu).fingerprint
    v20 = tiny_ltx2.write_official(tmp_path / "ltx-2.safetensors", tiny_ltx2.connectors())
    assert fp != TextConditioning(_config(parts, v20), None, [], cpu).fingerprint
    other = tiny_ltx23.connectors()
    with torch.no_grad():
        other.audio_text_proj_in.bias[0] += 1.0
    path = tiny_ltx23.write_official(tmp_path / "other.safetensors", other)
    assert fp != TextConditioning(_config(parts, path), None, [], cpu).fingerprint


def test_strict_loading_names_every_problem(parts, tmp_path) -> None:
    state = tiny_ltx23.official_state(parts["conn"])
    state.pop("text_embedding_projection.audio_aggregate_embed.bias")
    state["model.diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.attn1.extra"] = torch.zeros(1)
    state["model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.1.attn1.to_gate_logits.weight"] = (
        torch.zeros(3, 32)
    )
    header = tiny_ltx23.header(parts["conn"])
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(header)})
    with pytest.raises(CheckpointError) as e:
        load_connectors(tmp_path / "bad.safetensors")
    message = str(e.value)
    assert "bad.safetensors does not fit the text connectors (3 problem(s))" in message
    assert "missing: audio_text_proj_in.bias (16,)" in message
    assert "unexpected: audio_connector.transformer_blocks.0.attn1.extra (1,)" in message
    assert "shape: video_connector.transformer_blocks.1.attn1.to_gate_logits.weight is (3, 32), expected (4, 32)" in (
        message
    )
    header["transformer"]["connector_attention_head_dim"] = 4  # a video connector narrower than its projection
    save_file(
        tiny_ltx23.official_state(parts["conn"]),
        str(tmp_path / "narrow.safetensors"),
        metadata={"config": json.dumps(header)},
    )
    with pytest.raises(CheckpointError, match="config: the video connector is 16 wide .* but its input 32"):
        load_connectors(tmp_path / "narrow.safetensors")


def test_context_widths_and_stand_ins(parts) -> None:
    connectors = ContextConnectors(load_connectors(parts["folder"]), tiny_ltx2.MAX_LENGTH)
    assert connectors.context_channels == WIDTHS and connectors.channels == sum(WIDTHS)
    with pytest.raises(ValueError, match="prompt features are 32 wide; these connectors read 48"):
        connectors([torch.zeros(3, 32)], torch.device("cpu"), torch.float32)
    video, audio = StandInConditioning(4, 32, audio_channels=16).contexts(
        ["a", "b"], torch.device("cpu"), torch.float32
    )
    assert video.shape == (2, 4, 32) and audio.shape == (2, 4, 16)
    same = StandInConditioning(4, 32)
    assert same.context_channels == (32, 32)
    v, a = same.contexts(["a"], torch.device("cpu"), torch.float32)
    assert torch.equal(v, a) and torch.equal(v[0], video[0])


def test_a_cache_written_once_is_read_by_a_run_without_gemma(parts, tmp_path) -> None:
    cpu = torch.device("cpu")
    cfg = _config(parts, parts["folder"], cache=str(tmp_path / "c"))
    first = TextConditioning(cfg, None, PROMPTS, cpu)
    assert EmbeddingCache(cfg.cache, first.fingerprint).missing(PROMPTS) == []
    again = TextConditioning(_config(parts, parts["folder"], cache=cfg.cache, on_missing="error"), None, PROMPTS, cpu)
    a, b = first.contexts(PROMPTS, cpu, torch.float32), again.contexts(PROMPTS, cpu, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
