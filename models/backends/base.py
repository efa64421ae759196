"""The plain torch backend, which every other backend starts from.

The model never constructs `nn.Linear`, a QK norm or an attention call itself; it asks its backend,
naming each linear layer's parallel role. A tensor-parallel or FP8 backend overrides these methods
and the model definition stays as it is.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Literal

from torch import Tensor, nn

import kernels

from ..sharding import Sharding

ParallelRole = Literal["column", "row", "replicated"]


def records_role(linear: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorates a backend's `linear`: the layer it builds carries its `parallel_role`, so code that
    adds to a built model (models.lora: adapters split the way their layer is split) can read it."""

    @functools.wraps(linear)
    def build(
        self, in_features: int, out_features: int, *, bias: bool = True, role: ParallelRole = "replicated"
    ) -> nn.Module:
        layer = linear(self, in_features, out_features, bias=bias, role=role)
        layer.parallel_role = role
        return layer

    return build


class TorchBackend:
    """Plain torch layers; the attention core is `kernels.cross_attention` (run as `kernels.dispatch` picks)."""

    name = "torch"
    tensor_parallel = False  # whether its column/row layers split over the sharding's tensor-parallel ranks
    row_multiple = 1  # token rows its linears need in multiples of (the sharding pads streams to it)

    def __init__(self, sharding: Sharding | None = None):
        sharding = sharding or Sharding()
        if sharding.tp_size > 1 and not self.tensor_parallel:
            raise ValueError(
                f"model.backend={self.name} builds whole layers; {sharding.tp_size} tensor-parallel "
                f"ranks need model.backend=megatron or te"
            )
        self.sharding = sharding.aligned(max(sharding.row_multiple, self.row_multiple))

    @records_role
    def linear(
        self, in_features: int, out_features: int, *, bias: bool = True, role: ParallelRole = "replicated"
    ) -> nn.Module:
        """`role` says how a tensor-parallel backend splits it: 'column' (output features:
        Q/K/V, LTX-2.3's per-head gate logits and FFN-in), 'row' (input features: attention out,
        FFN-out) or 'replicated'."""
        return nn.Linear(in_features, out_features, bias=bias)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_mask: Tensor | None = None,
        kv_grad_scale: float = 1.0,
        with_lse: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, H, N, D) attention; `kv_grad_scale` is the A2V partial stop-gradient on K and V. With
        `with_lse`, also the row log-sum-exp (B, H, Nq) of the scaled logits (for the V2A mass)."""
        if with_lse:
            return kernels.cross_attention_lse(q, k, v, kv_grad_scale=kv_grad_scale, key_mask=key_mask)
        return kernels.cross_attention(q, k, v, kv_grad_scale=kv_grad_scale, key_mask=key_mask)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        """RMSNorm over all `dim` = heads x head_dim channels of Q or K (LTX-2 normalises across heads)."""
        return nn.RMSNorm(dim, eps=eps)

    def forward_context(self) -> AbstractContextManager:
        """Entered around the model's blocks (Transformer Engine's FP8 autocast); here nothing."""
        return contextlib.nullcontext()
