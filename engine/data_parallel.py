"""Gradient averaging over data-parallel ranks: after `finish`, every `p.grad` is the mean gradient.

megatron-core's DistributedDataParallel does it wherever megatron's CUDA-bound buffers can live (on
GPUs, and on the CPU under the test shim): backward hooks accumulate each gradient into one
contiguous buffer, whose buckets are all-reduced (pre-scaled by 1/dp) as soon as the last
microbatch's backward has produced them, overlapping the reduction with the rest of backward on
GPUs (`overlap_grad_reduce`). The model is not wrapped: the hooks live on its parameters, so the
trainer and the pipeline keep calling the model itself. A plain CPU host averages with one
coalesced all-reduce after backward. Gradients are reduced in the parameters' dtype (fp32 masters
in the 19B config).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn

from models.backend import all_reduce_coalesced

from .distributed import ParallelContext, megatron_cuda_calls_work


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
    def __init__(self, model: nn.Module, parallel: ParallelContext):
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
                                                   grad_reduce_in_fp32=False, use_distributed_optimizer=False)
        self.ddp = DistributedDataParallel(config, ddp_config, module=model)

    def no_sync(self) -> ContextManager:
        return self.ddp.no_sync()

    def start(self) -> None:
        self.ddp.zero_grad_buffer()

    def finish(self) -> None:
        self.ddp.finish_grad_sync()
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = p.main_grad


def grad_sync(model: nn.Module, parallel: ParallelContext) -> GradSync:
    if parallel.dp > 1 and megatron_cuda_calls_work():
        return MegatronGradSync(model, parallel)
    return GradSync(model, parallel)
