"""engine.rewards.decode on LTX-2.3's decoders against diffusers 0.42.1, on tiny random components: the 2.3 video
VAE (four upsamplers: over all axes twice, then time, then space) and the bandwidth-extension vocoder
(LTX2VocoderWithBWE, 16 kHz -> 48 kHz) decode a 2.3-configured `LTX2Pipeline`'s rollout to its own
`output_type="pt"` frames and audio, from a diffusers folder and from the official single file; 2.3 is read from
the weights' config (the header's `vae.decoder_blocks` and `vocoder.bwe`, a folder's config.json), and the
released header gives the conversion script's configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.rewards.decode import DecodeConfig, Decoders, load_decoders
from engine.rewards.decoder_files import official_vocoder_key, video_vae_kwargs, vocoder_kwargs
from engine.sampler import ltx2_sigmas

from ..data import tiny_ltx2, tiny_ltx23
from . import tiny_decoders

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")
GRID = (2, 2, 3)  # latent frames, height, width: 9 frames of 64 x 96
FPS = 24.0
AUDIO_TOKENS = 9  # what the pipeline makes of 9 frames at 24 fps (models.LatentGeometry.audio_tokens_for)
FP32 = DecodeConfig(dtype="float32")


@pytest.fixture(scope="module")
def parts():
    return dict(vae=tiny_ltx23.video_vae(), audio=tiny_decoders.audio_vae(seed=20), vocoder=tiny_ltx23.vocoder())


@pytest.fixture(scope="module")
def sources(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders23")
    conn = tiny_ltx23.connectors()
    vae, audio, voc = parts["vae"], parts["audio"], parts["vocoder"]
    return dict(
        folder=tiny_decoders.write_folder(root / "pipe", vae, audio, voc),
        official=tiny_ltx23.write_official(root / "ltx-2.3-tiny.safetensors", conn, vae, audio, voc),
        conn=conn,
    )


def _run(pipe, output_type: str):
    f, h, w = GRID
    g = torch.Generator().manual_seed(7)
    sigmas = ltx2_sigmas(2)
    with torch.no_grad():
        return pipe(
            prompt=["a dog barks", "rain on a roof"],
            height=h * 32,
            width=w * 32,
            num_frames=8 * (f - 1) + 1,
            frame_rate=FPS,
            sigmas=sigmas[:-1].tolist(),
            num_inference_steps=len(sigmas) - 1,
            guidance_scale=1.0,
            audio_guidance_scale=1.0,
            **tiny_ltx2.PIPELINE_EXTRAS_OFF,
            latents=torch.randn(2, f * h * w, tiny_ltx23.LATENT, generator=g),
            audio_latents=torch.randn(2, AUDIO_TOKENS, 16, generator=g),
            max_sequence_length=tiny_ltx2.MAX_LENGTH,
            output_type=output_type,
            return_dict=False,
        )


@pytest.fixture(scope="module")
def pipeline_outputs(parts, sources):
    """The 2.3 pipeline's denormalised latents and its own decode of them (frames [B, F, 3, H, W], audio)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = diffusers.LTX2Pipeline(
        scheduler=scheduler,
        vae=parts["vae"],
        audio_vae=parts["audio"],
        text_encoder=tiny_ltx2.gemma(),
        tokenizer=tiny_ltx2.tokenizer(),
        connectors=sources["conn"],
        transformer=tiny_ltx23.dit(),
        vocoder=parts["vocoder"],
    )
    video, audio = _run(pipe, "latent")
    frames, waves = _run(pipe, "pt")
    return dict(video=video, audio=audio, frames=frames, waves=waves)


