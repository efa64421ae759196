"""Text conditioning against diffusers' LTX2Pipeline on tiny random Gemma 3 + connectors (fp32):
the encoder, the connectors from both weight layouts, the embedding cache, and the errors."""

from __future__ import annotations

import pytest
import torch

from engine.data.cache import EmbeddingCache
from engine.data.conditioning import TextConditioning
from engine.data.text import ContextConnectors, PromptEncoder, TextConfig, load_connectors
from engine.errors import CheckpointError, ConfigError, DataError

from . import tiny_ltx2

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a dog barks twice", "  rain on a tin roof, at night  ", "waves"]
LONG = "a very long prompt that the tokenizer must truncate on the right"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2")
    gemma, tok, conn = tiny_ltx2.gemma(), tiny_ltx2.tokenizer(), tiny_ltx2.connectors()
    pipe_dir = tiny_ltx2.write_pipeline(root / "pipe", gemma, tok, conn)
    official = tiny_ltx2.write_official(root / "ltx-2-tiny.safetensors", conn)
    gemma.save_pretrained(root / "gemma-3")  # a Gemma 3 directory: model and tokenizer side by side
    tok.save_pretrained(root / "gemma-3")
    pipe = diffusers.LTX2Pipeline(
        scheduler=None,
        vae=None,
        audio_vae=None,
        text_encoder=gemma,
        tokenizer=tok,
        connectors=conn,
        transformer=None,
        vocoder=None,
    )
    return dict(root=root, pipe_dir=pipe_dir, official=official, pipe=pipe, conn=conn, gemma_dir=root / "gemma-3")


def _reference(pipe, prompts: list[str], negative: list[str]) -> tuple[torch.Tensor, ...]:
    """What LTX2Pipeline feeds its transformer under CFG: cat([negative, positive]) through the connectors."""
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            prompts,
            negative_prompt=negative,
            do_classifier_free_guidance=True,
            max_sequence_length=tiny_ltx2.MAX_LENGTH,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        video, audio, mask = pipe.connectors(
            torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask]), padding_side=pipe.tokenizer.padding_side
        )
    assert bool(mask.all())  # the registers fill every padded position
    return video, audio


def _config(parts, source: str, encoder: str | None = None, **kw) -> TextConfig:
    return TextConfig(
        encoder=encoder or str(parts["pipe_dir"]),
        connectors=source,
        max_length=tiny_ltx2.MAX_LENGTH,
        dtype="float32",
        **kw,
    )


@pytest.mark.parametrize("layout", ["diffusers", "official", "gemma-dir"])
def test_contexts_equal_the_pipeline(parts, layout) -> None:
    """Encoder and connectors from a pipeline folder; connectors from the official file; the encoder
    from a plain Gemma 3 directory (with the official file's connectors)."""
    source = str(parts["pipe_dir"] if layout == "diffusers" else parts["official"])
    cfg = _config(parts, source, encoder=str(parts["gemma_dir"]) if layout == "gemma-dir" else None)
    conn = load_connectors(source, torch.float32)
    encoder = PromptEncoder.load(cfg, conn)
    prompts, negative = [*PROMPTS, LONG], ["", "blurry", "", "silent"]
    rows = encoder.encode(negative + prompts)
    assert [r.shape[0] for r in rows][:2] == [1, 7]  # "" is BOS alone; "blurry" is BOS + 6 characters
    assert rows[-1].shape[0] == tiny_ltx2.MAX_LENGTH  # truncated on the right
    video, audio = ContextConnectors(conn, cfg.max_length)(rows, torch.device("cpu"), torch.float32)
    ref_video, ref_audio = _reference(parts["pipe"], prompts, negative)
    assert video.shape == (8, tiny_ltx2.MAX_LENGTH, tiny_ltx2.CAPTION)
    assert ref_video.abs().max() > 0.1 and not torch.allclose(ref_video, ref_audio)
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-5)
    torch.testing.assert_close(audio, ref_audio, rtol=0, atol=1e-5)


