"""Per-reward group advantages and their routing to the video and audio branches (SPEC 2).

Rewards judge different things (a video-quality score says nothing about the audio), so OmniNFT
normalises each reward on its own and sends it only to the branch(es) it judges. The vanilla-NFT
(`global`) and GDPO (`gdpo`) baselines run through the same function so ablations differ only in
the mode string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..fields import bounded, choice
from ..rewards.base import MODALITIES

ROUTING_MODES = ("omninft", "global", "gdpo")
STD_MODES = ("global", "group")


@dataclass
class AdvantageConfig:
    """`advantage.*`: how rewards become the two branches' advantages and optimality probabilities."""

    routing: str = choice(*ROUTING_MODES, default="omninft")
    std: str = choice(*STD_MODES, default="global")
    eps: float = bounded(0.0, None, default=1e-4)
    adv_clip: float = bounded(1e-6, None, default=5.0)


def group_advantages(rewards: Tensor, group_ids: Tensor, std_mode: str = "global", eps: float = 1e-4) -> Tensor:
    """Group-relative advantage `(R - mean_group(R)) / (std + eps)` for rewards (N,) and group_ids (N,).

    The mean is always per prompt group (the baseline is "how did this prompt's other samples do");
    the std is the population std over the whole batch (`global`, the paper's choice, which keeps
    near-constant groups from blowing up) or over the sample's own group (`group`).
    Float64 inside because reward sums of similar magnitude cancel; float32 out.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode {std_mode!r} is not one of {STD_MODES}")
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (N,)")
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    r = rewards.detach().to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    counts = counts.to(torch.float64)
    group_mean = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r) / counts
    centred = r - group_mean[inverse]
    if std_mode == "global":
        std = r.std(unbiased=False)
    else:
        group_var = (
            torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, centred.square())
            / counts
        )
        std = group_var.sqrt()[inverse]
    return (centred / (std + eps)).to(torch.float32)


@dataclass(frozen=True)
class RoutedAdvantages:
    """Advantages per branch, plus each reward's own advantage for logging."""

    video: Tensor
    audio: Tensor
    per_reward: dict[str, Tensor]


def _check_reward_config(
    rewards: dict[str, Tensor], modalities: dict[str, str], weights: dict[str, float], group_ids: Tensor
) -> None:
    if not rewards:
        raise ValueError("route_advantages needs at least one reward")
    for name, values in rewards.items():
        if name not in modalities:
            raise ValueError(f"reward {name!r} has no entry in modalities (one of {MODALITIES})")
        if modalities[name] not in MODALITIES:
            raise ValueError(f"modalities[{name!r}] = {modalities[name]!r} is not one of {MODALITIES}")
        if name not in weights:
            raise ValueError(f"reward {name!r} has no entry in weights")
        if values.shape != group_ids.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(values.shape)}, group_ids has {tuple(group_ids.shape)}")


def route_advantages(
    rewards: dict[str, Tensor],
    modalities: dict[str, str],
    weights: dict[str, float],
    group_ids: Tensor,
    mode: str = "omninft",
    std_mode: str = "global",
    eps: float = 1e-4,
) -> RoutedAdvantages:
    """Combine rewards (each (N,)) into the video and audio branch advantages.

    omninft: per-reward A_k; video gets video+av rewards, audio gets audio+av rewards.
    global: one advantage of the weighted reward sum to both branches (vanilla NFT).
    gdpo: weighted sum of per-reward A_k to both branches.
    A branch no reward feeds gets zeros (so its optimality probability is the neutral 0.5).
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r} is not one of {ROUTING_MODES}")
    _check_reward_config(rewards, modalities, weights, group_ids)

    if mode == "global":
        total = sum(weights[k] * rewards[k].detach().to(torch.float64) for k in rewards)
        adv = group_advantages(total, group_ids, std_mode, eps)
        return RoutedAdvantages(video=adv, audio=adv.clone(), per_reward={"global": adv})

    per_reward = {k: group_advantages(r, group_ids, std_mode, eps) for k, r in rewards.items()}
    zeros = torch.zeros(group_ids.shape, dtype=torch.float32, device=group_ids.device)
    if mode == "gdpo":
        adv = sum((weights[k] * a for k, a in per_reward.items()), zeros)
        return RoutedAdvantages(video=adv, audio=adv.clone(), per_reward=per_reward)

    video = sum((weights[k] * a for k, a in per_reward.items() if modalities[k] in ("video", "av")), zeros)
    audio = sum((weights[k] * a for k, a in per_reward.items() if modalities[k] in ("audio", "av")), zeros)
    return RoutedAdvantages(video=video, audio=audio, per_reward=per_reward)


def optimality_probability(advantage: Tensor, adv_clip: float = 5.0) -> Tensor:
    """NFT's optimality probability r = 0.5 + 0.5 * clamp(A / adv_clip, -1, 1), in [0, 1]."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    return 0.5 + 0.5 * (advantage / adv_clip).clamp(-1.0, 1.0)
