"""Layer backends: where the one model definition gets its linear layers and attention core.

Like megatron-core's ModuleSpec, the model never constructs `nn.Linear`, a QK norm or an attention
call itself; it asks its backend, naming each linear layer's parallel role. A tensor-parallel or FP8
backend overrides these methods and the model definition stays as it is. The defaults describe one
process holding every head and every token.
"""
from __future__ import annotations

import contextlib
import importlib
from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.distributed
from torch import Tensor, nn

import kernels

ParallelRole = Literal["column", "row", "replicated"]


class TorchBackend:
    """Plain torch layers; the attention core is `kernels.cross_attention` (Triton on CUDA once available)."""

    name = "torch"
    tp_size = 1  # tensor-parallel ranks sharing each layer; the model keeps heads // tp_size heads
    tp_rank = 0

    def linear(self, in_features: int, out_features: int, *, bias: bool = True,
               role: ParallelRole = "replicated") -> nn.Module:
        """`role` says how a tensor-parallel backend would split it: 'column' (output features:
        Q/K/V and FFN-in), 'row' (input features: attention out, FFN-out) or 'replicated'."""
        return nn.Linear(in_features, out_features, bias=bias)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None,
                  kv_grad_scale: float = 1.0) -> Tensor:
        """(B, H, N, D) attention; `kv_grad_scale` is the A2V partial stop-gradient on K and V."""
        return kernels.cross_attention(q, k, v, kv_grad_scale=kv_grad_scale, key_mask=key_mask)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        """RMSNorm over all `dim` = heads x head_dim channels of Q or K (LTX-2 normalises across heads)."""
        return nn.RMSNorm(dim, eps=eps)

    def forward_context(self) -> AbstractContextManager:
        """Entered around the model's blocks (Transformer Engine's FP8 autocast); here nothing."""
        return contextlib.nullcontext()

    def padded_length(self, n: int) -> int:
        """Tokens a sequence of n carries after `scatter_sequence` pads it to split evenly; here n."""
        return n

    def local_length(self, n: int) -> int:
        """Tokens of a sequence of n that this rank carries after `scatter_sequence`; here n."""
        return n

    def scatter_sequence(self, x: Tensor) -> Tensor:
        """(B, T, D) -> this rank's share of the (padded) tokens (sequence parallelism); here all of them."""
        return x

    def gather_sequence(self, x: Tensor, length: int) -> Tensor:
        """Inverse of `scatter_sequence`: the full (B, length, D), padding dropped."""
        return x

    def tp_average(self, x: Tensor) -> Tensor:
        """Mean over tensor-parallel ranks of a per-rank statistic (e.g. attention mass over local heads)."""
        return x

    def finalize_grads(self, model: nn.Module) -> None:
        """Called after backward, before clipping: reductions a parallel layout owes the gradients."""


def all_reduce_coalesced(tensors: list[Tensor], group, divide_by: int = 1) -> None:
    """Sums `tensors` in place over `group` (then divides) with one collective on a flat copy."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    torch.distributed.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    for t, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


# name -> "module:class", imported on first use so that optional packages (megatron-core) stay optional.
BACKENDS: dict[str, str] = {
    "torch": "models.backend:TorchBackend",
    "fp8": "models.fp8:Fp8Backend",
    "megatron": "models.megatron:MegatronBackend",
    "te": "models.te:TEBackend",
}


def backend_class(name: str) -> type[TorchBackend]:
    if name not in BACKENDS:
        raise ValueError(f"model.backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_backend(backend: str | TorchBackend | None, **kwargs) -> TorchBackend:
    """A backend instance from a name (constructed with `kwargs`), an instance, or None (torch)."""
    if backend is None:
        return TorchBackend()
    if isinstance(backend, str):
        return backend_class(backend)(**kwargs)
    return backend