@pytest.mark.parametrize("layout", ["folder", "official"])
def test_frames_and_waveforms_equal_the_23_pipeline(parts, sources, pipeline_outputs, layout) -> None:
    """The pipeline's denormalised latents, normalised and packed again (what our sampler hands the rewards),
    decode to the pipeline's own frames and 48 kHz audio."""
    out = pipeline_outputs
    vae, audio_vae = parts["vae"], parts["audio"]
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    video_tokens = ((out["video"] - mean) / std).flatten(2).transpose(1, 2)
    audio_tokens = (out["audio"].transpose(1, 2).flatten(2) - audio_vae.latents_mean) / audio_vae.latents_std

    decoders = Decoders(FP32, sources[layout])
    frames, waves = decoders.frames(video_tokens, GRID), decoders.waveforms(audio_tokens)
    assert decoders.sample_rate == 48000 and not decoders.timestep_conditioned
    assert frames.shape == (2, 9, 64, 96, 3) and 0 < frames.std() and frames.min() >= 0 and frames.max() <= 1
    torch.testing.assert_close(frames.permute(0, 1, 4, 2, 3), out["frames"], rtol=0, atol=1e-5)
    assert waves.shape == out["waves"].shape == (2, 2, 480 * (4 * AUDIO_TOKENS - 3))  # 10 ms mel frames at 48 kHz
    assert waves.abs().max() > 0.1 and waves.std() > 1e-3
    torch.testing.assert_close(waves, out["waves"].float(), rtol=0, atol=1e-5)


def test_folder_and_official_file_load_the_same_decoders(parts, sources) -> None:
    """The header's ltx-core sections give the 2.3 modules' configs (the VAE's four upsamplers in diffusers' order,
    zero padding; LTX2VocoderWithBWE with its STFT and rates) and the hand-written official names map onto
    every tensor."""
    folder = load_decoders(sources["folder"], torch.float32, video=True, audio=True)
    official = load_decoders(sources["official"], torch.float32, video=True, audio=True)
    for ours, theirs, ref in zip(official, folder, (parts["vae"], parts["audio"], parts["vocoder"])):
        assert type(ours) is type(theirs) is type(ref)
        expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("encoder.")}
        for module in (ours, theirs):
            assert module.state_dict().keys() == expected.keys()
            assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items())
    vae, vocoder = official[0].config, official[2].config
    for key in (
        "decoder_block_out_channels",
        "decoder_layers_per_block",
        "upsample_type",
        "upsample_residual",
        "upsample_factor",
        "decoder_spatial_padding_mode",
        "decoder_causal",
    ):
        assert vae[key] == parts["vae"].config[key], key
    assert {k: v for k, v in vocoder.items() if not k.startswith("_")} == {
        k: v for k, v in parts["vocoder"].config.items() if not k.startswith("_")
    }
    # The resampler's filter is not in the weights: the constructor's (Hann-windowed sinc, 3x), in float32.
    torch.testing.assert_close(official[2].resampler.filter, parts["vocoder"].resampler.filter, rtol=0, atol=0)


def test_ltx_core_vocoder_names_map_onto_the_bwe_vocoder(parts) -> None:
    """Names of ltx-core's VocoderWithBWE (its `vocoder` / `bwe_generator` Vocoders with ups, resblocks of
    Activation1d(SnakeBeta) with `downsample.lowpass`, act_post, conv_post; its `mel_stft`) land on diffusers'."""
    names = {
        "vocoder.conv_pre.weight": "vocoder.conv_in.weight",
        "vocoder.ups.0.weight": "vocoder.upsamplers.0.weight",
        "vocoder.resblocks.4.convs1.2.bias": "vocoder.resnets.4.convs1.2.bias",
        "vocoder.resblocks.0.acts1.0.act.alpha": "vocoder.resnets.0.acts1.0.act.alpha",
        "vocoder.resblocks.0.acts2.1.upsample.filter": "vocoder.resnets.0.acts2.1.upsample.filter",
        "vocoder.resblocks.0.acts1.0.downsample.lowpass.filter": "vocoder.resnets.0.acts1.0.downsample.filter",
        "vocoder.act_post.act.beta": "vocoder.act_out.act.beta",
        "vocoder.act_post.downsample.lowpass.filter": "vocoder.act_out.downsample.filter",
        "vocoder.conv_post.weight": "vocoder.conv_out.weight",
        "bwe_generator.ups.4.bias": "bwe_generator.upsamplers.4.bias",
        "bwe_generator.act_post.act.alpha": "bwe_generator.act_out.act.alpha",
        "mel_stft.mel_basis": "mel_stft.mel_basis",
        "mel_stft.stft_fn.forward_basis": "mel_stft.stft_fn.forward_basis",
    }
    state = parts["vocoder"].state_dict()
    for official, diffusers_name in names.items():
        assert official_vocoder_key(official) == diffusers_name and diffusers_name in state
    assert "vocoder.conv_out.bias" not in state  # use_bias_at_final: false
    assert official_vocoder_key("conv_post.weight") == "conv_out.weight"  # LTX-2.0's flat names are unchanged


