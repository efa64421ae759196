"""The optimizer: AdamW with global-norm gradient clipping, plain or as megatron-core's distributed
optimizer.

`parallel.distributed_optimizer` shards AdamW's moments over the data-parallel ranks (megatron's
DistributedOptimizer, ZeRO-1): gradients are reduce-scattered instead of all-reduced, each rank
updates its slice of every bucket, and the updated parameters are all-gathered. Same AdamW, same
clipping (megatron's norm counts tensor-parallel shards once and sums pipeline stages, as ours
does), weight decay on every parameter like ours, so with fp32 parameters the steps equal the
unsharded ones. With bf16 parameters it keeps sharded fp32 main copies (checkpointed too), which
plain AdamW on bf16 parameters does not have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fields import bounded, choice
from .parallel.grads import GradSync, MegatronGradSync
from .parallel.layout import ProcessLayout

SCHEDULES = ("constant", "linear", "cosine")
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors, shaped and split like the parameter
MAIN = "main_param"  # the distributed optimizer's fp32 copy of a bf16/fp16 parameter


@dataclass
class OptimConfig:
    """`optim.*`: AdamW and the gradient-norm clip."""

    lr: float = bounded(0.0, None, default=3e-4)
    weight_decay: float = bounded(0.0, None, default=0.0)
    beta1: float = bounded(0.0, 0.999999, default=0.9)
    beta2: float = bounded(0.0, 0.999999, default=0.999)
    eps: float = bounded(0.0, None, default=1e-8)
    grad_clip: float = bounded(0.0, None, default=1.0)
    # Learning rate over the run's optimizer steps: `warmup_steps` linear from lr/warmup_steps to lr, then
    # constant, or decayed to 0 at the last step (linear or cosine). A function of the step count, which
    # checkpoints keep, so a resumed run continues the schedule exactly.
    schedule: str = choice(*SCHEDULES, default="constant")
    warmup_steps: int = bounded(0, None, default=0)


def scheduled_lr(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))  # 1 at the last
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer | DistributedAdamW, lr: float) -> None:
    if isinstance(optimizer, DistributedAdamW):
        optimizer.set_hyper_parameters({"lr": lr})
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )


def make_optimizer(
    cfg: OptimConfig, model: nn.Module, sync: GradSync, distributed: bool
) -> torch.optim.AdamW | DistributedAdamW:
    """AdamW over the model's trainable parameters, or megatron's distributed optimizer (`distributed`)
    over the data-parallel gradient buffers of `sync`."""
    betas = (cfg.beta1, cfg.beta2)
    if distributed:
        return DistributedAdamW(sync, cfg.lr, cfg.weight_decay, betas, cfg.eps, cfg.grad_clip)
    return build_optimizer(model, cfg.lr, cfg.weight_decay, betas, cfg.eps)


def apply_hyper_parameters(optimizer: torch.optim.Optimizer | DistributedAdamW, cfg: OptimConfig) -> None:
    """Sets the config's lr, betas, eps and weight decay on a (resumed) optimizer, whose state dict
    brought the values it was saved with: a resumed run takes the settings it was started with."""
    values = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if isinstance(optimizer, DistributedAdamW):
        optimizer.set_hyper_parameters(values)
    else:
        for group in optimizer.param_groups:
            group.update(values)


def grad_norm(model: nn.Module, layout: ProcessLayout) -> Tensor:
    """The global gradient norm, a 0-d tensor (no host sync). Under tensor parallelism a split
    parameter's squares are summed over the group and a replicated one is counted once; pipeline
    stages add their sums. So it equals the single-process norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    split = [p.grad.float().pow(2).sum() for p in params if getattr(p, "tensor_model_parallel", False)]
    whole = [p.grad.float().pow(2).sum() for p in params if not getattr(p, "tensor_model_parallel", False)]
    zero = torch.zeros((), device=params[0].device if params else layout.device)
    split_sq = layout.sum_over("tp", torch.stack(split).sum() if split else zero)
    return torch.sqrt(layout.sum_over("pp", split_sq + (torch.stack(whole).sum() if whole else 0.0)))


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | DistributedAdamW,
    max_norm: float,
    layout: ProcessLayout,
    norm: Tensor | None = None,
) -> float:
    """Clips the global gradient norm (0 = no clipping) and steps; returns the norm before clipping
    (`grad_norm`, unless the caller computed it already). megatron's distributed optimizer computes
    and clips its own, alike."""
    if isinstance(optimizer, DistributedAdamW):
        return optimizer.step()
    grads = [p for p in model.parameters() if p.grad is not None]
    norm = grad_norm(model, layout) if norm is None else norm
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in grads:
            p.grad.mul_(coef.to(p.grad.dtype))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class DistributedAdamW:
    """megatron-core's DistributedOptimizer around AdamW, for `policy.clip_and_step` and the
    distributed checkpoints. Checkpoints keep the unsharded format (moments shaped like each
    parameter, by name), so they reshard to any layout with or without this optimizer. As in
    megatron's own 'fully_reshardable' format, saving assembles each moment on data-parallel rank 0
    (one parameter at a time, in host memory), and loading reads the whole moments (host memory) and
    keeps this rank's slice."""

    def __init__(
        self,
        sync: MegatronGradSync,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        max_norm: float,
    ):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            adam_eps=eps,
            clip_grad=max_norm,
            use_distributed_optimizer=True,
            params_dtype=next(p for p in sync.model.parameters() if p.requires_grad).dtype,
        )
        # No overrides: weight decay on every parameter (megatron's default skips biases and norms).
        chained = get_megatron_optimizer(config, [sync.ddp], config_overrides={})
        (self.optimizer,) = chained.chained_optimizers
        self.chained, self.model, self.layout = chained, sync.model, sync.layout
        self.masters = config.params_dtype != torch.float32

    def trained(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters it steps (the adapters alone when training LoRA), by name."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        """Drops the gradients of a step that is not taken."""
        self.chained.zero_grad()

    def step(self) -> float:
        """Clip (0 = no clipping) and step; the gradient norm before clipping. (Without a loss scaler
        megatron always steps; non-finite gradients go through as they do with plain AdamW.)"""
        _, norm, _ = self.chained.step()
        self.chained.zero_grad()
        return float(norm)

    @property
    def hyper_parameters(self) -> dict:
        group = self.optimizer.optimizer.param_groups[0]
        return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}

    def set_hyper_parameters(self, values: dict) -> None:
        for group in self.optimizer.optimizer.param_groups:
            group.update({k: values[k] for k in ("lr", "betas", "eps", "weight_decay") if k in values})

    def _slice(self, p: Tensor) -> tuple[slice, dict, dict, Tensor] | None:
        """This rank's flat range of parameter p, the AdamW state of that range, its param group and
        its fp32 main parameter (None: another rank's)."""
        opt = self.optimizer
        if p not in opt.model_param_gbuf_map:
            return None
        r = opt._get_model_param_range_map(p)["param"]
        index, order = opt.model_param_group_index_map[p]
        group = opt.optimizer.param_groups[index]
        main = group["params"][order]
        return slice(r.start, r.end), opt.optimizer.state[main], group, main

    @property
    def _keys(self) -> tuple[str, ...]:
        """Tensors kept per parameter: the moments, and the fp32 main copies when the parameters are
        not fp32 themselves (for fp32 parameters the main slices are views of them)."""
        return (*MOMENTS, MAIN) if self.masters else MOMENTS

    def _steps_taken(self) -> Tensor:
        """AdamW's step count: per-parameter state in torch's AdamW, per group in TE's or apex's FusedAdam."""
        for _, p in self.trained():
            if (mine := self._slice(p)) is not None:
                _, state, group, _ = mine
                step = state.get("step", group.get("step", 0))
                return torch.as_tensor(step, dtype=torch.float64).reshape(())
        return torch.zeros((), dtype=torch.float64)

    def full_state(self) -> dict[str, dict[str, Tensor]]:
        """{name: {exp_avg, exp_avg_sq[, main_param] (shaped like the parameter on this rank), step}}
        assembled on data-parallel rank 0 in host memory (collective over the group). The other
        ranks get zero-strided placeholders of the right shapes: their replicas are not written."""
        writer = self.layout.dp_rank == 0
        device = next(self.model.parameters()).device
        step = self.layout.max_over("dp", self._steps_taken().to(device)).float().cpu()
        keys, out = self._keys, {}
        for name, p in self.trained():
            flat = torch.zeros(len(keys), p.numel(), dtype=torch.float32, device=p.device)
            if (mine := self._slice(p)) is not None:
                rows, state, _, main = mine
                for i, k in enumerate(keys):
                    if k == MAIN:
                        flat[i, rows] = main.detach().float()
                    elif k in state:
                        flat[i, rows] = state[k].float()
            self.layout.sum_to_first_("dp", flat)  # every element is owned by exactly one rank
            if writer:
                out[name] = {k: flat[i].view_as(p).cpu() for i, k in enumerate(keys)}
            else:
                out[name] = {k: torch.zeros((), dtype=torch.float32).expand(p.shape) for k in keys}
            out[name]["step"] = step
        return out

    def load_targets(self, with_main: bool) -> dict[str, dict[str, Tensor]]:
        """Host buffers for loading the whole moments (and main copies, if the checkpoint has them)."""
        keys = self._keys if with_main else MOMENTS
        return {
            name: {**{k: torch.empty(p.shape, dtype=torch.float32) for k in keys}, "step": torch.zeros(())}
            for name, p in self.trained()
        }

    @torch.no_grad()
    def load_full_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Keeps this rank's slice of each parameter's tensors. Call after the model's weights are
        loaded: without main copies in the checkpoint (it was written by plain AdamW) they are taken
        from the parameters."""
        for name, p in self.trained():
            if (mine := self._slice(p)) is None:
                continue
            rows, st, group, main = mine
            for k in MOMENTS:
                st[k] = state[name][k].reshape(-1)[rows].to(device=p.device, dtype=torch.float32)
            if self.masters:
                source = state[name][MAIN] if MAIN in state[name] else p.detach()
                main.copy_(source.reshape(-1)[rows].to(device=main.device, dtype=main.dtype))
            step = state[name]["step"].reshape(())
            if "step" in group:
                group["step"] = int(step)
            else:
                st["step"] = step.clone()
