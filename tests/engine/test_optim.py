"""The learning-rate schedule: warmup, then constant, linear or cosine decay, a function of the step
count (which checkpoints keep), reaching the optimizer at every step."""

from __future__ import annotations

import math

import pytest

from engine.config import load_config
from engine.optim import OptimConfig, scheduled_lr
from engine.trainer import Trainer


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("cosine", [0.25, 0.5, 0.75, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)),
                    0.0]),
    ],
)  # fmt: skip
def test_warmup_then_schedule(schedule, expected):
    cfg = OptimConfig(lr=1.0, schedule=schedule, warmup_steps=4)
    assert [scheduled_lr(cfg, s, total_steps=8) for s in range(8)] == pytest.approx(expected)


def test_the_trainer_steps_with_the_scheduled_rate(tmp_path):
    small = ["train.prompts_per_iteration=2", "train.group_size=3", "train.batch_size=3", "sampler.steps=4",
             "task.video_grid=[3,2,2]", "log.tensorboard=false", "log.progress=false", "log.plot=false",
             "checkpoint_every=0", "iterations=2", "optim.lr=0.01", "optim.schedule=linear",
             "optim.warmup_steps=2"]  # fmt: skip
    trainer = Trainer(load_config(None, [*small, f"run_dir={tmp_path}"]))
    assert trainer.total_steps == 4  # 2 iterations x 2 mini-batches
    rates = [m["lr"] for m in trainer.run()]
    assert rates == pytest.approx([0.01, 0.0])  # steps 1 (the end of warmup) and 3 (the last: decayed to 0)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
