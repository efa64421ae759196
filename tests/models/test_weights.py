"""Checkpoints: official and diffusers layouts, conversion, whole-file validation, the configs weights carry, and
every weights source (diffusers pipeline, transformer and sharded folders; the official single file)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
from models.layouts import (
    OFFICIAL_PREFIX,
    config_from_diffusers,
    config_from_official,
    diffusers_config,
    official_config,
    our_name,
    to_layout,
)
from models.weights import read_config

diffusers = pytest.importorskip("diffusers")

TINY = models.PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(cfg=TINY, seed: int = 0):
    torch.manual_seed(seed)
    return models.build_model(cfg)


def _file_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _assert_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(a[k], b[k]) for k in a), "fresh model should start with other weights"


# ---------------------------------------------------------------- official layout


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        dataclasses.replace(TINY, timestep_embed_dim=32),
        models.resolve_config(
            {"preset": "tiny", "num_layers": 2, "rope_theta": 5000.0, "rope_max_pos": [10, 1024, 512], "norm_eps": 1e-5}
        ),
    ],
)
def test_official_round_trip(tmp_path, cfg) -> None:
    m = _model(cfg, seed=0)
    path = tmp_path / "official.safetensors"
    models.save_model(m, path, "official")
    tensors, _ = _file_tensors(path)
    assert tensors and all(k.startswith(OFFICIAL_PREFIX) for k in tensors)
    assert set(tensors) == {OFFICIAL_PREFIX + k for k in m.state_dict()}
    assert read_config(path) == m.config
    m2 = _model(cfg, seed=1)
    _assert_differs(m.state_dict(), m2.state_dict())
    models.load_model_weights(m2, path)
    _assert_same_state(m.state_dict(), m2.state_dict())


def test_official_file_with_vae_and_connector_keys_loads(tmp_path) -> None:
    """A monolithic release file also carries the VAEs and text connectors: they are not the DiT's."""
    m = _model()
    state = {OFFICIAL_PREFIX + k: v.clone() for k, v in m.state_dict().items()}
    state["vae.decoder.conv_in.weight"] = torch.zeros(3, 3)
    state["audio_vae.encoder.conv.weight"] = torch.zeros(2)
    state[OFFICIAL_PREFIX + "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"] = torch.zeros(4, 4)
    state[OFFICIAL_PREFIX + "audio_embeddings_connector.learnable_registers"] = torch.zeros(4, 2)
    path = tmp_path / "monolithic.safetensors"
    save_file(state, str(path))
    assert read_config(path) is None  # no config metadata in this file
    m2 = _model(seed=1)
    models.load_model_weights(m2, path)
    _assert_same_state(m.state_dict(), m2.state_dict())


# ---------------------------------------------------------------- diffusers layout


def test_diffusers_round_trip_and_strict_load_into_diffusers(tmp_path) -> None:
    m = _model(TINY)
    path = tmp_path / "diffusers.safetensors"
    models.save_model(m, path, "diffusers")
    tensors, _ = _file_tensors(path)
    assert not any(k.startswith(OFFICIAL_PREFIX) for k in tensors)
    assert read_config(path) == m.config

    m2 = _model(TINY, seed=1)
    _assert_differs(m.state_dict(), m2.state_dict())
    models.load_model_weights(m2, path)  # layout detected
    _assert_same_state(m.state_dict(), m2.state_dict())
    m3 = _model(TINY, seed=2)
    models.load_model_weights(m3, path, layout="diffusers")
    _assert_same_state(m.state_dict(), m3.state_dict())

    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(m.config))
    ref = dm.state_dict()
    assert set(tensors) == set(ref)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    result = dm.load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(dm.state_dict(), tensors)


def test_diffusers_state_dict_loads_into_ours() -> None:
    torch.manual_seed(3)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(TINY))
    ours = _model(TINY, seed=4)
    models.load_state(ours, dm.state_dict())
    back = to_layout(ours.state_dict(), "diffusers")
    _assert_same_state(back, dm.state_dict())
    assert config_from_diffusers(dm.config) == TINY


