"""NFT loss against an independent per-sample float64 formula."""

import pytest
import torch

from engine.algorithm.loss import modality_nft_loss, nft_loss

B, T, C = 3, 5, 4


def make_inputs(seed: int, tokens: int = T) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, tokens, C, generator=g, dtype=torch.float64)
    eps = torch.randn(B, tokens, C, generator=g, dtype=torch.float64)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
    v_old = eps - x0 + 0.3 * torch.randn(B, tokens, C, generator=g, dtype=torch.float64)
    v_theta = v_old + 0.2 * torch.randn(B, tokens, C, generator=g, dtype=torch.float64)
    return {"x0": x0, "x_t": x_t, "sigma": sigma, "v_old": v_old, "v_theta": v_theta.requires_grad_(True)}


def direct_loss(inp, r, beta, detach_w, token_weights=None) -> torch.Tensor:
    """Sample by sample, token by token, as the spec writes it."""
    total = 0.0
    for b in range(inp["x0"].shape[0]):
        s = inp["sigma"][b]
        v_plus = (1 - beta) * inp["v_old"][b] + beta * inp["v_theta"][b]
        v_minus = (1 + beta) * inp["v_old"][b] - beta * inp["v_theta"][b]
        d_plus = inp["x_t"][b] - s * v_plus - inp["x0"][b]
        d_minus = inp["x_t"][b] - s * v_minus - inp["x0"][b]
        w_plus = torch.clamp(d_plus.abs().mean(), min=1e-5)
        w_minus = torch.clamp(d_minus.abs().mean(), min=1e-5)
        if detach_w:
            w_plus, w_minus = w_plus.detach(), w_minus.detach()
        num, den = 0.0, 0.0
        for i in range(d_plus.shape[0]):
            l_i = r[b] * (d_plus[i] ** 2).mean() / w_plus + (1 - r[b]) * (d_minus[i] ** 2).mean() / w_minus
            w_i = 1.0 if token_weights is None else token_weights[b, i]
            num, den = num + w_i * l_i, den + w_i
        total = total + num / den
    return total / inp["x0"].shape[0]


def grad_of(loss: torch.Tensor, v_theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, v_theta)[0]


R = torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_gradient_matches_detached_weights_formula(beta: float) -> None:
    inp = make_inputs(0)
    ours = modality_nft_loss(**inp, r=R, beta=beta)
    expected = direct_loss(inp, R, beta, detach_w=True)
    torch.testing.assert_close(ours, expected)
    g_ours = grad_of(ours, inp["v_theta"])
    torch.testing.assert_close(g_ours, grad_of(expected, inp["v_theta"]))
    # Without the detach the gradient is measurably different, so a missing detach fails above.
    g_undetached = grad_of(direct_loss(inp, R, beta, detach_w=False), inp["v_theta"])
    assert (g_ours - g_undetached).abs().max() > 1e-3


def test_uniform_token_weights_equal_plain_mean() -> None:
    inp = make_inputs(1)
    plain = modality_nft_loss(**inp, r=R)
    uniform = modality_nft_loss(**inp, r=R, token_weights=torch.full((B, T), 2.5, dtype=torch.float64))
    torch.testing.assert_close(uniform, plain)


def test_weighted_tokens_match_hand_formula() -> None:
    inp = make_inputs(2)
    weights = torch.tensor(
        [[1.0, 2.5, 1.0, 1.2, 1.0], [2.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.5]], dtype=torch.float64
    )
    ours = modality_nft_loss(**inp, r=R, token_weights=weights)
    expected = direct_loss(inp, R, 1.0, detach_w=True, token_weights=weights)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, modality_nft_loss(**inp, r=R))
    torch.testing.assert_close(grad_of(ours, inp["v_theta"]), grad_of(expected, inp["v_theta"]))


