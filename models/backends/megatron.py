"""megatron-core tensor (and sequence) parallel backend for the one model definition.

Q/K/V and FFN-in are megatron `ColumnParallelLinear`s, attention-out and FFN-out `RowParallelLinear`s,
so each rank holds heads // tp heads of all six attentions and a 1/tp slice of each FFN. LTX-2.3's
gate logits (one output per head) are column-split too, so each rank computes the gates of its own
heads. AdaLN (the prompt adaLN too), tables, embeddings, caption and output projections are
replicated. The QK RMSNorm spans all heads, so its sum of squares is all-reduced over the
tensor-parallel group.

With sequence parallelism (models.sharding splits the tokens) column linears all-gather the tokens
and row linears reduce-scatter them (megatron does both on dim 0, so these layers run on (T, B, D)
views). Every replicated parameter then sees only this rank's tokens, and the engine sums its
gradient over the group (engine.parallel.grads), as megatron does for LayerNorm weights under
sequence parallelism.

`parallel_state.initialize_model_parallel` must have run before the backend is built, with the
tensor-parallel group of the sharding the backend is built for.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn

from ..sharding import Sharding
from .base import ParallelRole, TorchBackend, records_role


def _init_like_torch(weight: Tensor) -> None:
    """nn.Linear's default weight init, so a fresh megatron model is distributed like a torch one."""
    nn.init.kaiming_uniform_(weight, a=5**0.5)


class BatchFirst:
    """Mixin for megatron's parallel linears (plain and Transformer Engine): batch-first (B, T, D) in
    and out, bias added (they return (out, bias) and, under sequence parallelism, gather and scatter
    dim 0, so they run on (T, B, D) views). No `_extra_state` entry (megatron keeps one for
    Transformer Engine), so state dicts keep the official layout's keys."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()  # megatron's hook re-inserts `_extra_state` on load

    def forward(self, x: Tensor) -> Tensor:
        if self.config.sequence_parallel:
            return super().forward(x.transpose(0, 1))[0].transpose(0, 1)
        return super().forward(x)[0]


class _ColumnLinear(BatchFirst, tensor_parallel.ColumnParallelLinear):
    """(B, T, D) in, (B, T, D_out / tp) out."""


class _RowLinear(BatchFirst, tensor_parallel.RowParallelLinear):
    """(B, T, D_in / tp) in, (B, T, D_out) out (or this rank's tokens under SP)."""


class TPRMSNorm(nn.Module):
    """RMSNorm over channels split across the tensor-parallel group: local sum of squares, all-reduced
    (the autograd all-reduce sums the gradients back), then this rank's slice of the weight."""

    def __init__(self, dim: int, eps: float, group, world: int):
        super().__init__()
        self.dim, self.eps, self.group = dim, eps, group
        self.weight = nn.Parameter(torch.ones(dim // world))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        sum_sq = dist_fn.all_reduce(x.float().pow(2).sum(-1, keepdim=True), group=self.group)
        return (x.float() * torch.rsqrt(sum_sq / self.dim + self.eps)).to(x.dtype) * self.weight


class MegatronBackend(TorchBackend):
    name = "megatron"
    tensor_parallel = True

    def __init__(self, sharding: Sharding | None = None, params_dtype: torch.dtype = torch.float32):
        super().__init__(sharding)
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("MegatronBackend needs megatron.core.parallel_state.initialize_model_parallel() first")
        # megatron's layers read the tensor-parallel group from parallel_state; it must be the sharding's.
        if parallel_state.get_tensor_model_parallel_world_size() != self.sharding.tp_size:
            raise ValueError(
                f"the sharding has {self.sharding.tp_size} tensor-parallel ranks, megatron's parallel "
                f"state {parallel_state.get_tensor_model_parallel_world_size()}"
            )
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.sharding.tp_size,
            sequence_parallel=self.sharding.sequence_parallel,
            use_cpu_initialization=not torch.cuda.is_available(),
            gradient_accumulation_fusion=False,
            params_dtype=params_dtype,
        )

    @records_role
    def linear(
        self, in_features: int, out_features: int, *, bias: bool = True, role: ParallelRole = "replicated"
    ) -> nn.Module:
        if role == "column":
            return _ColumnLinear(
                in_features,
                out_features,
                config=self.config,
                init_method=_init_like_torch,
                bias=bias,
                gather_output=False,
            )
        if role == "row":
            return _RowLinear(
                in_features,
                out_features,
                config=self.config,
                init_method=_init_like_torch,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=False,
            )
        return nn.Linear(in_features, out_features, bias=bias)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        if dim % self.sharding.tp_size:
            raise ValueError(f"QK norm width {dim} cannot be split over {self.sharding.tp_size} tensor-parallel ranks")
        return TPRMSNorm(dim, eps, self.sharding.tp_group, self.sharding.tp_size)