def test_diffusers_file_written_by_diffusers_loads(tmp_path) -> None:
    torch.manual_seed(5)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(TINY))
    path = tmp_path / "dm.safetensors"
    save_file({k: v.contiguous() for k, v in dm.state_dict().items()}, str(path))
    ours = _model(TINY, seed=6)
    models.load_model_weights(ours, path)
    _assert_same_state(to_layout(ours.state_dict(), "diffusers"), dm.state_dict())


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_diffusers_config_describes_the_preset(name) -> None:
    """diffusers_config(cfg) must describe cfg exactly, or refuse: a silent mismatch builds a different model.

    (diffusers has no timestep-feature width option; it always uses 256.)"""
    cfg = models.PRESETS[name]
    assert config_from_diffusers(diffusers_config(cfg)) == cfg


def test_diffusers_config_refuses_what_diffusers_cannot_express() -> None:
    with pytest.raises(ValueError, match="timestep_embed_dim"):
        diffusers_config(dataclasses.replace(TINY, timestep_embed_dim=32))


# ---------------------------------------------------------------- conversion


def test_convert_file_round_trip(tmp_path) -> None:
    m = _model(TINY)
    src = tmp_path / "a.safetensors"
    mid = tmp_path / "b.safetensors"
    dst = tmp_path / "sub" / "c.safetensors"
    models.save_model(m, src, "official")
    n = models.convert_file(src, mid, "diffusers")
    assert n == len(m.state_dict())
    mid_tensors, _ = _file_tensors(mid)
    assert set(mid_tensors) == set(diffusers.LTX2VideoTransformer3DModel(**diffusers_config(TINY)).state_dict())
    assert read_config(mid) == m.config
    assert models.convert_file(mid, dst, "official") == n
    orig, _ = _file_tensors(src)
    again, _ = _file_tensors(dst)
    _assert_same_state(orig, again)
    assert read_config(dst) == m.config


def test_convert_same_layout_is_identity(tmp_path) -> None:
    m = _model(TINY)
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    models.save_model(m, src, "diffusers")
    models.convert_file(src, dst, "diffusers")
    _assert_same_state(_file_tensors(src)[0], _file_tensors(dst)[0])


# ---------------------------------------------------------------- bad checkpoints


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_bad_checkpoint_lists_every_problem(tmp_path, layout) -> None:
    m = _model(TINY)
    good = tmp_path / "good.safetensors"
    models.save_model(m, good, layout)
    state, _ = _file_tensors(good)
    prefix = OFFICIAL_PREFIX if layout == "official" else ""
    q = "norm_q" if layout == "diffusers" else "q_norm"
    missing = [prefix + "transformer_blocks.1.attn1.to_k.bias", prefix + "proj_out.weight"]
    wrong = prefix + f"transformer_blocks.2.audio_attn2.{q}.weight"
    for k in missing:
        del state[k]
    state[prefix + "transformer_blocks.0.bogus_layer.weight"] = torch.zeros(3)
    state[wrong] = torch.zeros(7)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))

    m2 = _model(TINY, seed=1)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(models.CheckpointError) as info:
        models.load_model_weights(m2, bad)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "transformer_blocks.1.attn1.to_k.bias" in msg
    assert "proj_out.weight" in msg
    assert "transformer_blocks.0.bogus_layer.weight" in msg
    assert "transformer_blocks.2.audio_attn2" in msg and "(7,)" in msg
    assert "4 problem" in msg
    assert str(bad) in msg
    # Nothing was loaded.
    _assert_same_state(before, m2.state_dict())


def test_shape_mismatch_against_other_config(tmp_path) -> None:
    m = _model(TINY)
    path = tmp_path / "a.safetensors"
    models.save_model(m, path)
    other = _model(models.resolve_config({"preset": "tiny", "timestep_embed_dim": 256, "num_layers": 3}))
    with pytest.raises(models.CheckpointError, match="unexpected: transformer_blocks.3."):
        models.load_model_weights(other, path)


def test_a_checkpoint_of_another_model_lists_a_dozen_problems_and_counts_the_rest(tmp_path):
    path = tmp_path / "tiny.safetensors"
    models.save_model(_model(TINY), path)
    with pytest.raises(models.CheckpointError) as info:
        models.load_model_weights(models.build_model("ltx2-19b", device="meta"), path)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 12 + 1 and "problem(s)" in lines[0] and str(path) in lines[0]
    total = int(lines[0].split("(")[1].split(" ")[0])
    assert lines[-1] == f"  ... and {total - 12} more"


