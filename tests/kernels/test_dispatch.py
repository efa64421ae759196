"""kernels.dispatch: shape classes, the table's rules, every candidate against float64, the committed table.

On a CPU the candidates that run are SDPA as torch picks (the reference) and SDPA held to torch's CPU
flash kernel, which is enough to see a table's choice (or OMNINFT_ATTENTION) reach the model. With CUDA,
`gpu` tests run every candidate at LTX-2 shapes against float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import kernels
import models
from bench.kernels import block_calls
from kernels import dispatch, reference
from kernels.dispatch import CallClass, DispatchTable
from tests.helpers import ROOT

CUDA = torch.cuda.is_available()


def test_length_and_call_classes() -> None:
    assert [dispatch.length_class(n) for n in (1, 2, 3, 126, 128, 129, 6144, 24576)] == [
        1,
        2,
        4,
        128,
        128,
        256,
        8192,
        32768,
    ]
    q, k = torch.zeros(1, 2, 6144, 64), torch.zeros(1, 2, 126, 64)
    mask = torch.ones(1, 126, dtype=torch.bool)
    cls = dispatch.call_class("fwd+bwd", q, k, 0.9, mask)
    assert cls == CallClass("fwd+bwd", True, True, 64, 8192, 128)
    assert cls.key == "fwd+bwd/scaled/masked/d64/q8192/k128" and CallClass.parse(cls.key) == cls
    assert not dispatch.call_class("fwd", q, k, 0.9, None).scaled  # a scale matters only with a backward
    for bad in ("fwd/plain/dense/d64/q8", "bwd/plain/dense/d64/q8/k8", "fwd/plain/dense/dx/q8/k8"):
        with pytest.raises(ValueError, match="dispatch table key"):
            CallClass.parse(bad)


def test_attention_op_follows_autograd() -> None:
    x = torch.randn(1, 1, 3, 64)
    assert dispatch.attention_op(x, x, x, with_lse=False) == "fwd"
    assert dispatch.attention_op(x, x, x, with_lse=True) == "fwd+lse"
    leaf = x.clone().requires_grad_()
    assert dispatch.attention_op(leaf, x, x, with_lse=True) == "fwd+bwd"
    with torch.no_grad():
        assert dispatch.attention_op(leaf, x, x, with_lse=False) == "fwd"


def _entry(impl: str, **ms: float) -> dict:
    return {"impl": impl, "ms": ms or {impl: 1.0}}


def test_table_exact_nearest_and_missing() -> None:
    table = DispatchTable(
        {
            "gpu-x": {
                "bfloat16": {
                    "fwd+bwd/scaled/dense/d64/q8192/k128": _entry("triton"),
                    "fwd+bwd/plain/dense/d64/q8192/k128": _entry("sdpa-flash"),
                    "mass/plain/dense/d64/q128/k8192": _entry("triton"),
                }
            }
        }
    )
    cls = CallClass("fwd+bwd", True, False, 64, 8192, 128)
    assert table.choose("gpu-x", "bfloat16", cls) == "triton"
    near = CallClass("fwd+bwd", True, False, 64, 32768, 256)  # 2 + 1 doublings away: too far
    assert table.choose("gpu-x", "bfloat16", near) is None
    assert table.choose("gpu-x", "bfloat16", CallClass("fwd+bwd", True, False, 64, 16384, 256)) == "triton"
    assert table.choose("gpu-x", "bfloat16", CallClass("fwd+bwd", False, False, 64, 4096, 128)) == "sdpa-flash"
    assert table.choose("gpu-x", "bfloat16", CallClass("fwd+bwd", True, True, 64, 8192, 128)) is None  # masked
    assert table.choose("gpu-x", "bfloat16", CallClass("fwd+bwd", True, False, 128, 8192, 128)) is None  # head dim
    assert table.choose("gpu-x", "float16", cls) is None and table.choose("gpu-y", "bfloat16", cls) is None
    assert table.choose("gpu-x", "bfloat16", CallClass("mass", False, False, 64, 128, 8192)) == "triton"


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"fwd/plain/dense/d64/q8/k8": _entry("cutlass")}, "impl must be one of"),
        ({"fwd/plain/dense/d64/q8/k8": _entry("torch")}, "is not a attention implementation"),
        ({"mass/plain/dense/d64/q8/k8": _entry("sdpa")}, "is not a mass implementation"),
        ({"fwd/plain/dense/d64/q8": _entry("sdpa")}, "dispatch table key"),
    ],
)
def test_table_rejects_bad_entries(entries: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DispatchTable({"gpu-x": {"bfloat16": entries}}, source="t.json")


def test_fastest_picks_least_time_per_class() -> None:
    rows = [
        {"class": "fwd/plain/dense/d64/q8/k8", "impl": "sdpa", "seconds": 2e-3},
        {"class": "fwd/plain/dense/d64/q8/k8", "impl": "triton", "seconds": 1e-3},
        {"class": "mass/plain/dense/d64/q8/k8", "impl": "torch", "seconds": 1e-3},
        {"class": "mass/plain/dense/d64/q8/k8", "impl": "triton", "seconds": 3e-3},
    ]
    assert dispatch.fastest(rows) == {
        "fwd/plain/dense/d64/q8/k8": {"impl": "triton", "ms": {"sdpa": 2.0, "triton": 1.0}},
        "mass/plain/dense/d64/q8/k8": {"impl": "torch", "ms": {"torch": 1.0, "triton": 3.0}},
    }


def test_committed_table_loads() -> None:
    table = DispatchTable.load(dispatch.TABLE_PATH)
    assert set(json.loads(dispatch.TABLE_PATH.read_text())) == {"about", "devices"}
    assert "cpu" not in table.devices  # CPU tensors take the reference


def _use_table(monkeypatch: pytest.MonkeyPatch, path: Path, entries: dict) -> None:
    DispatchTable({"cpu": {"float32": entries}}).save(path, about="test")
    monkeypatch.setenv("OMNINFT_DISPATCH_TABLE", str(path))


def test_choice_reaches_the_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    q = torch.randn(1, 2, 100, 64, requires_grad=True)
    k = torch.randn(1, 2, 30, 64, requires_grad=True)
    assert dispatch.choose("fwd+bwd", q, k, 0.5).name == "sdpa"  # no measurement
    _use_table(monkeypatch, tmp_path / "t.json", {"fwd+bwd/scaled/dense/d64/q128/k32": _entry("sdpa-flash")})
    assert dispatch.choose("fwd+bwd", q, k, 0.5).name == "sdpa-flash"
    assert dispatch.choose("fwd+bwd", q, k, 1.0).name == "sdpa"  # another class
    assert dispatch.choose("fwd+bwd", q.double(), k.double(), 0.5).name == "sdpa"  # another dtype
    seen = _count_calls(monkeypatch, "sdpa-flash")
    kernels.cross_attention(q, k, k, 0.5)
    assert len(seen) == 1
    with torch.no_grad():  # without a backward the class is fwd: not in the table
        kernels.cross_attention(q, k, k, 0.5)
    assert len(seen) == 1


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    """Records each call of implementation `name`'s attention (which still runs)."""
    seen, impl = [], dispatch.IMPLEMENTATIONS[name]
    wrapped = dataclasses.replace(impl, attention=lambda *a: seen.append(a) or impl.attention(*a))
    monkeypatch.setitem(dispatch.IMPLEMENTATIONS, name, wrapped)
    return seen


