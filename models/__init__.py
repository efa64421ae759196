"""The LTX-2 audio-video DiT (one definition, pluggable layer backends) and its checkpoints."""

from __future__ import annotations

import torch

from .backends import BACKENDS, TorchBackend, resolve_backend
from .config import PRESETS, ModelConfig, resolve_config
from .errors import CheckpointError, UserError
from .latents import REFERENCE_DEPTH, LatentGeometry, reference_block
from .layouts import config_from_diffusers
from .sharding import Sharding
from .stage import Stage, stage_layers
from .transformer import LTX2AVTransformer, V2AProbe
from .weights import WeightsSource, convert_file, load_model_weights, load_state, save_model, weights_source

__all__ = [
    "BACKENDS",
    "PRESETS",
    "REFERENCE_DEPTH",
    "CheckpointError",
    "LTX2AVTransformer",
    "LatentGeometry",
    "ModelConfig",
    "Sharding",
    "Stage",
    "TorchBackend",
    "UserError",
    "V2AProbe",
    "WeightsSource",
    "build_model",
    "convert_file",
    "from_diffusers",
    "load_model_weights",
    "reference_block",
    "save_model",
    "stage_layers",
    "weights_source",
]


def build_model(
    name_or_config: str | ModelConfig | dict = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str | TorchBackend | None = None,
    stage: Stage | None = None,
    sharding: Sharding | None = None,
    **backend_options,
) -> LTX2AVTransformer:
    """Builds the DiT (or one pipeline stage of it) with random weights; `device='meta'` builds shapes
    only (e.g. to count the 19B). A backend name is built for `sharding` (default: one process
    holding every head and token) with `backend_options`; a backend instance brings its own."""
    cfg = resolve_config(name_or_config)
    layers = resolve_backend(backend, sharding, **backend_options)
    with torch.device(device):
        model = LTX2AVTransformer(cfg, layers, stage)
    return model.to(dtype)


def from_diffusers(diffusers_model, backend: str | TorchBackend | None = None) -> LTX2AVTransformer:
    """Our model with the config and weights of a `diffusers.LTX2VideoTransformer3DModel`."""
    cfg = config_from_diffusers(diffusers_model.config)
    param = next(diffusers_model.parameters())
    model = build_model(cfg, device=param.device, dtype=param.dtype, backend=backend)
    load_state(model, diffusers_model.state_dict(), "diffusers", source="diffusers model")
    return model
