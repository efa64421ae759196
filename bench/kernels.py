"""Attention kernels against their torch alternatives at LTX-2 shapes.

    python -m bench.kernels [--reps N] [--out PATH]

On CUDA: our Triton cross-attention (forward, forward+backward with the A2V gradient scale fused)
against torch SDPA with the scale applied by a gradient hook (the reference) and flash-attn plus
the same hook where installed; our Triton attention mass against the chunked reference and a
materialised softmax column sum. Shapes (B=1, H=32): A2V video queries 6144/24576 on audio keys
126/504 at D=64, V2A the other way round, square self-attention 4096/16384 at D=64 and 128.
On a CPU only the torch paths run, at small shapes, and the figures are labelled CPU figures.

Per row: median time, TFLOP/s (model FLOPs, backward counted as 2.5x forward), GB/s over the
minimum bytes (inputs read and outputs written once), those as fractions of the device-to-device
copy bandwidth and the matmul rate measured in the same run (bf16 on CUDA; fp32 on a CPU, which
runs the benchmark in fp32 for want of fast bf16 matmuls), and peak memory above the inputs (CUDA
only). Writes bench/results/<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from kernels import HAS_TRITON, reference

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
GPU_HEADS, CPU_HEADS = 32, 4
A2V_GPU = [(nq, nk) for nq in (6144, 24576) for nk in (126, 504)]
A2V_CPU = [(1024, 126)]
SELF_GPU = [(n, d) for n in (4096, 16384) for d in (64, 128)]
SELF_CPU = [(512, 64), (512, 128)]


def timer(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn` after warm-up (which also absorbs Triton's autotuning)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Memory allocated by one call above what was allocated before it (CUDA only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def device_peaks(device: torch.device, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(copy GB/s counting read + write, matmul TFLOP/s in `dtype`), measured now on this device."""
    numel = (1 << 28) if CUDA else (1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src), reps)
    n = 8192 if CUDA else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timer(lambda: a @ b, reps)
    return 2 * src.numel() * 4 / copy_s / 1e9, 2 * n**3 / mm_s / 1e12


def flash_attention() -> Callable[..., Tensor] | None:
    """flash-attn on (B, H, N, D) tensors with the reference's gradient scale, where installed."""
    if not CUDA or importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    def run(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float = 1.0) -> Tensor:
        if kv_grad_scale != 1.0:
            k = reference._ScaleGrad.apply(k, kv_grad_scale)
            v = reference._ScaleGrad.apply(v, kv_grad_scale)
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


def materialised_mass(q: Tensor, k: Tensor) -> Tensor:
    """The whole Nq x Nk probability map, summed over queries and averaged over heads."""
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return probs.sum(dim=2).mean(dim=1)


def attention_impls() -> dict[str, Callable[..., Tensor]]:
    impls: dict[str, Callable[..., Tensor]] = {}
    if CUDA and HAS_TRITON:
        from kernels import triton_attention

        impls["triton"] = triton_attention.cross_attention
    impls["sdpa+hook"] = reference.cross_attention
    flash = flash_attention()
    if flash is not None:
        impls["flash-attn+hook"] = flash
    return impls


