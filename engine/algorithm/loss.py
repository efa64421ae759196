"""The DiffusionNFT loss with per-modality optimality probabilities (SPEC 3, paper Eq. 12).

This is the only place the loss is written, so the sampler, trainer and benchmarks cannot drift
apart on a sign, a scale or a detach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..fields import bounded

_MODALITY_KEYS = ("x0", "x_t", "sigma", "v_old", "v_theta")


@dataclass
class LossConfig:
    """`loss.*`: DiffusionNFT's guidance strength beta and the optional KL to the frozen reference."""

    beta: float = bounded(1e-6, None, default=1.0)
    kl_weight: float = bounded(0.0, None, default=0.0)


@dataclass
class NFTLoss:
    """Total loss to backpropagate and its detached parts for logging."""

    total: Tensor
    video: Tensor
    audio: Tensor
    kl: Tensor


def _check_shapes(x0: Tensor, x_t: Tensor, sigma: Tensor, v_old: Tensor, v_theta: Tensor, r: Tensor) -> None:
    if x0.dim() != 3:
        raise ValueError(f"x0 must be (B, T, C), got {tuple(x0.shape)}")
    for name, t in (("x_t", x_t), ("v_old", v_old), ("v_theta", v_theta)):
        if t.shape != x0.shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match x0 {tuple(x0.shape)}")
    batch = x0.shape[:1]
    for name, t in (("sigma", sigma), ("r", r)):
        if t.shape != batch:
            raise ValueError(f"{name} {tuple(t.shape)} must be (B,) = {tuple(batch)}")


def _x0_from_velocity(x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    return x_t - sigma[:, None, None] * v


def modality_nft_loss(
    x0: Tensor,
    x_t: Tensor,
    sigma: Tensor,
    v_old: Tensor,
    v_theta: Tensor,
    r: Tensor,
    beta: float = 1.0,
    token_weights: Tensor | None = None,
) -> Tensor:
    """NFT loss of one modality, a scalar averaged over the batch.

    The positive and negative implicit policies are reconstructed in x0 space and each squared error
    is divided by its own (detached) mean absolute error, DiffusionNFT's adaptive weighting; the
    detach keeps the weight a per-sample scale instead of a term that changes the gradient direction.
    token_weights (B, T) turn the token mean into a weighted mean (region reweighting).
    """
    _check_shapes(x0, x_t, sigma, v_old, v_theta, r)
    if v_old.requires_grad:
        raise ValueError("v_old must come from the old policy without gradient (v_old.requires_grad is True)")
    if token_weights is not None and token_weights.shape != x0.shape[:2]:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must be (B, T) = {tuple(x0.shape[:2])}")
    # Squared errors of bf16 tensors lose too much precision; float32 at least.
    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    x0, x_t, sigma, v_old, v_theta, r = (t.to(dtype) for t in (x0, x_t, sigma, v_old, v_theta, r))

    v_plus = (1.0 - beta) * v_old + beta * v_theta
    v_minus = (1.0 + beta) * v_old - beta * v_theta
    err_plus = _x0_from_velocity(x_t, sigma, v_plus) - x0
    err_minus = _x0_from_velocity(x_t, sigma, v_minus) - x0
    w_plus = err_plus.detach().abs().mean(dim=(1, 2)).clamp(min=1e-5)
    w_minus = err_minus.detach().abs().mean(dim=(1, 2)).clamp(min=1e-5)

    per_token = (r / w_plus)[:, None] * err_plus.square().mean(dim=2) + ((1.0 - r) / w_minus)[
        :, None
    ] * err_minus.square().mean(dim=2)
    if token_weights is None:
        per_sample = per_token.mean(dim=1)
    else:
        w = token_weights.detach().to(dtype)
        per_sample = (w * per_token).sum(dim=1) / w.sum(dim=1)
    return per_sample.mean()


def _unpack(name: str, tensors: dict) -> tuple[Tensor, ...]:
    missing = [k for k in _MODALITY_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{name} is missing keys {missing}; expected {_MODALITY_KEYS}")
    return tuple(tensors[k] for k in _MODALITY_KEYS)


def _kl_term(x_t: Tensor, sigma: Tensor, v_theta: Tensor, v_ref: Tensor, name: str) -> Tensor:
    if v_ref.shape != v_theta.shape:
        raise ValueError(f"{name} {tuple(v_ref.shape)} does not match v_theta {tuple(v_theta.shape)}")
    if v_ref.requires_grad:
        raise ValueError(f"{name} must come from the frozen reference model without gradient")
    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    x_t, sigma, v_theta, v_ref = (t.to(dtype) for t in (x_t, sigma, v_theta, v_ref))
    return (_x0_from_velocity(x_t, sigma, v_theta) - _x0_from_velocity(x_t, sigma, v_ref)).square().mean()


def nft_loss(
    video: dict,
    audio: dict,
    r_video: Tensor,
    r_audio: Tensor,
    beta: float = 1.0,
    adv_clip: float = 5.0,
    video_token_weights: Tensor | None = None,
    kl_weight: float = 0.0,
    v_ref: tuple[Tensor, Tensor] | None = None,
) -> NFTLoss:
    """Joint loss: region-weighted video loss + audio loss, scaled by adv_clip / beta, plus optional KL.

    video/audio hold x0, x_t, sigma, v_old, v_theta. The adv_clip/beta scale undoes the 1/adv_clip
    slope of the optimality probability so gradient magnitudes match DiffusionNFT's. The KL
    (x0-space distance to the frozen reference, both modalities) is only computed when
    kl_weight > 0, since it needs a third forward pass to produce v_ref.
    """
    if beta <= 0 or adv_clip <= 0:
        raise ValueError(f"beta ({beta}) and adv_clip ({adv_clip}) must be > 0")
    vx0, vxt, vsig, vold, vtheta = _unpack("video", video)
    ax0, axt, asig, aold, atheta = _unpack("audio", audio)
    if vx0.shape[:1] != ax0.shape[:1]:
        raise ValueError(f"video x0 {tuple(vx0.shape)} and audio x0 {tuple(ax0.shape)} differ in batch size")
    video_loss = modality_nft_loss(vx0, vxt, vsig, vold, vtheta, r_video, beta, video_token_weights)
    audio_loss = modality_nft_loss(ax0, axt, asig, aold, atheta, r_audio, beta)
    total = (video_loss + audio_loss) * (adv_clip / beta)

    if kl_weight > 0:
        if v_ref is None:
            raise ValueError("kl_weight > 0 needs v_ref = (v_ref_video, v_ref_audio)")
        kl = _kl_term(vxt, vsig, vtheta, v_ref[0], "v_ref video") + _kl_term(axt, asig, atheta, v_ref[1], "v_ref audio")
        total = total + kl_weight * kl
    else:
        kl = torch.zeros((), dtype=total.dtype, device=total.device)
    return NFTLoss(total=total, video=video_loss.detach(), audio=audio_loss.detach(), kl=kl.detach())
