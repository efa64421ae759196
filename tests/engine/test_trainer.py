"""The training loop end to end on a small task: metrics, checkpoints, exact resume, reward errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.config import load_config
from engine.errors import CheckpointError, RewardError
from engine.metrics import read_metrics
from engine.rewards import Reward, Rollout
from engine.trainer import Trainer

SMALL = [
    "train.prompts_per_iteration=2",
    "train.group_size=3",
    "train.batch_size=4",
    "sampler.steps=4",
    "task.video_grid=[3,2,2]",
    "log.tensorboard=false",
    "log.progress=false",
    "log.plot=false",
    "reweight.warmup_steps=0",
    "checkpoint_every=0",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [*SMALL, f"run_dir={tmp_path}", *extra])


def test_train_cli_two_iterations_writes_metrics_checkpoint_and_plot(tmp_path, capsys):
    small = [o for o in SMALL if not o.startswith(("log.tensorboard", "log.plot"))]
    rc = main(["train", "iterations=2", "seed=0", f"run_dir={tmp_path}", *small])
    assert rc == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    for row in rows:
        assert {
            "loss",
            "reward/video_sharpness",
            "reward/audio_steadiness",
            "reward/av_sync",
            "grad_norm",
            "adv/video_mean",
            "adv/audio_std",
            "time/rollout",
            "time/train",
        } <= set(row)
        assert torch.isfinite(torch.tensor(row["loss"]))
    assert (tmp_path / "rewards.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").iterdir())
    ckpt = tmp_path / "checkpoints" / "iter_000001"
    assert (tmp_path / "checkpoints" / "latest").read_text() == ckpt.name
    weights = load_file(ckpt / "model.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in weights)
    out = capsys.readouterr().out
    for name in ("video_sharpness", "audio_steadiness", "av_sync"):
        assert name in out.split("reward means")[1]


def test_resume_gives_the_identical_next_iteration(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a", "iterations=3"))
    full = straight.run()

    first = Trainer(_cfg(tmp_path / "b", "iterations=2"))
    first.run()
    resumed = Trainer(_cfg(tmp_path / "b", "iterations=3", "resume=true"))
    tail = resumed.run()

    assert [m["iteration"] for m in tail] == [2]
    skip = {k for k in full[2] if k.startswith("time/")}
    assert {k: v for k, v in tail[0].items() if k not in skip} == {k: v for k, v in full[2].items() if k not in skip}
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.old_model.parameters(), resumed.old_model.parameters()):
        assert torch.equal(p, q)
    assert [r["iteration"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [0, 1, 2]


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(tmp_path, "iterations=1", "resume=true")).run()


def test_rollouts_do_not_depend_on_which_samples_a_process_takes(tmp_path):
    """Noise is keyed by (seed, iteration, prompt, sample): a sample is the same whether rolled out
    with all others or in a data-parallel rank's share."""
    trainer = Trainer(_cfg(tmp_path, "iterations=1"))
    prompts = trainer.prompts_for(0)
    g = trainer.cfg.train.group_size
    together, *_ = trainer.rollout(0, prompts, list(range(2 * g)))
    share, *_ = trainer.rollout(0, prompts, [1, g + 2])
    torch.testing.assert_close(together.video[[1, g + 2]], share.video, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.audio[[1, g + 2]], share.audio, rtol=1e-5, atol=1e-5)
    assert share.prompts == (prompts[0].prompt, prompts[1].prompt)


class _Broken(Reward):
    name, modality = "broken", "video"

    def score(self, rollout):
        return torch.full((rollout.num_samples,), float("nan"))


def test_failing_reward_stops_the_run_with_its_name(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "iterations=1"))
    trainer.rewards.append(_Broken())
    with pytest.raises(RewardError, match="broken"):
        trainer.iteration(0)


def test_surgery_schedule_reaches_the_model(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "iterations=1", "surgery.schedule=[0.0, 0.5, 1.0, 1.0]"))
    assert [b.a2v_kv_grad_scale for b in trainer.model.transformer_blocks.values()] == [0.0, 0.5, 1.0, 1.0]
    paper = Trainer(_cfg(tmp_path, "iterations=1"))
    assert [b.a2v_kv_grad_scale for b in paper.model.transformer_blocks.values()] == [0.9, 1.0, 1.0, 1.0]


def test_region_weights_are_recorded_and_used(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "iterations=1"))
    m = trainer.iteration(0)
    assert m["region_weight/max"] > 1.0 and m["region_weight/max"] <= 2.5 + 1e-6
    off = Trainer(_cfg(tmp_path / "off", "iterations=1", "reweight.mode=off")).iteration(0)
    assert "region_weight/max" not in off


def test_sample_cli_writes_scored_latents(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path), *SMALL]) == 0
    data = load_file(tmp_path / "samples.safetensors")
    assert data["latents/video"].shape == data["noise/video"].shape == (6, 12, 16)
    assert data["latents/audio"].shape == data["noise/audio"].shape and data["noise/audio"].shape[0] == 6
    assert set(k for k in data if k.startswith("reward/")) == {
        "reward/video_sharpness",
        "reward/audio_steadiness",
        "reward/av_sync",
    }
    assert "video_sharpness" in capsys.readouterr().out


