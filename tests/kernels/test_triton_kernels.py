"""Triton kernels against materialised float64 attention on fresh random inputs.

Without CUDA the kernels run under Triton's interpreter on CPU tensors. TRITON_INTERPRET must be
set before triton is first imported in the process: triton's own @jit helpers (tl.sum, tl.max)
are wrapped for the interpreter or the compiler at that moment, not at launch. So this module sets
it when triton is not loaded yet (this file run on its own); in a full `pytest tests` run torch has
usually imported triton already, and `test_interpreter_in_subprocess` runs this file again in a
fresh process with the variable set. With CUDA the same tests run compiled, plus `gpu` tests at
LTX-2 shapes. The small shapes take both the split and the unsplit paths of each loop kernel.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from kernels import reference
from tests.helpers import ROOT

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
if HAS_TRITON and not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
IN_PROCESS = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
if IN_PROCESS:
    from kernels import triton_attention, triton_mass

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (Nq, Nk, heads, head dim): odd sizes on either side of the 64-wide interpreter blocks.
SHAPES = [
    (1, 1, 1, 64),
    (1, 300, 2, 128),
    (13, 37, 3, 64),
    (37, 13, 4, 128),
    (126, 129, 1, 128),
    (129, 126, 2, 64),
    (300, 1, 3, 128),
]

needs_kernels = pytest.mark.skipif(
    not IN_PROCESS,
    reason="triton is not installed" if not HAS_TRITON else "run by test_interpreter_in_subprocess",
)
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _inputs(b: int, h: int, nq: int, nk: int, d: int, dtype: torch.dtype, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for n in (nq, nk, nk)]


def _random_mask(b: int, nk: int, seed: int) -> Tensor:
    """Random key mask that keeps at least one key per row, as the API requires."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, nk, generator=gen) < 0.6
    mask[torch.arange(b), torch.randint(nk, (b,), generator=gen)] = True
    return mask.to(DEVICE)


