"""engine.rewards.decode against diffusers 0.42.1 on tiny random decoders (random latent statistics, every
constant-initialised parameter perturbed): frames and waveforms equal `LTX2Pipeline`'s own decode of the same
rollout, with a plain and a timestep-conditioned VAE; the decode noise equals the pipeline's formula on
`vae.decode`; the diffusers folder and the official single file load the same weights (our key maps agree with
diffusers' converters); strict loading names every problem at once."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
from engine.errors import CheckpointError, ConfigError
from engine.noise import seeded_normal
from engine.rewards.decode import DecodeConfig, Decoders, decode_source, load_decoders
from engine.rewards.decoder_files import (
    AUDIO_VAE_19B,
    VIDEO_VAE_19B,
    official_audio_vae_key,
    official_video_vae_key,
    official_vocoder_key,
)
from engine.sampler import ltx2_sigmas
from models.layouts import diffusers_config

from ..data import tiny_ltx2
from . import tiny_decoders

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")
GRID = (2, 2, 3)  # latent frames, height, width: 9 frames of 64 x 96
FPS = 24.0
FP32 = DecodeConfig(dtype="float32")


@pytest.fixture(scope="module")
def parts():
    return dict(
        plain=tiny_decoders.video_vae(timestep_conditioning=False, seed=0),
        timed=tiny_decoders.video_vae(timestep_conditioning=True, seed=10),
        audio=tiny_decoders.audio_vae(seed=20),
        vocoder=tiny_decoders.vocoder(seed=30),
    )


@pytest.fixture(scope="module")
def sources(parts, tmp_path_factory):
    """For each video VAE: a diffusers pipeline folder and an official single file with ltx-core's header."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for kind in ("plain", "timed"):
        vae, audio, voc = parts[kind], parts["audio"], parts["vocoder"]
        out[kind] = dict(
            folder=tiny_decoders.write_folder(root / kind, vae, audio, voc),
            official=tiny_decoders.write_official(root / f"{kind}.safetensors", vae, audio, voc),
        )
    return out


def _latents(n: int = 2, seed: int = 0, grid=GRID, audio_tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return torch.randn(n, f * h * w, tiny_decoders.LATENT, generator=g), torch.randn(n, audio_tokens, 16, generator=g)


# ---- parity with LTX2Pipeline ---------------------------------------------------------------------------------


def _dit():
    torch.manual_seed(3)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"])).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dm.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dm


@pytest.fixture(scope="module")
def text_and_dit():
    return dict(
        text_encoder=tiny_ltx2.gemma(),
        tokenizer=tiny_ltx2.tokenizer(),
        connectors=tiny_ltx2.connectors(),
        transformer=_dit(),
    )


def _pipeline(text_and_dit, parts, kind):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    return diffusers.LTX2Pipeline(
        scheduler=scheduler, vae=parts[kind], audio_vae=parts["audio"], vocoder=parts["vocoder"], **text_and_dit
    )


def _run(pipe, output_type: str, **kwargs):
    f, h, w = GRID
    num_audio = models.PRESETS["tiny"].geometry.audio_tokens_for(f, FPS)
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
            latents=torch.randn(2, f * h * w, 16, generator=g),
            audio_latents=torch.randn(2, num_audio, 16, generator=g),
            max_sequence_length=tiny_ltx2.MAX_LENGTH,
            output_type=output_type,
            return_dict=False,
            **kwargs,
        )


