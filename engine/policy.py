"""The policies of a run: the trainable model (`model.*`), the old policy that samples rollouts and
follows it by EMA, and the frozen KL reference; all built for this rank's place in the layout."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

import models
from models import LTX2AVTransformer, ModelConfig
from models.config import PRESETS
from models.weights import load_full_state, weights_source

from .errors import ConfigError, UserError
from .fields import bounded, choice
from .parallel.layout import ProcessLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class PolicyConfig:
    """`model.*`: which DiT, its layers, precision and starting weights."""

    preset: str = choice(*PRESETS, default="tiny")  # the DiT shape, unless `init` carries its own (see model_config)
    backend: str = choice(*models.BACKENDS, default="torch")  # layer flavour; tp > 1 needs megatron or te
    # FP8 scaling of the te backend (the torch-native fp8 backend is tensorwise only)
    fp8_recipe: str = choice("tensorwise", "delayed", default="tensorwise")
    dtype: str = choice("float32", "bfloat16", "float64", default="float32")  # parameters (and AdamW state)
    # Mixed precision: matmuls under torch.autocast in this dtype while parameters stay in `dtype`
    # (keep fp32 parameters for bf16 compute: AdamW updates on bf16 weights round away).
    autocast: str = choice("off", "bfloat16", "float16", default="off")
    # weights to start from: a safetensors file (official or diffusers layout, the official single file
    # included) or a diffusers LTX-2 pipeline or transformer folder
    init: str | None = None
    init_seed: int = 0  # random weights when `init` is None

    def __post_init__(self) -> None:
        if self.fp8_recipe != "tensorwise" and self.backend != "te":
            raise ConfigError(
                f"model.fp8_recipe={self.fp8_recipe} needs model.backend=te (the torch-native fp8 "
                f"backend scales tensorwise)"
            )
        if self.init is not None:
            try:  # headers and configs only: a bad path, folder or unsupported config fails here, not at build
                weights_source(self.init)
            except UserError as e:
                raise ConfigError(f"model.init: {e}") from e


@dataclass
class EMAConfig:
    """`ema.*`: theta_old <- eta theta_old + (1 - eta) theta, eta = min(decay_rate * step, max_decay)."""

    decay_rate: float = bounded(0.0, None, default=0.001)
    max_decay: float = bounded(0.0, 1.0, default=0.5)


def layer_backend(cfg: PolicyConfig, sharding: models.Sharding) -> models.TorchBackend:
    """The layers `model.backend` names, built for this rank's sharding."""
    options = {"fp8_recipe": cfg.fp8_recipe} if cfg.backend == "te" else {}
    return models.backends.resolve_backend(cfg.backend, sharding, **options)


def model_config(cfg: PolicyConfig) -> ModelConfig:
    """The DiT shape of the run: the config `model.init` carries (a diffusers config.json, or the
    safetensors header of an official or our own file), else `PRESETS[model.preset]`.

    Weights that carry a config win over `model.preset`, silently, even when the preset was set and
    disagrees: the config describes the tensors in the file, the preset only the shape to use without one."""
    carried = weights_source(cfg.init).config if cfg.init is not None else None
    return carried if carried is not None else PRESETS[cfg.preset]


def build_policy(cfg: PolicyConfig, layout: ProcessLayout, sequence_parallel: bool = False) -> LTX2AVTransformer:
    """This rank's share of the model (its pipeline stage, its tensor-parallel slices) with its
    starting weights: `model.init` (each rank reads only its share), or a seeded random init made as
    one process would make it (so the run does not depend on the layout; it builds the whole model on
    every rank, fine for `tiny`)."""
    with layout.collectively("reading the model config"):  # model.init's header or config.json, on every rank
        shape = model_config(cfg)
    model = models.build_model(
        shape,
        device=layout.device,
        stage=layout.stage(),
        backend=layer_backend(cfg, layout.sharding(sequence_parallel)),
    )
    if cfg.init is not None:
        with layout.collectively(f"loading model.init {cfg.init}"):  # each rank checks only its share
            models.load_model_weights(model, cfg.init)
    else:
        torch.manual_seed(cfg.init_seed)
        load_full_state(model, models.build_model(shape).state_dict())
    return model.to(DTYPES[cfg.dtype])


def frozen_copy(cfg: PolicyConfig, model: LTX2AVTransformer) -> LTX2AVTransformer:
    """Same layers, layout and weights, no gradients (the old policy and the KL reference). The shape is
    `model.config` (what model_config gave build_policy), so `model.init` is not read again."""
    copy = models.build_model(
        model.config,
        device=next(model.parameters()).device,
        dtype=DTYPES[cfg.dtype],
        backend=layer_backend(cfg, model.sharding),
        stage=model.stage,
    )
    copy.load_state_dict(model.state_dict())
    return copy.requires_grad_(False)


def autocast(cfg: PolicyConfig, device: torch.device) -> AbstractContextManager:
    """Mixed precision for every model forward (`model.autocast`); a no-op when off."""
    return (
        contextlib.nullcontext() if cfg.autocast == "off" else torch.autocast(device.type, dtype=DTYPES[cfg.autocast])
    )


def ema_decay(step: int, decay_rate: float, max_decay: float) -> float:
    """eta = min(decay_rate * step, max_decay): the old policy tracks theta closely early, lags later."""
    return min(decay_rate * step, max_decay)


@torch.no_grad()
def ema_update(old: nn.Module, new: nn.Module, eta: float) -> None:
    """theta_old <- eta * theta_old + (1 - eta) * theta."""
    for p_old, p in zip(old.parameters(), new.parameters()):
        p_old.mul_(eta).add_(p.detach(), alpha=1.0 - eta)
