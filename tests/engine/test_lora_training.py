"""LoRA post-training through the trainer (`lora.*`): one frozen base, the old policy as the "old" adapter
set moved by EMA, the KL reference as the base, adapters alone in the optimizer and the checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import models
from engine.checkpoint import full
from engine.cli import main
from engine.errors import CheckpointError, ConfigError
from engine.policy import ema_decay, policy_state
from engine.trainer import Trainer
from models.lora import AdapterView, lora_layers, lora_parameters, use_adapter
from models.lora_files import export_lora, save_lora_file
from tests.helpers import SMALL, small_config, tiny_inputs

LORA = ("lora.rank=4", "lora.alpha=8", "model.init_seed=3")


def _cfg(run_dir, *overrides: str):
    return small_config(run_dir, *LORA, *overrides)


def test_lora_run_trains_the_adapters_alone_and_moves_old_by_ema(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "iterations=2", "loss.kl_weight=0.1"))
    base = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".lora." not in k}
    default0 = [p.detach().clone() for p in lora_parameters(trainer.model, "default")]
    assert isinstance(trainer.old_model, AdapterView) and trainer.old_model.adapter == "old"
    assert isinstance(trainer.ref_model, AdapterView) and trainer.ref_model.adapter is None
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in lora_parameters(trainer.model, "default")}

    old_before = [p.detach().clone() for p in lora_parameters(trainer.model, "old")]
    trainer.run()

    after = trainer.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items()), "the frozen base moved"
    default1 = lora_parameters(trainer.model, "default")
    assert any(not torch.equal(a, b) for a, b in zip(default0, default1)), "the adapters did not train"
    # Two optimizer steps (one per iteration): old <- eta old + (1 - eta) default after each, and the
    # check replays it from the two "default" states the steps left, recorded by a second run.
    replay = Trainer(_cfg(tmp_path / "replay", "iterations=1", "loss.kl_weight=0.1"))
    replay.run()
    expected = []
    eta0, eta1 = ema_decay(0, 0.001, 0.5), ema_decay(1, 0.001, 0.5)
    for o, d_first, d_last in zip(old_before, lora_parameters(replay.model, "default"), default1):
        expected.append(eta1 * (eta0 * o + (1 - eta0) * d_first) + (1 - eta1) * d_last)
    for got, want in zip(lora_parameters(trainer.model, "old"), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fp32 rounding of the in-place update


def test_policies_share_one_base(tmp_path):
    """The old policy and the reference are views of the trained model: no second copy of any weight."""
    trainer = Trainer(_cfg(tmp_path, "iterations=1", "loss.kl_weight=0.1"))
    storages = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    for view in (trainer.old_model, trainer.ref_model):
        assert {p.untyped_storage().data_ptr() for p in view.parameters()} == storages
    inputs = tiny_inputs(trainer.model.config)
    for layer in lora_layers(trainer.model).values():  # make the three policies differ
        for s, value in (("default", 0.01), ("old", -0.02)):
            layer.B[s].data.fill_(value)
    with torch.no_grad():
        outs = {name: view(**inputs) for name, view in (("old", trainer.old_model), ("ref", trainer.ref_model))}
        with use_adapter(trainer.model, "old"):
            want_old = trainer.model(**inputs)
        with use_adapter(trainer.model, None):
            want_ref = trainer.model(**inputs)
        default = trainer.model(**inputs)  # the view restored the trained set
    torch.testing.assert_close(outs["old"], want_old, rtol=0, atol=0)
    torch.testing.assert_close(outs["ref"], want_ref, rtol=0, atol=0)
    assert not torch.allclose(default[0], want_old[0]) and not torch.allclose(default[0], want_ref[0])


def test_lora_resume_is_exact_and_checkpoints_hold_adapters_only(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a", "iterations=3"))
    whole = straight.run()
    first = Trainer(_cfg(tmp_path / "b", "iterations=2"))
    first.run()
    ckpt = tmp_path / "b" / "checkpoints" / "iter_000001"
    assert full.holds_adapters(ckpt) and not (ckpt / full.MODEL_FILES[0]).exists()
    resumed = Trainer(_cfg(tmp_path / "b", "iterations=3", "resume=true"))
    tail = resumed.run()
    skip = {k for k in whole[2] if k.startswith("time/")}
    assert {k: v for k, v in tail[0].items() if k not in skip} == {k: v for k, v in whole[2].items() if k not in skip}
    for policy in ("model", "old_model"):
        ours, theirs = policy_state(getattr(resumed, policy)), policy_state(getattr(straight, policy))
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (policy, k)


def test_resuming_across_lora_and_full_fine_tuning_is_refused(tmp_path):
    Trainer(_cfg(tmp_path, "iterations=1")).run()
    with pytest.raises(CheckpointError, match="holds LoRA adapters"):
        Trainer(small_config(tmp_path, "iterations=2", "resume=true", "resume_overrides=true")).run()


def test_init_from_a_lora_file_starts_both_sets_there(tmp_path):
    donor = Trainer(_cfg(tmp_path / "donor", "iterations=1"))
    donor.run()
    path = tmp_path / "donor.safetensors"
    save_lora_file(donor.model, path)
    trainer = Trainer(_cfg(tmp_path / "run", "iterations=1", f"lora.init_from={path}"))
    for s in ("default", "old"):
        for got, want in zip(lora_parameters(trainer.model, s), lora_parameters(donor.model, "default")):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=-1", "lora.rank must be >= 0"),
        ("lora.init=xavier", "lora.init must be one of gaussian, kaiming"),
        ("lora.targets=[]", "lora.targets must be a non-empty list"),
        ("lora.init_from=/nonexistent.safetensors", "lora.init_from: /nonexistent.safetensors is not a file"),
    ],
)
def test_lora_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_convert_exports_the_adapters_and_the_merged_model(tmp_path, capsys):
    trainer = Trainer(_cfg(tmp_path, "iterations=1"))
    trainer.run()
    ckpt = tmp_path / "checkpoints" / "iter_000000"
    lora_file, official, diffusers = (tmp_path / f"{n}.safetensors" for n in ("lora", "official", "diffusers"))
    assert main(["convert", str(ckpt), str(lora_file), "--to", "lora"]) == 0
    exported, expected = load_file(lora_file), export_lora(trainer.model)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert main(["convert", str(ckpt), str(tmp_path / "bf16.safetensors"), "--to", "lora", "--dtype", "bfloat16"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "bf16.safetensors").values()} == {torch.bfloat16}

    # Merged: the plain model from the file computes what the base with the trained adapters computes.
    assert main(["convert", str(ckpt), str(official), "--to", "official"]) == 0
    assert main(["convert", str(ckpt), str(diffusers), "--to", "diffusers"]) == 0
    inputs = tiny_inputs(trainer.model.config)
    with torch.no_grad():
        want = trainer.model(**inputs)
        with use_adapter(trainer.model, None):
            base = trainer.model(**inputs)
        for path in (official, diffusers):
            plain = models.build_model(trainer.model.config)
            models.load_model_weights(plain, path)
            got = plain(**inputs)
            for g, w, b in zip(got, want, base):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
                assert not torch.allclose(g, b, rtol=0, atol=1e-6)  # the adapters did change the model

    # `sample --checkpoint` on the LoRA checkpoint samples what the merged weights sample.
    for name, src in (("lora", ckpt), ("merged", official)):
        assert main(["sample", "--checkpoint", str(src), "--out", str(tmp_path / name), *SMALL]) == 0
    from_lora, from_merged = (load_file(tmp_path / n / "samples.safetensors") for n in ("lora", "merged"))
    for key in ("latents/video", "latents/audio"):
        torch.testing.assert_close(from_lora[key], from_merged[key], rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    Trainer(small_config(tmp_path / "full", "iterations=1")).run()
    full_ckpt = tmp_path / "full" / "checkpoints" / "iter_000000"
    assert main(["convert", str(full_ckpt), str(tmp_path / "x.safetensors"), "--to", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a full fine-tuning checkpoint: use --to official or --to diffusers" in err


def test_ltx23_trains_with_lora_and_exports(tmp_path):
    """The 2.3 DiT (gated attention, prompt adaLN, contexts at the stream widths) through the whole loop:
    LoRA on the gates too, resume, and the merged export."""
    extra = ("model.preset=tiny-2.3", "lora.targets=[attn1.to_q, '*.to_gate_logits', audio_to_video_attn.to_k]")
    trainer = Trainer(_cfg(tmp_path, "iterations=2", *extra))
    assert trainer.conditioning.context_channels == (64, 32)
    assert any(name.endswith("to_gate_logits") for name in lora_layers(trainer.model))
    history = trainer.run()
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    merged = tmp_path / "merged.safetensors"
    assert main(["convert", str(tmp_path / "checkpoints" / "iter_000001"), str(merged), "--to", "diffusers"]) == 0
    plain = models.build_model(trainer.model.config)
    models.load_model_weights(plain, merged)
    inputs = tiny_inputs(trainer.model.config)
    with torch.no_grad():
        for got, want in zip(plain(**inputs), trainer.model(**inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
