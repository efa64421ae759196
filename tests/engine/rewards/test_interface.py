"""The reward interface for media: Rollout's decoded frames and waveforms, what a reward reads (`reads`,
`reads_media`), score_rewards refusing a reward whose media are missing, and custom rewards named in the
config by import path (`cls: package.module:Class`), with their errors as one-line ConfigErrors."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError, RewardError
from engine.rewards import (
    LATENT_REWARDS,
    MEDIA,
    READS,
    REGISTRY,
    AVSync,
    Reward,
    RewardSpec,
    Rollout,
    build_rewards,
    check_rewards,
    reads_media,
    register,
    score_rewards,
)
from engine.rewards.base import require_package
from tests.engine.rewards.rollouts import media_rollout

CUSTOM = """
import torch

from engine.rewards import Reward


class Loudness(Reward):
    '''Mean absolute amplitude times `gain`.'''

    name = "loudness"
    modality = "audio"
    reads = frozenset({"waveform"})

    def __init__(self, weight=1.0, *, gain=1.0):
        super().__init__(weight)
        if gain <= 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.gain = gain

    def score(self, rollout):
        return self.gain * rollout.waveforms.abs().mean(dim=(1, 2))


class Holder:
    class Brightness(Reward):
        name = "brightness"
        modality = "video"
        reads = frozenset({"frames"})

        def score(self, rollout):
            return rollout.frames.mean(dim=(1, 2, 3, 4))


class NoModality(Reward):
    name = "no_modality"

    def score(self, rollout):
        return torch.zeros(rollout.num_samples)


class BadReads(Reward):
    name = "bad_reads"
    modality = "audio"
    reads = frozenset({"pixels"})

    def score(self, rollout):
        return torch.zeros(rollout.num_samples)


class Unfinished(Reward):
    name = "unfinished"
    modality = "audio"


class NotAReward:
    name = "not_a_reward"
