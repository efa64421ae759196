"""Layer backends: where the one model definition gets its linear layers and attention core.

Like megatron-core's ModuleSpec, the model never constructs `nn.Linear` or calls an attention
function itself; it asks its backend, naming each layer's parallel role. A tensor-parallel or FP8
backend overrides these two methods and the model definition stays as it is.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

import kernels

ParallelRole = Literal["column", "row", "replicated"]


class TorchBackend:
    """Plain torch layers; the attention core is `kernels.cross_attention` (Triton on CUDA once available)."""

    name = "torch"

    def linear(self, in_features: int, out_features: int, *, bias: bool = True,
               role: ParallelRole = "replicated") -> nn.Module:
        """`role` says how a tensor-parallel backend would split it: 'column' (output features:
        Q/K/V and FFN-in), 'row' (input features: attention out, FFN-out) or 'replicated'."""
        return nn.Linear(in_features, out_features, bias=bias)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None,
                  kv_grad_scale: float = 1.0) -> Tensor:
        """(B, H, N, D) attention; `kv_grad_scale` is the A2V partial stop-gradient on K and V."""
        return kernels.cross_attention(q, k, v, kv_grad_scale=kv_grad_scale, key_mask=key_mask)


BACKENDS: dict[str, type[TorchBackend]] = {"torch": TorchBackend}


def resolve_backend(backend: str | TorchBackend | None) -> TorchBackend:
    if backend is None:
        return TorchBackend()
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        return BACKENDS[backend]()
    return backend