@pytest.mark.parametrize("kind", ["plain", "timed"])
def test_frames_and_waveforms_equal_the_pipeline(text_and_dit, parts, sources, kind) -> None:
    """The pipeline's `output_type="latent"` gives denormalised latents; normalised and packed again they are
    what our sampler hands the rewards, and decoding them must give the pipeline's own frames and audio. The
    timestep-conditioned VAE decodes at 0.05 without noise on both sides (the pipeline's noise comes from its
    generator, ours from per-sample keys: they are compared on vae.decode below)."""
    pipe = _pipeline(text_and_dit, parts, kind)
    decode_kwargs = dict(decode_timestep=0.05, decode_noise_scale=0.0) if kind == "timed" else {}
    video, audio = _run(pipe, "latent")
    ref_frames, ref_audio = _run(pipe, "pt", **decode_kwargs)

    vae, audio_vae = parts[kind], parts["audio"]
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    video_tokens = ((video - mean) / std * vae.config.scaling_factor).flatten(2).transpose(1, 2)
    audio_tokens = (audio.transpose(1, 2).flatten(2) - audio_vae.latents_mean) / audio_vae.latents_std

    decoders = Decoders(DecodeConfig(dtype="float32", **decode_kwargs), sources[kind]["folder"])
    frames = decoders.frames(video_tokens, GRID)
    waves = decoders.waveforms(audio_tokens)

    assert frames.shape == (2, 9, 64, 96, 3) and frames.dtype == torch.float32
    assert 0 < frames.std() and frames.min() >= 0 and frames.max() <= 1
    torch.testing.assert_close(frames.permute(0, 1, 4, 2, 3), ref_frames, rtol=0, atol=1e-5)
    assert waves.shape == ref_audio.shape and waves.abs().max() > 0.1
    torch.testing.assert_close(waves, ref_audio.float(), rtol=0, atol=1e-5)
    assert decoders.sample_rate == 24000 and decoders.timestep_conditioned == (kind == "timed")


def test_decode_noise_is_the_pipeline_formula_keyed_per_sample(parts, sources) -> None:
    """z <- (1 - s) z + s * noise in the normalised space, then the denormalisation and vae.decode(z, t): the
    pipeline's formula with ltx-core's (t, s) = (0.05, 0.025), the noise of each sample drawn from its own key,
    so that batching never changes a sample's frames."""
    tokens, _ = _latents(n=3, seed=1)
    keys = [(0, 5, "a dog barks", i) for i in range(3)]
    vae = parts["timed"]
    f, h, w = GRID
    z = tokens.reshape(3, f, h, w, -1).permute(0, 4, 1, 2, 3)
    noise = torch.stack([seeded_normal(z.shape[1:], *key, "decode") for key in keys])
    z = 0.975 * z + 0.025 * noise
    z = z * vae.latents_std.view(1, -1, 1, 1, 1) / vae.config.scaling_factor + vae.latents_mean.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref = vae.decode(z, torch.full((3,), 0.05), return_dict=False)[0]
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)

    one = Decoders(FP32, sources["timed"]["folder"], audio=False)
    assert (FP32.decode_timestep, FP32.decode_noise_scale) == (0.05, 0.025)
    frames = one.frames(tokens, GRID, noise_keys=keys)
    torch.testing.assert_close(frames, ref, rtol=0, atol=1e-5)
    batched = Decoders(DecodeConfig(dtype="float32", batch_size=2), sources["timed"]["folder"], audio=False)
    torch.testing.assert_close(batched.frames(tokens, GRID, noise_keys=keys), frames, rtol=0, atol=1e-5)
    reordered = one.frames(tokens[[2, 0]], GRID, noise_keys=[keys[2], keys[0]])
    torch.testing.assert_close(reordered, frames[[2, 0]], rtol=0, atol=1e-5)
    other = one.frames(tokens[:1], GRID, noise_keys=[(1, 5, "a dog barks", 0)])
    assert (other - frames[:1]).abs().max() > 1e-4  # the key matters
    with pytest.raises(ValueError, match="noise key"):
        one.frames(tokens, GRID)
    # The noise is for timestep-conditioned VAEs only: a plain VAE ignores keys and settings.
    plain = Decoders(FP32, sources["plain"]["folder"], audio=False)
    torch.testing.assert_close(plain.frames(tokens, GRID, noise_keys=keys), plain.frames(tokens, GRID))


# ---- loading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "timed"])
def test_folder_and_official_file_decode_identically(parts, sources, kind) -> None:
    video, audio = _latents(seed=2)
    keys = [(0, 0, "p", i) for i in range(2)]
    folder = Decoders(FP32, sources[kind]["folder"])
    official = Decoders(FP32, sources[kind]["official"])
    assert official.timestep_conditioned == (kind == "timed")  # read from decoder.last_time_embedder.* keys
    assert torch.equal(folder.frames(video, GRID, keys), official.frames(video, GRID, keys))
    assert torch.equal(folder.waveforms(audio), official.waveforms(audio))
    for ours, ref in ((official.vae, parts[kind]), (official.audio_vae, parts["audio"])):
        assert not hasattr(ours, "encoder")  # the encoders are never materialised
        expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("encoder.")}
        assert ours.state_dict().keys() == expected.keys()
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())


