"""Checkpoints: official and diffusers layouts, conversion, whole-file validation, diffusers configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
from models.layouts import OFFICIAL_PREFIX, config_from_diffusers, diffusers_config, to_layout
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
