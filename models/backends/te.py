"""Transformer Engine backend: megatron-core's TE layers with FP8, for clusters with TE installed
(NGC containers). The layout is the megatron backend's (models.backends.megatron); only the layers differ.

Q/K/V and FFN-in are `TEColumnParallelLinear`, attention-out and FFN-out `TERowParallelLinear`, the
QK RMSNorm a `TENorm` (with one tensor-parallel rank; across ranks it stays the megatron backend's
all-reduced norm, since TE normalises only the channels it holds). The blocks run under megatron's
FP8 context (`get_fp8_context`): hybrid format (e4m3 forward, e5m2 gradients), tensorwise current
scaling by default or delayed scaling (`model.fp8_recipe`). One context spans all blocks, as
megatron's TransformerBlock does, so delayed scaling reduces its amax history once per forward.
Patchify, adaLN, caption and output projections are plain linears outside it, in the parameter
dtype. TE's cache of FP8 weight copies across microbatches is disabled (`is_first_microbatch`
would have to be reset after every optimizer step), so every forward casts the current weights.

A parallel linear whose local weight is not 16-aligned in both dimensions (LTX-2.3's `to_gate_logits`, one
output per head: 32 / tp rows) cannot run TE's FP8 GEMM; it is megatron's plain parallel linear of the same
role and split (models.backends.megatron), in the parameter dtype.

TE's FP8 GEMMs need token rows in multiples of 16 (`row_multiple`): the backend's sharding pads every
stream to a multiple of 16 (times tp under sequence parallelism) with the model's one padding path
(models.sharding: padded keys masked, identity RoPE, outputs trimmed), so any token count works.
TE keeps its FP8 scaling state in `_extra_state`, which our checkpoints leave out (they keep the
official layout's keys): delayed scaling restarts its amax history on resume.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager

import torch
from torch import nn

if importlib.util.find_spec("transformer_engine") is None:
    raise ImportError(
        "model.backend=te needs NVIDIA Transformer Engine (pip install transformer-engine[pytorch], "
        "or an NGC PyTorch container); it is not installed here. model.backend=fp8 is the "
        "torch-native FP8 backend for machines without it."
    )

from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear  # noqa: E402
from megatron.core.fp8_utils import get_fp8_context  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from ..sharding import Sharding  # noqa: E402
from .base import ParallelRole, records_role  # noqa: E402
from .megatron import BatchFirst, MegatronBackend, _init_like_torch  # noqa: E402

FP8_RECIPES = ("tensorwise", "delayed")
FP8_ALIGN = 16  # TE's FP8 GEMMs want both weight dimensions in multiples of 16


class _TEColumnLinear(BatchFirst, TEColumnParallelLinear):
    """(B, T, D) in, (B, T, D_out / tp) out."""


class _TERowLinear(BatchFirst, TERowParallelLinear):
    """(B, T, D_in / tp) in, (B, T, D_out) out (or this rank's tokens under SP)."""


class TEBackend(MegatronBackend):
    name = "te"
    row_multiple = 16  # TE's FP8 GEMMs want row counts in multiples of 16

    def __init__(
        self,
        sharding: Sharding | None = None,
        params_dtype: torch.dtype = torch.float32,
        fp8_recipe: str = "tensorwise",
    ):
        super().__init__(sharding, params_dtype)
        if fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"model.fp8_recipe must be one of {', '.join(FP8_RECIPES)}; got {fp8_recipe!r}")
        # TE layers read their settings from a TransformerConfig; the width and head count only label it
        # (each layer gets its own sizes).
        self.te_config = TransformerConfig(
            num_layers=1,
            hidden_size=self.sharding.tp_size,
            num_attention_heads=self.sharding.tp_size,
            tensor_model_parallel_size=self.sharding.tp_size,
            sequence_parallel=self.sharding.sequence_parallel,
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,
            normalization="RMSNorm",
            fp8="hybrid",
            fp8_recipe=fp8_recipe,
            disable_parameter_transpose_cache=True,
        )

    @records_role
    def linear(
        self, in_features: int, out_features: int, *, bias: bool = True, role: ParallelRole = "replicated"
    ) -> nn.Module:
        tp = self.sharding.tp_size
        local = (out_features // tp, in_features) if role == "column" else (out_features, in_features // tp)
        if role != "replicated" and any(d % FP8_ALIGN for d in local):  # no FP8 kernel for this shape
            return super().linear(in_features, out_features, bias=bias, role=role)
        if role == "column":
            return _TEColumnLinear(
                in_features,
                out_features,
                config=self.te_config,
                init_method=_init_like_torch,
                gather_output=False,
                bias=bias,
                skip_bias_add=False,
                is_expert=False,
            )
        if role == "row":
            return _TERowLinear(
                in_features,
                out_features,
                config=self.te_config,
                init_method=_init_like_torch,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=False,
                is_expert=False,
            )
        return nn.Linear(in_features, out_features, bias=bias)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        if self.sharding.tp_size > 1:
            return super().qk_norm(dim, eps)
        return TENorm(self.te_config, dim, eps)

    def forward_context(self) -> AbstractContextManager:
        return get_fp8_context(self.te_config)