def test_sample_cli_samples_the_given_prompts_from_the_noise_it_stores(tmp_path):
    """`--prompt` replaces the config's prompts; the file holds what reproduces the latents: the
    initial noise, the prompts, the grid, the fps and the sigmas."""
    from safetensors import safe_open

    from engine.noise import rollout_noise
    from engine.sampler import sample

    prompts = ["a cat purrs", "thunder rolls"]
    argv = ["sample", "--out", str(tmp_path), "--prompt", prompts[0], "--prompt", f" {prompts[1]} ", *SMALL]
    assert main(argv) == 0
    with safe_open(str(tmp_path / "samples.safetensors"), "pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["prompts"]) == [prompts[0]] * 3 + [prompts[1]] * 3
    grid, fps, sigmas = json.loads(meta["video_grid"]), json.loads(meta["fps"]), json.loads(meta["sigmas"])
    cfg = load_config(None, [*SMALL, "iterations=1"])
    noise = rollout_noise(cfg.seed, 0, prompts[1], 2, (12, 16), tuple(data["noise/audio"].shape[1:]))
    assert torch.equal(data["noise/video"][5], noise[0]) and torch.equal(data["noise/audio"][5], noise[1])
    trainer = Trainer(cfg, for_training=False)
    ctx = trainer.conditioning.contexts([prompts[0]] * 3 + [prompts[1]] * 3, torch.device("cpu"), torch.float32)
    again = sample(
        trainer.model, data["noise/video"], data["noise/audio"], *ctx, tuple(grid), fps, torch.tensor(sigmas)
    )
    torch.testing.assert_close(again.video, data["latents/video"], rtol=0, atol=1e-6)
    torch.testing.assert_close(again.audio, data["latents/audio"], rtol=0, atol=1e-6)


def test_trainer_state_json_holds_config(tmp_path):
    Trainer(_cfg(tmp_path, "iterations=1")).run()
    meta = json.loads((tmp_path / "checkpoints" / "iter_000000" / "trainer_state.json").read_text())
    assert meta["iteration"] == 0 and meta["step"] >= 1
    assert meta["config"]["train"]["group_size"] == 3


def test_autocast_computes_in_bf16_and_keeps_fp32_parameters(tmp_path):
    plain = Trainer(_cfg(tmp_path / "fp32", "iterations=1"))
    mixed = Trainer(_cfg(tmp_path / "bf16", "iterations=1", "model.autocast=bfloat16"))
    prompts = plain.prompts_for(0)
    a, *_ = plain.rollout(0, prompts, [0, 1])
    b, *_ = mixed.rollout(0, prompts, [0, 1])
    assert not torch.equal(a.video, b.video)  # the matmuls really ran in bf16 ...
    torch.testing.assert_close(b.video, a.video, rtol=0.1, atol=0.1)  # ... and computed the same thing
    m = mixed.iteration(0)
    assert torch.isfinite(torch.tensor(m["loss"]))
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())


def test_evaluation_leaves_training_untouched_and_logs_every_reward(tmp_path, capsys):
    """eval.every samples task.eval_prompts with its own sampler and noise: training's numbers are
    bitwise those of a run without it, every reward gets eval/ metrics, and two evaluations of the
    same weights agree (fixed noise); `omninft eval` reports the same for a checkpoint."""
    evals = ["task.eval_prompts=[a cat purrs, thunder rolls]", "eval.samples_per_prompt=2", "eval.sampler.steps=3"]
    plain = Trainer(_cfg(tmp_path / "plain", "iterations=2")).run()
    with_eval = Trainer(_cfg(tmp_path / "eval", "iterations=2", "eval.every=1", *evals)).run()
    for a, b in zip(plain, with_eval):
        assert all(a[k] == b[k] for k in ("loss", "grad_norm", "reward/video_sharpness", "reward/av_sync"))
    assert {"eval/reward/video_sharpness", "eval/reward_std/av_sync"} <= set(with_eval[0])
    assert with_eval[0]["eval/reward/audio_steadiness"] != with_eval[1]["eval/reward/audio_steadiness"]
    rows = read_metrics(tmp_path / "eval" / "metrics.jsonl")
    assert rows[1]["eval/reward/av_sync"] == with_eval[1]["eval/reward/av_sync"]

    ckpt = tmp_path / "eval" / "checkpoints" / "iter_000001"
    out = tmp_path / "report"
    argv = ["eval", "--checkpoint", str(ckpt), "--out", str(out), *SMALL, *evals]
    assert main(argv) == 0 and main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    trainer = Trainer(_cfg(tmp_path / "again", f"model.init={ckpt / 'model.safetensors'}", *evals), for_training=False)
    assert trainer.evaluate(0)["eval/reward/video_sharpness"] == report["eval/reward/video_sharpness"]
    assert "video_sharpness" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(ckpt), *SMALL]) == 2  # no eval prompts: one line
    assert "needs task.eval_prompts" in capsys.readouterr().err


class _LatentDeSync(Reward):
    """Stands in for `desync` (its name, its score form 1 / (1 + seconds)) on latents: 1 / (1 + |mean|)."""

    name = "desync"
    modality = "av"

    def score(self, rollout: Rollout) -> torch.Tensor:
        return 1.0 / (1.0 + rollout.video.mean(dim=(1, 2)).abs())


def test_evaluation_logs_desync_in_seconds_from_the_desync_reward(tmp_path):
    evals = ["task.eval_prompts=[a cat purrs, thunder rolls]", "eval.samples_per_prompt=2", "eval.sampler.steps=2"]
    trainer = Trainer(_cfg(tmp_path, *evals), for_training=False)
    trainer.rewards = [_LatentDeSync()]
    metrics = trainer.evaluate(0)
    prompts = list(trainer.cfg.task.eval_records())
    rollout, _, _ = trainer.rollout(0, prompts, list(range(4)), evaluation=True)
    seconds = rollout.video.mean(dim=(1, 2)).abs()
    assert metrics["eval/desync"] == pytest.approx(float(seconds.mean()), rel=1e-5)
    assert metrics["eval/desync_std"] == pytest.approx(float(seconds.std(unbiased=False)), rel=1e-4)
    assert metrics["eval/reward/desync"] == pytest.approx(float((1 / (1 + seconds)).mean()), rel=1e-6)
