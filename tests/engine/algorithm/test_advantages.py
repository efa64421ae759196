"""Advantages and routing against numbers computed by hand with plain Python floats."""

from statistics import fmean, pstdev

import pytest
import torch

from engine.algorithm.advantages import (
    ROUTING_MODES,
    group_advantages,
    optimality_probability,
    route_advantages,
)

EPS = 1e-4
# Two prompts x three samples, interleaved and with non-contiguous ids on purpose.
GROUP_IDS = [7, 3, 7, 3, 7, 3]


def hand_advantages(values: list[float], groups: list[int], std_mode: str = "global") -> list[float]:
    members = {g: [v for v, h in zip(values, groups) if h == g] for g in set(groups)}
    out = []
    for v, g in zip(values, groups):
        std = pstdev(values) if std_mode == "global" else pstdev(members[g])
        out.append((v - fmean(members[g])) / (std + EPS))
    return out


def as_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, as_tensor(expected), rtol=1e-5, atol=1e-6)


def test_group_advantages_global_std_written_out() -> None:
    rewards = [1.0, 4.0, 2.0, 6.0, 3.0, 8.0]
    # group 7: [1, 2, 3] mean 2; group 3: [4, 6, 8] mean 6; batch pstdev = sqrt(34 / 6).
    std = (34 / 6) ** 0.5 + EPS
    expected = [-1 / std, -2 / std, 0.0, 0.0, 1 / std, 2 / std]
    out = group_advantages(as_tensor(rewards), torch.tensor(GROUP_IDS))
    assert out.dtype == torch.float32
    assert_close(out, expected)
    assert_close(out, hand_advantages(rewards, GROUP_IDS))


def test_group_advantages_group_std_differs_from_global() -> None:
    rewards = [1.0, 4.0, 2.0, 6.0, 3.0, 8.0]
    s7, s3 = (2 / 3) ** 0.5 + EPS, (8 / 3) ** 0.5 + EPS
    expected = [-1 / s7, -2 / s3, 0.0, 0.0, 1 / s7, 2 / s3]
    out = group_advantages(as_tensor(rewards), torch.tensor(GROUP_IDS), std_mode="group")
    assert_close(out, expected)
    assert not torch.allclose(out, group_advantages(as_tensor(rewards), torch.tensor(GROUP_IDS)))


def test_group_advantages_constant_group_is_zero() -> None:
    out = group_advantages(as_tensor([5.0, 1.0, 5.0, 2.0]), torch.tensor([0, 1, 0, 1]), std_mode="group")
    assert out[0] == 0 and out[2] == 0
    assert out[1] < 0 < out[3]


def test_group_advantages_bad_std_mode_lists_allowed() -> None:
    with pytest.raises(ValueError, match="global.*group"):
        group_advantages(as_tensor([1.0, 2.0]), torch.tensor([0, 0]), std_mode="batch")


REWARDS = {
    "vq": [0.2, 0.9, 0.5, 0.1, 0.8, 0.4],
    "aq": [3.0, 1.0, 5.0, 2.0, 4.0, 6.0],
    "sync": [-0.3, -0.6, -0.1, -0.2, -0.5, -0.9],
}
MODALITIES = {"vq": "video", "aq": "audio", "sync": "av"}
WEIGHTS = {"vq": 1.0, "aq": 0.5, "sync": 2.0}


def route(mode: str, rewards: dict[str, list[float]] = REWARDS, **kwargs):
    return route_advantages(
        {k: as_tensor(v) for k, v in rewards.items()},
        MODALITIES,
        WEIGHTS,
        torch.tensor(GROUP_IDS),
        mode=mode,
        **kwargs,
    )


def weighted(names: list[str]) -> list[float]:
    per = {k: hand_advantages(REWARDS[k], GROUP_IDS) for k in names}
    return [sum(WEIGHTS[k] * per[k][i] for k in names) for i in range(len(GROUP_IDS))]


