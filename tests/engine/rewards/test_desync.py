"""DeSync (Synchformer): the full-size model's tensor names and shapes against the released checkpoint's (a
checked-in list), strict loading, the preprocessing contract (frame-rate conversion against ffmpeg's fps filter,
resize and crop, log-mel features, padding to 8 s, windows), and a tiny random model's scores.

Measured outside CI, where the reference code runs (v-iashin/Synchformer as vendored by OmniNFT's authors, with
shims for timm and transformers 5; torchaudio and torchvision in pure-Python mode): with the same random
full-size weights, video features within 9e-7, audio features within 1.1e-6 and offset logits within 7e-7 of the
reference's (relative to their largest value); end to end on a 121-frame 512x768 24 fps clip with 5 s of 24 kHz
stereo audio, 16 kHz audio within 1.2e-7, log-mel features within 9.2e-6, frames within 0.0084 (the reference
rounds resized frames to 8 bits), logits within 1.4e-3 relative, the same argmax in both windows and the same
DeSync."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, ConfigError
from engine.rewards import RewardSpec, build_rewards, check_rewards, score_rewards
from engine.rewards.audio import htk_mel_filters, power_spectrogram, resample
from engine.rewards.base import REGISTRY
from engine.rewards.desync import (
    MEL_MEAN,
    MEL_STD,
    DeSync,
    desync_from_scores,
    fit_frames,
    log_mel_segments,
    random_desync,
    resample_indices,
    window_segments,
)
from engine.rewards.synchformer import Synchformer, SynchformerConfig, parameter_count, randomize
from tests.engine.rewards.rollouts import media_rollout

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS_FILE = Path(__file__).resolve().parents[2] / "data" / "keys-synchformer.txt"
TINY = dict(
    dim=32, image_size=32, video_depth=1, video_heads=2, audio_depth=1, audio_heads=2, sync_depth=1, sync_heads=2
)
RATE = 16_000  # media at the model's own rates (25 fps, 16 kHz) unless a test is about conversion
FPS = 25.0


def released_layout() -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in KEYS_FILE.read_text().splitlines() if not line.startswith("#")]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


def tiny_model(seed: int = 0) -> Synchformer:
    """A tiny random Synchformer; weights of std 0.3 so its logits react visibly to the input."""
    return randomize(Synchformer(SynchformerConfig(**TINY)), seed=seed, std=0.3)


@pytest.fixture(scope="module")
def tiny() -> DeSync:
    return DeSync.from_model(tiny_model())


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("desync") / "synchformer_state_dict.pth"
    torch.save(tiny_model().state_dict(), path)
    return path


def media(seconds: float, seed: int = 0, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, frames, 24, 40, 3) smooth random video at 25 fps and (1, channels, samples) audio at 16 kHz: noise in
    bursts of 0.2 s every 0.77 s."""
    gen = torch.Generator().manual_seed(seed)
    frames = round(seconds * FPS)
    low = torch.rand(frames, 3, 3, 5, generator=gen)
    video = torch.nn.functional.interpolate(low, size=(24, 40), mode="bilinear").permute(0, 2, 3, 1)
    t = torch.arange(round(seconds * RATE)) / RATE
    bursts = (torch.remainder(t, 0.77) < 0.2).float()
    audio = torch.randn(1, channels, t.numel(), generator=gen) * 0.3 * bursts
    return video[None], audio


def rollout_of(frames: torch.Tensor, waveforms: torch.Tensor, *, fps: float = FPS, rate: int = RATE):
    return media_rollout(frames=frames, waveforms=waveforms, sample_rate=rate, fps=fps)


# ---- the model and its weights ----------------------------------------------------------------------------


def test_full_size_model_has_the_released_checkpoints_513_tensors():
    expected = released_layout()
    assert len(expected) == 513 and sum(math.prod(s) for s in expected.values()) == 237_460_245
    with torch.device("meta"):
        model = Synchformer()
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert list(ours) == list(expected)
    assert ours == expected
    assert parameter_count(SynchformerConfig()) == 237_460_245
    assert SynchformerConfig().sync_tokens == expected["transformer.pos_emb_cfg.pos_emb"][1] == 198