def test_r_selects_positive_or_negative_branch() -> None:
    inp = make_inputs(3)
    ones, zeros = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    # With beta = 1, v_plus = v_theta: r = 1 pulls x0_theta towards x0.
    x0_theta = inp["x_t"] - inp["sigma"][:, None, None] * inp["v_theta"]
    d = (x0_theta - inp["x0"]).detach()
    expected = ((d**2).mean(dim=(1, 2)) / d.abs().mean(dim=(1, 2))).mean()
    torch.testing.assert_close(modality_nft_loss(**inp, r=ones), expected)
    assert not torch.allclose(modality_nft_loss(**inp, r=zeros), expected)


def test_nft_loss_total_scaling_and_parts() -> None:
    video, audio = make_inputs(4), make_inputs(5, tokens=2)
    r_v, r_a = R, torch.tensor([0.1, 0.6, 0.95], dtype=torch.float64)
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 1
    out = nft_loss(video, audio, r_v, r_a, beta=0.5, adv_clip=5.0, video_token_weights=weights)
    v_part = direct_loss(video, r_v, 0.5, detach_w=True, token_weights=weights)
    a_part = direct_loss(audio, r_a, 0.5, detach_w=True)
    torch.testing.assert_close(out.video, v_part.detach())
    torch.testing.assert_close(out.audio, a_part.detach())
    torch.testing.assert_close(out.total, (v_part + a_part) * 10.0)
    assert out.kl == 0
    assert out.total.requires_grad and not out.video.requires_grad and not out.audio.requires_grad
    g_v, g_a = torch.autograd.grad(out.total, [video["v_theta"], audio["v_theta"]])
    e_v, e_a = torch.autograd.grad((v_part + a_part) * 10.0, [video["v_theta"], audio["v_theta"]])
    torch.testing.assert_close(g_v, e_v)
    torch.testing.assert_close(g_a, e_a)


def test_kl_term_in_x0_space() -> None:
    video, audio = make_inputs(6), make_inputs(7, tokens=2)
    g = torch.Generator().manual_seed(11)
    ref_v = video["v_old"] + 0.1 * torch.randn(video["v_old"].shape, generator=g, dtype=torch.float64)
    ref_a = audio["v_old"] + 0.1 * torch.randn(audio["v_old"].shape, generator=g, dtype=torch.float64)
    base = nft_loss(video, audio, R, R)
    out = nft_loss(video, audio, R, R, kl_weight=0.1, v_ref=(ref_v, ref_a))
    # x0_theta - x0_ref = -sigma * (v_theta - v_ref)
    kl = sum(
        ((m["sigma"][:, None, None] * (m["v_theta"] - ref)) ** 2).mean() for m, ref in ((video, ref_v), (audio, ref_a))
    )
    torch.testing.assert_close(out.kl, kl.detach())
    torch.testing.assert_close(out.total, base.total + 0.1 * kl)
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(video, audio, R, R, kl_weight=0.1)


def test_shape_errors_name_the_tensor() -> None:
    inp = make_inputs(8)
    with pytest.raises(ValueError, match="x_t"):
        modality_nft_loss(**{**inp, "x_t": inp["x_t"][:, :4]}, r=R)
    with pytest.raises(ValueError, match="sigma"):
        modality_nft_loss(**{**inp, "sigma": inp["sigma"][:, None]}, r=R)
    with pytest.raises(ValueError, match="r "):
        modality_nft_loss(**inp, r=R[:2])
    with pytest.raises(ValueError, match="token_weights"):
        modality_nft_loss(**inp, r=R, token_weights=torch.ones(B, T + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="v_theta"):
        nft_loss({k: v for k, v in inp.items() if k != "v_theta"}, inp, R, R)


def test_v_old_with_grad_raises() -> None:
    inp = make_inputs(9)
    with pytest.raises(ValueError, match="v_old"):
        modality_nft_loss(**{**inp, "v_old": inp["v_old"].clone().requires_grad_(True)}, r=R)
