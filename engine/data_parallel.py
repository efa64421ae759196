"""Gradient averaging over data-parallel ranks (after `finish`, every `p.grad` is the mean gradient)
and megatron-core's distributed optimizer.

megatron-core's DistributedDataParallel does it wherever megatron's CUDA-bound buffers can live (on
GPUs, and on the CPU under the test shim): backward hooks accumulate each gradient into one
contiguous buffer, whose buckets are all-reduced (pre-scaled by 1/dp) as soon as the last
microbatch's backward has produced them, overlapping the reduction with the rest of backward on
GPUs (`overlap_grad_reduce`). The model is not wrapped: the hooks live on its parameters, so the
trainer and the pipeline keep calling the model itself. A plain CPU host averages with one
coalesced all-reduce after backward. Gradients are reduced in the parameters' dtype (fp32 masters
in the 19B config).

`parallel.distributed_optimizer` shards AdamW's moments over the data-parallel ranks (megatron's
DistributedOptimizer, ZeRO-1): gradients are reduce-scattered instead of all-reduced, each rank
updates its slice of every bucket, and the updated parameters are all-gathered. Same AdamW, same
clipping (megatron's norm counts tensor-parallel shards once and sums pipeline stages, as ours
does), weight decay on every parameter like ours, so with fp32 parameters the steps equal the
unsharded ones. With bf16 parameters it keeps sharded fp32 main copies (checkpointed too), which
plain AdamW on bf16 parameters does not have.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.backend import all_reduce_coalesced

from .distributed import ParallelContext, megatron_cuda_calls_work

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors, shaped and split like the parameter
MAIN = "main_param"  # the distributed optimizer's fp32 copy of a bf16/fp16 parameter


class GradSync:
    """One process (nothing to do), or a plain CPU host: one coalesced all-reduce in `finish`."""

    def __init__(self, model: nn.Module, parallel: ParallelContext):
        self.model, self.parallel = model, parallel

    def no_sync(self) -> ContextManager:
        """Around the backward of every microbatch but the step's last (no reduction yet)."""
        return contextlib.nullcontext()

    def start(self) -> None:
        """Before the step's first backward."""

    def finish(self) -> None:
        """After the step's last backward: mean gradients in `p.grad`."""
        if self.parallel.dp > 1:
            all_reduce_coalesced([p.grad for p in self.model.parameters() if p.grad is not None],
                                 self.parallel.dp_group, self.parallel.dp)


class MegatronGradSync(GradSync):
    def __init__(self, model: nn.Module, parallel: ParallelContext, distributed_optimizer: bool = False):
        super().__init__(model, parallel)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer import TransformerConfig

        cfg, dtype = model.config, next(model.parameters()).dtype
        # DDP reads the layout and the loss convention from a TransformerConfig; the sizes only label it.
        config = TransformerConfig(num_layers=cfg.num_layers, hidden_size=cfg.video_dim,
                                   num_attention_heads=cfg.num_heads, tensor_model_parallel_size=parallel.tp,
                                   pipeline_model_parallel_size=parallel.pp, pipeline_dtype=dtype,
                                   params_dtype=dtype)
        ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=parallel.device.type == "cuda",
                                                   grad_reduce_in_fp32=False,
                                                   use_distributed_optimizer=distributed_optimizer)
        self.ddp = DistributedDataParallel(config, ddp_config, module=model)

    def no_sync(self) -> ContextManager:
        return self.ddp.no_sync()

    def start(self) -> None:
        for p in self.model.parameters():
            p.grad = None  # `finish` aliased it to the buffer; autograd would accumulate into it
        self.ddp.zero_grad_buffer()

    def finish(self) -> None:
        self.ddp.finish_grad_sync()
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = p.main_grad


def grad_sync(model: nn.Module, parallel: ParallelContext, distributed_optimizer: bool = False) -> GradSync:
    if distributed_optimizer or (parallel.dp > 1 and megatron_cuda_calls_work()):
        return MegatronGradSync(model, parallel, distributed_optimizer)
    return GradSync(model, parallel)


class DistributedAdamW:
    """megatron-core's DistributedOptimizer around AdamW, for `policy.clip_and_step` and the
    distributed checkpoints. Checkpoints keep the unsharded format (moments shaped like each
    parameter, by name), so they reshard to any layout with or without this optimizer. As in
    megatron's own 'fully_reshardable' format, saving assembles each moment on data-parallel rank 0
    (one parameter at a time, in host memory), and loading reads the whole moments (host memory) and
    keeps this rank's slice."""

    def __init__(self, sync: MegatronGradSync, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, max_norm: float):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                                 adam_beta2=betas[1], adam_eps=eps, clip_grad=max_norm,
                                 use_distributed_optimizer=True, params_dtype=next(sync.model.parameters()).dtype)
        # No overrides: weight decay on every parameter (megatron's default skips biases and norms).
        chained = get_megatron_optimizer(config, [sync.ddp], config_overrides={})
        (self.optimizer,) = chained.chained_optimizers
        self.chained, self.model, self.group = chained, sync.model, sync.ddp.dp_group
        self.masters = config.params_dtype != torch.float32

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
        for p in self.model.parameters():
            if (mine := self._slice(p)) is not None:
                _, state, group, _ = mine
                step = state.get("step", group.get("step", 0))
                return torch.as_tensor(step, dtype=torch.float64).reshape(())
        return torch.zeros((), dtype=torch.float64)

    def full_state(self) -> dict[str, dict[str, Tensor]]:
        """{name: {exp_avg, exp_avg_sq[, main_param] (shaped like the parameter on this rank), step}}
        assembled on data-parallel rank 0 in host memory (collective over the group). The other
        ranks get zero-strided placeholders of the right shapes: their replicas are not written."""
        lead = dist.get_global_rank(self.group, 0)
        writer = dist.get_rank() == lead
        device = next(self.model.parameters()).device
        step = self._steps_taken().to(device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.group)
        step = step.float().cpu()
        keys, out = self._keys, {}
        for name, p in self.model.named_parameters():
            flat = torch.zeros(len(keys), p.numel(), dtype=torch.float32, device=p.device)
            if (mine := self._slice(p)) is not None:
                rows, state, _, main = mine
                for i, k in enumerate(keys):
                    if k == MAIN:
                        flat[i, rows] = main.detach().float()
                    elif k in state:
                        flat[i, rows] = state[k].float()
            dist.reduce(flat, dst=lead, group=self.group)  # every element is owned by exactly one rank
            if writer:
                out[name] = {k: flat[i].view_as(p).cpu() for i, k in enumerate(keys)}
            else:
                out[name] = {k: torch.zeros((), dtype=torch.float32).expand(p.shape) for k in keys}
            out[name]["step"] = step
        return out

    def load_targets(self, with_main: bool) -> dict[str, dict[str, Tensor]]:
        """Host buffers for loading the whole moments (and main copies, if the checkpoint has them)."""
        keys = self._keys if with_main else MOMENTS
        return {name: {**{k: torch.empty(p.shape, dtype=torch.float32) for k in keys}, "step": torch.zeros(())}
                for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Keeps this rank's slice of each parameter's tensors. Call after the model's weights are
        loaded: without main copies in the checkpoint (it was written by plain AdamW) they are taken
        from the parameters."""
        for name, p in self.model.named_parameters():
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