def mass_impls(q: Tensor, k: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Zero-argument calls; 'lse given' is the V2A case where the forward already produced the LSE."""
    impls: dict[str, Callable[[], Tensor]] = {}
    if CUDA and HAS_TRITON:
        from kernels import triton_attention, triton_mass

        lse = triton_attention.cross_attention_lse(q, k, k)[1]
        impls["triton"] = partial(triton_mass.attention_mass, q, k)
        impls["triton, lse given"] = partial(triton_mass.attention_mass, q, k, lse=lse)
    impls["torch chunked"] = partial(reference.attention_mass, q, k)
    impls["materialised"] = partial(materialised_mass, q, k)
    return impls


def forward(attend: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, g: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return attend(q, k, v, kv_grad_scale=g)

    return run


def train_step(
    attend: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, g: float, do: Tensor
) -> Callable[[], tuple[Tensor, ...]]:
    return lambda: torch.autograd.grad(attend(q, k, v, kv_grad_scale=g), (q, k, v), do)


def bench_attention(
    name: str, heads: int, nq: int, nk: int, dim: int, g: float, device: torch.device, reps: int
) -> list[dict]:
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=DTYPE, requires_grad=True) for n in (nq, nk, nk))
    do = torch.randn(1, heads, nq, dim, device=device, dtype=DTYPE)
    size = q.element_size()
    fwd_flops = 4 * heads * nq * nk * dim
    fwd_bytes = size * heads * dim * (2 * nq + 2 * nk)
    bwd_bytes = size * heads * dim * (4 * nq + 4 * nk)  # read q o dO k v, write dq dk dv
    rows = []
    for impl, attend in attention_impls().items():
        for op, fn, flops, nbytes in [
            ("fwd", forward(attend, q, k, v, g), fwd_flops, fwd_bytes),
            ("fwd+bwd", train_step(attend, q, k, v, g, do), 3.5 * fwd_flops, fwd_bytes + bwd_bytes),
        ]:
            rows.append(
                {
                    "case": name,
                    "op": op,
                    "impl": impl,
                    "shape": [1, heads, nq, nk, dim],
                    "kv_grad_scale": g,
                    "seconds": timer(fn, reps),
                    "flops": flops,
                    "bytes": nbytes,
                    "peak_mib": peak_mib(fn),
                }
            )
    return rows


def bench_mass(name: str, heads: int, nq: int, nk: int, dim: int, device: torch.device, reps: int) -> list[dict]:
    q, k = (torch.randn(1, heads, n, dim, device=device, dtype=DTYPE) for n in (nq, nk))
    flops = 2 * heads * nq * nk * dim
    nbytes = q.element_size() * heads * dim * (nq + nk) + 4 * nk
    rows = []
    for impl, fn in mass_impls(q, k).items():
        rows.append(
            {
                "case": name,
                "op": "mass",
                "impl": impl,
                "shape": [1, heads, nq, nk, dim],
                "seconds": timer(fn, reps),
                "flops": flops,
                "bytes": nbytes,
                "peak_mib": peak_mib(fn),
            }
        )
    return rows


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def report(result: dict, out: str | None, suffix: str) -> Path:
    """Prints `result` and writes it as JSON to `out`, default bench/results/<device>-<date>-<suffix>.json."""
    print(json.dumps(result, indent=2))
    path = Path(out or f"bench/results/{result['device']}-{result['date']}-{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def package_versions(*modules: str) -> dict[str, str]:
    """torch's version and those of the named optional packages that are installed, for the JSON."""
    versions = {"torch": torch.__version__}
    for module in modules:
        if importlib.util.find_spec(module) is not None:
            versions[module] = __import__(module).__version__
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    reps = args.reps or (20 if CUDA else 5)
    heads = GPU_HEADS if CUDA else CPU_HEADS
    copy_gbps, matmul_tflops = device_peaks(device, DTYPE, reps)

    rows = []
    for nq, nk in A2V_GPU if CUDA else A2V_CPU:
        rows += bench_attention("a2v", heads, nq, nk, 64, 0.9, device, reps)
        rows += bench_attention("v2a", heads, nk, nq, 64, 1.0, device, reps)
        rows += bench_mass("v2a", heads, nk, nq, 64, device, reps)
    for n, dim in SELF_GPU if CUDA else SELF_CPU:
        rows += bench_attention("self", heads, n, n, dim, 1.0, device, reps)
    for row in rows:
        row["tflops"] = row["flops"] / row["seconds"] / 1e12
        row["gbps"] = row["bytes"] / row["seconds"] / 1e9
        row["frac_copy_bw"] = row["gbps"] / copy_gbps
        row["frac_matmul"] = row["tflops"] / matmul_tflops

    label = device_label(device)
    dtype_name = str(DTYPE).removeprefix("torch.")
    what = (
        f"GPU figures, {torch.cuda.get_device_name(device)}, {dtype_name}"
        if CUDA
        else f"CPU figures ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{dtype_name}, small shapes, torch paths only)"
    )
    print(f"{what}; measured copy {copy_gbps:.1f} GB/s, {dtype_name} matmul {matmul_tflops:.3f} TFLOP/s")
    print(
        f"{'case':5s} {'op':8s} {'impl':18s} {'B,H,Nq,Nk,D':>22s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
        f"{'%copy':>6s} {'%mm':>6s} {'peak MiB':>9s}"
    )
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(
            f"{r['case']:5s} {r['op']:8s} {r['impl']:18s} {','.join(map(str, r['shape'])):>22s} "
            f"{r['seconds'] * 1e3:9.3f} {r['tflops']:8.3f} {r['gbps']:8.1f} {100 * r['frac_copy_bw']:6.1f} "
            f"{100 * r['frac_matmul']:6.1f} {peak:>9s}"
        )

    out = Path(args.out or f"bench/results/{label}-{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = package_versions("triton", "flash_attn")
    out.write_text(
        json.dumps(
            {
                "device": label,
                "figures": what,
                "date": date.today().isoformat(),
                "reps": reps,
                "versions": versions,
                "dtype": dtype_name,
                "copy_gbps": copy_gbps,
                "matmul_tflops": matmul_tflops,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
