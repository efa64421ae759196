"""Config loading: files, overrides, and errors that name the key and what it allows."""

from __future__ import annotations

import pytest
import yaml

from engine.cli import main
from engine.config import Config, ConfigError, load_config, to_dict
from tests.helpers import ROOT


def test_tiny_yaml_is_exactly_the_embedded_default():
    assert yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()) == to_dict(Config())
    assert load_config(ROOT / "configs" / "tiny.yaml") == Config()


def test_ltx2_19b_yaml_loads():
    cfg = load_config(ROOT / "configs" / "ltx2-19b.yaml")
    assert cfg.model.preset == "ltx2-19b" and cfg.task.video_grid == [16, 16, 24] and cfg.sampler.steps == 20


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "iterations=2",
            "seed=7",
            "run_dir=out",
            "train.group_size=4",
            "optim.lr=1e-3",
            "surgery.schedule=[0.0, 1, 1, 1]",
            "sampler.shift=1.5",
        ],
    )
    assert (cfg.iterations, cfg.seed, cfg.run_dir, cfg.train.group_size) == (2, 7, "out", 4)
    assert cfg.optim.lr == 1e-3 and cfg.surgery.schedule == [0.0, 1.0, 1.0, 1.0] and cfg.sampler.shift == 1.5


@pytest.mark.parametrize(
    "override, words",
    [
        ("advantage.routing=vanilla", ["advantage.routing", "omninft", "global", "gdpo"]),
        ("reweight.mode=soft", ["reweight.mode", "minmax", "zscore_sigmoid"]),
        ("train.sigma_mode=random", ["train.sigma_mode", "highest", "uniform", "logit_normal"]),
        ("model.preset=huge", ["model.preset", "ltx2-19b", "tiny"]),
        ("train.group_size=1", ["train.group_size", ">= 2"]),
        ("train.group_size=two", ["train.group_size", "integer"]),
        ("optim.lr=-1", ["optim.lr", ">= 0"]),
        ("train.gruop_size=4", ["train.gruop_size", "group_size"]),
        ("colour=red", ["colour", "iterations"]),
        ("surgery.schedule=gentle", ["surgery.schedule", "paper", "authors", "off"]),
        ("task.video_grid=[2,3,4]", ["rewards[2]: av_sync needs task.video_grid of at least [3, 1, 1]", "[2, 3, 4]"]),
        ("task.video_grid=[3,1,4]", ["rewards[0]: video_sharpness needs task.video_grid of at least [1, 2, 2]"]),
        ("reweight.last_step=20", ["reweight.last_step must be in [0, 19]"]),
        ("log.progress=maybe", ["log.progress", "true or false"]),
        ("rewards=[{name: aesthetics}]", ["aesthetics", "video_sharpness"]),
        ("iterations", ["key=value"]),
        ("model.init=/no/such/file.safetensors", ["model.init", "/no/such/file.safetensors"]),
        ("parallel.tp=2", ["parallel.tp", "megatron"]),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "advantage.routing=vanilla"]) == 2
    assert "advantage.routing" in capsys.readouterr().err


def test_cli_reports_missing_files_without_a_traceback(tmp_path, capsys):
    assert main(["train", "--resume", f"run_dir={tmp_path}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert (
        main(["convert", str(tmp_path / "nope.safetensors"), str(tmp_path / "out.safetensors"), "--to", "diffusers"])
        == 2
    )
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, words",
    [
        ("surgery.schedule=[0.5, 1.0]", ["surgery.schedule has 2 entries", "4 blocks", "tiny"]),
        (
            "surgery.schedule=[0.5, 1.0, 2.0, -0.1]",
            ["surgery.schedule entries must be in [0, 1]", "(2, 2.0)", "(3, -0.1)"],
        ),
        ("reweight.first_step=19", ["reweight.last_step must be >= reweight.first_step"]),
        ("profile.start_step=3", ["profile.start_step and profile.end_step must be set together"]),
        ("parallel.sequence_parallel=true", ["parallel.sequence_parallel needs parallel.tp > 1"]),
        ("rewards=[]", ["rewards must name at least one reward", "av_sync"]),
    ],
)
def test_section_and_cross_section_rules_are_checked_when_the_config_is_read(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_model_init_must_be_a_safetensors_file(tmp_path):
    not_safetensors = tmp_path / "weights.safetensors"
    not_safetensors.write_text("not a safetensors header")
    with pytest.raises(ConfigError, match="model.init: .*weights.safetensors is not a readable safetensors file"):
        load_config(None, [f"model.init={not_safetensors}"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: 2\ntrain:\n  group_size: [4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override task.video_grid:1: malformed YAML"):
        load_config(None, ["task.video_grid=[3,2"])
