"""The Transformer Engine backend. Its layers need TE and a CUDA GPU (neither exists in CPU CI nor on
the lent GPU machines), so the model tests skip with that reason; the config rules and the error
for a missing TE run everywhere."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import models
from engine.config import ConfigError, load_config
from engine.parallel import init_layout, init_one_process

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(HAS_TE, reason="Transformer Engine is installed")
def test_missing_transformer_engine_is_a_clear_error():
    with pytest.raises(ImportError, match="needs NVIDIA Transformer Engine.*model.backend=fp8"):
        models.backends.backend_class("te")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backend=te"], "model.backend=te needs megatron's process groups: run under torchrun"),
        (["model.backend=te", "train.activation_checkpointing=true"], "activation_checkpointing is not supported"),
        (["model.backend=fp8", "model.fp8_recipe=delayed"], "fp8_recipe=delayed needs model.backend=te"),
        (["model.fp8_recipe=mxfp8"], "model.fp8_recipe must be one of tensorwise, delayed"),
        (["parallel.tp=2"], "needs model.backend=megatron or te"),
    ],
)
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, overrides)
        init_layout(cfg.parallel, cfg.model.backend, cfg.model.init_seed)


def test_one_process_megatron_layout():
    """The process groups the te backend (and bench.step's te row) get outside torchrun."""
    import torch.distributed as dist

    parallel_state = pytest.importorskip("megatron.core.parallel_state", reason="megatron-core is not installed")
    before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        layout = init_one_process(torch.device("cpu"))
        assert (layout.tp, layout.pp, layout.dp, layout.rank) == (1, 1, 1, 0)
        assert parallel_state.model_parallel_is_initialized()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        for k, v in before.items():  # leave the environment as found
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def process_group():
    """TE's layers come from megatron-core, which needs its parallel state even in one process."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    init_one_process(torch.device("cuda"))
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TE and torch.cuda.is_available()), reason="needs Transformer Engine and a CUDA GPU")
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_te_model_matches_fp32_within_fp8_error(process_group, recipe):
    from models.backends.te import TEBackend

    torch.manual_seed(0)
    ref = models.build_model("tiny", device="cuda")
    te = models.build_model("tiny", device="cuda", backend=TEBackend(fp8_recipe=recipe))
    assert list(te.state_dict()) == list(ref.state_dict())  # official names, no TE extra state
    models.weights.load_full_state(te, ref.state_dict())
    g = torch.Generator(device="cuda").manual_seed(1)
    cfg, b = ref.config, 2
    # Odd token counts: the backend pads every stream to the 16 rows TE's FP8 GEMMs need.
    args = (
        torch.randn(b, 12, cfg.in_channels, device="cuda", generator=g),
        torch.randn(b, 5, cfg.audio_in_channels, device="cuda", generator=g),
        torch.rand(b, device="cuda", generator=g),
        torch.randn(b, 7, cfg.caption_channels, device="cuda", generator=g),
        torch.randn(b, 7, cfg.caption_channels, device="cuda", generator=g),
        (3, 2, 2),
        24.0,
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_ref, out_te = ref(*args), te(*args)
    for r, t in zip(out_ref, out_te):
        assert float((t.float() - r.float()).norm() / r.float().norm()) < 0.1
    sum(o.float().square().mean() for o in out_te).backward()
    for name, p in te.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
