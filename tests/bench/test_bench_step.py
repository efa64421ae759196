"""bench/step.py: its analytic FLOP count against torch's FlopCounterMode, and the CPU run end to end.

FlopCounterMode counts matmuls (mm, addmm, bmm) as 2*M*K*N and nothing elementwise, the same rule
as `forward_flops`; addmm's bias add is left out by both. It has no formula for the CPU SDPA kernel
(`_scaled_dot_product_flash_attention_for_cpu`), so the test forces SDPA's math backend, whose QK^T
and PV are two bmm's that it does count. With nothing else in the model multiplying matrices (norms,
RoPE, softmax, GELU and modulation are elementwise), the two counts must be equal, not merely close.
The LoRA count is checked the same way, its backward against what autograd runs once the input
gradients it skips (counted here on their own) are taken out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
from bench.step import LORA_RANK, Shapes, adapter_flops, forward_flops, make_batch, step_flops
from models.lora import LoRAConfig, apply_lora
from tests.helpers import ROOT


@pytest.mark.parametrize(
    "layers, shapes",
    [
        (2, Shapes(batch=1, video_grid=(4, 8, 8), audio_tokens=26, text_tokens=32)),
        (1, Shapes(batch=2, video_grid=(3, 4, 5), audio_tokens=7, text_tokens=11)),  # batch > 1, all lengths differ
    ],
)
def test_forward_flops_match_flop_counter(layers: int, shapes: Shapes) -> None:
    cfg = models.resolve_config({"preset": "tiny", "num_layers": layers})
    model = models.build_model(cfg)
    batch = make_batch(cfg, shapes, torch.device("cpu"), torch.float32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*batch.xt, batch.sigma, batch.context, batch.context, batch.grid)
    counted = counter.get_flop_counts()["Global"]
    assert set(map(str, counted)) == {"aten.addmm", "aten.bmm"}  # no matmul the formula could have missed
    parts = forward_flops(cfg, shapes)
    assert sum(parts.values()) == counter.get_total_flops()
    assert parts["attention"] == counted[torch.ops.aten.bmm]


def skipped_input_gradients(cfg: models.ModelConfig, shapes: Shapes, rank: int) -> int:
    """Matmul FLOPs `step_flops` counts in a LoRA backward that autograd skips, because nothing before them
    needs a gradient: outside the blocks all but proj_out's input gradient (patchify, captions and adaLN
    read inputs only); in every block the text keys' and values' input gradients (base and adapter A: the
    context is an input); in block 0 the self-attentions' q, k, v input gradients (they read the embedded
    latents)."""
    b, nv, na, nt = shapes.batch, shapes.video_tokens, shapes.audio_tokens, shapes.text_tokens
    dv, da = cfg.video_dim, cfg.audio_dim
    proj_out = 2 * b * (nv * cfg.in_channels * dv + na * cfg.audio_in_channels * da)
    skipped = forward_flops(cfg, shapes)["outside"] - proj_out
    skipped += cfg.num_layers * sum(2 * (2 * b * nt * d * d + 2 * b * nt * rank * d) for d in (dv, da))
    return skipped + sum(3 * (2 * b * n * d * d + 2 * b * n * rank * d) for n, d in ((nv, dv), (na, da)))


@pytest.mark.parametrize(
    "layers, shapes",
    [
        (2, Shapes(batch=1, video_grid=(4, 8, 8), audio_tokens=26, text_tokens=32)),
        (1, Shapes(batch=2, video_grid=(3, 4, 5), audio_tokens=7, text_tokens=11)),
    ],
)
def test_lora_flops_match_flop_counter(layers: int, shapes: Shapes) -> None:
    cfg = models.resolve_config({"preset": "tiny", "num_layers": layers})
    model = models.build_model(cfg)
    apply_lora(model, LoRAConfig(rank=8))
    batch = make_batch(cfg, shapes, torch.device("cpu"), torch.float32)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            v = model(*batch.xt, batch.sigma, batch.context, batch.context, batch.grid)
        with FlopCounterMode(display=False) as backward:
            (v[0].sum() + v[1].sum()).backward()
    flops = step_flops(cfg, shapes, lora_rank=8)
    assert (
        forward.get_total_flops()
        == flops["forward"]
        == sum(forward_flops(cfg, shapes).values()) + adapter_flops(cfg, shapes, 8)
    )
    counted = flops["forward_backward"] - flops["forward"] - skipped_input_gradients(cfg, shapes, 8)
    assert backward.get_total_flops() == counted
    assert flops["step"] == flops["forward_backward"] + flops["forward"]  # + the old policy's forward


def test_cpu_run_writes_json(tmp_path: Path) -> None:
    """`python -m bench.step` on the CPU. One thread: on a busy machine, OpenMP threads contending for
    cores make the tiny model's small ops tens of times slower."""
    out = tmp_path / "step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.step", "--blocks", "1", "--steps", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CPU figures" in proc.stdout and "Transformer Engine" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"]["num_layers"] == 1
    assert set(result["backends"]) == {"torch", "fp8", "lora"}
    fwd = sum(result["forward_flops_parts"].values())
    cfg = models.resolve_config({"preset": "tiny", "num_layers": 1})
    shapes = {k: v for k, v in result["shapes"].items() if k != "video_tokens"}
    lora = step_flops(cfg, Shapes(**{**shapes, "video_grid": tuple(shapes["video_grid"])}), LORA_RANK)
    for name, row in result["backends"].items():
        if name == "lora":  # adapters on every block linear; the frozen base's backward 1x
            assert row["lora_rank"] == LORA_RANK and row["forward_flops"] > fwd and row["step_flops"] == lora["step"]
        else:
            assert row["step_flops"] == 4 * fwd and row["lora_rank"] == 0
        assert all(row[k] > 0 for k in ("step_s", "forward_s", "forward_backward_s", "tflops", "mfu_measured"))
        assert row["mfu_datasheet"] is None and row["peak_gib"] is None