# The released LTX-2.3 file's `vae` and `vocoder` header sections, as third-party loaders quote them.
RELEASE_VAE = json.loads(
    '{"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": '
    '128, "decoder_blocks": [["res_x", {"num_layers": 4}], ["compress_space", {"multiplier": 2}], ["res_x", '
    '{"num_layers": 6}], ["compress_time", {"multiplier": 2}], ["res_x", {"num_layers": 4}], ["compress_all", '
    '{"multiplier": 1}], ["res_x", {"num_layers": 2}], ["compress_all", {"multiplier": 2}], ["res_x", '
    '{"num_layers": 2}]], "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": '
    '"uniform", "use_quant_conv": false, "causal_decoder": false, "timestep_conditioning": false, '
    '"normalize_latent_channels": false, "encoder_base_channels": 128, "decoder_base_channels": 128, '
    '"spatial_padding_mode": "zeros"}'
)
RELEASE_VOCODER = json.loads(
    '{"vocoder": {"upsample_initial_channel": 1536, "resblock": "AMP1", "upsample_rates": [5, 2, 2, 2, 2, 2], '
    '"resblock_kernel_sizes": [3, 7, 11], "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4], "resblock_dilation_sizes": '
    '[[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": true, "use_tanh_at_final": false, "activation": "snakebeta", '
    '"use_bias_at_final": false}, "bwe": {"upsample_initial_channel": 512, "resblock": "AMP1", "upsample_rates": '
    '[6, 5, 2, 2, 2], "resblock_kernel_sizes": [3, 7, 11], "upsample_kernel_sizes": [12, 11, 4, 4, 4], '
    '"resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": true, "use_tanh_at_final": false, '
    '"activation": "snakebeta", "use_bias_at_final": false, "apply_final_activation": false, '
    '"input_sampling_rate": 16000, "output_sampling_rate": 48000, "hop_length": 80, "n_fft": 512, "win_size": 512, '
    '"num_mels": 64}}'
)


def test_release_headers_give_the_conversion_scripts_configs() -> None:
    """The 2.3 decoder fields of diffusers' scripts/convert_ltx2_to_diffusers.py (get_ltx2_video_vae_config and
    get_ltx2_vocoder_config, "2.3") from the released header. One deliberate difference: ltx-core clamps the
    first vocoder stage's output to [-1, 1] (`use_tanh_at_final: false` with its final activation on), which the
    script's config leaves off (`final_act_fn: None`); we build what the header describes."""
    vae = video_vae_kwargs(RELEASE_VAE, timestep_conditioning=False)
    script_vae = dict(
        latent_channels=128,
        decoder_block_out_channels=(256, 512, 512, 1024),
        decoder_layers_per_block=(4, 6, 4, 2, 2),
        decoder_spatio_temporal_scaling=(True, True, True, True),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        upsample_residual=(False, False, False, False),
        upsample_factor=(2, 2, 1, 2),
        timestep_conditioning=False,
        patch_size=4,
        decoder_causal=False,
        decoder_spatial_padding_mode="zeros",
        scaling_factor=1.0,
    )
    assert {k: vae[k] for k in script_vae} == script_vae
    with torch.device("meta"):
        decoder = diffusers.AutoencoderKLLTX2Video(**vae).decoder
    assert tuple(decoder.conv_in.conv.weight.shape) == (1024, 128, 3, 3, 3)
    assert tuple(decoder.conv_out.conv.weight.shape) == (48, 128, 3, 3, 3)

    audio = dict(output_channels=2, mel_bins=64)
    class_name, vocoder = vocoder_kwargs(RELEASE_VOCODER, audio)
    script_vocoder = dict(
        in_channels=128,
        hidden_channels=1536,
        out_channels=2,
        upsample_kernel_sizes=[11, 4, 4, 4, 4, 4],
        upsample_factors=[5, 2, 2, 2, 2, 2],
        resnet_kernel_sizes=[3, 7, 11],
        resnet_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        act_fn="snakebeta",
        leaky_relu_negative_slope=0.1,
        antialias=True,
        antialias_ratio=2,
        antialias_kernel_size=12,
        final_act_fn=None,
        final_bias=False,
        bwe_in_channels=128,
        bwe_hidden_channels=512,
        bwe_out_channels=2,
        bwe_upsample_kernel_sizes=[12, 11, 4, 4, 4],
        bwe_upsample_factors=[6, 5, 2, 2, 2],
        bwe_resnet_kernel_sizes=[3, 7, 11],
        bwe_resnet_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        bwe_act_fn="snakebeta",
        bwe_leaky_relu_negative_slope=0.1,
        bwe_antialias=True,
        bwe_antialias_ratio=2,
        bwe_antialias_kernel_size=12,
        bwe_final_act_fn=None,
        bwe_final_bias=False,
        filter_length=512,
        hop_length=80,
        window_length=512,
        num_mel_channels=64,
        input_sampling_rate=16000,
        output_sampling_rate=48000,
    )
    assert class_name == "LTX2VocoderWithBWE"
    assert vocoder == dict(script_vocoder, final_act_fn="clamp")