def test_forced_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 10, 64)
    monkeypatch.setenv("OMNINFT_ATTENTION", "sdpa-flash")
    assert dispatch.choose("fwd", q, q).name == "sdpa-flash"
    assert dispatch.choose("mass", q, q).name == "torch"  # not a mass implementation: the default
    monkeypatch.setenv("OMNINFT_ATTENTION", "triton")
    assert dispatch.choose("fwd", q, q).name == "sdpa"  # Triton refuses CPU tensors
    monkeypatch.setenv("OMNINFT_ATTENTION", "fa3")
    with pytest.raises(ValueError, match="^OMNINFT_ATTENTION must be one of sdpa, "):
        dispatch.choose("fwd", q.cuda() if CUDA else q, q)


def _float64_attention(q: Tensor, k: Tensor, v: Tensor, g: float, mask: Tensor | None, do: Tensor) -> list:
    """O, dQ, dK, dV in float64 on the host, and the mask there."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    mask = None if mask is None else mask.cpu()
    out = reference.cross_attention(*leaves, g, mask)
    return [out.detach(), *torch.autograd.grad(out, leaves, do.cpu().double()), mask]


def _check_candidates(nq: int, nk: int, dim: int, dtype: torch.dtype, g: float, masked: bool, tol: float) -> None:
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(nq * 7 + nk)
    q, k, v = (torch.randn(1, 3, n, dim, generator=gen).to(device, dtype).requires_grad_() for n in (nq, nk, nk))
    do = torch.randn(1, 3, nq, dim, generator=gen).to(device, dtype)
    mask = None
    if masked:
        mask = torch.rand(1, nk, generator=gen) < 0.5
        mask[0, -1] = True
        mask = mask.to(device)
    expected = _float64_attention(q, k, v, g, mask, do)
    expected_lse = reference.row_lse(q.detach().cpu().double(), k.detach().cpu().double(), expected[-1])
    impls = dispatch.candidates("fwd+bwd", q, mask)
    assert impls[0].name == "sdpa" and ("sdpa-flash" in [i.name for i in impls]) == (not masked or not CUDA)
    for impl in impls:
        out = impl.attention(q, k, v, g, mask)
        got = [out, *torch.autograd.grad(out, (q, k, v), do)]
        with torch.no_grad():
            got += impl.attention_lse(q, k, v, g, mask)
        names = ("out", "dq", "dk", "dv", "out (with lse)", "lse")
        for name, ours, ref in zip(names, got, [*expected[:4], expected[0], expected_lse], strict=True):
            err = float((ours.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-300))
            assert err < tol, f"{impl.name} {name}: relative error {err:.3g}"


@pytest.mark.parametrize(
    "nq,nk,dim,g,masked", [(37, 13, 64, 0.3, False), (13, 70, 128, 1.0, True), (1, 5, 64, 0.0, False)]
)
def test_cpu_candidates_match_float64(nq: int, nk: int, dim: int, g: float, masked: bool) -> None:
    _check_candidates(nq, nk, dim, torch.float32, g, masked, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("call", block_calls(6144, 126, 1024, 200), ids=lambda c: c.name)
def test_ltx2_candidates_match_float64(call) -> None:
    """Every candidate on CUDA at a block's shapes (3 heads: the float64 reference runs on the host)."""
    g = 0.9 if call.name == "a2v" else 1.0
    _check_candidates(call.nq, call.nk, call.dim, torch.bfloat16, g, call.real_keys is not None, tol=2e-2)


