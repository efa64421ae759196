"""LoRA adapters on the one model: targets, init, the adapted forward against the merged model (torch and
fp8 backends), frozen base, adapter sets and adapters off, state dicts, dtypes, A2V surgery through
the adapters, and the tensor-parallel layouts against the single process (torchrun)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import models
from models.errors import CheckpointError
from models.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    matches,
    merge_lora,
    use_adapter,
)
from tests.helpers import SharedLaunches, tiny_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = LoRAConfig(rank=4, alpha=8.0)
FWD_BOUND, BWD_BOUND = 0.08, 0.15  # FP8 rounding bounds of tests/models/test_fp8.py


def _model(backend: str | None = None, lora: LoRAConfig | None = LORA, seed: int = 0, **kw) -> models.LTX2AVTransformer:
    """The tiny model with the same base weights for every backend, adapted with `lora` (None: plain)."""
    torch.manual_seed(0)
    model = models.build_model("tiny", **kw)
    if backend is not None:
        other = models.build_model("tiny", backend=backend, **kw)
        other.load_state_dict(model.state_dict())
        model = other
    if lora is not None:
        apply_lora(model, lora, seed=seed)
    return model


def _randomize(model: models.LTX2AVTransformer, adapter: str = "default", seed: int = 1) -> None:
    """Non-zero A and B in set `adapter` (B starts at zero, which would hide the adapter path)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model, adapter).items()}
    load_lora_state_dict(model, state, adapter)


def _forward(model: models.LTX2AVTransformer, backward: bool = False) -> tuple[Tensor, Tensor]:
    video, audio = model(**tiny_inputs(model.config))
    if backward:
        (video.square().mean() + audio.square().mean()).backward()
    return video.detach(), audio.detach()


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- targets and config


def test_default_targets_are_every_linear_of_every_block():
    assert len(DEFAULT_TARGETS) == len(set(DEFAULT_TARGETS)) == 28
    plain = _model(lora=None)
    model = _model()
    names = lora_layers(model)
    cfg = model.config
    assert len(names) == 28 * cfg.num_layers
    for i in range(cfg.num_layers):
        inside = {n.split(".", 2)[2] for n in names if n.startswith(f"transformer_blocks.{i}.")}
        assert inside == set(DEFAULT_TARGETS)
    # Every linear a backend built inside the blocks, none outside them.
    linears = {n for n, m in plain.named_modules() if hasattr(m, "parallel_role")}
    assert set(names) == {n for n in linears if n.startswith("transformer_blocks.")}
    # The base keeps its parameter names; the adapters are extra keys.
    keys = set(model.state_dict())
    assert {k for k in keys if ".lora." not in k} == set(plain.state_dict())
    assert "transformer_blocks.0.ff.net.0.proj.lora.A.default" in keys


def test_patterns_match_inside_blocks_and_by_full_path():
    targets = ("attn1.to_q", "transformer_blocks.1.*ff.net.2", "patchify_proj", "*attn2.to_out.?")
    names = apply_lora(_model(lora=None), LoRAConfig(rank=2, targets=targets))
    expected = {"patchify_proj", "transformer_blocks.1.ff.net.2", "transformer_blocks.1.audio_ff.net.2"}
    for i in range(4):
        expected |= {f"transformer_blocks.{i}.{n}" for n in ("attn1.to_q", "attn2.to_out.0", "audio_attn2.to_out.0")}
    assert set(names) == expected
    assert matches("transformer_blocks.42.ff.net.2", ["transformer_blocks.4[0-7].*"])
    assert not matches("transformer_blocks.4.ff.net.2", ["transformer_blocks.4[0-7].*"])
    assert not matches("transformer_blocks.0.audio_ff.net.2", ["ff.*"])  # anchored at the start


def test_unmatched_pattern_and_second_application_are_refused():
    with pytest.raises(ValueError, match=r"\['attn3.to_q'\] match no linear"):
        apply_lora(_model(lora=None), LoRAConfig(rank=2, targets=("attn1.to_q", "attn3.to_q")))
    with pytest.raises(ValueError, match="already"):
        apply_lora(_model(), LORA)


