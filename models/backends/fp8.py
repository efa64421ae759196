"""Torch-native FP8 linear layers: the FP8 backend for machines without Transformer Engine.

Recipe: tensorwise current scaling (TE's `Float8CurrentScaling`). Every call scales each operand by
its own amax, so there is no amax history to warm up or checkpoint. Activations and weights go to
E4M3 (3 mantissa bits, max 448), gradients to E5M2 (2 mantissa bits, max 57344: gradients need range
more than precision). All three GEMMs of a linear (forward, dgrad, wgrad) run through
`torch._scaled_mm`. Master weights stay in the module's dtype, so checkpoints, the optimizer and EMA
see an ordinary `nn.Linear`.

`torch._scaled_mm` (torch 2.13) on CUDA wants the first operand row-major and the second
column-major, K and N multiples of 16, fp32 scalar scales, and refuses E5M2 x E5M2 (cuBLASLt has no
such kernel). The recipe never multiplies two E5M2 operands: dgrad and wgrad are E5M2 x E4M3. On CPU
every E4M3/E5M2 pairing, layout and shape works, with no dequantize-and-matmul fallback needed. The
layer applies the CUDA rules on CPU too, so CPU tests take the same path a GPU run does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ParallelRole, TorchBackend, records_role

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
ALIGN = 16  # cuBLASLt's FP8 rule for K, N and (in wgrad, where the tokens are contracted) M
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a tiny scale instead of 0/0 = NaN


def quantize(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Tensorwise current scaling: returns (q, scale) with `t ~= q.float() * scale`, q row-major.
    The clamp guards the cast against rounding just past the format's max: E4M3FN has no inf,
    so an out-of-range value would become NaN."""
    fmax = torch.finfo(dtype).max
    scale = t.detach().abs().amax().float().clamp(min=_AMAX_FLOOR) / fmax
    q = (t.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q.contiguous(), scale


def _col_major(t: Tensor) -> Tensor:
    """Same values, column-major storage: the layout `_scaled_mm` wants for its second operand."""
    return t.t().contiguous().t()


def _pad_rows(t: Tensor) -> Tensor:
    """Zero rows up to a multiple of ALIGN. wgrad contracts over the rows (tokens), and zero rows
    add nothing to it nor to any amax."""
    extra = -t.shape[0] % ALIGN
    return F.pad(t, (0, 0, 0, extra)) if extra else t


class _Fp8Matmul(torch.autograd.Function):
    """x @ W^T for a 2-D x with row count a multiple of ALIGN; all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        x_q, x_scale = quantize(x, E4M3)
        w_q, w_scale = quantize(weight, E4M3)
        # The FP8 copies are what backward multiplies, and they are 1 byte per element to keep.
        ctx.save_for_backward(x_q, x_scale, w_q, w_scale)
        ctx.dtypes = x.dtype, weight.dtype
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_q, x_scale, w_q, w_scale = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g_q, g_scale = quantize(grad_out, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dgrad (M, N) @ (N, K)
            grad_x = torch._scaled_mm(g_q, _col_major(w_q), scale_a=g_scale, scale_b=w_scale, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # wgrad (N, M) @ (M, K)
            grad_w = torch._scaled_mm(
                g_q.t().contiguous(), _col_major(x_q), scale_a=g_scale, scale_b=x_scale, out_dtype=w_dtype
            )
        return grad_x, grad_w


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose matmul runs in FP8 (module docstring); parameters and state dict are nn.Linear's.

    Leading dims are flattened into tokens and padded to a multiple of 16 (wgrad contracts over
    them). When in_features or out_features is not a multiple of 16 the layer is the plain
    linear, since cuBLASLt has no FP8 kernel for that shape. The bias is added outside FP8, in the
    output dtype, which is the input's dtype.
    """

    @property
    def fp8(self) -> bool:
        """Whether this layer's shape takes the FP8 path."""
        return self.in_features % ALIGN == 0 and self.out_features % ALIGN == 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.fp8 or x.numel() == 0:  # amax of an empty tensor is undefined
            return super().forward(x)
        x2d = x.reshape(-1, self.in_features)
        y = _Fp8Matmul.apply(_pad_rows(x2d), self.weight)[: x2d.shape[0]]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8Backend(TorchBackend):
    """FP8 for the transformer blocks' GEMMs (attention Q/K/V/out, LTX-2.3's gate logits and FFNs: the
    'column' and 'row' roles; a layer with a dimension that is not a multiple of 16, like the tiny
    models' 4-head gate logits, stays plain, see Fp8Linear). 'replicated' layers (patchify, adaLN,
    caption and output projections) stay in the model dtype. Like TE's recipe, this keeps the
    model's first and last layers and the small conditioning MLPs, where FP8 error hurts most and
    saves least, out of FP8."""

    name = "fp8"

    @records_role
    def linear(
        self, in_features: int, out_features: int, *, bias: bool = True, role: ParallelRole = "replicated"
    ) -> nn.Module:
        if role == "replicated":
            return super().linear(in_features, out_features, bias=bias, role=role)
        return Fp8Linear(in_features, out_features, bias=bias)