def _model_step(model: torch.nn.Module, device: str, dtype: torch.dtype) -> list[Tensor]:
    """Velocities and every parameter gradient of one forward and backward on fixed random inputs (host float64)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    video, audio = (
        torch.randn(1, 32, cfg.in_channels, generator=gen),
        torch.randn(1, 9, cfg.audio_in_channels, generator=gen),
    )
    context = torch.randn(1, 7, cfg.caption_channels, generator=gen)
    model = model.to(device, dtype)
    model.zero_grad()
    args = (t.to(device, dtype) for t in (video, audio, torch.tensor([0.6]), context, context))
    v, a = model(*args, (2, 4, 4))
    (v.square().mean() + a.square().mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [t.detach().cpu().double() for t in (v, a, *grads)]


def test_model_with_a_forced_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole tiny model, forward and backward, with every attention on torch's CPU flash kernel."""
    cfg = models.resolve_config({"preset": "tiny", "num_layers": 2})
    torch.manual_seed(0)
    model = models.build_model(cfg)
    expected = _model_step(model, "cpu", torch.float32)
    monkeypatch.setenv("OMNINFT_ATTENTION", "sdpa-flash")
    calls = _count_calls(monkeypatch, "sdpa-flash")
    got = _model_step(model, "cpu", torch.float32)
    assert len(calls) == 6 * cfg.num_layers  # every attention of every block
    for ours, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["sdpa", "sdpa-efficient", "triton"])
def test_model_on_cuda_matches_float64(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """Two blocks at LTX-2's head dims (video 128, audio 64), forward and backward on CUDA in fp32 with every
    attention on `impl`, against the same weights in float64 on the host (fp32 matmuls without TF32)."""
    cfg = models.resolve_config(
        {"preset": "tiny", "num_layers": 2, "num_heads": 2, "video_head_dim": 128, "audio_head_dim": 64}
    )
    torch.manual_seed(0)
    model = models.build_model(cfg)
    expected = _model_step(model, "cpu", torch.float64)
    monkeypatch.setenv("OMNINFT_ATTENTION", impl)
    calls = _count_calls(monkeypatch, impl)
    got = _model_step(model, "cuda", torch.float32)
    assert len(calls) == 6 * cfg.num_layers
    for i, (ours, ref) in enumerate(zip(got, expected, strict=True)):
        err = float((ours - ref).norm() / ref.norm().clamp_min(1e-300))
        assert err < 1e-4, f"{impl}: output {i} (velocities, then parameter gradients): relative error {err:.3g}"


def test_kernels_work_without_triton_in_a_fresh_process() -> None:
    """`import kernels` must not need triton (an optional extra), and a table naming it must not break a CPU run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "q = torch.randn(1, 2, 5, 64)\n"
        "assert not kernels.HAS_TRITON and kernels.cross_attention(q, q, q).shape == q.shape\n"
        "assert kernels.attention_mass(q, q).shape == (1, 5)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "OMNINFT_ATTENTION": "triton"}
    )
