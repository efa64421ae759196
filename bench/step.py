"""One OmniNFT training step at LTX-2 19B layer shapes: model TFLOP/s, MFU and peak memory per backend.

    python -m bench.step [--blocks N] [--batch B] [--steps S] [--backends torch fp8 te lora] [--out PATH]

A step is what the trainer does per mini-batch and training sigma: a no-grad forward of the old
policy, a forward of the policy, the NFT loss (`engine.algorithm.loss.nft_loss`), its backward, then gradient
clipping and AdamW (`engine.optim.clip_and_step`); the old-policy EMA is timed apart by the trainer
and left out. The policy's forward alone (no grad) and forward+backward are timed too.

On CUDA: the `ltx2-19b` preset cut to `--blocks` blocks (default 2), bf16 parameters, 6144 video
tokens (latent grid 16x16x24) + 126 audio tokens (25 per second over the 121 frames at 24 fps), a
1024-token text context at caption_channels, batch 1; backends torch (bf16), fp8 (torch-native,
`models.backends.fp8`) and, where Transformer Engine is installed, te (`models.backends.te`, FP8 tensorwise, run in a
one-process megatron layout); the output says whether TE is importable; and lora: the torch layers
with LoRA rank 32 adapters (fp32) on the frozen base, the old policy's forward run by the same model
with its "old" adapter set (`models.lora.AdapterView`: under `use_adapter`) instead of a second model,
AdamW over the adapters alone. On a CPU the same code runs the `tiny` preset at a small grid in fp32
(CPUs lack fast bf16 matmuls), and the figures are labelled CPU figures; on a busy machine run it with
OMP_NUM_THREADS=1, as contended OpenMP threads make the tiny model's small ops many times slower.

Model FLOPs are counted analytically (`forward_flops`): matmuls only, backward = 2x forward, so a
step is 4 forwards' worth (lora: `step_flops`, adapters added, the frozen base's backward 1x). That is
the usual model-FLOP convention: attention recomputation in the backward and optimizer arithmetic are
not counted, and the input gradients the first layers skip (patchify, caption and timestep embedders'
first linears: under 0.2% at the GPU shapes) are.
MFU divides the achieved rate by the bf16 (CPU: fp32) matmul rate measured in the same run, and,
where the device is known, by the datasheet dense rate of the backend's GEMM precision.
Peak memory is `torch.cuda.max_memory_allocated` over one step: both models' weights (lora: one model
with two adapter sets), gradients, AdamW state and activations. Writes
bench/results/<device>-<date>-step.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

import models
from bench.measure import CUDA, DTYPE, device_label, device_peaks, package_versions, timer
from engine.algorithm.loss import nft_loss
from engine.optim import build_optimizer, clip_and_step
from engine.parallel import ProcessLayout, init_one_process
from models import LTX2AVTransformer, ModelConfig
from models.lora import AdapterView, LoRAConfig, apply_lora

# Dense (no sparsity) tensor-core TFLOP/s by device label and GEMM precision, from NVIDIA's datasheets.
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "nvidia-h100-80gb-hbm3": {"bf16": 989.0, "fp8": 1979.0},  # H100 SXM
    "nvidia-h200": {"bf16": 989.0, "fp8": 1979.0},
}
GEMM_PRECISION = {"torch": "bf16", "fp8": "fp8", "te": "fp8", "lora": "bf16"}  # lora: torch layers
LORA_RANK = 32  # the authors' (models.lora.LoRAConfig)
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class Shapes:
    """Token counts of one training sample (the sequence lengths every FLOP term depends on)."""

    batch: int
    video_grid: tuple[int, int, int]
    audio_tokens: int
    text_tokens: int

    @property
    def video_tokens(self) -> int:
        f, h, w = self.video_grid
        return f * h * w


GPU_SHAPES = Shapes(batch=1, video_grid=(16, 16, 24), audio_tokens=126, text_tokens=1024)
CPU_SHAPES = Shapes(batch=1, video_grid=(4, 8, 8), audio_tokens=26, text_tokens=32)


def _attention_flops(b: int, heads: int, head_dim: int, nq: int, nk: int, query_dim: int, context_dim: int) -> dict:
    """Q and out projections on the queries, K and V on the keys (2*M*K*N each); QK^T and PV (2*B*H*Nq*Nk*D each)."""
    inner = heads * head_dim
    return {
        "linear": 2 * b * (2 * nq * query_dim * inner + 2 * nk * context_dim * inner),
        "attention": 4 * b * heads * nq * nk * head_dim,
    }


def _attentions(cfg: ModelConfig, shapes: Shapes) -> list[tuple[int, int, int, int, int, int]]:
    """(heads, head_dim, query tokens, key tokens, query width, key width) of a block's six attentions."""
    nv, na, nt = shapes.video_tokens, shapes.audio_tokens, shapes.text_tokens
    dv, da, h = cfg.video_dim, cfg.audio_dim, cfg.num_heads
    return [
        (h, cfg.video_head_dim, nv, nv, dv, dv),  # video self
        (h, cfg.audio_head_dim, na, na, da, da),  # audio self
        (h, cfg.video_head_dim, nv, nt, dv, dv),  # video-text (context already projected to dv)
        (h, cfg.audio_head_dim, na, nt, da, da),  # audio-text
        (h, cfg.audio_head_dim, nv, na, dv, da),  # A2V: video queries, audio keys, audio head layout
        (h, cfg.audio_head_dim, na, nv, da, dv),  # V2A
    ]


