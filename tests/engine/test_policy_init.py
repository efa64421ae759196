"""`model.init` from every weights source: the DiT shape comes from the config the weights carry (a
diffusers config.json, an official header), the preset only when they carry none."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import models
from engine.errors import ConfigError
from engine.parallel.layout import ProcessLayout
from engine.policy import PolicyConfig, build_policy, frozen_copy, model_config
from models.layouts import diffusers_config, to_layout

diffusers = pytest.importorskip("diffusers")

TINY = models.PRESETS["tiny"]
THREE_LAYERS = dataclasses.replace(TINY, num_layers=3, rope_theta=5000.0)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A diffusers pipeline folder of a 3-layer model (no preset has that shape) and its diffusers model."""
    torch.manual_seed(11)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(THREE_LAYERS))
    root = tmp_path_factory.mktemp("pipe")
    dm.save_pretrained(root / "transformer", max_shard_size="500KB")
    return root, dm


def test_the_shape_comes_from_the_weights_whatever_the_preset(pipe) -> None:
    root, dm = pipe
    for preset in ("tiny", "ltx2-19b"):
        cfg = PolicyConfig(preset=preset, init=str(root))
        assert model_config(cfg) == THREE_LAYERS
    model = build_policy(PolicyConfig(init=str(root)), ProcessLayout())
    assert model.config == THREE_LAYERS
    assert all(torch.equal(v, dm.state_dict()[k]) for k, v in to_layout(model.state_dict(), "diffusers").items())
    copy = frozen_copy(PolicyConfig(init=str(root)), model)
    assert copy.config == THREE_LAYERS and not any(p.requires_grad for p in copy.parameters())


def test_weights_without_a_config_and_no_init_take_the_preset(tmp_path) -> None:
    path = tmp_path / "bare.safetensors"
    model = models.build_model(TINY)
    save_file({k: v.contiguous() for k, v in to_layout(model.state_dict(), "official").items()}, str(path))
    assert model_config(PolicyConfig(preset="tiny", init=str(path))) == TINY
    assert model_config(PolicyConfig(preset="tiny")) == TINY
    assert model_config(PolicyConfig(preset="ltx2-19b")) == models.PRESETS["ltx2-19b"]


def test_an_init_that_is_neither_file_nor_diffusers_folder_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.init: .*is not a diffusers LTX-2 folder.*transformer/config.json"):
        PolicyConfig(init=str(tmp_path))


def test_an_init_of_an_unsupported_variant_is_a_config_error_naming_the_key(tmp_path) -> None:
    path = tmp_path / "ltx-2.5.safetensors"  # LTX-2.3's switches are supported, LTX-2.5's prompt modulation is not
    header = {"transformer": {"apply_gated_attention": True, "use_prompt_adaln_single": False}}
    save_file({"x": torch.zeros(1)}, str(path), {"config": json.dumps(header)})
    with pytest.raises(ConfigError, match="model.init: .*use_prompt_adaln_single=False is not supported"):
        PolicyConfig(init=str(path))