def test_rank_zero_is_full_fine_tuning():
    model = _model(lora=None)
    assert apply_lora(model, LoRAConfig()) == [] and not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(rank=-1), "lora.rank"),
        (dict(rank=2.0), "lora.rank"),
        (dict(rank=4, alpha=0), "lora.alpha"),
        (dict(rank=4, init="xavier"), "lora.init"),
        (dict(rank=4, targets=()), "lora.targets"),
        (dict(rank=4, adapters=("default", "default")), "lora.adapters"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LoRAConfig(**kwargs)


# ---------------------------------------------------------------- init


def test_init_gaussian_and_kaiming():
    for init in ("gaussian", "kaiming"):
        model = _model(lora=LoRAConfig(rank=16, alpha=16, init=init))
        layers = lora_layers(model).values()
        assert all(not layer.B[s].any() for layer in layers for s in layer.B)  # the adapted model starts as the base
        assert all(torch.equal(layer.A["default"], layer.A["old"]) for layer in layers)  # old starts as the policy
        if init == "gaussian":  # N(0, (1/rank)^2), PEFT's gaussian
            a = torch.cat([layer.A["default"].flatten() for layer in layers])
            assert abs(a.mean().item()) < 0.005 and a.std().item() == pytest.approx(1 / 16, rel=0.02)
        else:  # U(-1/sqrt(in), 1/sqrt(in)), PEFT's kaiming_uniform_(a=sqrt(5))
            a = torch.cat([(layer.A["default"] * math.sqrt(layer.in_features)).flatten() for layer in layers])
            assert a.abs().max().item() <= 1 and a.abs().max().item() > 0.99
            assert abs(a.mean().item()) < 0.01 and a.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)


