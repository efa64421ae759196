"""Sampling with real text conditioning equals diffusers' `LTX2Pipeline(output_type="latent")` on tiny
random components (Gemma 3, connectors, DiT, VAEs), LTX-2.0 and LTX-2.3 alike, given the same noise and sigmas:
guidance off, and CFG with negative prompts. The pipeline's extras we do not implement are switched off
(modality guidance, rescale, cross-timestep); STG has its own parity test (tests/models/test_model.py).
The VAE statistics are mean 0 / std 1, so the pipeline's latent (de)normalisation is the identity
here; decoding has its own tests."""

from __future__ import annotations

import pytest
import torch

import models
from engine.data.conditioning import TextConditioning
from engine.data.text import TextConfig
from engine.sampler import ltx2_sigmas, sample
from models.layouts import diffusers_config

from .data import tiny_ltx2, tiny_ltx23
from .rewards import tiny_decoders

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

GRID = (2, 2, 3)  # latent frames, height, width
FPS = 24.0
pytestmark = pytest.mark.usefixtures("single_thread")


def _dit():
    torch.manual_seed(3)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"])).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dm.parameters():  # nothing left at its constant init (zero gates, unit norms)
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dm


@pytest.fixture(scope="module", params=["2.0", "2.3"], ids=["ltx2", "ltx2.3"])
def setup(request, tmp_path_factory):
    """The oracle pipeline and our DiT for LTX-2.0 (tiny preset) or LTX-2.3 (gated attention, prompt adaLN, no
    caption projection; its connectors project per modality)."""
    root = tmp_path_factory.mktemp("oracle")
    gemma, tok = tiny_ltx2.gemma(), tiny_ltx2.tokenizer()
    if request.param == "2.0":
        conn, dm, video_vae = tiny_ltx2.connectors(), _dit(), tiny_decoders.video_vae()
        folder = tiny_ltx2.write_pipeline(root / "pipe", gemma, tok, conn)
    else:
        conn, dm, video_vae = tiny_ltx23.connectors(), tiny_ltx23.dit(perturbed_attn=False), tiny_ltx23.video_vae()
        folder = tiny_ltx23.write_pipeline(root / "pipe", gemma, tok, conn)
    audio_vae = tiny_decoders.audio_vae()
    for vae in (video_vae, audio_vae):  # identity statistics: the pipeline's latent output is then ours
        vae.latents_mean.zero_()
        vae.latents_std.fill_(1.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = diffusers.LTX2Pipeline(
        scheduler=scheduler,
        vae=video_vae,
        audio_vae=audio_vae,
        text_encoder=gemma,
        tokenizer=tok,
        connectors=conn,
        transformer=dm,
        vocoder=None,
    )
    text_cfg = TextConfig(encoder=str(folder), connectors=str(folder), max_length=tiny_ltx2.MAX_LENGTH, dtype="float32")
    ours = models.from_diffusers(dm).eval()
    return dict(pipe=pipe, ours=ours, text_cfg=text_cfg, geometry=ours.config.geometry)


@pytest.mark.parametrize("guidance", [(1.0, 1.0), (3.0, 5.0)], ids=["unguided", "cfg"])
def test_sampling_equals_the_pipeline(setup, guidance) -> None:
    cfg_video, cfg_audio = guidance
    prompts, negatives = ["a dog barks", "rain on a roof"], ["blurry", ""]
    f, h, w = GRID
    num_audio = setup["geometry"].audio_tokens_for(f, FPS)
    g = torch.Generator().manual_seed(7)
    config = setup["ours"].config
    noise_video = torch.randn(2, f * h * w, config.in_channels, generator=g)
    noise_audio = torch.randn(2, num_audio, config.audio_in_channels, generator=g)
    sigmas = ltx2_sigmas(4)

    with torch.no_grad():
        ref_video, ref_audio = setup["pipe"](
            prompt=prompts,
            negative_prompt=negatives,
            height=h * 32,
            width=w * 32,
            num_frames=8 * (f - 1) + 1,
            frame_rate=FPS,
            sigmas=sigmas[:-1].tolist(),
            num_inference_steps=len(sigmas) - 1,
            guidance_scale=cfg_video,
            audio_guidance_scale=cfg_audio,
            **tiny_ltx2.PIPELINE_EXTRAS_OFF,
            latents=noise_video,
            audio_latents=noise_audio,
            max_sequence_length=tiny_ltx2.MAX_LENGTH,
            output_type="latent",
            return_dict=False,
        )
    # Back to packed tokens: video [B, C, F, H, W] -> [B, F*H*W, C]; audio [B, C, L, M] -> [B, L, C*M].
    ref_video = ref_video.flatten(2).transpose(1, 2)
    ref_audio = ref_audio.transpose(1, 2).flatten(2)

    cpu = torch.device("cpu")
    text = TextConditioning(setup["text_cfg"], None, prompts + negatives, cpu)
    ctx = text.contexts(prompts, cpu, torch.float32)
    uncond = text.contexts(negatives, cpu, torch.float32)
    ours = sample(
        setup["ours"], noise_video, noise_audio, *ctx, GRID, FPS, sigmas, cfg_video, cfg_audio, uncond_context=uncond
    )
    assert ref_video.abs().max() > 0.1 and not torch.allclose(ref_video, noise_video, atol=1e-2)
    torch.testing.assert_close(ours.video, ref_video, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.audio, ref_audio, rtol=0, atol=1e-5)