def test_official_key_maps_match_diffusers_converters(parts) -> None:
    """Our maps against diffusers' single-file converters on a copy of the official tensors (the converters pop
    from the dict they are given), and exact round trips for every decoder key, timestep embedders included
    (the package's video converter lacks the conversion script's last_time_embedder / last_scale_shift_table
    renames, which our map has)."""
    from diffusers.loaders.single_file_utils import (
        convert_ltx2_audio_vae_to_diffusers,
        convert_ltx2_vae_to_diffusers,
    )

    official = tiny_decoders.official_state(parts["plain"], parts["audio"], parts["vocoder"])
    vae_slice = {k: v for k, v in official.items() if k.startswith("vae.")}
    converted = convert_ltx2_vae_to_diffusers(dict(vae_slice))
    ours = {official_video_vae_key(k[len("vae.") :]): v for k, v in vae_slice.items()}
    ours.pop(None)
    assert ours.keys() == {k for k in converted if not k.startswith("encoder.")}
    assert all(torch.equal(v, converted[k]) for k, v in ours.items())

    audio_slice = {k: v for k, v in official.items() if k.startswith("audio_vae.")}
    converted = convert_ltx2_audio_vae_to_diffusers(dict(audio_slice))
    ours = {official_audio_vae_key(k[len("audio_vae.") :]): v for k, v in audio_slice.items()}
    ours.pop(None)
    extra = {"per_channel_statistics.channel", "per_channel_statistics.mean-of-stds"}
    assert ours.keys() == {k for k in converted if not k.startswith("encoder.") and k not in extra}
    assert all(torch.equal(v, converted[k]) for k, v in ours.items())

    for name in parts["timed"].state_dict():
        if not name.startswith("encoder."):
            assert official_video_vae_key(tiny_decoders.official_video_key(name)) == name
    for name in parts["vocoder"].state_dict():
        assert official_vocoder_key(tiny_decoders.official_vocoder_key(name)) == name
    assert official_vocoder_key("ups.0.weight") == "upsamplers.0.weight"
    assert official_vocoder_key("resblocks.3.convs1.0.bias") == "resnets.3.convs1.0.bias"


def test_official_file_without_header_uses_the_19b_configs(parts, tmp_path) -> None:
    """No config in the header: the conversion script's 19B configs, which the tiny tensors do not fit (named
    in the error); on the meta device those configs give the release's decoder shapes."""
    path = tiny_decoders.write_official(
        tmp_path / "bare.safetensors", parts["plain"], parts["audio"], parts["vocoder"], header=False
    )
    with pytest.raises(CheckpointError, match=r"problem\(s\)") as err:
        load_decoders(path, torch.float32, video=True, audio=True)
    assert "video VAE missing: decoder.mid_block.resnets.1.conv1.conv.weight (1024, 1024, 3, 3, 3)" in str(err.value)
    assert "... and 329 more" in str(err.value)

    with torch.device("meta"):
        vae = diffusers.AutoencoderKLLTX2Video(**VIDEO_VAE_19B)
        audio = diffusers.AutoencoderKLLTX2Audio(**AUDIO_VAE_19B)
    assert tuple(vae.decoder.conv_in.conv.weight.shape) == (1024, 128, 3, 3, 3)
    assert tuple(vae.decoder.conv_out.conv.weight.shape) == (48, 128, 3, 3, 3)
    assert tuple(audio.latents_mean.shape) == (128,)  # = 8 channels x 16 latent mel bins, the packed width


