"""megatron-core tensor (and sequence) parallel backend for the one model definition.

Q/K/V and FFN-in are megatron `ColumnParallelLinear`s, attention-out and FFN-out `RowParallelLinear`s,
so each rank holds heads // tp heads of all six attentions and a 1/tp slice of each FFN. AdaLN,
tables, embeddings, caption and output projections are replicated. The QK RMSNorm spans all heads,
so its sum of squares is all-reduced over the tensor-parallel group.

With sequence parallelism the video and audio tokens (and the text context) are split along the
sequence between the parallel linears: column linears all-gather the tokens, row linears
reduce-scatter them (megatron does both on dim 0, so these layers run on (T, B, D) views). Every
replicated parameter then sees only this rank's tokens, and `finalize_grads` sums its gradient over
the group, as megatron does for LayerNorm weights under sequence parallelism.

`parallel_state.initialize_model_parallel` must have run before the backend is built.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn

from .backend import ParallelRole, TorchBackend, all_reduce_coalesced


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

    def __init__(self, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("MegatronBackend needs megatron.core.parallel_state.initialize_model_parallel() first")
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size, sequence_parallel=self.sequence_parallel,
            use_cpu_initialization=not torch.cuda.is_available(), gradient_accumulation_fusion=False,
            params_dtype=params_dtype)

    def linear(self, in_features: int, out_features: int, *, bias: bool = True,
               role: ParallelRole = "replicated") -> nn.Module:
        if role == "column":
            return _ColumnLinear(in_features, out_features, config=self.config, init_method=_init_like_torch,
                                 bias=bias, gather_output=False)
        if role == "row":
            return _RowLinear(in_features, out_features, config=self.config, init_method=_init_like_torch,
                              bias=bias, input_is_parallel=True, skip_bias_add=False)
        return nn.Linear(in_features, out_features, bias=bias)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        if dim % self.tp_size:
            raise ValueError(f"QK norm width {dim} cannot be split over {self.tp_size} tensor-parallel ranks")
        return TPRMSNorm(dim, eps, self.group, self.tp_size)

    # Token rows each rank's linears see must be a multiple of this (Transformer Engine's FP8 GEMMs: 16).
    row_multiple = 1

    def _shards(self) -> int:
        """Ranks a sequence is split over: tp under sequence parallelism, else 1."""
        return self.tp_size if self.sequence_parallel else 1

    def padded_length(self, n: int) -> int:
        step = self.row_multiple * self._shards()
        return -(-n // step) * step

    def local_length(self, n: int) -> int:
        return self.padded_length(n) // self._shards()

    def scatter_sequence(self, x: Tensor) -> Tensor:
        """Zero-pads the tokens to `padded_length` (the model masks padded keys), then, under sequence
        parallelism, keeps this rank's share."""
        extra = self.padded_length(x.shape[1]) - x.shape[1]
        if extra:
            x = nn.functional.pad(x, (0, 0, 0, extra))
        if not self.sequence_parallel:
            return x
        return tensor_parallel.scatter_to_sequence_parallel_region(x.transpose(0, 1).contiguous()).transpose(0, 1)

    def gather_sequence(self, x: Tensor, length: int) -> Tensor:
        if self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x.transpose(0, 1).contiguous(),
                                                                  tensor_parallel_output_grad=False).transpose(0, 1)
        return x[:, :length]

    def tp_average(self, x: Tensor) -> Tensor:
        if self.tp_size == 1:
            return x
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x / self.tp_size

    def finalize_grads(self, model: nn.Module) -> None:
        """Under sequence parallelism, sums the partial gradients of replicated parameters over the group."""
        if not self.sequence_parallel:
            return
        all_reduce_coalesced([p.grad for p in model.parameters()
                              if p.grad is not None and not getattr(p, "tensor_model_parallel", False)], self.group)
