"""bench/memory.py: its state formula against the bytes a real training step holds, and its CLI.

The formula counts the parameters of a meta-device model (`bench.memory.meta_model`) times their dtype sizes.
The measurement builds the tiny policy as the trainer does (`engine.policy.build_policy`, `add_adapters`,
`old_and_reference` with a KL reference, `engine.optim.make_optimizer`), takes an AdamW step and a second
forward+backward (so weights, gradients, moments, the old policy and the KL reference are all alive at
once), and counts what is held two ways: the distinct storages of every parameter, buffer, gradient and
optimizer tensor, and the net of the CPU allocations and frees torch's profiler recorded over the whole run
(its allocation events, which torch.profiler's memory timeline reads too; everything else allocated, inputs
and activations, has been freed by then). Both must equal the formula to the byte; the profiler's peak
(activations on top) must exceed it.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import models
from bench import memory
from engine.optim import OptimConfig, clip_and_step, make_optimizer
from engine.parallel import ProcessLayout, grad_sync
from engine.policy import LoRASection, PolicyConfig, add_adapters, build_policy, old_and_reference
from models.lora import LoRAConfig, apply_lora, lora_parameters
from tests.helpers import ROOT, tiny_inputs

FULL = memory.Method("full", torch.float32)
LORA = memory.Method("lora", torch.bfloat16, rank=8)


def allocations(prof: profile) -> list[int]:
    """Bytes of every CPU allocation (+) and free (-) the profiler recorded, in time order."""

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    return [e.extra_fields.alloc_size for e in events]


def forward_backward(model, old, ref, dtype: torch.dtype) -> None:
    """The trainer's passes: old policy and KL reference without gradients, the policy with them."""
    inputs = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in tiny_inputs(model.config).items()
    }
    with torch.no_grad():
        v_old, v_ref = old(**inputs), ref(**inputs)
    v = model(**inputs)
    sum(((a.float() - b.float() - c.float()) ** 2).mean() for a, b, c in zip(v, v_old, v_ref)).backward()


def held_bytes(*groups) -> int:
    """Bytes of the distinct storages under the given tensors (views and shared storages counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ts in groups for t in ts}
    return sum(storages.values())


@pytest.mark.parametrize("method", [FULL, LORA], ids=["full", "lora"])
def test_formula_equals_the_state_a_real_step_holds(method: memory.Method) -> None:
    """With loss.kl_weight > 0: full fine-tuning holds the KL reference copy, LoRA none."""
    cfg = PolicyConfig(preset="tiny", dtype=str(method.dtype).removeprefix("torch."))
    layout = ProcessLayout()
    gc.collect()  # the profiler counts frees too: earlier tests' garbage must not be freed inside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_policy(cfg, layout)
        add_adapters(LoRASection(rank=method.rank), model, seed=0)
        # Full fine-tuning: frozen copies; LoRA: the model's "old" set and its base (AdapterViews).
        old, ref = old_and_reference(cfg, model, kl=True)
        optimizer = make_optimizer(OptimConfig(), model, grad_sync(model, layout), distributed=False)
        forward_backward(model, old, ref, method.dtype)
        clip_and_step(model, optimizer, max_norm=1.0, layout=layout)  # AdamW creates its moments
        forward_backward(model, old, ref, method.dtype)  # gradients held again, as up to every optimizer step
    moves = allocations(prof)
    net, peak = sum(moves), max(itertools.accumulate(moves))
    frozen = [m for m in (old, ref) if isinstance(m, torch.nn.Module)]
    assert len(frozen) == (2 if method.rank == 0 else 0)
    stored = held_bytes(
        *(list(m.parameters()) + list(m.buffers()) for m in (model, *frozen)),
        [p.grad for p in model.parameters() if p.grad is not None],
        [t for state in optimizer.state.values() for t in state.values()],
    )

    meta = memory.meta_model(models.PRESETS["tiny"], method)
    formula = memory.state_bytes(meta)
    expected = sum(formula.values()) + memory.host_step_bytes(meta)  # on a CPU AdamW's step counters are here too
    assert stored == expected
    assert net == expected
    assert peak > expected  # activations come on top of the state
    if method.rank:
        assert formula["kl_reference"] == 0 and formula["old_policy"] == formula["gradients"]
        assert held_bytes(lora_parameters(model, "old")) == formula["old_policy"]
        assert all(p.dtype == torch.float32 for p in lora_parameters(model))


def whole_numel(method: memory.Method) -> tuple[int, int]:
    """(all parameters, trained ones) of the whole tiny model with one process, counted with plain torch layers."""
    model = models.build_model("tiny", device="meta")
    apply_lora(model, LoRAConfig(rank=method.rank))
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def test_cli_counts_every_layout(tmp_path: Path) -> None:
    """`python -m bench.memory` at the tiny preset with TP2 (megatron's layers over a fake process group, hence
    a subprocess): every layout's stages, each with its slices times tp, add up to the one-process model."""
    out = tmp_path / "memory.json"
    args = ["--preset", "tiny", "--rank", "8", "--tp", "2", "--dp", "3", "--markdown", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", *args],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| layout | method |" in proc.stdout and "activations excluded" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["name"], r["method"]) for r in rows] == [
        (name, method) for name in ("TP2xPP2", "TP2", "DP3", "DP3 dist-opt") for method in ("full", "lora")
    ]
    for r in rows:
        method = FULL if r["method"] == "full" else LORA
        numel, trained = whole_numel(method)
        stages = r["stages"]
        assert len(stages) == r["pp"]
        assert sum(s["parameters"] + (r["tp"] - 1) * s["split_parameters"] for s in stages) == numel
        assert (r["tp"] > 1) == all(s["split_parameters"] > 0 for s in stages)
        heaviest = max(stages, key=lambda s: sum(s["bytes"].values()))
        assert r["bytes"] == heaviest["bytes"]
        state = r["bytes"]
        if r["tp"] == 1:  # the whole model on every data-parallel rank
            assert state["gradients"] == 4 * trained
            if r["distributed"]:  # fp32 moments, 1/dp of them
                assert state["optimizer"] == 2 * 4 * math.ceil(trained / r["dp"])
            else:
                assert state["optimizer"] == 2 * 4 * trained
            if method.rank == 0:
                assert state["weights"] == state["old_policy"] == state["kl_reference"] == 4 * numel
            else:  # bf16 base, fp32 "default" set; the "old" set is the old policy; no KL copy
                base = numel - 2 * trained
                assert state["weights"] == 2 * base + 4 * trained and state["old_policy"] == 4 * trained
                assert state["kl_reference"] == 0
        total = sum(state.values()) - state["kl_reference"]
        assert r["total_bytes"] == total and r["total_bytes_with_kl"] == total + state["kl_reference"]
        assert r["fits"] == (total <= 80 * 2**30)
    full_dp, lora_dp = rows[4], rows[5]
    assert lora_dp["total_bytes"] < full_dp["total_bytes"] / 2