def test_a_state_dict_in_the_released_layout_loads_strictly(tiny, tiny_file):
    loaded = DeSync(path=str(tiny_file), config=TINY)
    for name, tensor in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    frames, audio = media(2.0)
    rollout = rollout_of(frames, audio)
    assert torch.equal(loaded.window_logits(rollout), tiny.window_logits(rollout))


def edited(state: dict, tmp_path: Path, drop=(), add=None, reshape=None) -> Path:
    state = {k: v for k, v in state.items() if k not in drop}
    state.update(add or {})
    for name, shape in (reshape or {}).items():
        state[name] = torch.zeros(shape)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "edit,named",
    [
        (dict(drop=["transformer.off_head.bias"]), "missing: transformer.off_head.bias (21,)"),
        (dict(add={"transformer.extra": torch.zeros(2)}), "unexpected: transformer.extra (2,)"),
        (dict(reshape={"transformer.off_head.weight": (20, 32)}), "shape: transformer.off_head.weight is (20, 32)"),
    ],
)
def test_keys_that_do_not_fit_are_named_in_one_line(tiny, tmp_path, edit, named):
    path = edited(tiny.model.state_dict(), tmp_path, **edit)
    with pytest.raises(CheckpointError) as error:
        DeSync(path=str(path), config=TINY)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and named in message and "desync" in message


def test_the_full_size_model_refuses_a_tiny_state_dict_naming_eight_problems(tiny_file):
    """406 tensors missing (11 MotionFormer blocks x 18, 11 AST layers x 16, 2 sync blocks x 16) and 106 of the
    tiny model's 107 mis-shaped (only off_head.bias, (21,), fits): 512 problems, 8 named."""
    with pytest.raises(CheckpointError) as error:
        DeSync(path=str(tiny_file))
    message = str(error.value)
    assert "\n" not in message and "(512 problem(s))" in message and message.endswith("; and 504 more")
    assert message.count("missing: ") + message.count("shape: ") == 8


def test_missing_unreadable_and_non_finite_files(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        DeSync(path=str(tmp_path / "absent.pth"), config=TINY)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch state dict"):
        DeSync(path=str(tmp_path / "text.pth"), config=TINY)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        DeSync(path=str(tmp_path / "list.pth"), config=TINY)
    state = dict(tiny.model.state_dict())
    state["vproj.bias"] = torch.full_like(state["vproj.bias"], math.nan)
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite.*vproj.bias"):
        DeSync(path=str(tmp_path / "nan.pth"), config=TINY)


def test_registered_and_built_from_the_config_entry(tiny_file):
    assert REGISTRY["desync"] is DeSync
    assert DeSync.modality == "av" and DeSync.reads == frozenset({"frames", "waveform"})
    spec = RewardSpec(name="desync", weight=0.5, args={"path": str(tiny_file), "config": TINY, "dtype": "bfloat16"})
    check_rewards([spec])
    (reward,) = build_rewards([spec])
    assert isinstance(reward, DeSync) and reward.weight == 0.5 and reward.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="args do not fit desync"):
        check_rewards([RewardSpec(name="desync", args={"path": "x", "fps": 25})])


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(dtype="float16"), "desync.dtype"),
        (dict(clip_seconds=0.5), "desync.clip_seconds must be a number >= 0.64"),
        (dict(segment_batch=0), "desync.segment_batch"),
        (dict(device="nowhere"), "desync.device"),
        (dict(config={"depth": 2}), "desync.config"),
    ],
)
def test_bad_options_are_config_errors_before_loading(args, match, tmp_path):
    spec = RewardSpec(name="desync", args={"path": str(tmp_path / "absent.pth"), **args})
    with pytest.raises(ConfigError, match=match):
        build_rewards([spec])


# ---- preprocessing ----------------------------------------------------------------------------------------


