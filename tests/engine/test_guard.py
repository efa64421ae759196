"""The non-finite guard: NaN injected at each site of a training step is caught before the optimizer
applies it, named, skipped up to train.max_bad_steps, and never reaches a checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint.integrity import write_manifest
from engine.cli import main
from engine.config import load_config
from engine.errors import CheckpointError
from engine.guard import NonFiniteError
from engine.parallel import ProcessLayout
from engine.trainer import Trainer
from tests.helpers import SMALL

NAN = float("nan")


def _trainer(tmp_path, *extra) -> Trainer:
    return Trainer(load_config(None, [*SMALL, f"run_dir={tmp_path}", "iterations=2", *extra]))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _old_policy_outputs_nan(trainer: Trainer) -> None:
    """The old policy's training forward (after the rollout) returns NaN video."""
    forward, rollout, rolled_out = trainer.pipeline.forward, trainer.rollout, []

    def after_rollout(*args):
        result = rollout(*args)
        rolled_out.append(True)
        return result

    def patched(model, microbatches):
        out = forward(model, microbatches)
        return [(v * NAN, a) for v, a in out] if rolled_out and model is trainer.old_model else out

    trainer.rollout, trainer.pipeline.forward = after_rollout, patched


def _policy_outputs_nan(trainer: Trainer) -> None:
    with torch.no_grad():
        trainer.model.audio_proj_out.bias[0] = NAN


def _kl_nan(trainer: Trainer) -> None:
    with torch.no_grad():
        trainer.ref_model.proj_out.bias[0] = NAN


def _gradient_nan(trainer: Trainer) -> None:
    trainer.model.transformer_blocks["2"].ff.net[2].weight.register_hook(lambda g: g * NAN)


@pytest.mark.parametrize(
    "inject, extra, names",
    [
        (_old_policy_outputs_nan, [], ["non-finite old-policy video output at iteration 0, training sigma"]),
        (_policy_outputs_nan, [], ["non-finite policy audio output at iteration 0, training sigma 1.0000"]),
        (_kl_nan, ["loss.kl_weight=0.1"], ["non-finite loss/kl at iteration 0"]),
        (_gradient_nan, [], ["non-finite gradient of transformer_blocks.2.ff.net.2.weight at iteration 0:"]),
    ],
    ids=["old-policy-output", "policy-output", "loss-part", "gradient"],
)
def test_first_non_finite_site_stops_the_run_before_the_step(tmp_path, inject, extra, names):
    trainer = _trainer(tmp_path, *extra)
    inject(trainer)
    before, old_before = _weights(trainer.model), _weights(trainer.old_model)
    with pytest.raises(NonFiniteError) as info:
        trainer.iteration(0)
    for name in names:
        assert name in str(info.value), str(info.value)
    assert "train.max_bad_steps=0" in str(info.value)
    assert trainer.state.step == 0 and trainer.state.bad_steps == 1
    after = _weights(trainer.model)
    assert all(torch.equal(after[k], before[k]) | ~before[k].isfinite().all() for k in before)  # nothing applied
    assert all(torch.equal(v, old_before[k]) for k, v in _weights(trainer.old_model).items())  # nor EMA'd


def test_skipped_steps_are_counted_and_the_run_goes_on(tmp_path):
    trainer = _trainer(tmp_path, "train.max_bad_steps=1")
    param = trainer.model.transformer_blocks["0"].attn1.to_q.weight
    handle = param.register_hook(lambda g: g * NAN)
    before = _weights(trainer.model)
    first = trainer.iteration(0)
    assert first["bad_steps"] == 1 and trainer.state.step == 0 and first["grad_norm"] != first["grad_norm"]
    assert all(torch.equal(v, before[k]) for k, v in _weights(trainer.model).items())
    handle.remove()
    second = trainer.iteration(1)
    assert second["bad_steps"] == 1 and trainer.state.step == 1 and second["grad_norm"] > 0
    assert not torch.equal(param, before["transformer_blocks.0.attn1.to_q.weight"])


def test_a_broken_old_policy_is_not_blamed_on_a_reward(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        trainer.old_model.proj_out.weight[0, 0] = NAN
    with pytest.raises(NonFiniteError, match="old policy's rollout at iteration 0 has non-finite latents"):
        trainer.iteration(0)


def test_weights_holding_nan_are_refused_at_load(tmp_path, capsys):
    trainer = _trainer(tmp_path / "run", "iterations=1")
    trainer.run()
    weights = tmp_path / "run" / "checkpoints" / "iter_000000" / "model.safetensors"
    state = load_file(weights)
    state["model.diffusion_model.proj_out.bias"][3] = float("inf")
    save_file(state, weights)
    write_manifest(weights.parent, ProcessLayout())  # saved so (not damaged on disk): its checksums match
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or inf\) in 1 tensor\(s\): proj_out.bias"):
        Trainer(load_config(None, [*SMALL, f"run_dir={tmp_path / 'run'}", "iterations=2", "resume=true"])).resume()
    assert main(["train", *SMALL, f"run_dir={tmp_path / 'fresh'}", f"model.init={weights}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors holds non-finite values" in err and "proj_out.bias" in err