def forward_flops(cfg: ModelConfig, shapes: Shapes) -> dict[str, int]:
    """Matmul FLOPs of one forward, by part: 'linear' and 'attention' inside the blocks, 'outside'
    for patchify, caption projections, adaLN (one row per sample: sigma is shared by the tokens)
    and output projections. Elementwise work (norms, RoPE, softmax, GELU, modulation) is not counted."""
    b, nv, na, nt = shapes.batch, shapes.video_tokens, shapes.audio_tokens, shapes.text_tokens
    dv, da = cfg.video_dim, cfg.audio_dim
    block = {"linear": 0, "attention": 0}
    for args in _attentions(cfg, shapes):
        for part, flops in _attention_flops(b, *args).items():
            block[part] += flops
    block["linear"] += 2 * b * (nv * dv * 4 * dv * 2 + na * da * 4 * da * 2)  # 4x FFNs, in and out

    f = cfg.timestep_embed_dim
    adaln = sum(2 * b * (f * d + d * d + d * k * d) for d, ks in ((dv, (6, 4, 1)), (da, (6, 4, 1))) for k in ks)
    caption = 2 * b * nt * sum(cfg.caption_channels * d + d * d for d in (dv, da))
    io = 2 * 2 * b * (nv * cfg.in_channels * dv + na * cfg.audio_in_channels * da)  # patchify and proj_out
    layers = cfg.num_layers
    return {
        "linear": layers * block["linear"],
        "attention": layers * block["attention"],
        "outside": adaln + caption + io,
    }


def adapter_flops(cfg: ModelConfig, shapes: Shapes, rank: int) -> int:
    """Matmul FLOPs LoRA rank `rank` adds to one forward: A then B, 2 * tokens * rank * (in + out), on each of
    the 28 linears of every block (models.lora's default targets: the six attentions' q, k, v, out and both
    FFNs' two linears), each over the tokens it sees."""
    linears = []  # (tokens, in, out)
    for heads, head_dim, nq, nk, dq, dk in _attentions(cfg, shapes):
        inner = heads * head_dim
        linears += [(nq, dq, inner), (nk, dk, inner), (nk, dk, inner), (nq, inner, dq)]
    for n, d in ((shapes.video_tokens, cfg.video_dim), (shapes.audio_tokens, cfg.audio_dim)):
        linears += [(n, d, 4 * d), (n, 4 * d, d)]
    return cfg.num_layers * sum(2 * shapes.batch * n * rank * (i + o) for n, i, o in linears)


def step_flops(cfg: ModelConfig, shapes: Shapes, lora_rank: int = 0) -> dict[str, int]:
    """Model FLOPs of one step (old-policy forward, policy forward, backward) and of its parts. Full
    fine-tuning: backward = 2x forward (input and weight gradients), a step 4 forwards. LoRA: each forward
    adds the adapters; the backward takes the frozen linears' input gradients only (1x), attention's 2x
    and the adapters' 2x; like full fine-tuning's count, it includes the input gradients autograd skips
    (text keys and values, everything before the first adapter: 0.8% of a LoRA step at the GPU shapes)."""
    parts = forward_flops(cfg, shapes)
    fwd = sum(parts.values())
    if lora_rank == 0:
        return {"forward": fwd, "forward_backward": 3 * fwd, "step": 4 * fwd}
    adapters = adapter_flops(cfg, shapes, lora_rank)
    backward = parts["linear"] + parts["outside"] + 2 * parts["attention"] + 2 * adapters
    return {
        "forward": fwd + adapters,
        "forward_backward": fwd + adapters + backward,
        "step": 2 * (fwd + adapters) + backward,
    }


