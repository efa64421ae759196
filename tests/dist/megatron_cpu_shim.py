"""Test-only: lets megatron-core 0.19.2 run on CPU tensors over gloo.

megatron-core hard-codes CUDA in its buffers, collectives and pipeline schedule
(`torch.cuda.current_device()` as an allocation device, `torch.cuda.synchronize()`, a
`torch.zeros(..., device="cuda")` token counter in the schedule, a `torch.cuda.current_stream()` in
DDP's gradient reduction). Without CUDA these are mapped to the CPU (one stream: nothing to wait for); with CUDA nothing is touched, so GPU runs exercise megatron exactly as shipped.
"""
from __future__ import annotations

import torch


def install() -> bool:
    """Returns True when the shim is active (no CUDA)."""
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    zeros = torch.zeros

    def cpu_zeros(*args, device=None, **kwargs):
        return zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)

    torch.zeros = cpu_zeros
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    return True


class _CpuStream:
    """CPU work is ordered already: waiting on an event or another stream is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass
