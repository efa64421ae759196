"""The torch-native FP8 backend: per-layer error within what E4M3/E5M2 rounding allows, the amax
guard, the shape fallback, and the tiny model on `backend="fp8"` against the same weights in fp32.

Error bounds. Round-to-nearest with m mantissa bits moves a value by at most 2^-(m+1) relative, and
by about 2^-(m+1) / sqrt(3) * 0.7 RMS over a binade: 2.5% for E4M3 (m=3), 5% for E5M2 (m=2). A
product of two rounded operands has the root-sum-square of both, and a dot product of independent
random terms keeps that relative size: ~3.6% forward (E4M3 x E4M3), ~5.7% dgrad and wgrad (E5M2 x
E4M3). The bounds below (8%, 15%) leave about 2.5x margin; the lower bound shows rounding happened.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import models
from models.backends.fp8 import E4M3, E5M2, Fp8Backend, Fp8Linear, quantize
from tests.helpers import tiny_inputs

SHAPES = [((4, 33), 64, 128), ((7,), 32, 16), ((2, 3, 5), 256, 64)]  # (leading dims, in, out)
FWD_BOUND, BWD_BOUND = 0.08, 0.15


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(in_features: int, out_features: int, seed: int = 0) -> tuple[nn.Linear, Fp8Linear]:
    torch.manual_seed(seed)
    ref = nn.Linear(in_features, out_features)
    fp8 = Fp8Linear(in_features, out_features)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def _forward_backward(layer: nn.Linear, x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_scales_by_amax(dtype):
    t = torch.randn(64, 48) * 3
    q, scale = quantize(t, dtype)
    fmax = torch.finfo(dtype).max
    assert q.dtype == dtype and q.is_contiguous()
    assert scale.item() == pytest.approx(t.abs().max().item() / fmax)
    assert q.float().abs().max().item() == fmax
    half_ulp = 2.0 ** -(4 if dtype == E4M3 else 3)
    big = t.abs() > 1e-2 * t.abs().max()  # normal range; smaller values are subnormal, absolute error
    assert ((q.float() * scale - t).abs() / t.abs())[big].max().item() <= half_ulp


@pytest.mark.parametrize("lead, i, o", SHAPES)
def test_forward_within_e4m3_error(lead, i, o):
    ref, fp8 = _pair(i, o)
    x = torch.randn(*lead, i)
    y_ref, y = ref(x), fp8(x)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert 0.005 < _rel(y, y_ref) < FWD_BOUND


@pytest.mark.parametrize("lead, i, o", SHAPES)
def test_backward_within_e5m2_error(lead, i, o):
    ref, fp8 = _pair(i, o)
    x, grad = torch.randn(*lead, i), torch.randn(*lead, o)
    _, dx_ref = _forward_backward(ref, x, grad)
    _, dx = _forward_backward(fp8, x, grad)
    assert dx is not None and fp8.weight.grad is not None
    assert 0.005 < _rel(dx, dx_ref) < BWD_BOUND
    assert 0.005 < _rel(fp8.weight.grad, ref.weight.grad) < BWD_BOUND
    torch.testing.assert_close(fp8.bias.grad, ref.bias.grad)  # the bias stays out of FP8


def test_all_three_gemms_are_scaled_mm(monkeypatch):
    seen = []
    scaled_mm = torch._scaled_mm

    def recording(a, b, **kwargs):
        seen.append((a.dtype, b.dtype, a.shape[1]))
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    _, fp8 = _pair(32, 48)
    _forward_backward(fp8, torch.randn(3, 7, 32), torch.randn(3, 7, 48))
    # forward E4M3 x E4M3 over K; dgrad E5M2 x E4M3 over N; wgrad over the 21 tokens padded to 32
    assert seen == [(E4M3, E4M3, 32), (E5M2, E4M3, 48), (E5M2, E4M3, 32)]


def test_bf16_keeps_its_dtype():
    ref, fp8 = _pair(64, 32)
    fp8 = fp8.to(torch.bfloat16)
    x, grad = torch.randn(10, 64), torch.randn(10, 32)
    y_ref, _ = _forward_backward(ref, x, grad)
    y, dx = _forward_backward(fp8, x.bfloat16(), grad.bfloat16())
    assert y.dtype == dx.dtype == fp8.weight.grad.dtype == torch.bfloat16
    assert _rel(y, y_ref) < FWD_BOUND


def test_zero_input_gives_no_nan():
    _, fp8 = _pair(32, 16)
    y, dx = _forward_backward(fp8, torch.zeros(5, 32), torch.randn(5, 16))
    torch.testing.assert_close(y, fp8.bias.detach().expand(5, 16))
    assert torch.isfinite(dx).all() and torch.isfinite(fp8.weight.grad).all()
    assert not fp8.weight.grad.any()  # wgrad of a zero input is zero
    fp8.weight.grad = None
    _, dx = _forward_backward(fp8, torch.randn(5, 32), torch.zeros(5, 16))
    assert not dx.any() and not fp8.weight.grad.any()


def test_unaligned_features_fall_back_to_the_plain_linear():
    ref, fp8 = _pair(20, 48)
    assert not fp8.fp8
    x = torch.randn(3, 20)
    torch.testing.assert_close(fp8(x), ref(x), rtol=0, atol=0)


def test_backend_roles():
    backend = models.backends.backend_class("fp8")()
    assert isinstance(backend, Fp8Backend) and backend.name == "fp8"
    assert type(backend.linear(32, 32, role="replicated")) is nn.Linear
    assert isinstance(backend.linear(32, 64, role="column"), Fp8Linear)
    assert isinstance(backend.linear(64, 32, bias=False, role="row"), Fp8Linear)


def test_tiny_model_on_fp8_backend():
    torch.manual_seed(0)
    ref = models.build_model("tiny")
    fp8 = models.build_model("tiny", backend="fp8")
    fp8.load_state_dict(ref.state_dict())  # same parameter names and shapes: checkpoints carry over

    linears = {name: type(m) for name, m in fp8.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {name: kind for name, kind in linears.items() if name.startswith("transformer_blocks.")}
    assert in_blocks and all(kind is Fp8Linear for kind in in_blocks.values())
    outside = {name: kind for name, kind in linears.items() if name not in in_blocks}
    assert any("adaln" in n for n in outside) and any("caption" in n for n in outside)
    assert any("proj" in n for n in outside) and all(kind is nn.Linear for kind in outside.values())

    inputs = tiny_inputs(ref.config)
    outputs = []
    for model in (ref, fp8):
        video, audio = model(**inputs)
        (video.square().mean() + audio.square().mean()).backward()
        outputs.append((video, audio))
    for out, out_ref in zip(outputs[1], outputs[0]):
        assert _rel(out, out_ref) < FWD_BOUND

    ref_params = dict(ref.named_parameters())
    grads = [(p.grad, ref_params[n].grad) for n, p in fp8.named_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g, _ in grads)
    flat, flat_ref = (torch.cat([pair[k].flatten() for pair in grads]) for k in (0, 1))
    assert _rel(flat, flat_ref) < BWD_BOUND
