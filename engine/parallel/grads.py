"""Gradient reductions after backward: averaging over data-parallel ranks, and the sums sequence
parallelism owes the replicated parameters. After `finish`, every `p.grad` is what one process
would have.

megatron-core's DistributedDataParallel does it wherever megatron's CUDA-bound buffers can live (on
GPUs, and on the CPU under the test shim): backward hooks accumulate each gradient into one
contiguous buffer, whose buckets are all-reduced (pre-scaled by 1/dp) as soon as the last
microbatch's backward has produced them, overlapping the reduction with the rest of backward on
GPUs (`overlap_grad_reduce`). The model is not wrapped: the hooks live on its parameters, so the
trainer and the pipeline keep calling the model itself. A plain CPU host averages with one
coalesced all-reduce after backward. Gradients are reduced in the parameters' dtype (fp32 masters
in the 19B config).

With `parallel.distributed_optimizer`, megatron's DDP reduce-scatters instead (engine.optim).

Under sequence parallelism every replicated parameter (adaLN, tables, embeddings, norms) saw only this
rank's tokens, so `finish` also sums its gradient over the tensor-parallel group, as megatron's
`finalize_model_grads` does for LayerNorm weights.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from torch import nn

from .layout import ProcessLayout, megatron_cuda_calls_work


class GradSync:
    """One process (nothing to do), or a plain CPU host: one coalesced all-reduce in `finish`."""

    def __init__(self, model: nn.Module, layout: ProcessLayout):
        self.model, self.layout = model, layout

    def no_sync(self) -> AbstractContextManager:
        """Around the backward of every microbatch but the step's last (no reduction yet)."""
        return contextlib.nullcontext()

    def start(self) -> None:
        """Before the step's first backward."""

    def finish(self) -> None:
        """After the step's last backward: mean gradients in `p.grad`."""
        self.layout.sum_over_(
            "dp", [p.grad for p in self.model.parameters() if p.grad is not None], divide_by=self.layout.dp
        )
        self.sum_sequence_parallel_grads()

    def sum_sequence_parallel_grads(self) -> None:
        """Under sequence parallelism, sums the partial gradients of replicated parameters over the
        tensor-parallel group."""
        sharding = self.model.sharding
        if sharding.sequence_parallel:
            self.layout.sum_over_(
                "tp", [p.grad for p in self.model.parameters() if p.grad is not None and not sharding.is_split(p)]
            )


class MegatronGradSync(GradSync):
    def __init__(self, model: nn.Module, layout: ProcessLayout, distributed_optimizer: bool = False):
        super().__init__(model, layout)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer import TransformerConfig

        cfg, dtype = model.config, next(model.parameters()).dtype
        # DDP reads the layout and the loss convention from a TransformerConfig; the sizes only label it.
        config = TransformerConfig(
            num_layers=cfg.num_layers,
            hidden_size=cfg.video_dim,
            num_attention_heads=cfg.num_heads,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            pipeline_dtype=dtype,
            params_dtype=dtype,
        )
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=layout.device.type == "cuda",
            grad_reduce_in_fp32=False,
            use_distributed_optimizer=distributed_optimizer,
        )
        self.ddp = DistributedDataParallel(config, ddp_config, module=model)

    def no_sync(self) -> AbstractContextManager:
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
        self.sum_sequence_parallel_grads()


def grad_sync(model: nn.Module, layout: ProcessLayout, distributed_optimizer: bool = False) -> GradSync:
    if distributed_optimizer or (layout.dp > 1 and megatron_cuda_calls_work()):
        return MegatronGradSync(model, layout, distributed_optimizer)
    return GradSync(model, layout)
