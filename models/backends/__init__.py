"""Layer backends: which linear layers, QK norms and attention core the one model definition gets.

Like megatron-core's spec providers, a backend picks layers and nothing else: the model names each
linear layer's tensor-parallel role and asks its backend for it. How heads and tokens are split is
the `models.sharding.Sharding` a backend is built for; collectives belong to the engine's process
layout. Backends are imported on first use, so optional packages (megatron-core, Transformer
Engine) stay optional.
"""

from __future__ import annotations

import importlib

from ..sharding import Sharding
from .base import ParallelRole, TorchBackend

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "torch": "models.backends.base:TorchBackend",
    "fp8": "models.backends.fp8:Fp8Backend",
    "megatron": "models.backends.megatron:MegatronBackend",
    "te": "models.backends.te:TEBackend",
}


def backend_class(name: str) -> type[TorchBackend]:
    if name not in BACKENDS:
        raise ValueError(f"model.backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_backend(backend: str | TorchBackend | None, sharding: Sharding | None = None, **options) -> TorchBackend:
    """A backend instance from a name (built for `sharding` with `options`), an instance (as it is,
    with the sharding it was built for), or None (plain torch layers)."""
    if isinstance(backend, TorchBackend):
        if sharding is not None or options:
            raise ValueError("pass a backend name with a sharding and options, or a backend instance alone")
        return backend
    return backend_class(backend or "torch")(sharding or Sharding(), **options)


__all__ = ["BACKENDS", "ParallelRole", "TorchBackend", "backend_class", "resolve_backend"]