"""


@pytest.fixture
def custom(tmp_path, monkeypatch) -> str:
    """The name of a fresh importable module holding CUSTOM (removed from sys.modules afterwards)."""
    module = f"custom_rewards_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop(module, None)


def config_rewards(entries: list[dict]) -> list[RewardSpec]:
    """The typed `rewards` list of a config whose rewards are `entries` (read as an override, like a user's)."""
    return load_config(None, [f"rewards={json.dumps(entries)}"]).rewards


def media(n: int = 2, channels: int = 2, samples: int = 800, frames: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "frames": torch.rand(n, frames, 4, 6, 3, generator=gen),
        "waveforms": torch.rand(n, channels, samples, generator=gen) * 2 - 1,
        "sample_rate": 16000,
    }


# ---------------------------------------------------------------- Rollout media


def test_rollout_carries_media_or_none():
    plain = media_rollout(prompts=("a", "b"))
    assert plain.frames is None and plain.waveforms is None and plain.sample_rate is None
    full = media_rollout(**media())
    assert full.frames.shape == (2, 3, 4, 6, 3) and full.waveforms.shape == (2, 2, 800) and full.sample_rate == 16000


@pytest.mark.parametrize(
    "change,match",
    [
        ({"frames": torch.rand(2, 3, 4, 6)}, "frames must be"),
        ({"frames": torch.rand(3, 3, 4, 6, 3)}, "frames must be"),
        ({"frames": torch.rand(2, 3, 4, 6, 4)}, "frames must be"),
        ({"frames": torch.rand(2, 0, 4, 6, 3)}, "frames must be"),
        ({"frames": torch.zeros(2, 3, 4, 6, 3, dtype=torch.uint8)}, "floating point"),
        ({"waveforms": torch.rand(2, 800)}, "waveforms must be"),
        ({"waveforms": torch.rand(1, 2, 800)}, "waveforms must be"),
        ({"waveforms": torch.zeros(2, 2, 800, dtype=torch.int16)}, "floating point"),
        ({"sample_rate": None}, "come together"),
        ({"waveforms": None}, "come together"),
        ({"sample_rate": 0}, "sample_rate must be"),
        ({"sample_rate": 16000.0}, "sample_rate must be"),
        ({"sample_rate": True}, "sample_rate must be"),
    ],
)
def test_rollout_rejects_bad_media(change, match):
    with pytest.raises(ValueError, match=match):
        media_rollout(prompts=("a", "b"), **{**media(), **change})


# ---------------------------------------------------------------- reads


class _Reads(Reward):
    """Scores 1 and records that it ran; reads what it is told."""

    modality = "av"

    def __init__(self, name: str, reads: set[str]) -> None:
        self.name, self.reads, self.calls = name, reads, 0
        super().__init__()

    def score(self, rollout: Rollout) -> torch.Tensor:
        self.calls += 1
        return torch.ones(rollout.num_samples)


def test_latent_rewards_read_latents_only():
    assert READS == {"latents", "frames", "waveform", "text"} and MEDIA == {"frames", "waveform"}
    rewards = build_rewards([RewardSpec(name) for name in LATENT_REWARDS])
    assert all(r.reads == {"latents"} for r in rewards)
    assert reads_media(rewards) == set()


def test_reads_media_names_what_to_decode():
    assert reads_media([_Reads("a", {"latents"}), _Reads("b", {"waveform", "text"})]) == {"waveform"}
    assert reads_media([_Reads("a", {"frames"}), _Reads("b", {"waveform"})]) == {"frames", "waveform"}
    assert {name for name in REGISTRY if REGISTRY[name].reads & MEDIA} == {
        "clap",
        "audiobox_aesthetics",
        "av_align",
        "videoalign",
        "hpsv3",
        "desync",
    }
    assert reads_media([REGISTRY["av_align"]()]) == {"frames", "waveform"}


@pytest.mark.parametrize("lacking", ["frames", "waveform"])
def test_score_rewards_refuses_missing_media_before_running_any(lacking):
    first = _Reads("latent_probe", {"latents"})
    needy = _Reads("needy", {lacking, "text"})
    given = media()
    given.pop(lacking if lacking == "frames" else "waveforms")
    if lacking == "waveform":
        given.pop("sample_rate")
    with pytest.raises(RewardError, match=f"'needy' reads {lacking}, but the rollout has none"):
        score_rewards([first, needy], media_rollout(**given))
    assert first.calls == 0 and needy.calls == 0
    scores = score_rewards([first, needy], media_rollout(**media()))
    assert list(scores) == ["latent_probe", "needy"]


@pytest.mark.parametrize(
    "reads,match", [({"pixels"}, "reads"), (set(), "reads"), (["frames"], "reads"), ({"frames", "audio"}, "reads")]
)
def test_reads_must_be_a_set_of_known_inputs(reads, match):
    with pytest.raises(ValueError, match=match):
        _Reads("odd", reads)


def test_a_missing_model_package_names_the_reward_and_the_install():
    with pytest.raises(RewardError, match="reward 'fancy' needs no_such_package_xyz.*: pip install fancy"):
        require_package("fancy", "no_such_package_xyz", "pip install fancy")


def test_register_checks_declarations():
    class Nameless(Reward):
        modality = "audio"

        def score(self, rollout: Rollout) -> torch.Tensor:
            return torch.zeros(rollout.num_samples)

    with pytest.raises(ValueError, match="Nameless must declare a non-empty string `name`"):
        register(Nameless)
    assert "Nameless" not in REGISTRY and None not in REGISTRY


# ---------------------------------------------------------------- custom rewards from the config


def test_custom_reward_from_config_is_built_with_args_and_scores(custom):
    specs = config_rewards([{"name": "av_sync"}, {"cls": f"{custom}:Loudness", "weight": 2, "args": {"gain": 3}}])
    assert specs[1] == RewardSpec(cls=f"{custom}:Loudness", weight=2.0, args={"gain": 3})
    sync, loud = build_rewards(specs)
    assert isinstance(sync, AVSync) and type(loud).__name__ == "Loudness"
    assert (loud.name, loud.modality, loud.weight, loud.gain) == ("loudness", "audio", 2.0, 3)
    assert reads_media([sync, loud]) == {"waveform"}
    rollout = media_rollout(**media())
    expected = 3 * rollout.waveforms.abs().mean(dim=(1, 2))
    torch.testing.assert_close(score_rewards([loud], rollout)["loudness"], expected)


def test_custom_reward_nested_class_and_defaults(custom):
    (bright,) = build_rewards(config_rewards([{"cls": f"{custom}:Holder.Brightness"}]))
    assert (bright.name, bright.weight, bright.reads) == ("brightness", 1.0, {"frames"})


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"cls": "no_such_package.rewards:Thing"}, r"rewards\[0\]\.cls .*cannot import no_such_package\.rewards"),
        ({"cls": "{m}:Missing"}, r"rewards\[0\]\.cls .*has no attribute 'Missing'"),
        ({"cls": "{m}:NotAReward"}, r"rewards\[0\]\.cls .*is not a subclass of engine\.rewards\.Reward"),
        ({"cls": "{m}:Unfinished"}, r"rewards\[0\]\.cls .*is abstract"),
        ({"cls": "{m}:NoModality"}, r"rewards\[0\]\.cls .*modality None"),
        ({"cls": "{m}:BadReads"}, r"rewards\[0\]\.cls .*reads frozenset\(\{'pixels'\}\)"),
        ({"cls": "{m}"}, r"rewards\[0\]\.cls must look like package\.module:Class"),
        ({"cls": "{m}:Loudness", "args": {"gian": 2}}, r"rewards\[0\]\.args do not fit loudness .*'gian'"),
        ({"cls": "{m}:Loudness", "args": {"gain": -1}}, r"rewards\[0\]: building loudness raised ValueError: gain"),
        ({"cls": "{m}:Loudness", "args": {"weight": 2}}, r"rewards\[0\]\.args\.weight: set the weight beside args"),
        ({"cls": "{m}:Loudness", "name": "av_sync"}, r"rewards\[0\] needs exactly one of name .* or cls"),
        ({"class": "{m}:Loudness", "cls": "{m}:Loudness"}, r"rewards\[0\]: give class or cls, not both"),
        ({"name": "av_align", "args": {"path": "x"}}, r"rewards\[0\]\.args do not fit av_align .*'path'"),
        ({"name": "clap"}, r"rewards\[0\]\.args do not fit clap .*missing a required argument: 'path'"),
        ({"name": "clap", "args": {"path": "x", "2": 1}}, r"rewards\[0\]\.args do not fit clap"),
    ],
)
def test_bad_reward_entries_are_one_line_config_errors(custom, entry, match):
    entry = {k: v.format(m=custom) if isinstance(v, str) else v for k, v in entry.items()}
    with pytest.raises(ConfigError, match=match) as info:
        build_rewards(config_rewards([entry]))
    assert "\n" not in str(info.value)


def test_args_keys_must_be_strings():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.args keys must be strings"):
        check_rewards([RewardSpec(name="av_sync", args={1: 2})])


def test_the_same_reward_by_name_and_by_class_is_a_duplicate():
    with pytest.raises(ConfigError, match=r"rewards\[1\]: 'av_sync' is a duplicate"):
        check_rewards([RewardSpec(name="av_sync"), RewardSpec(cls="engine.rewards.latent:AVSync")])


def test_check_rewards_builds_nothing(custom):
    """The config loader's check imports and inspects classes but constructs none (a model may be large)."""
    check_rewards([RewardSpec(cls=f"{custom}:Loudness", args={"gain": -1})])
    check_rewards([RewardSpec(name="clap", args={"path": "/no/such/dir"})])
    with pytest.raises(ConfigError, match="gain must be > 0"):
        build_rewards([RewardSpec(cls=f"{custom}:Loudness", args={"gain": -1})])


def test_class_is_the_key_users_write(custom):
    (spec,) = config_rewards([{"class": f"{custom}:Loudness", "weight": 2.0}])
    assert spec.cls == f"{custom}:Loudness" and build_rewards([spec])[0].weight == 2.0