def test_omninft_routes_each_reward_to_its_branches() -> None:
    out = route("omninft")
    assert_close(out.video, weighted(["vq", "sync"]))
    assert_close(out.audio, weighted(["aq", "sync"]))
    assert set(out.per_reward) == set(REWARDS)
    for name, values in REWARDS.items():
        assert_close(out.per_reward[name], hand_advantages(values, GROUP_IDS))


def test_omninft_audio_reward_never_reaches_video_and_vice_versa() -> None:
    base = route("omninft")
    changed_audio = route("omninft", {**REWARDS, "aq": [6.0, 2.0, 1.0, 9.0, 0.0, 4.0]})
    changed_video = route("omninft", {**REWARDS, "vq": [0.0, 0.1, 0.9, 0.7, 0.3, 0.3]})
    torch.testing.assert_close(changed_audio.video, base.video)
    assert not torch.allclose(changed_audio.audio, base.audio)
    torch.testing.assert_close(changed_video.audio, base.audio)
    assert not torch.allclose(changed_video.video, base.video)


def test_global_mode_normalises_the_weighted_sum() -> None:
    total = [sum(WEIGHTS[k] * REWARDS[k][i] for k in REWARDS) for i in range(len(GROUP_IDS))]
    out = route("global")
    expected = hand_advantages(total, GROUP_IDS)
    assert_close(out.video, expected)
    assert_close(out.audio, expected)
    assert list(out.per_reward) == ["global"]
    assert not torch.allclose(out.video, as_tensor(weighted(list(REWARDS))))


def test_gdpo_mode_sends_weighted_sum_of_normalised_advantages_to_both() -> None:
    out = route("gdpo")
    expected = weighted(["vq", "aq", "sync"])
    assert_close(out.video, expected)
    assert_close(out.audio, expected)


def test_group_std_mode_is_forwarded() -> None:
    out = route("omninft", std_mode="group")
    vq = hand_advantages(REWARDS["vq"], GROUP_IDS, "group")
    sync = hand_advantages(REWARDS["sync"], GROUP_IDS, "group")
    assert_close(out.video, [WEIGHTS["vq"] * a + WEIGHTS["sync"] * b for a, b in zip(vq, sync)])


def test_branch_without_reward_gets_zeros() -> None:
    out = route("omninft", {"vq": REWARDS["vq"]})
    assert torch.equal(out.audio, torch.zeros(6))
    assert_close(out.video, weighted(["vq"]))
    only_audio = route("omninft", {"aq": REWARDS["aq"]})
    assert torch.equal(only_audio.video, torch.zeros(6))


def test_bad_mode_lists_allowed_modes() -> None:
    with pytest.raises(ValueError, match="vanilla") as err:
        route("vanilla")
    assert all(m in str(err.value) for m in ROUTING_MODES)


def test_bad_modality_names_key_and_allowed_values() -> None:
    with pytest.raises(ValueError) as err:
        route_advantages({"vq": as_tensor(REWARDS["vq"])}, {"vq": "speech"}, WEIGHTS, torch.tensor(GROUP_IDS))
    message = str(err.value)
    assert "vq" in message and "speech" in message
    assert all(m in message for m in ("video", "audio", "av"))


def test_missing_weight_and_shape_mismatch_name_the_reward() -> None:
    with pytest.raises(ValueError, match="aq"):
        route_advantages({"aq": as_tensor(REWARDS["aq"])}, MODALITIES, {"vq": 1.0}, torch.tensor(GROUP_IDS))
    with pytest.raises(ValueError, match="sync"):
        route("omninft", {**REWARDS, "sync": [0.0, 1.0]})


def test_optimality_probability_clips() -> None:
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(optimality_probability(adv), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    clipped_at_2 = optimality_probability(torch.tensor([1.0, -3.0]), adv_clip=2.0)
    torch.testing.assert_close(clipped_at_2, torch.tensor([0.75, 0.0]))