def test_strict_loading_names_every_problem(parts, sources, tmp_path) -> None:
    root = shutil.copytree(sources["plain"]["folder"], tmp_path / "broken")
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("decoder.conv_out.conv.bias")
    state["decoder.extra"] = torch.zeros(1)
    state["latents_std"] = torch.ones(3)
    save_file(state, weights)
    audio_weights = root / "audio_vae" / "diffusion_pytorch_model.safetensors"
    audio_state = load_file(audio_weights)
    audio_state["latents_mean"] = torch.zeros(5)
    save_file(audio_state, audio_weights)
    with pytest.raises(CheckpointError) as err:
        Decoders(FP32, root)
    message = str(err.value)
    assert "(4 problem(s))" in message
    for fragment in (
        "video VAE missing: decoder.conv_out.conv.bias",
        "video VAE unexpected: decoder.extra (1,)",
        "video VAE shape: latents_std is (3,), expected (16,)",
        "audio VAE shape: latents_mean is (5,), expected (16,)",
    ):
        assert fragment in message
    # Only what is asked for is read: the broken video VAE does not stop an audio-only load, and vice versa.
    audio_state["latents_mean"] = torch.zeros(16)
    save_file(audio_state, audio_weights)
    assert Decoders(FP32, root, video=False).vae is None

    state = load_file(sources["plain"]["folder"] / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.conv_in.conv.weight"][0, 0, 0, 0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"non-finite .*decoder\.conv_in\.conv\.weight"):
        Decoders(FP32, root, audio=False)

    with safe_open(str(sources["plain"]["official"]), framework="pt") as f:
        official = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("audio_vae.")}
        save_file(official, tmp_path / "no_audio.safetensors", metadata=f.metadata())
    with pytest.raises(CheckpointError, match=r"holds no audio VAE \(audio_vae\.\* tensors\)"):
        Decoders(FP32, tmp_path / "no_audio.safetensors")
    assert Decoders(FP32, tmp_path / "no_audio.safetensors", audio=False).vae is not None

    (root / "vocoder" / "config.json").write_text('{"_class_name": "LTX2VocoderWithCoffee"}')
    with pytest.raises(CheckpointError, match="must be LTX2Vocoder or LTX2VocoderWithBWE"):
        Decoders(FP32, root, video=False)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Decoders(FP32, tmp_path / "nowhere")


# ---- the rest of the API ----------------------------------------------------------------------------------------


def test_parts_offload_batches_and_dtype(sources) -> None:
    video, audio = _latents(n=3, seed=3)
    folder = sources["plain"]["folder"]
    full = Decoders(FP32, folder)
    frames, waves = full.frames(video, GRID), full.waveforms(audio)
    assert waves.shape == (3, 2, 240 * (4 * 5 - 3))

    video_only = Decoders(DecodeConfig(dtype="float32", offload=True, batch_size=2), folder, audio=False)
    assert video_only.audio_vae is None and video_only.vocoder is None
    torch.testing.assert_close(video_only.frames(video, GRID), frames, rtol=0, atol=1e-5)
    assert next(video_only.vae.parameters()).device.type == "cpu"
    with pytest.raises(RuntimeError, match="audio decoders were not loaded"):
        video_only.waveforms(audio)
    audio_only = Decoders(DecodeConfig(dtype="float32", batch_size=3), folder, video=False)
    torch.testing.assert_close(audio_only.waveforms(audio), waves, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="video decoders were not loaded"):
        audio_only.frames(video, GRID)

    assert next(Decoders(DecodeConfig(), folder).vae.parameters()).dtype == torch.float32  # auto on a CPU
    bf16 = Decoders(DecodeConfig(dtype="bfloat16"), folder)  # what auto picks on CUDA
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16
    bf16_frames = bf16.frames(video, GRID)
    assert bf16_frames.dtype == torch.float32 and (bf16_frames - frames).abs().max() < 0.1
    assert (bf16.waveforms(audio) - waves).abs().max() < 0.1

    with pytest.raises(ValueError, match="do not fit grid"):
        full.frames(video, (2, 2, 2))
    with pytest.raises(ValueError, match="do not fit the audio VAE"):
        full.waveforms(audio[..., :8])


def test_config_and_source(sources) -> None:
    cfg = DecodeConfig()
    assert (cfg.source, cfg.dtype, cfg.offload, cfg.batch_size) == (None, "auto", False, 1)
    assert decode_source(cfg, "dit.safetensors") == "dit.safetensors"
    folder = str(sources["plain"]["folder"])
    assert decode_source(DecodeConfig(source=folder), "dit.safetensors") == folder
    with pytest.raises(ConfigError, match="decode.source is not set and model.init is None"):
        decode_source(cfg, None)
    with pytest.raises(ConfigError, match="decode.source: .* does not exist"):
        DecodeConfig(source="/no/such/vae")
