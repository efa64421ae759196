"""The LTX-2 audio-video DiT (one definition, pluggable layer backends) and its checkpoints."""
from __future__ import annotations

import torch

from .backend import BACKENDS, TorchBackend, resolve_backend
from .checkpoint import (CheckpointError, config_from_diffusers, convert_file, load_model_weights, load_state,
                         save_model)
from .config import PRESETS, ModelConfig, resolve_config
from .stage import Stage, stage_layers
from .transformer import LTX2AVTransformer

__all__ = ["BACKENDS", "PRESETS", "CheckpointError", "LTX2AVTransformer", "ModelConfig", "Stage", "TorchBackend",
           "build_model", "convert_file", "from_diffusers", "load_model_weights", "save_model", "stage_layers"]


def build_model(name_or_config: str | ModelConfig | dict = "tiny", device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, backend: str | TorchBackend | None = None,
                stage: Stage | None = None) -> LTX2AVTransformer:
    """Builds the DiT (or one pipeline stage of it) with random weights; `device='meta'` builds shapes
    only (e.g. to count the 19B)."""
    cfg = resolve_config(name_or_config)
    with torch.device(device):
        model = LTX2AVTransformer(cfg, resolve_backend(backend), stage)
    return model.to(dtype)


def from_diffusers(diffusers_model, backend: str | TorchBackend | None = None) -> LTX2AVTransformer:
    """Our model with the config and weights of a `diffusers.LTX2VideoTransformer3DModel`."""
    cfg = config_from_diffusers(diffusers_model.config)
    param = next(diffusers_model.parameters())
    model = build_model(cfg, device=param.device, dtype=param.dtype, backend=backend)
    load_state(model, diffusers_model.state_dict(), "diffusers", source="diffusers model")
    return model
