"""Pipeline stages and microbatches in one process: stage split, the packed carry, stages chained by
hand against the whole model, microbatched sampling and training against whole batches. The
multi-process schedule runs in tests/engine/parallel/test_parallel.py."""

from __future__ import annotations

import pytest
import torch

import models
from engine.algorithm.reweighting import V2AMassRecorder
from engine.config import ConfigError, load_config
from engine.parallel import ProcessLayout, init_layout
from engine.parallel.pipeline import Pipeline, PipelinedForward
from engine.sampler import ltx2_sigmas, sample
from engine.trainer import Trainer
from models.stage import CARRY, Stage, pack, stage_layers, unpack
from tests.helpers import TASK


@pytest.mark.parametrize("layers, count", [(4, 1), (4, 2), (4, 3), (4, 4), (48, 5), (48, 8)])
def test_stages_cover_the_blocks_in_order(layers, count):
    parts = [stage_layers(layers, count, i) for i in range(count)]
    assert [i for p in parts for i in p] == list(range(layers))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_stages_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="pp=5 pipeline stages need 1 <= pp <= num_layers \\(4\\)"):
        stage_layers(4, 5, 0)
    with pytest.raises(ConfigError, match=r"parallel.pp=5: the model \(model.preset='tiny'\) has only 4 blocks"):
        load_config(None, ["parallel.pp=5"])


def test_pack_round_trip_and_gradients():
    shapes = {name: (2, 3 + i, 4) for i, name in enumerate(CARRY)}
    parts = {name: torch.randn(s, requires_grad=True) for name, s in shapes.items()}
    packed = pack(parts)
    assert packed.shape == (sum(3 * 4 + 4 * i for i in range(len(CARRY))), 2, 1)
    back = unpack(packed, shapes)
    assert all(torch.equal(back[n], parts[n]) for n in CARRY)
    sum(v.sum() * (i + 1) for i, v in enumerate(back.values())).backward()
    assert all(torch.equal(parts[n].grad, torch.full(shapes[n], float(i + 1))) for i, n in enumerate(CARRY))
    with pytest.raises(ValueError, match="pipeline input tensor has shape"):
        unpack(packed[:-1], shapes)


def test_chained_stages_equal_the_whole_model():
    """Stage 0's packed output fed to stage 1 by hand gives the whole model's outputs and gradients
    (the schedule only moves this tensor between processes)."""
    torch.manual_seed(0)
    whole = models.build_model("tiny")
    stages = [models.build_model("tiny", stage=Stage(index=i, count=2)) for i in range(2)]
    assert set(stages[0].state_dict()).isdisjoint(stages[1].state_dict())
    assert set(stages[0].state_dict()) | set(stages[1].state_dict()) == set(whole.state_dict())
    for s in stages:
        models.weights.load_full_state(s, whole.state_dict())
    g = torch.Generator().manual_seed(1)
    cfg, b = whole.config, 2
    args = (
        torch.randn(b, 12, cfg.in_channels, generator=g),
        torch.randn(b, 5, cfg.audio_in_channels, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, 6, cfg.caption_channels, generator=g),
        torch.randn(b, 6, cfg.caption_channels, generator=g),
        (3, 2, 2),
    )
    kwargs = {"audio_sigma": torch.rand(b, 5, generator=g)}  # per-token sigma: a (B, T, k*D) modulation crosses
    ref = whole(*args, **kwargs)
    packed = stages[0](*args, **kwargs)
    received = packed.detach().requires_grad_()
    stages[1].set_input_tensor([received])
    out = stages[1](*args, **kwargs)
    for o, r in zip(out, ref):  # views of the packed tensor may take other kernels: rounding only
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    sum(o.square().sum() for o in ref).backward()
    sum(o.square().sum() for o in out).backward()
    packed.backward(received.grad)
    grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    # Against the largest gradient entry: some (key biases under softmax) are rounding noise around 0.
    scale = max(float(p.grad.abs().max()) for p in whole.parameters())
    for name, p in whole.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_microbatched_sampling_equals_one_batch():
    """Rows split over microbatches: same samples and the same V2A mass (the probe is told each
    microbatch's first row)."""
    torch.manual_seed(0)
    model = models.build_model("tiny")
    g = torch.Generator().manual_seed(2)
    cfg, n = model.config, 4
    noise = (torch.randn(n, 12, cfg.in_channels, generator=g), torch.randn(n, 5, cfg.audio_in_channels, generator=g))
    ctx = torch.randn(n, 6, cfg.caption_channels, generator=g)
    common = dict(
        video_grid=(3, 2, 2),
        fps=24.0,
        sigmas=ltx2_sigmas(4),
        cfg_video=2.0,
        cfg_audio=1.5,
        uncond_context=(ctx * 0, ctx * 0),
    )
    recorders = [
        V2AMassRecorder(steps=(1, 2), blocks=(2, 3), rows=n, num_video_tokens=12, device="cpu") for _ in range(2)
    ]
    whole = sample(model, *noise, ctx, ctx, v2a_recorder=recorders[0], **common)
    split = sample(
        PipelinedForward(Pipeline(ProcessLayout()), model, 1), *noise, ctx, ctx, v2a_recorder=recorders[1], **common
    )
    torch.testing.assert_close(split.video, whole.video, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorders[1].score(), recorders[0].score(), rtol=1e-5, atol=1e-7)
    assert float(recorders[0].score().sum()) > 0


def test_microbatched_iteration_equals_whole_batches(tmp_path, single_thread):
    runs = [
        Trainer(load_config(None, [*TASK, f"train.micro_batch_size={m}", f"run_dir={tmp_path / str(m)}"]))
        for m in (0, 1)
    ]
    whole, micro = (r.iteration(0) for r in runs)
    for key in ("loss", "loss/video", "loss/audio", "grad_norm", "reward/video_sharpness"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_micro_batch_size_must_divide_a_share(tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch_size=3 must divide each rank's share"):
        Trainer(load_config(None, [*TASK, "train.micro_batch_size=3", f"run_dir={tmp_path}"]))


def _init(overrides: list[str]) -> ProcessLayout:
    cfg = load_config(None, overrides)
    return init_layout(cfg.parallel, cfg.model.backend, cfg.model.init_seed)


def test_pipeline_and_distributed_optimizer_need_torchrun_and_cuda(monkeypatch):
    with pytest.raises(ConfigError, match="needs torchrun"):
        _init(["parallel.pp=2"])
    with pytest.raises(ConfigError, match="parallel.distributed_optimizer needs megatron's process groups"):
        _init(["parallel.distributed_optimizer=true"])
    if not torch.cuda.is_available():
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="pipeline schedule allocates on CUDA"):
            _init(["parallel.pp=2"])
        with pytest.raises(ConfigError, match="distributed optimizer allocates on CUDA"):
            _init(["parallel.distributed_optimizer=true"])
