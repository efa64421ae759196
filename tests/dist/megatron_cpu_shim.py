"""Test-only: lets megatron-core 0.19.2 run on CPU tensors over gloo.

megatron-core hard-codes CUDA in its buffers, collectives and pipeline schedule
(`torch.cuda.current_device()` as an allocation device, `torch.cuda.synchronize()`, a
`device="cuda"` literals in tensor factories (the schedule's token counter, the optimizers'
overflow buffers), a `torch.cuda.current_stream()` in DDP's gradient reduction, the distributed
optimizer's check that parameters are `torch.cuda.*Tensor`s). Without CUDA these are mapped to the
CPU (one stream: nothing to wait for); with CUDA nothing is touched, so GPU runs exercise megatron
exactly as shipped.
"""

from __future__ import annotations

import torch

_installed = False


def install() -> bool:
    """Returns True when the shim is active (no CUDA). Installing twice changes nothing."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    _installed = True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for name in ("zeros", "tensor", "empty", "ones", "full"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, dtype=None, *args, **kwargs):
        """megatron's optimizers accept parameters whose `type()` is a torch.cuda.*Tensor name."""
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return tensor_type(self).replace("torch.", "torch.cuda.", 1)
        return tensor_type(self, dtype, *args, **kwargs)

    torch.Tensor.type = cuda_type_name
    return True


def _on_cpu(factory):
    """A tensor factory that allocates `device="cuda"` requests on the CPU."""

    def make(*args, **kwargs):
        if str(kwargs.get("device")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _CpuStream:
    """CPU work is ordered already: waiting on an event or another stream is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass
