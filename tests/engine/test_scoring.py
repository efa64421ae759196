"""Chunked rollouts with rewards scored as chunks arrive (engine.rewards.scoring), and reward failures in the
trainer: a stop (default) keeps the last checkpoint, `on_failure: skip` drops the iteration and counts it."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from engine.errors import RewardError
from engine.metrics import read_metrics
from engine.rewards import Reward, Rollout
from engine.trainer import Trainer
from tests.engine.rewards.reward_servers import ServerProcess, health
from tests.helpers import small_config


class FlakyReward(Reward):
    """Mean video latent; raises on call number `fail_at` (0-based, counted over the class: one call per
    iteration without chunks), as a scorer that goes away would."""

    name = "flaky"
    modality = "video"
    calls, fail_at = 0, -1

    def score(self, rollout: Rollout) -> torch.Tensor:
        cls = type(self)
        cls.calls += 1
        if cls.calls - 1 == cls.fail_at:
            raise ConnectionError("scorer went away")
        return rollout.video.mean(dim=(1, 2))


@pytest.fixture
def fail_at():
    """Sets the call FlakyReward fails on; restores it afterwards."""

    def set_(call: int) -> None:
        FlakyReward.calls, FlakyReward.fail_at = 0, call

    yield set_
    FlakyReward.calls, FlakyReward.fail_at = 0, -1


FLAKY = "tests.engine.test_scoring:FlakyReward"


def _rewards(on_failure: str) -> str:
    return (
        f'rewards=[{{name: video_sharpness}}, {{name: audio_steadiness}}, {{cls: "{FLAKY}", on_failure: {on_failure}}}]'
    )


def test_chunked_rollout_equals_the_whole_rollout(tmp_path):
    whole = Trainer(small_config(tmp_path / "a", "iterations=1")).run()[0]
    chunked = Trainer(small_config(tmp_path / "b", "iterations=1", "train.rollout_chunk=2")).run()[0]
    for key in [k for k in whole if not k.startswith("time/")]:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    for key in ("time/reward_wait", "time/reward_hidden", "time/reward/video_sharpness"):
        assert chunked[key] >= 0.0


def test_a_failing_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, fail_at):
    trainer = Trainer(small_config(tmp_path, "iterations=3", "checkpoint_every=1", _rewards("stop")))
    fail_at(1)
    with pytest.raises(RewardError, match=r"iteration 1: reward 'flaky' raised ConnectionError: scorer went away"):
        trainer.run()
    fail_at(-1)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000000"
    # The scorer is back: the resumed run's iteration 1 is the one an uninterrupted run takes.
    tail = Trainer(small_config(tmp_path, "iterations=2", "resume=true", _rewards("stop"))).run()
    straight = Trainer(small_config(tmp_path / "straight", "iterations=2", _rewards("stop"))).run()
    skip = {k for k in straight[1] if k.startswith("time/")}
    assert {k: v for k, v in tail[0].items() if k not in skip} == {
        k: v for k, v in straight[1].items() if k not in skip
    }


def test_on_failure_skip_drops_the_iteration_and_counts_it(tmp_path, fail_at):
    trainer = Trainer(small_config(tmp_path, "iterations=3", _rewards("skip")))
    fail_at(1)
    history = trainer.run()
    assert [m.get("skipped", 0) for m in history] == [0, 1, 0]
    assert history[1]["reward_failure/flaky"] == 1 and history[2]["skipped_iterations"] == 1
    assert history[1]["step"] == history[0]["step"] == history[2]["step"] - 1  # no optimizer step when skipped
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[1]["skipped"] == 1
    assert trainer.state.skipped_iterations == 1


def _remote(url: str) -> str:
    """The tiny task's rewards with av_sync scored by the server at `url` (one retry, 5 s per request)."""
    remote = f"{{name: av_sync, url: {url}, retries: 1, timeout: 5}}"
    return f"rewards=[{{name: video_sharpness}}, {{name: audio_steadiness}}, {remote}]"


def test_remote_reward_trains_as_the_local_one_with_scoring_behind_sampling(tmp_path):
    local = Trainer(small_config(tmp_path / "local", "iterations=2", "train.rollout_chunk=2")).run()
    with ServerProcess(["--reward", "av_sync"], tmp_path) as server:
        trainer = Trainer(
            small_config(tmp_path / "remote", "iterations=2", "train.rollout_chunk=2", _remote(server.url))
        )
        remote = trainer.run()
        assert health(server.url)["samples"] == 2 * 6  # every sample of both iterations, in chunks of 2
    assert [r.name for r in trainer.rewards if r.remote] == ["av_sync"]
    for got, want in zip(remote, local):
        assert {k: v for k, v in got.items() if not k.startswith("time/")} == {
            k: v for k, v in want.items() if not k.startswith("time/")
        }
        assert got["time/reward/av_sync"] > 0 and got["time/reward_wait"] >= 0 and got["time/reward_hidden"] >= 0


def test_a_server_killed_mid_run_stops_it_and_a_resume_after_its_restart_is_exact(tmp_path):
    run_dir = tmp_path / "run"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with ServerProcess(["--reward", "av_sync"], tmp_path / "a") as server:

        def kill_after_the_first_iteration() -> None:
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text().strip()):
                time.sleep(0.01)
            server.kill()

        killer = threading.Thread(target=kill_after_the_first_iteration, daemon=True)
        killer.start()
        with pytest.raises(RewardError, match=rf"reward 'av_sync': .*{server.url}") as failure:
            Trainer(small_config(run_dir, "iterations=4", "checkpoint_every=1", _remote(server.url))).run()
        killer.join(10)
    failed = int(re.search(r"iteration (\d+):", str(failure.value)).group(1))
    assert failed >= 1 and f"the last checkpoint (iteration {failed - 1}) is intact" in str(failure.value)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{failed - 1:06d}"

    straight = Trainer(small_config(tmp_path / "straight", "iterations=4")).run()
    with ServerProcess(["--reward", "av_sync"], tmp_path / "b") as restarted:  # another port: url is not protected
        tail = Trainer(small_config(run_dir, "iterations=4", "resume=true", _remote(restarted.url))).run()
    assert [m["iteration"] for m in tail] == list(range(failed, 4))
    for got, want in zip(tail, straight[failed:]):
        assert {k: v for k, v in got.items() if not k.startswith("time/")} == {
            k: v for k, v in want.items() if not k.startswith("time/")
        }