@dataclass
class Batch:
    """One training sample per row: clean latents, their noised versions at sigma, text, rewards."""

    x0: tuple[Tensor, Tensor]
    xt: tuple[Tensor, Tensor]
    sigma: Tensor
    context: Tensor
    r: tuple[Tensor, Tensor]
    grid: tuple[int, int, int]


def make_batch(cfg: ModelConfig, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Batch:
    """Random data (never zeros, which can run faster than real data) at the benchmark's shapes."""
    b = shapes.batch
    x0 = (
        torch.randn(b, shapes.video_tokens, cfg.in_channels),
        torch.randn(b, shapes.audio_tokens, cfg.audio_in_channels),
    )
    sigma = torch.full((b,), 0.7)
    xt = [(1 - sigma[:, None, None]) * x + sigma[:, None, None] * torch.randn_like(x) for x in x0]
    context = torch.randn(b, shapes.text_tokens, cfg.caption_channels)
    x0_v, x0_a, xt_v, xt_a, sigma, context = (t.to(device, dtype) for t in (*x0, *xt, sigma, context))
    return Batch(
        x0=(x0_v, x0_a),
        xt=(xt_v, xt_a),
        sigma=sigma,
        context=context,
        r=(torch.rand(b, device=device), torch.rand(b, device=device)),
        grid=shapes.video_grid,
    )


def _velocity(model: LTX2AVTransformer | AdapterView, batch: Batch) -> tuple[Tensor, Tensor]:
    return model(*batch.xt, batch.sigma, batch.context, batch.context, batch.grid)


def _loss(batch: Batch, v_old: tuple[Tensor, Tensor], v_theta: tuple[Tensor, Tensor]) -> Tensor:
    video, audio = (
        {"x0": batch.x0[i], "x_t": batch.xt[i], "sigma": batch.sigma, "v_old": v_old[i], "v_theta": v_theta[i]}
        for i in range(2)
    )
    return nft_loss(video, audio, *batch.r).total


def peak_gib(fn: Callable[[], object]) -> float | None:
    """Most memory allocated at any point of one call, everything resident included (CUDA only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def bench_backend(cfg: ModelConfig, backend: str, shapes: Shapes, device: torch.device, steps: int) -> dict:
    """Seconds per step, forward and forward+backward, and peak memory of one backend. Everything it
    allocates is local, so the next backend starts from an empty device. Backend `lora` is the torch
    layers with LoRA rank LORA_RANK: the old policy is the "old" adapter set of the same model
    (`models.lora.AdapterView`: its forward under `use_adapter`), not a second model, and AdamW steps the
    "default" set alone."""
    torch.manual_seed(0)
    lora = backend == "lora"
    policy = models.build_model(cfg, device=device, dtype=DTYPE, backend="torch" if lora else backend)
    if lora:
        apply_lora(policy, LoRAConfig(rank=LORA_RANK))  # freezes the base; adapters fp32
        old = AdapterView(policy, "old")  # the policy's forward under use_adapter(policy, "old")
    else:
        old = models.build_model(cfg, device=device, dtype=DTYPE, backend=backend)
        old.load_state_dict(policy.state_dict())
        old.requires_grad_(False)
    optimizer = build_optimizer(policy, lr=3e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)  # config defaults
    batch = make_batch(cfg, shapes, device, DTYPE)
    with torch.no_grad():
        v_old = _velocity(old, batch)

    def step() -> None:
        with torch.no_grad():
            v = _velocity(old, batch)
        _loss(batch, v, _velocity(policy, batch)).backward()
        clip_and_step(policy, optimizer, max_norm=1.0, layout=ProcessLayout())

    def forward() -> None:
        with torch.no_grad():
            _velocity(policy, batch)

    def forward_backward() -> None:
        policy.zero_grad(set_to_none=True)
        _loss(batch, v_old, _velocity(policy, batch)).backward()

    # A non-finite loss or gradient would make every figure below meaningless.
    loss = _loss(batch, v_old, _velocity(policy, batch))
    loss.backward()
    grad_sq = sum(p.grad.float().pow(2).sum() for p in policy.parameters() if p.grad is not None)
    if not (torch.isfinite(loss) and torch.isfinite(grad_sq)):
        raise RuntimeError(f"{backend}: loss {float(loss)} or gradient norm^2 {float(grad_sq)} is not finite")
    policy.zero_grad(set_to_none=True)

    result = {"step_s": timer(step, steps), "peak_gib": peak_gib(step)}
    result["forward_s"] = timer(forward, steps)
    result["forward_backward_s"] = timer(forward_backward, steps)
    return result


def transformer_engine_note() -> str:
    return "Transformer Engine installed: te row" if HAS_TE else "Transformer Engine not installed: no TE row"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 3 on CPU)")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=sorted(GEMM_PRECISION),
        default=["torch", "fp8", *(["te"] if HAS_TE and CUDA else []), "lora"],
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-step.json)")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.batch < 1:
        parser.error("--blocks and --batch must be >= 1")
    device = torch.device("cuda" if CUDA else "cpu")
    if "te" in args.backends:
        if not (HAS_TE and CUDA):
            parser.error("--backends te needs Transformer Engine and a CUDA GPU")
        init_one_process(device)  # the te layers come from megatron-core, which needs its process groups
    steps = args.steps or (20 if CUDA else 3)
    cfg = models.resolve_config({"preset": "ltx2-19b" if CUDA else "tiny", "num_layers": args.blocks})
    shapes = dataclasses.replace(GPU_SHAPES if CUDA else CPU_SHAPES, batch=args.batch)
    label = device_label(device)
    _, matmul_tflops = device_peaks(device, DTYPE, steps)
    datasheet = DATASHEET_TFLOPS.get(label)

    parts = forward_flops(cfg, shapes)
    fwd = sum(parts.values())
    rows = {}
    for name in args.backends:
        r = bench_backend(cfg, name, shapes, device, steps)
        if CUDA:
            torch.cuda.empty_cache()
        gc.collect()
        flops = step_flops(cfg, shapes, LORA_RANK if name == "lora" else 0)
        r.update({f"{k}_flops": v for k, v in flops.items()}, lora_rank=LORA_RANK if name == "lora" else 0)
        r["tflops"] = r["step_flops"] / r["step_s"] / 1e12
        r["forward_tflops"] = r["forward_flops"] / r["forward_s"] / 1e12
        r["forward_backward_tflops"] = r["forward_backward_flops"] / r["forward_backward_s"] / 1e12
        r["mfu_measured"] = r["tflops"] / matmul_tflops
        r["datasheet_precision"] = GEMM_PRECISION[name] if datasheet else None
        r["mfu_datasheet"] = r["tflops"] / datasheet[GEMM_PRECISION[name]] if datasheet else None
        rows[name] = r

    dtype_name = str(DTYPE).removeprefix("torch.")
    what = (
        f"GPU figures, {torch.cuda.get_device_name(device)}, {dtype_name} parameters"
        if CUDA
        else f"CPU figures ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{dtype_name}, tiny preset)"
    )
    te = transformer_engine_note()
    sheet = f"; datasheet dense bf16 {datasheet['bf16']:.0f}, fp8 {datasheet['fp8']:.0f} TFLOP/s" if datasheet else ""
    print(f"{what}; measured {dtype_name} matmul {matmul_tflops:.3f} TFLOP/s{sheet}; {te}")
    print(
        f"{cfg.num_layers} blocks, batch {shapes.batch}, video {shapes.video_tokens} tokens "
        f"(grid {'x'.join(map(str, shapes.video_grid))}), audio {shapes.audio_tokens}, text {shapes.text_tokens}; "
        f"forward {fwd / 1e12:.4g} TFLOP (block linears {parts['linear'] / fwd:.1%}, attention "
        f"{parts['attention'] / fwd:.1%}, outside blocks {parts['outside'] / fwd:.1%}); step = 4x forward "
        f"(lora: `step_flops`)"
    )
    print(
        f"{'backend':8s} {'ms/step':>9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'MFU meas':>9s} "
        f"{'MFU sheet':>9s} {'peak GiB':>9s}"
    )
    for name, r in rows.items():
        sheet_mfu = "-" if r["mfu_datasheet"] is None else f"{100 * r['mfu_datasheet']:.1f}%"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(
            f"{name:8s} {r['step_s'] * 1e3:9.2f} {r['forward_s'] * 1e3:9.2f} {r['forward_backward_s'] * 1e3:11.2f} "
            f"{r['tflops']:8.4g} {100 * r['mfu_measured']:8.1f}% {sheet_mfu:>9s} {peak:>9s}"
        )

    out = Path(args.out or f"bench/results/{label}-{date.today().isoformat()}-step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = package_versions("triton", "transformer_engine")
    out.write_text(
        json.dumps(
            {
                "device": label,
                "figures": what,
                "date": date.today().isoformat(),
                "steps": steps,
                "versions": versions,
                "transformer_engine": te,
                "dtype": dtype_name,
                "model": dataclasses.asdict(cfg),
                "shapes": {**dataclasses.asdict(shapes), "video_tokens": shapes.video_tokens},
                "forward_flops_parts": parts,
                "matmul_tflops": matmul_tflops,
                "datasheet_tflops": datasheet,
                "backends": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