# ---------------------------------------------------------------- diffusers configs


@pytest.mark.parametrize(
    "key,value",
    [
        ("gated_attn", True),
        ("audio_gated_attn", True),
        ("cross_attn_mod", True),
        ("rope_type", "interleaved"),
        ("patch_size", 2),
        ("use_keyframes_abs_pos_embedding", True),
    ],
)
def test_config_from_diffusers_rejects_unsupported_variants(key, value) -> None:
    dcfg = {**diffusers_config(TINY), key: value}
    with pytest.raises(ValueError, match=key):
        config_from_diffusers(dcfg)


def test_config_from_diffusers_rejects_unequal_heads() -> None:
    dcfg = {**diffusers_config(TINY), "audio_num_attention_heads": 2, "audio_cross_attention_dim": 16}
    with pytest.raises(ValueError, match="num_attention_heads"):
        config_from_diffusers(dcfg)


def test_config_from_diffusers_model_config() -> None:
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(TINY))
    assert config_from_diffusers(dm.config) == TINY
    # diffusers' own defaults are the legacy interleaved RoPE: refused by name.
    dm_default = diffusers.LTX2VideoTransformer3DModel(**{**diffusers_config(TINY), "rope_type": "interleaved"})
    with pytest.raises(ValueError, match="rope_type"):
        config_from_diffusers(dm_default.config)


# ---------------------------------------------------------------- weights sources: diffusers folders, official file

# The 19B release header's `transformer` keys (ARCHITECTURE.md section 0) at the tiny shape, connector keys included.
OFFICIAL_TINY_HEADER = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "audio_num_attention_heads": 4,
    "audio_attention_head_dim": 8,
    "num_layers": 4,
    "in_channels": 16,
    "out_channels": 16,
    "audio_in_channels": 16,
    "audio_out_channels": 16,
    "cross_attention_dim": 64,
    "audio_cross_attention_dim": 32,
    "caption_channels": 32,
    "qk_norm": "rms_norm",
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "rope_type": "split",
    "frequencies_precision": "float64",
    "positional_embedding_theta": 10000,
    "positional_embedding_max_pos": [20, 2048, 2048],
    "audio_positional_embedding_max_pos": [20],
    "use_middle_indices_grid": True,
    "causal_temporal_positioning": True,
    "timestep_scale_multiplier": 1000,
    "av_ca_timestep_scale_multiplier": 1000.0,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "av_cross_ada_norm": True,
    "connector_num_layers": 2,
    "connector_num_attention_heads": 30,
    "connector_attention_head_dim": 128,
    "connector_num_learnable_registers": 128,
}
NOT_DIT = {  # what a release file holds beside the DiT
    "vae.decoder.conv_in.conv.weight": (8, 4, 3, 3, 3),
    "audio_vae.encoder.conv_in.conv.weight": (4, 2, 3, 3),
    "vocoder.conv_pre.weight": (8, 4, 7),
    "text_embedding_projection.aggregate_embed.weight": (32, 49 * 32),
    OFFICIAL_PREFIX + "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight": (32, 32),
    OFFICIAL_PREFIX + "audio_embeddings_connector.learnable_registers": (128, 32),
}


def _diffusers_model(cfg=TINY, seed: int = 7):
    torch.manual_seed(seed)
    return diffusers.LTX2VideoTransformer3DModel(**diffusers_config(cfg))