def test_frame_rate_conversion_picks_frames_as_ffmpeg_does():
    """LTX-2's 121 frames at 24 fps are 126 at 25 fps: frames 11 and 35 are shown twice, as ffmpeg's fps filter
    (what the reference's decoder applies) shows them."""
    index = resample_indices(121, 24.0)
    assert index.shape == (126,) and index[-1] == 120
    assert torch.equal(index[:14], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 12]))
    repeated = (index[1:] == index[:-1]).nonzero().flatten() + 1
    assert repeated[:2].tolist() == [12, 37] and index[36] == index[37] == 35
    assert torch.equal(resample_indices(121, 25.0), torch.arange(121))
    assert torch.equal(resample_indices(50, 50.0), torch.arange(0, 50, 2))


@pytest.mark.parametrize("count,fps", [(121, 24.0), (97, 24.0), (61, 30.0), (241, 48.0), (100, 12.0)])
def test_frame_rate_conversion_matches_ffmpegs_fps_filter(count, fps):
    av = pytest.importorskip("av")
    graph = av.filter.Graph()
    source = graph.add_buffer(width=16, height=16, format="gray", time_base=f"1/{int(fps)}")
    convert, sink = graph.add("fps", "25"), graph.add("buffersink")
    source.link_to(convert)
    convert.link_to(sink)
    graph.configure()
    shown = []

    def drain():
        while True:
            try:
                shown.append(int(sink.pull().to_ndarray()[0, 0]))
            except (av.error.BlockingIOError, av.error.EOFError):
                return

    for i in range(count):  # frame i is filled with the value i (all below 256)
        frame = av.VideoFrame.from_ndarray(np.full((16, 16), i, dtype=np.uint8), format="gray")
        frame.pts, frame.duration = i, 1
        source.push(frame)
        drain()
    source.push(None)
    drain()
    assert resample_indices(count, fps).tolist() == shown


def test_frames_are_resized_centre_cropped_and_scaled_to_minus_one_one():
    """512 x 768: shorter side to 224 (224 x 336), the middle 224 columns kept, so the outer 100 columns on
    each side (red, blue) vanish; green (0, 1, 0) becomes (-1, 1, -1)."""
    frame = torch.zeros(1, 512, 768, 3)
    frame[..., 1] = 1.0
    frame[:, :, :100] = torch.tensor([1.0, 0.0, 0.0])
    frame[:, :, -100:] = torch.tensor([0.0, 0.0, 1.0])
    out = fit_frames(frame, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1).expand_as(out))
    portrait = torch.full((2, 40, 24, 3), 0.25)
    portrait[:, :4] = 1.0  # the top rows of a portrait frame are cropped away
    torch.testing.assert_close(fit_frames(portrait, 16), torch.full((2, 3, 16, 16), -0.5))
    same = torch.rand(1, 32, 32, 3)
    torch.testing.assert_close(fit_frames(same, 32), same.permute(0, 3, 1, 2) * 2 - 1)