def test_official_and_diffusers_connectors_are_the_same_weights(parts) -> None:
    a = load_connectors(parts["official"]).state_dict()
    b = load_connectors(parts["pipe_dir"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conditioning_encodes_into_the_cache_then_reads_it(parts, tmp_path) -> None:
    cfg = _config(parts, str(parts["official"]), cache=str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    first = TextConditioning(cfg, None, PROMPTS, cpu)
    cache = EmbeddingCache(cfg.cache, first.fingerprint)
    assert cache.missing(PROMPTS) == []
    strict = TextConditioning(
        _config(parts, str(parts["official"]), cache=cfg.cache, on_missing="error"), None, PROMPTS, cpu
    )
    in_memory = TextConditioning(_config(parts, str(parts["official"])), None, PROMPTS, cpu)
    a = strict.contexts(PROMPTS, cpu, torch.float32)
    b = in_memory.contexts(PROMPTS, cpu, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ref_video, ref_audio = _reference(parts["pipe"], [p.strip() for p in PROMPTS], [""] * 3)
    torch.testing.assert_close(a[0], ref_video[3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], ref_audio[3:], rtol=0, atol=1e-5)


def test_missing_prompt_with_on_missing_error_names_the_command(parts, tmp_path) -> None:
    cfg = _config(parts, str(parts["official"]), cache=str(tmp_path / "empty"), on_missing="error")
    with pytest.raises(DataError, match=r"3 prompt\(s\) are not encoded .*omninft encode-prompts"):
        TextConditioning(cfg, None, PROMPTS, torch.device("cpu"))


def test_another_projection_is_another_fingerprint(parts, tmp_path) -> None:
    cpu = torch.device("cpu")
    cfg = _config(parts, str(parts["official"]))
    other = tiny_ltx2.connectors(seed=5)
    path = tiny_ltx2.write_official(tmp_path / "other.safetensors", other)
    fp_a = TextConditioning(cfg, None, [], cpu).fingerprint
    fp_b = TextConditioning(_config(parts, str(path)), None, [], cpu).fingerprint
    fp_c = TextConditioning(_config(parts, str(parts["pipe_dir"])), None, [], cpu).fingerprint
    assert fp_a != fp_b and fp_a == fp_c


def test_connector_loading_lists_every_bad_key(parts, tmp_path) -> None:
    from safetensors.torch import save_file

    state = tiny_ltx2.official_connector_state(parts["conn"])
    state.pop("model.diffusion_model.audio_embeddings_connector.learnable_registers")
    state["model.diffusion_model.video_embeddings_connector.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_connectors(tmp_path / "bad.safetensors")
    assert "missing: audio_connector.learnable_registers" in str(e.value)
    assert "unexpected: video_connector.extra.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="holds no text connectors"):
        save_file({"vae.x": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
        load_connectors(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers connectors folder"):
        load_connectors(tmp_path)


def test_config_errors(parts, tmp_path) -> None:
    with pytest.raises(ConfigError, match="text.encoder: .* does not exist"):
        TextConfig(encoder=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="text.connectors: set it"):
        TextConditioning(TextConfig(encoder=str(parts["pipe_dir"])), None, [], torch.device("cpu"))
    conn = load_connectors(parts["official"])
    with pytest.raises(ConfigError, match="multiple of the connectors' 8 registers"):
        ContextConnectors(conn, 12)
    with pytest.raises(CheckpointError, match="text.encoder: no tokenizer in"):
        PromptEncoder.load(TextConfig(encoder=str(tmp_path), dtype="float32", max_length=16), conn)
    parts["pipe"].tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(CheckpointError, match="text.encoder: no Gemma 3 config in"):
        PromptEncoder.load(TextConfig(encoder=str(tmp_path), dtype="float32", max_length=16), conn)


def test_a_cache_other_ranks_cannot_see_is_named(parts, tmp_path) -> None:
    cfg = _config(parts, str(parts["official"]), cache=str(tmp_path / "cache"))
    conditioning = TextConditioning(cfg, None, PROMPTS, torch.device("cpu"))
    conditioning.check_complete(PROMPTS)
    conditioning.cache.path(PROMPTS[1]).unlink()  # as if another rank's entry were on a disk this one lacks
    with pytest.raises(DataError, match="1 entries that other ranks wrote are not visible .* every rank shares"):
        conditioning.check_complete(PROMPTS)
    with pytest.raises(ConfigError, match="text.on_missing=error needs text.cache"):
        _config(parts, str(parts["official"]), on_missing="error")