def _logits64(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Tensor:
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits


def _attention64(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, do: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Float64 O, LSE, dQ, dK, dV (through autograd on the materialised softmax), each paired with
    the size of its summands: the same sums over absolute values, which bound the rounding error of
    a correct kernel also where the result cancels to about 0 (dQ and dK with a single key)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    logits = _logits64(leaves[0], leaves[1], key_mask)
    out = logits.softmax(dim=-1) @ leaves[2]
    dq, dk, dv = torch.autograd.grad(out, leaves, do.double())
    p = logits.detach().softmax(dim=-1)
    aq, ak, av, ado = (t.detach().double().abs() for t in (q, k, v, do))
    out_size = p @ av
    ds_size = p * (ado @ av.transpose(-1, -2) + (ado * out_size).sum(dim=-1, keepdim=True))
    scale = 1.0 / math.sqrt(q.shape[-1])
    lse = logits.detach().logsumexp(dim=-1)
    return [
        (out.detach(), out_size),
        (lse, lse.abs().clamp_min(1.0)),
        (dq, scale * ds_size @ ak),
        (dk, scale * ds_size.transpose(-1, -2) @ aq),
        (dv, p.transpose(-1, -2) @ ado),
    ]


def _mass64(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Tensor:
    return _logits64(q, k, key_mask).softmax(dim=-1).sum(dim=2).mean(dim=1)


def _assert_close(actual: Tensor, expected: Tensor, size: Tensor, tol: float) -> None:
    """Within tol of expected, elementwise and relative to the largest summand size."""
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * size.abs().max().item())


def _run(q: Tensor, k: Tensor, v: Tensor, g: float, key_mask: Tensor | None, do: Tensor) -> tuple[Tensor, ...]:
    """Triton O, LSE, dQ, dK, dV."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = triton_attention.cross_attention_lse(*leaves, kv_grad_scale=g, key_mask=key_mask)
    return out.detach(), lse, *torch.autograd.grad(out, leaves, do)


def _check_attention(
    b: int, h: int, nq: int, nk: int, d: int, dtype: torch.dtype, g: float, use_mask: bool, seed: int
) -> None:
    q, k, v = _inputs(b, h, nq, nk, d, dtype, seed)
    mask = _random_mask(b, nk, seed + 1) if use_mask else None
    do = torch.randn(b, h, nq, d, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE, dtype)
    ours = _run(q, k, v, g, mask, do)
    assert all(t.dtype == dtype for t in ours[:1] + ours[2:]) and ours[1].dtype == torch.float32
    for actual, (expected, size), factor in zip(ours, _attention64(q, k, v, mask, do), [1, 1, 1, g, g]):
        _assert_close(actual, factor * expected, size, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("nq,nk,h,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_attention_matches_float64(nq: int, nk: int, h: int, d: int, dtype: torch.dtype, use_mask: bool) -> None:
    _check_attention(2, h, nq, nk, d, dtype, 1.0, use_mask, seed=nq * 1000 + nk)


@needs_kernels
@pytest.mark.parametrize("g", [0.0, 0.1, 0.9, 1.0])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_kv_grad_scale_scales_only_dk_dv(g: float, use_mask: bool) -> None:
    q, k, v = _inputs(2, 2, 300, 37, 64, torch.float32, seed=7)
    mask = _random_mask(2, 37, seed=8) if use_mask else None
    do = torch.randn(2, 2, 300, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, _, dq, dk, dv = _run(q, k, v, g, mask, do)
    out1, _, dq1, dk1, dv1 = _run(q, k, v, 1.0, mask, do)
    assert torch.equal(out, out1) and torch.equal(dq, dq1)
    # Equal up to where g is applied: to each split's partial sum before they are added.
    torch.testing.assert_close(dk, g * dk1, rtol=1e-6, atol=1e-6 * dk1.abs().max().item())
    torch.testing.assert_close(dv, g * dv1, rtol=1e-6, atol=1e-6 * dv1.abs().max().item())
    (dk64, dk_size), (dv64, dv_size) = _attention64(q, k, v, mask, do)[3:]
    _assert_close(dk, g * dk64, dk_size, 1e-5)
    _assert_close(dv, g * dv64, dv_size, 1e-5)


@needs_kernels
def test_strided_inputs_and_gradient() -> None:
    """The model's (B, N, H, D) projections viewed as (B, H, N, D), and a non-contiguous dO."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = [torch.randn(2, n, 3, 64, generator=gen).to(DEVICE).transpose(1, 2) for n in (129, 126, 126)]
    do = torch.randn(2, 129, 3, 64, generator=gen).to(DEVICE).transpose(1, 2)
    ours = _run(q, k, v, 0.5, None, do)
    for actual, (expected, size), factor in zip(ours, _attention64(q, k, v, None, do), [1, 1, 1, 0.5, 0.5]):
        _assert_close(actual, factor * expected, size, 1e-5)


@needs_kernels
@pytest.mark.parametrize("nq,nk", [(1, 13), (13, 37), (37, 300), (129, 126), (300, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("lse_from", ["pass", "forward"])
def test_attention_mass_matches_float64(nq: int, nk: int, dtype: torch.dtype, use_mask: bool, lse_from: str) -> None:
    seed = nq * 1000 + nk
    q, k, v = _inputs(2, 3, nq, nk, (64, 128)[seed % 2], dtype, seed)
    mask = _random_mask(2, nk, seed) if use_mask else None
    lse = triton_attention.cross_attention_lse(q, k, v, key_mask=mask)[1] if lse_from == "forward" else None
    mass = triton_mass.attention_mass(q, k, key_mask=mask, lse=lse)
    assert mass.shape == (2, nk) and mass.dtype == torch.float32
    expected = _mass64(q, k, mask)
    _assert_close(mass, expected, expected, TOL[dtype])
    if mask is not None:
        assert (mass[~mask] == 0).all()


@needs_kernels
def test_attention_mass_accumulates_into_strided_out() -> None:
    q, k, _ = _inputs(2, 2, 13, 37, 64, torch.float32, seed=5)
    out = torch.ones(2, 74, device=DEVICE)[:, ::2]
    returned = triton_mass.attention_mass(q, k, out=out)
    assert returned is out
    triton_mass.attention_mass(q, k, out=out)
    expected = 1 + 2 * _mass64(q, k, None)
    _assert_close(out, expected, expected, 1e-5)


def _good() -> dict[str, Tensor]:
    q, k, v = _inputs(2, 2, 5, 6, 64, torch.float32, seed=0)
    return {"q": q, "k": k, "v": v, "key_mask": torch.ones(2, 6, dtype=torch.bool, device=DEVICE)}


BAD_ATTENTION = [
    {"q": torch.randn(2, 5, 64)},
    {"k": torch.randn(3, 2, 6, 64)},
    {"k": torch.randn(2, 2, 6, 32)},
    {"v": torch.randn(2, 2, 7, 64)},
    {"v": torch.randn(2, 2, 6, 64, dtype=torch.float64)},
    {"key_mask": torch.ones(2, 5, dtype=torch.bool)},
    {"key_mask": torch.ones(2, 6)},
    {"key_mask": torch.zeros(2, 6, dtype=torch.bool)},
    {"kv_grad_scale": 1.5},
]
BAD_MASS = [
    {"q": torch.randn(2, 5, 64)},
    {"k": torch.randn(2, 2, 6, 64, dtype=torch.float64)},
    {"key_mask": torch.ones(2, 6, dtype=torch.int64)},
    {"lse": torch.zeros(2, 2, 6)},
    {"out": torch.zeros(2, 5)},
    {"out": torch.zeros(2, 6, dtype=torch.float64)},
    {"chunk_size": 0},
]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@needs_kernels
@pytest.mark.parametrize("override", BAD_ATTENTION)
def test_cross_attention_rejects_like_reference(override: dict) -> None:
    args = _good() | {name: t.to(DEVICE) if isinstance(t, Tensor) else t for name, t in override.items()}
    ours = _error(triton_attention.cross_attention, **args)
    assert ours == _error(reference.cross_attention, **args)


@needs_kernels
@pytest.mark.parametrize("override", BAD_MASS)
def test_attention_mass_rejects_like_reference(override: dict) -> None:
    args = {"q": _good()["q"], "k": _good()["k"]} | {
        name: t.to(DEVICE) if isinstance(t, Tensor) else t for name, t in override.items()
    }
    ours = _error(triton_mass.attention_mass, **args)
    assert ours == _error(reference.attention_mass, **args)


@needs_kernels
@pytest.mark.parametrize("dtype,dim,name", [(torch.float64, 64, "q dtype"), (torch.float32, 32, "q head dim")])
def test_rejects_what_triton_does_not_support(dtype: torch.dtype, dim: int, name: str) -> None:
    q, k, v = _inputs(1, 1, 4, 4, dim, dtype, seed=0)
    with pytest.raises(ValueError, match=f"^{name}"):
        triton_attention.cross_attention(q, k, v)
    with pytest.raises(ValueError, match=f"^{name}"):
        triton_mass.attention_mass(q, k)


@pytest.mark.skipif(not HAS_TRITON or IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_in_subprocess() -> None:
    """triton was imported before TRITON_INTERPRET could be set: run this file in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# LTX-2 shapes (B=1, H=32): A2V is video queries on audio keys, V2A the other way round.
LTX2_ATTENTION = [
    (6144, 126, 64, torch.bfloat16, 0.9, True),
    (24576, 504, 64, torch.bfloat16, 0.1, False),
    (6144, 126, 64, torch.float32, 0.0, False),
    (126, 6144, 64, torch.bfloat16, 1.0, False),
    (504, 24576, 64, torch.bfloat16, 1.0, True),
    (4096, 4096, 128, torch.bfloat16, 1.0, False),
]


@pytest.mark.gpu
@requires_cuda
@needs_kernels
@pytest.mark.parametrize("nq,nk,d,dtype,g,use_mask", LTX2_ATTENTION)
def test_ltx2_attention_matches_float64(nq: int, nk: int, d: int, dtype: torch.dtype, g: float, use_mask: bool) -> None:
    _check_attention(1, 32, nq, nk, d, dtype, g, use_mask, seed=nq + nk)


@pytest.mark.gpu
@requires_cuda
@needs_kernels
@pytest.mark.parametrize("nq,nk", [(126, 6144), (504, 24576)])
@pytest.mark.parametrize("lse_from", ["pass", "forward"])
def test_ltx2_attention_mass_matches_float64(nq: int, nk: int, lse_from: str) -> None:
    q, k, v = _inputs(1, 32, nq, nk, 64, torch.bfloat16, seed=nq)
    lse = triton_attention.cross_attention_lse(q, k, v)[1] if lse_from == "forward" else None
    expected = _mass64(q, k, None)
    _assert_close(triton_mass.attention_mass(q, k, lse=lse), expected, expected, 2e-2)
