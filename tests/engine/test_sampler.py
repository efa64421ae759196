"""Rollout sampler: the LTX-2 schedule, the Euler loop, batched CFG and STG, and the V2A attention mass recorder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import models
from engine.algorithm.reweighting import V2AMassRecorder
from engine.errors import ConfigError
from engine.parallel import ProcessLayout
from engine.parallel.pipeline import Pipeline, PipelinedForward
from engine.sampler import SamplerConfig, ltx2_sigmas, sample, shift_for_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- schedule


def _reference_sigmas(n: int, shift: float, terminal: float) -> np.ndarray:
    """The LTX2Scheduler formula, written out independently in float64."""
    s = np.linspace(1.0, 0.0, n + 1, dtype=np.float64)
    out = np.zeros_like(s)
    nz = s != 0
    es = math.exp(shift)
    shifted = es / (es + 1.0 / s[nz] - 1.0)
    one_minus = 1.0 - shifted
    factor = one_minus[-1] / (1.0 - terminal)
    out[nz] = 1.0 - one_minus / factor
    return out


@pytest.mark.parametrize("steps", [2, 3, 8, 20, 30, 40, 50])
@pytest.mark.parametrize("shift,terminal", [(2.05, 0.1), (0.95, 0.1), (1.5, 0.05), (2.05, 0.3)])
def test_ltx2_sigmas_match_formula(steps: int, shift: float, terminal: float) -> None:
    got = ltx2_sigmas(steps, shift, terminal)
    assert got.shape == (steps + 1,) and got.dtype == torch.float32
    ref = _reference_sigmas(steps, shift, terminal)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-6)
    assert got[0].item() == pytest.approx(1.0, abs=1e-6)
    assert got[-1].item() == 0.0
    assert got[-2].item() == pytest.approx(terminal, abs=1e-6)
    assert bool((got[1:] < got[:-1]).all()), "schedule must be strictly decreasing"
    assert not torch.isnan(got).any()


def test_ltx2_sigmas_defaults_are_the_pipeline_ones() -> None:
    torch.testing.assert_close(ltx2_sigmas(20), ltx2_sigmas(20, 2.05, 0.1), rtol=0, atol=0)


def test_ltx2_sigmas_40_step_values() -> None:
    s = ltx2_sigmas(40)
    assert s[0].item() == pytest.approx(1.0, abs=1e-3)
    assert s[1].item() == pytest.approx(0.9964, abs=1e-3)
    assert s[-4].item() == pytest.approx(0.3378, abs=1e-3)
    assert s[-3].item() == pytest.approx(0.2339, abs=1e-3)
    assert s[-2].item() == pytest.approx(0.1, abs=1e-6)
    assert s[-1].item() == 0.0


def test_ltx2_sigmas_single_step_is_an_error_not_nan() -> None:
    """The stretch divides by 0 for one step; the schedule refuses it instead of returning NaN."""
    with pytest.raises(ValueError, match="steps"):
        ltx2_sigmas(1)


def test_shift_for_tokens() -> None:
    assert shift_for_tokens(1024) == pytest.approx(0.95)
    assert shift_for_tokens(4096) == pytest.approx(2.05)
    assert shift_for_tokens(2560) == pytest.approx(1.5)


# ---------------------------------------------------------------- sample()

GRID = (2, 2, 3)
TV, TA, N = 12, 7, 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = models.build_model("tiny").eval()
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    vn = torch.randn(N, TV, cfg.in_channels, generator=g)
    an = torch.randn(N, TA, cfg.audio_in_channels, generator=g)
    ctx_v = torch.randn(N, 5, cfg.caption_channels, generator=g)
    ctx_a = torch.randn(N, 5, cfg.caption_channels, generator=g)
    unc_v = torch.randn(N, 5, cfg.caption_channels, generator=g)
    unc_a = torch.randn(N, 5, cfg.caption_channels, generator=g)
    return model, vn, an, (ctx_v, ctx_a), (unc_v, unc_a), ltx2_sigmas(4)


class _Probe:
    """Materialises the full (audio query x video key) softmax of the recorded blocks, and checks the
    log-sum-exp the attention hands over against it."""

    def __init__(self, blocks):
        self.blocks, self.active, self.maps = set(blocks), False, []

    def wants(self, block: int) -> bool:
        return self.active and block in self.blocks

    def record(self, block: int, q: Tensor, k: Tensor, lse: Tensor) -> None:
        logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
        p = torch.softmax(logits, dim=-1)  # (B, H, T_a, T_v)
        self.maps.append(p.sum(dim=2).mean(dim=1))  # mass per video token, mean over heads


def _hand_loop(
    model,
    vn,
    an,
    ctx,
    sigmas,
    cfg_v=1.0,
    cfg_a=1.0,
    unc=None,
    record_steps=(),
    record_blocks=(),
    stg_scale=0.0,
    stg_blocks=(),
):
    """Separate forwards per pass. With STG, guidance is combined as LTX2Pipeline does, in x0 space:
    x0 = x - sigma v, x0_c + (cfg - 1)(x0_c - x0_u) + stg (x0_c - x0_p), back to v = (x - x0) / sigma."""
    probe = _Probe(record_blocks)
    x, a = vn.clone(), an.clone()
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(x.shape[0])
            probe.active = i in set(record_steps)
            vc, ac = model(x, a, s, ctx[0], ctx[1], GRID, 24.0, v2a_probe=probe)
            probe.active = False
            if stg_scale:
                every = torch.ones(x.shape[0], dtype=torch.bool)
                vp, ap = model(x, a, s, ctx[0], ctx[1], GRID, 24.0, perturbed=every, stg_blocks=set(stg_blocks))
                vu, au = model(x, a, s, unc[0], unc[1], GRID, 24.0) if unc is not None else (vc, ac)
                guided = []
                for lat, c, u, p, cfg in ((x, vc, vu, vp, cfg_v), (a, ac, au, ap, cfg_a)):
                    x0c, x0u, x0p = (lat - sigmas[i] * v for v in (c, u, p))
                    x0 = x0c + (cfg - 1) * (x0c - x0u) + stg_scale * (x0c - x0p)
                    guided.append((lat - x0) / sigmas[i])
                v_video, v_audio = guided
            elif unc is not None:
                vu, au = model(x, a, s, unc[0], unc[1], GRID, 24.0)
                v_video, v_audio = vu + cfg_v * (vc - vu), au + cfg_a * (ac - au)
            else:
                v_video, v_audio = vc, ac
            dt = sigmas[i + 1] - sigmas[i]
            x, a = x + dt * v_video, a + dt * v_audio
    score = torch.stack(probe.maps).mean(0) if probe.maps else None
    return x, a, score


def _recorded(model, vn, an, ctx, sigmas, steps=(), blocks=(), **kw):
    """`sample` with a V2A mass recorder of `steps` x `blocks`: (result, score)."""
    recorder = V2AMassRecorder(
        steps=steps, blocks=blocks, rows=vn.shape[0], num_video_tokens=vn.shape[1], device=vn.device
    )
    res = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, v2a_recorder=recorder, **kw)
    return res, recorder.score()


def test_sample_unguided_equals_euler_loop(setup) -> None:
    model, vn, an, ctx, _, sigmas = setup
    vn0, an0 = vn.clone(), an.clone()
    res = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas)
    x, a, _ = _hand_loop(model, vn, an, ctx, sigmas)
    torch.testing.assert_close(res.video, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.audio, a, rtol=0, atol=1e-5)
    assert torch.equal(res.sigmas, sigmas)
    assert torch.equal(vn, vn0) and torch.equal(an, an0)  # inputs untouched
    assert (res.video - vn).abs().max() > 0.1  # the loop did move the latents


def test_sample_batched_cfg_equals_separate_passes(setup) -> None:
    model, vn, an, ctx, unc, sigmas = setup
    res = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, cfg_video=3.0, cfg_audio=7.0, uncond_context=unc)
    x, a, _ = _hand_loop(model, vn, an, ctx, sigmas, 3.0, 7.0, unc)
    torch.testing.assert_close(res.video, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.audio, a, rtol=0, atol=1e-5)
    # Guidance does something, and the two scales are applied to their own streams.
    plain = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas)
    assert (res.video - plain.video).abs().max() > 1e-2 and (res.audio - plain.audio).abs().max() > 1e-2
    swapped = sample(
        model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, cfg_video=7.0, cfg_audio=3.0, uncond_context=unc
    )
    assert (swapped.video - res.video).abs().max() > 1e-3


def test_sample_cfg_needs_uncond_context(setup) -> None:
    model, vn, an, ctx, _, sigmas = setup
    with pytest.raises(ValueError, match="uncond"):
        sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, cfg_video=3.0)


@pytest.mark.parametrize("guided", [False, True])
def test_v2a_score_matches_materialised_softmax(setup, guided: bool) -> None:
    model, vn, an, ctx, unc, sigmas = setup
    steps, blocks = (0, 2), (1, 3)
    kw = dict(cfg_video=3.0, cfg_audio=7.0, uncond_context=unc) if guided else {}
    res, score = _recorded(model, vn, an, ctx, sigmas, steps, blocks, **kw)
    x, a, ref = _hand_loop(
        model, vn, an, ctx, sigmas, *((3.0, 7.0, unc) if guided else ()), record_steps=steps, record_blocks=blocks
    )
    assert ref is not None and score is not None
    assert score.shape == (N, TV)
    torch.testing.assert_close(score.double(), ref, rtol=1e-5, atol=1e-5)
    # Each audio query's probabilities sum to one: the mass over video tokens is T_a.
    torch.testing.assert_close(
        score.sum(-1).double(), torch.full((N,), float(TA), dtype=torch.float64), rtol=0, atol=1e-4
    )
    assert (score > 0).all()
    # Not uniform, and the two samples differ (the score is per sample, not pooled).
    assert (score - TA / TV).abs().max() > 1e-3
    assert not torch.allclose(score[0], score[1])
    # Recording does not change the rollout.
    torch.testing.assert_close(res.video, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.audio, a, rtol=0, atol=1e-5)


def test_v2a_score_depends_on_the_chosen_blocks_and_steps(setup) -> None:
    model, vn, an, ctx, _, sigmas = setup
    _, s1 = _recorded(model, vn, an, ctx, sigmas, (0,), (0,))
    _, s2 = _recorded(model, vn, an, ctx, sigmas, (0,), (2,))
    _, s3 = _recorded(model, vn, an, ctx, sigmas, (3,), (0,))
    assert not torch.allclose(s1, s2)
    assert not torch.allclose(s1, s3)
    _, _, ref = _hand_loop(model, vn, an, ctx, sigmas, record_steps=(3,), record_blocks=(0,))
    torch.testing.assert_close(s3.double(), ref, rtol=1e-5, atol=1e-5)
    # Recording needs both steps and blocks.
    assert _recorded(model, vn, an, ctx, sigmas, steps=(0,))[1] is None
    assert _recorded(model, vn, an, ctx, sigmas, blocks=(0,))[1] is None


# ---------------------------------------------------------------- STG


@pytest.mark.parametrize("cfg", [False, True], ids=["stg", "cfg+stg"])
def test_batched_stg_equals_separate_passes_combined_in_x0(setup, cfg: bool) -> None:
    """Rows [cond, uncond, perturbed] in one forward, combined in velocity space, give LTX2Pipeline's
    x0-space combine of three separate forwards; the V2A mass still counts the conditional rows only."""
    model, vn, an, ctx, unc, sigmas = setup
    guidance = dict(cfg_video=3.0, cfg_audio=7.0, uncond_context=unc) if cfg else {}
    steps, blocks = (0, 2), (1, 3)
    res, score = _recorded(model, vn, an, ctx, sigmas, steps, blocks, stg_scale=1.5, stg_blocks=[2], **guidance)
    x, a, ref = _hand_loop(
        model,
        vn,
        an,
        ctx,
        sigmas,
        *((3.0, 7.0, unc) if cfg else ()),
        record_steps=steps,
        record_blocks=blocks,
        stg_scale=1.5,
        stg_blocks=[2],
    )
    torch.testing.assert_close(res.video, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.audio, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(score.double(), ref, rtol=1e-5, atol=1e-5)
    # STG does something, on both streams.
    plain = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, **guidance)
    assert (res.video - plain.video).abs().max() > 1e-2 and (res.audio - plain.audio).abs().max() > 1e-2


def test_stg_scale_zero_is_todays_sampler(setup) -> None:
    """stg_scale=0 adds no rows: bit-identical to a call without STG, with and without CFG."""
    model, vn, an, ctx, unc, sigmas = setup
    for guidance in ({}, dict(cfg_video=3.0, cfg_audio=7.0, uncond_context=unc)):
        off = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, stg_scale=0.0, stg_blocks=[2], **guidance)
        ref = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, **guidance)
        assert torch.equal(off.video, ref.video) and torch.equal(off.audio, ref.audio)


def test_stg_rows_travel_through_microbatches(setup) -> None:
    """The (B,) perturbed mask is a keyword tensor: split_batch cuts it with the rows."""
    model, vn, an, ctx, unc, sigmas = setup
    common = dict(cfg_video=3.0, cfg_audio=7.0, uncond_context=unc, stg_scale=1.0, stg_blocks=[0, 3])
    whole = sample(model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, **common)
    split = sample(
        PipelinedForward(Pipeline(ProcessLayout()), model, 1), vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas, **common
    )
    torch.testing.assert_close(split.video, whole.video, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.audio, whole.audio, rtol=1e-5, atol=1e-6)


def test_bad_stg_settings(setup) -> None:
    model, vn, an, ctx, _, sigmas = setup
    run = (model, vn, an, ctx[0], ctx[1], GRID, 24.0, sigmas)
    with pytest.raises(ValueError, match=r"stg_blocks \[29\] are outside the model's blocks 0..3 \(4 blocks\)"):
        sample(*run, stg_scale=1.0, stg_blocks=[29])  # the default blocks are the 19B's
    with pytest.raises(ValueError, match="needs stg_blocks"):
        sample(*run, stg_scale=1.0)
    with pytest.raises(ValueError, match="stg_scale must be >= 0"):
        sample(*run, stg_scale=-1.0, stg_blocks=[1])
    # The config: checked on its own, and against the model's depth only with STG on.
    assert SamplerConfig().stg_blocks == [29] and SamplerConfig().stg_scale == 0.0
    SamplerConfig().check_blocks(4)
    with pytest.raises(ConfigError, match=r"^sampler.stg_blocks \[29\] are outside the model's blocks 0..3"):
        SamplerConfig(stg_scale=1.0).check_blocks(4)
    SamplerConfig(stg_scale=1.0).check_blocks(48)
    with pytest.raises(ConfigError, match="distinct block indices >= 0"):
        SamplerConfig(stg_blocks=[1, 1])
    with pytest.raises(ConfigError, match="distinct block indices >= 0"):
        SamplerConfig(stg_blocks=[-1])
    with pytest.raises(ConfigError, match="needs sampler.stg_blocks"):
        SamplerConfig(stg_scale=1.0, stg_blocks=[])
