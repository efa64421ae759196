"""Policy updates around the loss: AdamW with gradient clipping, the old-policy EMA, training sigmas."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data_parallel import DistributedAdamW
from .sampler import stable_seed


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay)


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer | DistributedAdamW, max_norm: float) -> float:
    """Clips the global gradient norm (0 = no clipping) and steps; returns the norm before clipping.

    Under tensor parallelism a split parameter's squares are summed over the group and a replicated
    one is counted once; pipeline stages add their sums. So the norm (and the clipping) equals the
    single-process one. megatron's distributed optimizer (engine.data_parallel) clips itself, alike."""
    if isinstance(optimizer, DistributedAdamW):
        return optimizer.step()
    backend, stage = getattr(model, "backend", None), getattr(model, "stage", None)
    grads = [p for p in model.parameters() if p.grad is not None]
    split = [p.grad.float().pow(2).sum() for p in grads if getattr(p, "tensor_model_parallel", False)]
    whole = [p.grad.float().pow(2).sum() for p in grads if not getattr(p, "tensor_model_parallel", False)]
    split_sq = torch.stack(split).sum() if split else torch.zeros(())
    if backend is not None and backend.tp_size > 1:
        torch.distributed.all_reduce(split_sq, group=backend.group)
    total = split_sq + (torch.stack(whole).sum() if whole else 0.0)
    if stage is not None and stage.count > 1:
        torch.distributed.all_reduce(total, group=stage.group)
    norm = torch.sqrt(total)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in grads:
            p.grad.mul_(coef.to(p.grad.dtype))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def ema_decay(step: int, decay_rate: float, max_decay: float) -> float:
    """eta = min(decay_rate * step, max_decay): the old policy tracks theta closely early, lags later."""
    return min(decay_rate * step, max_decay)


@torch.no_grad()
def ema_update(old: nn.Module, new: nn.Module, eta: float) -> None:
    """theta_old <- eta * theta_old + (1 - eta) * theta."""
    for p_old, p in zip(old.parameters(), new.parameters()):
        p_old.mul_(eta).add_(p.detach(), alpha=1.0 - eta)


def training_sigmas(schedule: Tensor, mode: str, fraction: float, num: int, seed: int, iteration: int) -> list[float]:
    """Noise levels the loss is evaluated at in one iteration.

    highest: the first ceil(fraction * steps) levels of the rollout's own schedule (the noisiest; the
    authors' choice); uniform / logit_normal: `num` fresh draws in (0, 1), seeded by (seed, iteration).
    """
    if mode == "highest":
        steps = len(schedule) - 1
        return [float(s) for s in schedule[: max(1, math.ceil(fraction * steps))]]
    g = torch.Generator().manual_seed(stable_seed(seed, iteration, "train-sigmas"))
    if mode == "uniform":
        draws = torch.rand(num, generator=g, dtype=torch.float64)
    elif mode == "logit_normal":
        draws = torch.sigmoid(torch.randn(num, generator=g, dtype=torch.float64))
    else:
        raise ValueError(f"train.sigma_mode must be one of highest, uniform, logit_normal; got {mode!r}")
    return [float(s) for s in draws.clamp(1e-3, 1.0)]
