"""Reference kernels checked against materialised float64 attention on fresh random inputs."""

import math

import pytest
import torch
from torch import Tensor

from kernels import attention_mass, cross_attention, cross_attention_lse

SIZES = [(1, 1), (1, 300), (13, 37), (37, 13), (126, 129), (129, 126), (300, 1)]


def _inputs(b: int, h: int, nq: int, nk: int, d: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen) for n in (nq, nk, nk))


def _random_mask(b: int, nk: int, seed: int) -> Tensor:
    """Random key mask that keeps at least one key per row, as the API requires."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, nk, generator=gen) < 0.6
    mask[torch.arange(b), torch.randint(nk, (b,), generator=gen)] = True
    return mask


def _probs64(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Tensor:
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def _attention64(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    return _probs64(q, k, key_mask) @ v.double()


@pytest.mark.parametrize("nq,nk", SIZES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_forward_matches_float64(nq: int, nk: int, use_mask: bool) -> None:
    seed = nq * 1000 + nk
    h, d = 1 + seed % 4, (64, 128)[seed % 2]
    q, k, v = _inputs(2, h, nq, nk, d, seed)
    mask = _random_mask(2, nk, seed) if use_mask else None
    out = cross_attention(q, k, v, key_mask=mask)
    assert out.shape == (2, h, nq, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, _attention64(q, k, v, mask).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g", [0.0, 0.1, 0.9, 1.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_backward_scales_only_kv(g: float, use_mask: bool) -> None:
    q, k, v = _inputs(2, 3, 37, 129, 64, seed=7)
    mask = _random_mask(2, 129, seed=8) if use_mask else None
    grad_out = torch.randn(2, 3, 37, 64, generator=torch.Generator().manual_seed(9))

    def grads(dtype: torch.dtype, scale: float) -> tuple[Tensor, ...]:
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if dtype == torch.float64:
            out = _attention64(*leaves, mask)
        else:
            out = cross_attention(*leaves, kv_grad_scale=scale, key_mask=mask)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype))

    dq, dk, dv = grads(torch.float32, g)
    dq_unscaled, _, _ = grads(torch.float32, 1.0)
    dq64, dk64, dv64 = grads(torch.float64, 1.0)
    torch.testing.assert_close(dq, dq_unscaled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dq, dq64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, (g * dk64).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, (g * dv64).float(), rtol=1e-5, atol=1e-5)


def _mass64(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Tensor:
    return _probs64(q, k, key_mask).sum(dim=2).mean(dim=1)


@pytest.mark.parametrize("nq,nk", [(1, 13), (13, 37), (129, 126), (300, 1)])
@pytest.mark.parametrize("chunk_size", [7, 64, 1024])
@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_mass_matches_float64(nq: int, nk: int, chunk_size: int, use_mask: bool) -> None:
    seed = nq * 1000 + nk
    q, k, _ = _inputs(2, 3, nq, nk, 64, seed)
    mask = _random_mask(2, nk, seed) if use_mask else None
    mass = attention_mass(q, k, key_mask=mask, chunk_size=chunk_size)
    assert mass.shape == (2, nk) and mass.dtype == torch.float32
    torch.testing.assert_close(mass, _mass64(q, k, mask).float(), rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert (mass[~mask] == 0).all()


def test_attention_mass_with_supplied_lse() -> None:
    q, k, _ = _inputs(2, 4, 126, 37, 128, seed=3)
    mask = _random_mask(2, 37, seed=4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(128)
    lse = logits.masked_fill(~mask[:, None, None, :], float("-inf")).logsumexp(dim=-1)
    mass = attention_mass(q, k, key_mask=mask, lse=lse, chunk_size=7)
    torch.testing.assert_close(mass, attention_mass(q, k, key_mask=mask, chunk_size=7))
    torch.testing.assert_close(mass, _mass64(q, k, mask).float(), rtol=1e-5, atol=1e-5)
    assert (mass[~mask] == 0).all()


@pytest.mark.parametrize("nq,nk", SIZES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_cross_attention_lse_is_the_forward_and_its_row_logsumexp(nq: int, nk: int, use_mask: bool) -> None:
    q, k, v = _inputs(2, 3, nq, nk, 64, seed=nq * 7 + nk)
    mask = _random_mask(2, nk, seed=nk) if use_mask else None
    q.requires_grad_()
    out, lse = cross_attention_lse(q, k, v, kv_grad_scale=0.5, key_mask=mask)
    assert torch.equal(out, cross_attention(q, k, v, kv_grad_scale=0.5, key_mask=mask))
    assert lse.shape == (2, 3, nq) and lse.dtype == torch.float32 and not lse.requires_grad
    logits = q.detach().double() @ k.double().transpose(-1, -2) / math.sqrt(64)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    # The mass from the attention's LSE is exactly the mass that computes its own.
    assert torch.equal(
        attention_mass(q.detach(), k, key_mask=mask, lse=lse), attention_mass(q.detach(), k, key_mask=mask)
    )


def test_attention_mass_accumulates_into_out() -> None:
    q, k, _ = _inputs(2, 2, 13, 37, 64, seed=5)
    out = torch.zeros(2, 37)
    returned = attention_mass(q, k, out=out, chunk_size=7)
    assert returned is out
    once = out.clone()
    attention_mass(q, k, out=out, chunk_size=7)
    torch.testing.assert_close(out, 2 * once)
    torch.testing.assert_close(once, _mass64(q, k, None).float(), rtol=1e-5, atol=1e-5)


def test_attention_mass_no_grad_and_float64_input() -> None:
    q, k, _ = _inputs(1, 2, 13, 37, 64, seed=6)
    q64 = q.double().requires_grad_()
    mass = attention_mass(q64, k.double(), chunk_size=5)
    assert not mass.requires_grad and mass.dtype == torch.float32
    torch.testing.assert_close(mass, _mass64(q, k, None).float())


def _good() -> dict[str, Tensor]:
    q, k, v = _inputs(2, 2, 5, 6, 8, seed=0)
    return {"q": q, "k": k, "v": v, "key_mask": torch.ones(2, 6, dtype=torch.bool)}


BAD_ATTENTION = [
    ("q", {"q": torch.randn(2, 5, 8)}),
    ("k", {"k": torch.randn(3, 2, 6, 8)}),
    ("k", {"k": torch.randn(2, 2, 6, 4)}),
    ("v", {"v": torch.randn(2, 2, 7, 8)}),
    ("v", {"v": torch.randn(2, 6, 8)}),
    ("key_mask", {"key_mask": torch.ones(2, 5, dtype=torch.bool)}),
    ("key_mask", {"key_mask": torch.ones(2, 6)}),
    ("key_mask", {"key_mask": torch.zeros(2, 6, dtype=torch.bool)}),
]


@pytest.mark.parametrize("name,override", BAD_ATTENTION)
def test_cross_attention_rejects_bad_inputs(name: str, override: dict[str, Tensor]) -> None:
    args = _good() | override
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cross_attention(args["q"], args["k"], args["v"], key_mask=args["key_mask"])


@pytest.mark.parametrize("scale", [-0.1, 1.5, float("nan")])
def test_cross_attention_rejects_bad_grad_scale(scale: float) -> None:
    args = _good()
    with pytest.raises(ValueError, match=r"^kv_grad_scale\b"):
        cross_attention(args["q"], args["k"], args["v"], kv_grad_scale=scale)


BAD_MASS = [
    ("q", {"q": torch.randn(2, 5, 8)}),
    ("k", {"k": torch.randn(2, 3, 6, 8)}),
    ("key_mask", {"key_mask": torch.ones(2, 6, dtype=torch.int64)}),
    ("lse", {"lse": torch.zeros(2, 2, 6)}),
    ("out", {"out": torch.zeros(2, 5)}),
    ("out", {"out": torch.zeros(2, 6, dtype=torch.float64)}),
    ("chunk_size", {"chunk_size": 0}),
]


@pytest.mark.parametrize("name,override", BAD_MASS)
def test_attention_mass_rejects_bad_inputs(name: str, override: dict) -> None:
    args = _good() | override
    kwargs = {key: args[key] for key in ("key_mask", "lse", "out", "chunk_size") if key in args}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        attention_mass(args["q"], args["k"], **kwargs)