def _official_file(path, dm, header: dict) -> None:
    """An official single file built from a diffusers model: DiT keys renamed, the rest of a release beside them."""
    state = to_layout(models.from_diffusers(dm).state_dict(), "official")
    state.update({k: torch.zeros(shape) for k, shape in NOT_DIT.items()})
    meta = {"config": json.dumps({"transformer": header, "vae": {"latent_channels": 16}}), "model_version": "2.0.0"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny diffusers model, and its weights as every kind of source model.init accepts."""
    root = tmp_path_factory.mktemp("sources")
    dm = _diffusers_model()
    dm.save_pretrained(root / "pipe" / "transformer")
    (root / "pipe" / "model_index.json").write_text("{}")
    dm.save_pretrained(root / "sharded" / "transformer", max_shard_size="500KB")
    _official_file(root / "ltx-2-19b-dev.safetensors", dm, OFFICIAL_TINY_HEADER)
    paths = {
        "pipeline folder": root / "pipe",
        "transformer folder": root / "pipe" / "transformer",
        "weights file in a transformer folder": root / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors",
        "sharded pipeline folder": root / "sharded",
        "official single file": root / "ltx-2-19b-dev.safetensors",
    }
    return dm, paths


@pytest.mark.parametrize(
    "kind",
    [
        "pipeline folder",
        "transformer folder",
        "weights file in a transformer folder",
        "sharded pipeline folder",
        "official single file",
    ],
)
def test_every_source_loads_the_diffusers_weights_exactly_and_carries_the_config(sources, kind) -> None:
    dm, paths = sources
    source = models.weights_source(paths[kind])
    assert source.config == TINY and read_config(paths[kind]) == TINY
    assert source.layout == ("official" if kind == "official single file" else "diffusers")
    if kind == "sharded pipeline folder":
        assert len(source.files) > 1
    ours = _model(TINY, seed=1)
    models.load_model_weights(ours, paths[kind])
    _assert_same_state(to_layout(ours.state_dict(), "diffusers"), dm.state_dict())


def test_a_pipeline_stage_takes_only_its_blocks_from_the_shards(sources) -> None:
    dm, paths = sources
    stage = models.Stage(index=1, count=2, layers=models.stage_layers(TINY.num_layers, 2, 1))
    part = models.build_model(TINY, stage=stage)
    models.load_model_weights(part, paths["sharded pipeline folder"])
    whole = models.from_diffusers(dm).state_dict()
    assert not any(k.startswith(("transformer_blocks.0.", "transformer_blocks.1.")) for k in part.state_dict())
    for k, v in part.state_dict().items():
        assert torch.equal(v, whole[k]), k


def test_convert_reads_folders(sources, tmp_path) -> None:
    dm, paths = sources
    out = tmp_path / "official.safetensors"
    assert models.convert_file(paths["sharded pipeline folder"], out, "official") == len(dm.state_dict())
    assert read_config(out) == TINY
    ours = _model(TINY, seed=2)
    models.load_model_weights(ours, out)
    _assert_same_state(to_layout(ours.state_dict(), "diffusers"), dm.state_dict())


def test_a_shape_other_than_the_presets_is_read_from_the_weights(tmp_path) -> None:
    cfg = dataclasses.replace(TINY, num_layers=3, rope_theta=5000.0, audio_rope_max_pos=10.0)
    dm = _diffusers_model(cfg)
    dm.save_pretrained(tmp_path / "pipe" / "transformer")
    header = {
        **OFFICIAL_TINY_HEADER,
        "num_layers": 3,
        "positional_embedding_theta": 5000.0,
        "audio_positional_embedding_max_pos": [10],
    }
    _official_file(tmp_path / "official.safetensors", dm, header)
    for path in (tmp_path / "pipe", tmp_path / "official.safetensors"):
        assert read_config(path) == cfg
        ours = models.build_model(read_config(path))
        models.load_model_weights(ours, path)
        _assert_same_state(to_layout(ours.state_dict(), "diffusers"), dm.state_dict())


def test_our_header_uses_the_official_names(tmp_path) -> None:
    """ltx-core builds its DiT from `config.transformer` in official names and insists on its fixed values."""
    path = tmp_path / "ours.safetensors"
    models.save_model(_model(TINY), path)
    header = json.loads(_file_tensors(path)[1]["config"])["transformer"]
    for key, value in OFFICIAL_TINY_HEADER.items():
        if not key.startswith("connector_"):
            assert header[key] == value, key
    assert header["dropout"] == 0.0 and header["num_vector_embeds"] is None and header["share_ff"] is False
    assert header["apply_gated_attention"] is False and header["cross_attention_adaln"] is False
    assert "num_heads" not in header and "video_head_dim" not in header


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_official_config_describes_the_preset(name) -> None:
    cfg = models.PRESETS[name]
    assert config_from_official(official_config(cfg)) == cfg


def test_official_keys_a_header_lacks_take_ltx_core_defaults() -> None:
    assert config_from_official({"av_ca_timestep_scale_multiplier": 1000}) == models.PRESETS["ltx2-19b"]
    assert config_from_official({}).av_ca_timestep_scale_multiplier == 1.0  # ltx-core's default


def test_headers_written_before_the_official_names_still_read(tmp_path) -> None:
    cfg = dataclasses.replace(TINY, num_layers=2, timestep_embed_dim=32)
    m = _model(cfg)
    path = tmp_path / "old.safetensors"
    legacy = {"config": json.dumps({"transformer": dataclasses.asdict(cfg)})}
    save_file({k: v.contiguous() for k, v in to_layout(m.state_dict(), "official").items()}, str(path), legacy)
    assert read_config(path) == cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_prompt_adaln_single", False),  # LTX-2.5 (LTX-2.3's switches are supported: tests/models/test_ltx23.py)
        ("use_keyframes_abs_pos_embedding", True),
        ("rope_type", "interleaved"),
        ("ff_bias", False),
    ],
)
def test_an_official_header_of_an_unsupported_variant_is_refused_by_key(tmp_path, key, value) -> None:
    path = tmp_path / "variant.safetensors"
    save_file(
        {"x": torch.zeros(1)}, str(path), {"config": json.dumps({"transformer": {**OFFICIAL_TINY_HEADER, key: value}})}
    )
    with pytest.raises(models.CheckpointError, match=f"{path}.*{key}"):
        models.weights_source(path)


def test_a_diffusers_config_of_an_unsupported_variant_or_another_model_is_refused(sources, tmp_path) -> None:
    dm, paths = sources
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(
        paths["transformer folder"] / "diffusion_pytorch_model.safetensors"
    )
    dcfg = json.loads((paths["transformer folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**dcfg, "gated_attn": True}))
    with pytest.raises(models.CheckpointError, match="config.json.*gated_attn"):
        models.weights_source(tmp_path)
    (folder / "config.json").write_text(json.dumps({**dcfg, "_class_name": "LTXVideoTransformer3DModel"}))
    with pytest.raises(models.CheckpointError, match="_class_name"):
        models.weights_source(tmp_path)
    del dcfg["audio_num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(dcfg))
    with pytest.raises(models.CheckpointError, match="no 'audio_num_attention_heads' entry"):
        models.weights_source(tmp_path)


@pytest.mark.parametrize("content", ["nothing", "config only", "weights only"])
def test_a_folder_of_neither_layout_says_what_was_expected(sources, tmp_path, content) -> None:
    _, paths = sources
    folder = tmp_path / "pipe" / "transformer"
    folder.mkdir(parents=True)
    if content == "config only":
        (folder / "config.json").write_text((paths["transformer folder"] / "config.json").read_text())
    if content == "weights only":
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(models.CheckpointError) as info:
        models.weights_source(tmp_path / "pipe")
    msg = str(info.value)
    assert "is not a diffusers LTX-2 folder" in msg and "transformer/config.json" in msg
    assert "diffusion_pytorch_model.safetensors.index.json" in msg


def test_a_missing_path_names_both_kinds_of_source(tmp_path) -> None:
    with pytest.raises(models.CheckpointError, match="no such file or folder.*safetensors file.*diffusers"):
        models.weights_source(tmp_path / "absent")


def test_shards_with_a_key_missing_or_held_twice_list_every_problem(sources, tmp_path) -> None:
    _, paths = sources
    src = paths["sharded pipeline folder"] / "transformer"
    folder = tmp_path / "transformer"
    shutil.copytree(src, folder)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    state, _ = _file_tensors(folder / first)
    gone = sorted(state)[0]
    del state[gone]
    state[sorted(_file_tensors(folder / second)[0])[0]] = torch.zeros(1)  # also in the second shard
    save_file(state, str(folder / first))
    with pytest.raises(models.CheckpointError) as info:
        models.load_model_weights(_model(TINY), tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "2 problem" in msg
    assert "held twice" in msg and f"missing: {our_name(gone, 'diffusers')} " in msg


def test_an_index_naming_an_absent_shard_is_refused(sources, tmp_path) -> None:
    _, paths = sources
    folder = tmp_path / "transformer"
    shutil.copytree(paths["sharded pipeline folder"] / "transformer", folder)
    last = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(models.CheckpointError, match=f"lists shard.*{last.name}"):
        models.weights_source(tmp_path)