def test_init_is_keyed_by_seed_and_module():
    a, b, c = (lora_state_dict(_model(seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    key_q, key_k = "transformer_blocks.0.attn1.to_q.lora_A.weight", "transformer_blocks.0.attn1.to_k.lora_A.weight"
    assert not torch.equal(a[key_q], c[key_q]) and not torch.equal(a[key_q], a[key_k])


# ---------------------------------------------------------------- forward, merge, gradients


def test_zero_b_equals_the_base_exactly():
    base, adapted = _model(lora=None), _model()
    for out, ref in zip(_forward(adapted), _forward(base)):
        assert torch.equal(out, ref)


def test_adapted_forward_equals_the_merged_model():
    model, merged, base = _model(), _model(), _model(lora=None)
    _randomize(model)
    _randomize(merged)
    assert len(merge_lora(merged)) == 28 * 4
    assert not lora_layers(merged) and set(merged.state_dict()) == set(base.state_dict())
    outs, merged_outs, base_outs = _forward(model), _forward(merged), _forward(base)
    for out, ref, plain in zip(outs, merged_outs, base_outs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert (out - plain).abs().max() > 1e-2  # the adapters do move the outputs


def test_fp8_backend_adapted_equals_merged_within_fp8_error():
    ref = _model()  # the torch backend, fp32: the reference for both
    fp8, fp8_merged = _model("fp8"), _model("fp8")
    for model in (ref, fp8, fp8_merged):
        _randomize(model)
    merge_lora(fp8_merged)
    ref_outs, outs, merged_outs = _forward(ref, backward=True), _forward(fp8, backward=True), _forward(fp8_merged)
    for out, merged, exact in zip(outs, merged_outs, ref_outs):
        assert _rel(out, merged) < FWD_BOUND and _rel(out, exact) < FWD_BOUND
    grads, ref_grads = (torch.cat([p.grad.flatten() for p in lora_parameters(m)]) for m in (fp8, ref))
    assert torch.isfinite(grads).all() and _rel(grads, ref_grads) < BWD_BOUND
    assert all(p.dtype == torch.float32 for p in lora_parameters(fp8))


def test_gradients_reach_the_trained_adapters_only():
    model = _model()
    _randomize(model)
    _forward(model, backward=True)
    trained = {id(p) for p in lora_parameters(model, "default")}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # the frozen base and the old set (moved by EMA, not by gradients)
            assert not p.requires_grad and p.grad is None, name


def test_adapter_sets_are_independent_and_off_is_the_base():
    model, base = _model(), _model(lora=None)
    _randomize(model, "default", seed=1)
    _randomize(model, "old", seed=2)
    policy = _forward(model)
    with use_adapter(model, "old"):
        old = _forward(model)
        with use_adapter(model, None):
            off = _forward(model)
        assert all(torch.equal(a, b) for a, b in zip(_forward(model), old))  # restored on exit
    assert all(torch.equal(a, b) for a, b in zip(_forward(model), policy))
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(policy, old))
    assert all(torch.equal(a, b) for a, b in zip(off, _forward(base)))
    # The old set is an adapter like the policy's: loaded as "default" elsewhere, it gives the same outputs.
    other = _model()
    load_lora_state_dict(other, lora_state_dict(model, "old"))
    assert all(torch.equal(a, b) for a, b in zip(_forward(other), old))
    # Changing one set leaves the other's forward alone.
    _randomize(model, "old", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_forward(model), policy))
    with pytest.raises(ValueError, match="no LoRA adapter set 'new'"):
        with use_adapter(model, "new"):
            pass


def test_a2v_surgery_scales_the_kv_adapter_gradients():
    """The A2V partial stop-gradient multiplies dK and dV, so the A2V to_k/to_v adapters' gradients
    (here of the last block, which no later block's scale reaches) scale by it; to_q's do not."""
    grads = []
    for scale in (1.0, 0.25):
        model = _model()
        _randomize(model)
        model.set_a2v_grad_scales([1.0, 1.0, 1.0, scale])
        _forward(model, backward=True)
        layers = lora_layers(model)
        grads.append(
            {
                n: layers[f"transformer_blocks.3.audio_to_video_attn.{n}"].A["default"].grad
                for n in ("to_q", "to_k", "to_v")
            }
        )
    for n in ("to_k", "to_v"):
        torch.testing.assert_close(grads[1][n], 0.25 * grads[0][n], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(grads[1]["to_q"], grads[0]["to_q"], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- state dicts and dtypes


def test_state_dict_keys_round_trip_and_errors():
    model = _model()
    _randomize(model)
    state = lora_state_dict(model)
    assert len(state) == 2 * 28 * 4
    assert state["transformer_blocks.0.ff.net.0.proj.lora_A.weight"].shape == (4, 64)  # (rank, in)
    assert state["transformer_blocks.0.ff.net.0.proj.lora_B.weight"].shape == (256, 4)  # (out, rank)
    other = _model()
    load_lora_state_dict(other, state)
    assert all(torch.equal(a, b) for a, b in zip(_forward(other), _forward(model)))
    bad = dict(state)
    del bad["transformer_blocks.0.attn1.to_q.lora_A.weight"]
    bad["transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(3, 3)
    bad["transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(8.0)
    with pytest.raises(CheckpointError, match=r"3 problem") as err:
        load_lora_state_dict(other, bad, source="x.safetensors")
    assert all(s in str(err.value) for s in ("missing: transformer_blocks.0.attn1.to_q.lora_A", "unexpected", "shape"))


def test_bf16_base_stays_bf16_with_fp32_adapters():
    model = _model(dtype=torch.bfloat16)
    _randomize(model)
    base = [p for n, p in model.named_parameters() if ".lora." not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model) + lora_parameters(model, "old"))
    video, audio = model(**{k: v.bfloat16() if torch.is_tensor(v) else v for k, v in tiny_inputs(model.config).items()})
    assert video.dtype == audio.dtype == torch.bfloat16
    (video.float().square().mean() + audio.float().square().mean()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model))


def test_meta_device_counts_adapter_parameters():
    """Adapters on the meta device (shapes only, for memory accounting): r * (in + out) per layer."""
    model = models.build_model("tiny", device="meta")
    apply_lora(model, LoRAConfig(rank=8))
    layers = dict(model.named_modules())
    expected = sum(8 * sum(layers[n].weight.shape) for n in lora_layers(model))
    assert sum(p.numel() for p in lora_parameters(model)) == expected
    assert all(p.is_meta for p in lora_parameters(model))


# ---------------------------------------------------------------- tensor parallelism (torchrun)


@pytest.fixture(scope="module")
def lora_parity(tmp_path_factory) -> SharedLaunches:
    """tests/dist/lora_parity.py, one launch for the selected cases (start-up is paid once)."""
    return SharedLaunches("lora_parity.py", tmp_path_factory)


@pytest.mark.parametrize(
    "args",
    [["--tp", "2"], ["--tp", "2", "--sp"], ["--tp", "2", "--sp", "--preset", "tiny-2.3"]],
    ids=["tp2", "tp2-sp", "2.3-tp2-sp"],
)
def test_tensor_parallel_lora_matches_single_process(lora_parity, request, args):
    """megatron column/row linears with adapters split by their role (and SP's token split) against the
    single process: outputs, loss, gathered adapter gradients, the old set, adapters off and the
    per-rank merge; the initial adapters are the single process's, sliced. On LTX-2.3 the gate logits
    (column-split by heads) and the prompt adaLN (replicated) carry adapters too."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (see README: test command)")
    # Per block 28 default layers (+ 6 gate logits on 2.3), plus the prompt adaLN's linear on 2.3; A and B each.
    layers = 28 * 4 if "tiny-2.3" not in args else (28 + 6) * 4 + 1
    for r in lora_parity.reports(request, 2):
        assert r["init_equal"], r
        assert r["video_err"] < 1e-5 and r["audio_err"] < 1e-5 and r["loss_rel_err"] < 1e-5, r
        assert r["grad_rel_err"] < 1e-5 and r["adapter_grads"] == 2 * layers, r
        assert r["none_adapter_grads"] == [] and r["base_grads"] == [], r
        assert r["old_err"] < 1e-5 and r["off_err"] < 1e-5 and r["merged_err"] < 1e-5, r
        assert r["old_vs_default"] > 1e-2 and r["off_vs_default"] > 1e-2, r