def test_htk_mel_filters_match_transformers():
    """transformers' mel_filter_bank(mel_scale="htk", norm=None) is torchaudio's melscale_fbanks default."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    reference = audio_utils.mel_filter_bank(
        num_frequency_bins=513,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm=None,
        mel_scale="htk",
    )
    np.testing.assert_allclose(htk_mel_filters(16000, 1024, 128, 0.0, 8000.0).numpy(), reference, rtol=0, atol=1e-12)


def test_power_spectrogram_with_a_window_shorter_than_the_fft():
    """A 400-sample periodic Hann window centred in 1024 (312 zeros before it), as torch.stft pads it."""
    x = np.random.default_rng(2).standard_normal(4000)
    padded = np.pad(x, 512, mode="reflect")
    window = np.zeros(1024)
    window[312:712] = np.hanning(401)[:-1]
    frames = np.stack([padded[i : i + 1024] for i in range(0, len(padded) - 1024 + 1, 160)])
    reference = (np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2).T
    ours = power_spectrogram(torch.from_numpy(x)[None], 1024, 160, pad_mode="reflect", win_length=400)[0].numpy()
    assert ours.shape == reference.shape == (513, 26)
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_log_mel_segments_of_eight_seconds():
    """128,000 samples: 24 segments of 10,240 (hop 5,120), each 65 STFT frames plus one column of log-mel 0; the
    features are (x + 4.2677393) / (2 * 4.5689974): silence is log(1e-6) there, -1.0448, the column 0.4670."""
    audio = torch.zeros(1, 128_000, dtype=torch.float64)
    audio[0, 64_000:] = torch.sin(torch.arange(64_000) * 2 * math.pi * 440 / RATE)
    mel = log_mel_segments(audio, 10_240, 66, 128)
    assert mel.shape == (1, 24, 128, 66)
    pad_column, silence = -MEL_MEAN / (2 * MEL_STD), (math.log(1e-6) - MEL_MEAN) / (2 * MEL_STD)
    assert pad_column == pytest.approx(0.46703, abs=1e-5) and silence == pytest.approx(-1.04484, abs=1e-5)
    torch.testing.assert_close(mel[..., 65], torch.full((1, 24, 128), pad_column, dtype=torch.float64))
    torch.testing.assert_close(mel[0, :11, :, :65], torch.full((11, 128, 65), silence, dtype=torch.float64))
    band = round(math.log10(1 + 440 / 700) / math.log10(1 + 8000 / 700) * 129) - 1  # the tone's band (HTK mel)
    loudest = mel[0, 13:, :, :65].mean(dim=(0, 2)).argmax().item()  # segments 13-23 lie after 4 s
    assert abs(loudest - band) <= 1 and mel[0, 13:, band, :65].amin() > 0.5


@pytest.mark.parametrize(
    "count,expected",
    [
        (24, [list(range(14)), list(range(10, 24))]),
        (28, [list(range(14)), list(range(14, 28))]),
        (30, [list(range(14)), list(range(14, 28)), list(range(16, 30))]),
        (14, [list(range(14))]),
        (5, [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]),
    ],
)
def test_windows_of_fourteen_segments(count, expected):
    assert window_segments(count, 14).tolist() == expected


# ---- the reward -------------------------------------------------------------------------------------------


def test_scores_are_deterministic_and_react_to_the_input(tiny):
    """Shifting the audio by 0.4 s, or changing the video, changes the offset logits; the same input gives
    the same logits."""
    frames, audio = media(2.0)
    logits = tiny.window_logits(rollout_of(frames, audio))
    assert logits.shape == (1, 2, 21) and torch.isfinite(logits).all()
    assert torch.equal(tiny.window_logits(rollout_of(frames, audio)), logits)
    shifted = tiny.window_logits(rollout_of(frames, torch.roll(audio, 6_400, dims=-1)))
    assert (shifted - logits).abs().max() > 1e-2
    other_video, _ = media(2.0, seed=1)
    assert (tiny.window_logits(rollout_of(other_video, audio)) - logits).abs().max() > 1e-2


def test_desync_is_the_mean_absolute_offset_of_the_windows_and_the_reward_its_inverse(tiny):
    frames, audio = media(2.0)
    frames = torch.cat([frames, media(2.0, seed=3)[0]])
    audio = torch.cat([audio, media(2.0, seed=4)[1]])
    rollout = rollout_of(frames, audio)
    logits = tiny.window_logits(rollout)  # (2, 2, 21): 8 s of padded clip, 24 segments
    grid = torch.linspace(-2.0, 2.0, 21, dtype=torch.float64)
    assert logits.shape == (2, 2, 21)
    torch.testing.assert_close(tiny.offsets(rollout), grid[logits.argmax(dim=-1)])
    desync = grid[logits.argmax(dim=-1)].abs().mean(dim=-1).float()
    scores = score_rewards([tiny], rollout)["desync"]
    torch.testing.assert_close(tiny.last_desync, desync)
    torch.testing.assert_close(scores, 1.0 / (1.0 + desync))
    torch.testing.assert_close(desync_from_scores(scores), desync)


def test_short_clips_are_padded_to_eight_seconds_with_black_and_silence(tiny):
    """A 3 s clip scores as the same clip padded with black frames and silence to 8 s (the evaluation's
    max_length_s), and a 10 s clip as its first 8 s."""
    frames, audio = media(3.0)
    padded_frames = torch.cat([frames, torch.zeros(1, 125, 24, 40, 3)], dim=1)
    padded_audio = torch.nn.functional.pad(audio, (0, 80_000))
    logits = tiny.window_logits(rollout_of(frames, audio))
    assert logits.shape == (1, 2, 21)
    torch.testing.assert_close(tiny.window_logits(rollout_of(padded_frames, padded_audio)), logits)
    long_frames, long_audio = media(10.0, seed=5)
    torch.testing.assert_close(
        tiny.window_logits(rollout_of(long_frames, long_audio)),
        tiny.window_logits(rollout_of(long_frames[:, :200], long_audio[..., :128_000])),
    )


def test_segments_wholly_in_the_padding_are_encoded_once(tiny):
    """LTX-2's 121 frames at 24 fps are 126 at 25 fps: segments 0-15 hold some of them, 16-23 only padding, whose
    features are those of one black segment, encoded on first use and then reused."""
    reward = DeSync.from_model(tiny.model)
    batches = []
    hook = reward.model.vfeat_extractor.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    try:
        frames = media(121 / 24, seed=2)[0][:, :121]
        audio = media(5.0, seed=2)[1]
        first = reward.window_logits(rollout_of(frames, audio, fps=24.0))
        assert batches == [16, 1]
        reward.window_logits(rollout_of(frames, audio, fps=24.0))
        assert batches == [16, 1, 16]
    finally:
        hook.remove()
    assert first.shape == (1, 2, 21)


def test_clip_seconds_sets_the_windows(tiny):
    """4.8 s is 14 segments (one window); 2 s is 5 segments, repeated to fill one window."""
    frames, audio = media(6.0)
    assert DeSync.from_model(tiny.model, clip_seconds=4.8).window_logits(rollout_of(frames, audio)).shape == (1, 1, 21)
    two = DeSync.from_model(tiny.model, clip_seconds=2.0)
    assert two.clip_frames == 50 and two.clip_samples == 32_000
    assert two.window_logits(rollout_of(frames, audio)).shape == (1, 1, 21)


def test_24fps_stereo_24khz_media_are_converted(tiny):
    """LTX-2's media (24 fps, 24 kHz stereo) score as the same media converted by hand: the frames ffmpeg shows
    at 25 fps, the channels' mean resampled to 16 kHz."""
    gen = torch.Generator().manual_seed(7)
    frames = torch.rand(1, 49, 24, 40, 3, generator=gen)
    stereo = torch.randn(1, 2, 48_000, generator=gen, dtype=torch.float64) * 0.1
    native = tiny.window_logits(rollout_of(frames, stereo, fps=24.0, rate=24_000))
    mono = resample(stereo.mean(1, keepdim=True), 24_000, RATE)
    by_hand = rollout_of(frames[:, resample_indices(49, 24.0)], mono)
    assert by_hand.frames.shape[1] == 51
    torch.testing.assert_close(native, tiny.window_logits(by_hand), rtol=0, atol=0)


def test_bfloat16_runs_the_model_in_bfloat16_near_float32(tiny):
    frames, audio = media(2.0)
    rollout = rollout_of(frames, audio)
    half = DeSync.from_model(tiny_model(), dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    reference, logits = tiny.window_logits(rollout), half.window_logits(rollout)
    assert logits.dtype == torch.float32 and not torch.equal(logits, reference)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_random_full_size_reward_for_benchmarks():
    reward = random_desync(config=TINY, seed=3)
    assert reward.cfg.dim == 32 and reward.dtype == torch.float32
    again = random_desync(config=TINY, seed=3)
    for name, tensor in reward.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor)