def test_bwe_vocoder_runs_in_float32(sources) -> None:
    """decode.dtype=bfloat16 (auto on CUDA) puts the VAEs in bf16 but keeps the BWE vocoder in float32, as
    ltx-core runs it."""
    audio = torch.randn(2, AUDIO_TOKENS, 16, generator=torch.Generator().manual_seed(3))
    full = Decoders(FP32, sources["folder"], video=False).waveforms(audio)
    half = Decoders(DecodeConfig(dtype="bfloat16"), sources["folder"], video=False)
    assert next(half.audio_vae.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in half.vocoder.parameters()} == {torch.float32}
    waves = half.waveforms(audio)
    assert waves.dtype == torch.float32 and waves.shape == full.shape and (waves - full).abs().max() < 0.1


def test_strict_loading_names_every_problem(parts, sources, tmp_path) -> None:
    """Every missing, unexpected or mis-shaped tensor of the 2.3 parts in one error; a 2.3 file whose header lacks
    the vocoder section is read with the 19B vocoder config and says so through the same listing; a `bwe`
    section missing a key, or mixing the releases."""
    conn = sources["conn"]
    state = tiny_ltx23.official_state(conn, parts["vae"], parts["audio"], parts["vocoder"])
    state.pop("vocoder.mel_stft.mel_basis")
    state["vocoder.bwe_generator.resblocks.0.acts1.0.downsample.lowpass.filter"] = torch.zeros(1, 1, 5)
    state["vae.decoder.up_blocks.8.extra"] = torch.zeros(2)
    header = tiny_ltx23.header(conn)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(header)})
    with pytest.raises(CheckpointError) as err:
        load_decoders(tmp_path / "bad.safetensors", torch.float32, video=True, audio=True)
    message = str(err.value)
    assert "bad.safetensors does not fit the decoders (3 problem(s))" in message
    for fragment in (
        "video VAE unexpected: decoder.up_blocks.3.extra (2,)",
        "vocoder missing: mel_stft.mel_basis (16, 65)",
        "vocoder shape: bwe_generator.resnets.0.acts1.0.downsample.filter is (1, 1, 5), expected (1, 1, 12)",
    ):
        assert fragment in message

    good = tiny_ltx23.official_state(conn, parts["vae"], parts["audio"], parts["vocoder"])
    no_vocoder = {k: v for k, v in header.items() if k != "vocoder"}
    save_file(good, str(tmp_path / "bare.safetensors"), metadata={"config": json.dumps(no_vocoder)})
    with pytest.raises(CheckpointError, match=r"problem\(s\)") as err:  # the 19B LTX2Vocoder, not a guess
        load_decoders(tmp_path / "bare.safetensors", torch.float32, video=False, audio=True)
    assert "vocoder missing: conv_in.weight (1024, 32, 7)" in str(err.value)

    del header["vocoder"]["bwe"]["n_fft"]
    save_file(good, str(tmp_path / "no_fft.safetensors"), metadata={"config": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"no_fft\.safetensors: cannot use the decoder config .*'n_fft'"):
        load_decoders(tmp_path / "no_fft.safetensors", torch.float32, video=False, audio=True)
    header["vocoder"]["bwe"]["n_fft"] = tiny_ltx23.BWE_FFT
    header["vocoder"]["vocoder"]["resblock"] = "1"
    save_file(good, str(tmp_path / "mixed.safetensors"), metadata={"config": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"vocoder resblock '1', stereo True \(expected 'AMP1', stereo\)"):
        load_decoders(tmp_path / "mixed.safetensors", torch.float32, video=False, audio=True)
