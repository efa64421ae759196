"""What every benchmark shares: the device, timing, peaks measured in the run, and the JSON it writes.

Timing follows the device method: warm-up first (Triton's autotuning and compilation stay out of the
figures), CUDA events around each repetition, the median. Ceilings are measured in the same run (a
device-to-device copy, a large matrix product) rather than taken from datasheets.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.dispatch import device_label

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32


def timer(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn` after warm-up: three calls on CUDA (module loads, Triton's compilation and
    autotuning, cuBLAS handles), one on a CPU (first-call allocations; nothing there is compiled)."""
    for _ in range(3 if CUDA else 1):
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
    """(copy GB/s counting read + write, matmul TFLOP/s in `dtype`), measured now on this device on
    random data (zeros run faster than real data)."""
    numel = (1 << 28) if CUDA else (1 << 24)
    src = torch.randn(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src), reps)
    n = 8192 if CUDA else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timer(lambda: a @ b, reps)
    return 2 * src.numel() * 4 / copy_s / 1e9, 2 * n**3 / mm_s / 1e12


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


__all__ = ["CUDA", "DTYPE", "device_label", "device_peaks", "package_versions", "peak_mib", "report", "timer"]
