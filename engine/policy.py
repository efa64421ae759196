"""The policies of a run: the trainable model (`model.*`), the old policy that samples rollouts and
follows it by EMA, and the frozen KL reference; all built for this rank's place in the layout.

Full fine-tuning keeps whole frozen copies for the old policy and the reference. LoRA (`lora.*`,
models.lora) keeps one frozen base: the trained policy is its "default" adapter set, the old policy
its "old" set (EMA over the adapters only) and the reference the base with adapters off."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import models
from models import LTX2AVTransformer, ModelConfig
from models.config import PRESETS
from models.lora import (
    DEFAULT_TARGETS,
    INITS,
    AdapterView,
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_named_parameters,
    lora_state_dict,
)
from models.lora_files import load_lora_file
from models.weights import gather_whole, load_full_state, weights_source

from .errors import ConfigError, UserError
from .fields import bounded, choice
from .parallel.layout import ProcessLayout

TRAINED, OLD = LoRAConfig.adapters  # models.lora's adapter sets: the trained policy and the old policy
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
class LoRASection:
    """`lora.*`: LoRA post-training on the frozen base (models.lora); rank 0 is full fine-tuning."""

    rank: int = bounded(0, None, default=0)
    alpha: float = bounded(0.0, None, default=64.0)  # the update is (alpha / rank) B A
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-path patterns
    init: str = choice(*INITS, default="gaussian")  # A's init; B starts at zero
    # An LTX-2 LoRA file to start both adapter sets from (ours / ltx-trainer / ComfyUI / diffusers, or
    # kohya lora_down/lora_up/alpha), at lora.rank
    init_from: str | None = None

    def __post_init__(self) -> None:
        try:
            self.spec()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.init_from is not None:
            if self.rank == 0:
                raise ConfigError("lora.init_from needs lora.rank > 0 (the rank of the file's adapters)")
            if not Path(self.init_from).is_file():
                raise ConfigError(f"lora.init_from: {self.init_from} is not a file")

    def spec(self) -> LoRAConfig:
        """The adapters apply_lora adds: "default" (trained) and "old" (the old policy)."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), init=self.init)


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


def add_adapters(cfg: LoRASection, model: LTX2AVTransformer, seed: int) -> None:
    """With `lora.rank` > 0: freezes `model` and adds the adapter sets, drawn from `seed` (the same in
    every layout) or read from `lora.init_from`; "old" starts equal to "default"."""
    if cfg.rank == 0:
        return
    try:
        apply_lora(model, cfg.spec(), seed)
    except ValueError as e:  # a target that matches no layer of this model
        raise ConfigError(str(e)) from e
    if cfg.init_from is not None:
        load_lora_file(model, cfg.init_from, TRAINED)
        load_lora_state_dict(model, lora_state_dict(model, TRAINED), OLD, source=cfg.init_from)


def old_and_reference(
    cfg: PolicyConfig, model: LTX2AVTransformer, kl: bool
) -> tuple[nn.Module | AdapterView, nn.Module | AdapterView | None]:
    """The old policy and (with `kl`) the KL reference of `model`: its "old" adapter set and its base when
    it has adapters, else frozen copies of it."""
    if lora_layers(model):
        return AdapterView(model, OLD), AdapterView(model, None) if kl else None
    return frozen_copy(cfg, model), frozen_copy(cfg, model) if kl else None


def policy_state(policy: nn.Module | AdapterView) -> dict[str, Tensor]:
    """What training changes in a policy, by name (this rank's slices; parameters, so megatron's split
    attributes come along): with adapters, the set's `<layer>.lora_A/B.weight` (the trained model's
    "default", an AdapterView's own); without, the model's whole state dict. The EMA, checkpoints and
    exports read and write exactly this."""
    if isinstance(policy, AdapterView):
        return lora_named_parameters(policy.model, policy.adapter)
    if lora_layers(policy):
        return lora_named_parameters(policy, TRAINED)
    return policy.state_dict(keep_vars=True)


def whole_policy_state(policy: nn.Module | AdapterView) -> dict[str, Tensor]:
    """`policy_state` as one process holds it: tensor-parallel slices and pipeline stages joined
    (collective: every rank gets all of it)."""
    return gather_whole(policy_state(policy), policy.sharding, policy.stage)


def load_whole_policy_state(policy: nn.Module | AdapterView, state: dict[str, Tensor], source: str) -> None:
    """Loads `whole_policy_state`'s form into a policy of any layout (each rank keeps its share); every
    missing, unexpected or mis-shaped entry is one CheckpointError naming `source`."""
    if isinstance(policy, AdapterView):
        load_lora_state_dict(policy.model, state, policy.adapter, whole=True, source=source)
    elif lora_layers(policy):
        load_lora_state_dict(policy, state, TRAINED, whole=True, source=source)
    else:
        load_full_state(policy, state, source)


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
def ema_update(old: nn.Module | AdapterView, new: nn.Module, eta: float) -> None:
    """theta_old <- eta * theta_old + (1 - eta) * theta over the parameters of `policy_state` (the adapters
    alone with LoRA)."""
    old_state = policy_state(old)
    for name, p in policy_state(new).items():
        if isinstance(p, nn.Parameter):
            old_state[name].mul_(eta).add_(p.detach(), alpha=1.0 - eta)
