"""How this rank's copy of the model is cut: tensor-parallel heads and channels, and sequence shards.

A `Sharding` is derived from the engine's process layout (`engine.parallel.ProcessLayout.sharding`)
and handed to a layer backend, which builds its tensor-parallel layers for it, and to the model,
which splits its sequences with it. With sequence parallelism the video, audio and text tokens are
cut over the tensor-parallel ranks between the parallel linears: every stream is zero-padded to a
multiple of `row_multiple` x the shard count, the padded keys are masked in every attention, their
RoPE rows are identity rotations and their outputs are dropped. Context parallelism is the next
user of the same padding, masks and split, over its own group.

The scatter and gather here are megatron's sequence-parallel region functions (dim 1 of batch-first
tensors instead of dim 0): scatter keeps this rank's chunk and all-gathers in backward, gather
all-gathers and keeps this rank's chunk of the gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .rope import Rope


@dataclass(frozen=True)
class Sharding:
    """One process holding every head and token unless built from a process layout."""

    tp_size: int = 1  # tensor-parallel ranks sharing each layer; each holds heads // tp_size heads
    tp_rank: int = 0
    tp_group: object | None = field(default=None, repr=False, compare=False)
    sequence_parallel: bool = False  # tokens split over the tensor-parallel ranks between the parallel linears
    row_multiple: int = 1  # token rows each rank's linears see must be a multiple of this (TE's FP8 GEMMs: 16)

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} is outside 0..{self.tp_size - 1}")
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("sequence parallelism needs more than one tensor-parallel rank")

    def aligned(self, row_multiple: int) -> Sharding:
        """This sharding padding every stream to a multiple of `row_multiple` rows as well."""
        if row_multiple == self.row_multiple:
            return self
        return dataclasses.replace(self, row_multiple=row_multiple)

    # ---- tensor parallelism: heads and weights ---------------------------------------------------
    def local_heads(self, heads: int) -> int:
        """Heads this rank computes of an attention with `heads` heads."""
        if heads % self.tp_size:
            raise ValueError(f"{heads} attention heads cannot be split over {self.tp_size} tensor-parallel ranks")
        return heads // self.tp_size

    def head_slice(self, heads: int) -> slice:
        """This rank's heads among `heads` (RoPE tables are per head)."""
        local = self.local_heads(heads)
        return slice(self.tp_rank * local, (self.tp_rank + 1) * local)

    def is_split(self, param: Tensor | None) -> bool:
        """Whether `param` is a tensor-parallel slice (megatron marks those with `tensor_model_parallel`)."""
        return self.tp_size > 1 and param is not None and getattr(param, "tensor_model_parallel", False)

    def weight_slice(self, param: Tensor) -> tuple[slice, ...]:
        """Index of this rank's slice of the whole tensor that `param` is split from."""
        index = [slice(None)] * param.dim()
        n = param.shape[param.partition_dim]
        index[param.partition_dim] = slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        return tuple(index)

    def gather_weight(self, t: Tensor, param: Tensor) -> Tensor:
        """The whole tensor from every rank's slice `t` of split parameter `param` (collective)."""
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=param.partition_dim)

    # ---- sequences -------------------------------------------------------------------------------
    @property
    def sequence_shards(self) -> int:
        """Ranks a sequence is split over: tp under sequence parallelism, else 1."""
        return self.tp_size if self.sequence_parallel else 1

    def padded_length(self, n: int) -> int:
        """Tokens a sequence of n carries after `scatter` pads it to split evenly."""
        step = self.row_multiple * self.sequence_shards
        return -(-n // step) * step

    def local_length(self, n: int) -> int:
        """Tokens of a sequence of n that this rank carries after `scatter`."""
        return self.padded_length(n) // self.sequence_shards

    def scatter(self, x: Tensor) -> Tensor:
        """(B, T, D) -> this rank's share of the zero-padded tokens, (B, local_length(T), D)."""
        extra = self.padded_length(x.shape[1]) - x.shape[1]
        if extra:
            x = nn.functional.pad(x, (0, 0, 0, extra))
        if self.sequence_shards == 1:
            return x
        return _Scatter.apply(x, self)

    def gather(self, x: Tensor, length: int) -> Tensor:
        """Inverse of `scatter`: the full (B, length, D), padding dropped."""
        if self.sequence_shards > 1:
            x = _Gather.apply(x, self)
        return x[:, :length]

    def key_mask(self, mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor | None:
        """A (B, padded_length(n)) key mask: `mask` (or all True) for the n real tokens, False for the
        padding; None when there is neither."""
        padded = self.padded_length(n)
        if padded == n:
            return mask
        valid = (torch.arange(padded, device=device) < n).expand(b, padded)
        return valid if mask is None else valid & nn.functional.pad(mask, (0, padded - n), value=False)

    def pad_rope(self, table: Rope, n: int) -> Rope:
        """Identity rotations for the padded tokens (their keys are masked, their outputs dropped)."""
        extra = self.padded_length(n) - n
        if not extra:
            return table
        cos, sin = table
        return nn.functional.pad(cos, (0, 0, 0, extra), value=1.0), nn.functional.pad(sin, (0, 0, 0, extra))

    def _all_gather_tokens(self, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.sequence_shards)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=1)

    def _own_tokens(self, x: Tensor) -> Tensor:
        return x.chunk(self.sequence_shards, dim=1)[self.tp_rank].contiguous()


class _Scatter(torch.autograd.Function):
    """Forward: this rank's chunk of the tokens; backward: the chunks' gradients all-gathered."""

    @staticmethod
    def forward(ctx, x: Tensor, sharding: Sharding) -> Tensor:
        ctx.sharding = sharding
        return sharding._own_tokens(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.sharding._all_gather_tokens(grad), None


class _Gather(torch.autograd.Function):
    """Forward: every rank's tokens; backward: this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, sharding: Sharding) -> Tensor:
        ctx.sharding = sharding
        return sharding._all_gather_tokens(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.sharding._own_tokens(grad), None
