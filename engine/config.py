"""Run configuration: dataclass defaults (the embedded tiny CPU task), YAML files, `key=value` overrides.

The defaults *are* the `tiny` config (configs/tiny.yaml spells them out), so `omninft train` needs no
file. Every error names the offending key and what it allows.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from models.backend import BACKENDS
from models.config import PRESETS as MODEL_PRESETS

from .advantages import ROUTING_MODES, STD_MODES
from .reweighting import REWEIGHT_MODES
from .rewards import BUILTIN_REWARDS
from .surgery import SURGERY_PRESETS

SIGMA_MODES = ("highest", "uniform", "logit_normal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

DEFAULT_PROMPTS = (
    "a dog barks twice in a quiet park",
    "waves crash on a rocky shore at dusk",
    "a drummer plays a slow steady beat",
    "rain falls on a tin roof at night",
    "a train passes a crossing with its bell ringing",
    "a child laughs while running through sprinklers",
    "a blacksmith hammers glowing metal",
    "an owl hoots in a dark forest",
)


def _choice(*choices: str, **kw) -> Any:
    return field(metadata={"choices": choices}, **kw)


def _range(lo: float | None = None, hi: float | None = None, **kw) -> Any:
    return field(metadata={"min": lo, "max": hi}, **kw)


@dataclass
class ModelSection:
    preset: str = _choice(*MODEL_PRESETS, default="tiny")
    backend: str = _choice(*BACKENDS, default="torch")  # layer flavour; tp > 1 needs megatron or te
    # FP8 scaling of the te backend (the torch-native fp8 backend is tensorwise only)
    fp8_recipe: str = _choice("tensorwise", "delayed", default="tensorwise")
    dtype: str = _choice("float32", "bfloat16", "float64", default="float32")  # parameters (and AdamW state)
    # Mixed precision: matmuls under torch.autocast in this dtype while parameters stay in `dtype`
    # (keep fp32 parameters for bf16 compute: AdamW updates on bf16 weights round away).
    autocast: str = _choice("off", "bfloat16", "float16", default="off")
    init: str | None = None  # safetensors file (official or diffusers layout) to start from
    init_seed: int = 0        # random weights when `init` is None


@dataclass
class TaskSection:
    """The rollout task: prompts, clip shape and the stand-in text features."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    video_grid: list[int] = field(default_factory=lambda: [7, 3, 4])  # latent frames, height, width
    fps: float = _range(1e-3, None, default=24.0)
    context_tokens: int = _range(1, None, default=8)


@dataclass
class SamplerSection:
    steps: int = _range(2, None, default=10)
    shift: float | None = None  # None: the LTX-2 pipelines' fixed 2.05
    terminal: float = _range(0.0, 0.99, default=0.1)
    cfg_video: float = _range(1.0, None, default=1.0)  # 1.0 = unguided (SPEC 1: rollouts are unguided)
    cfg_audio: float = _range(1.0, None, default=1.0)


@dataclass
class AdvantageSection:
    routing: str = _choice(*ROUTING_MODES, default="omninft")
    std: str = _choice(*STD_MODES, default="global")
    eps: float = _range(0.0, None, default=1e-4)
    adv_clip: float = _range(1e-6, None, default=5.0)


@dataclass
class LossSection:
    beta: float = _range(1e-6, None, default=1.0)
    kl_weight: float = _range(0.0, None, default=0.0)


@dataclass
class SurgerySection:
    schedule: str | list[float] = "paper"  # a preset name or one gradient scale per block


@dataclass
class ReweightSection:
    mode: str = _choice(*REWEIGHT_MODES, default="minmax")
    lam: float = _range(1.0, None, default=1.5)
    warmup_steps: int = _range(0, None, default=400)
    first_deep_block: int = _range(0, 47, default=10)  # on the 48-block scale
    first_step: int = _range(0, None, default=10)      # steps 10-18 of a 20-step schedule, rescaled
    last_step: int = _range(0, None, default=18)


@dataclass
class TrainSection:
    prompts_per_iteration: int = _range(1, None, default=4)
    group_size: int = _range(2, None, default=8)
    batch_size: int = _range(1, None, default=16)
    sigma_mode: str = _choice(*SIGMA_MODES, default="highest")
    sigma_fraction: float = _range(1e-6, 1.0, default=0.4)  # 'highest': share of the schedule's steps
    num_sigmas: int = _range(1, None, default=4)             # 'uniform'/'logit_normal': draws per iteration
    activation_checkpointing: bool = False  # recompute each block in backward (LTX-2 trainer does, for 19B)
    # Samples per forward/backward (gradient accumulation; the pipeline's microbatches); 0 = a rank's
    # whole share of the mini-batch. It must divide that share.
    micro_batch_size: int = _range(0, None, default=0)


@dataclass
class OptimSection:
    lr: float = _range(0.0, None, default=3e-4)
    weight_decay: float = _range(0.0, None, default=0.0)
    beta1: float = _range(0.0, 0.999999, default=0.9)
    beta2: float = _range(0.0, 0.999999, default=0.999)
    eps: float = _range(0.0, None, default=1e-8)
    grad_clip: float = _range(0.0, None, default=1.0)


@dataclass
class EMASection:
    decay_rate: float = _range(0.0, None, default=0.001)  # eta = min(decay_rate * step, max_decay)
    max_decay: float = _range(0.0, 1.0, default=0.5)


@dataclass
class ParallelSection:
    """Process layout under torchrun: world = tp x pp x dp (dp is what remains)."""
    tp: int = _range(1, None, default=1)
    pp: int = _range(1, None, default=1)  # pipeline stages of contiguous blocks
    # megatron-core's distributed optimizer: AdamW moments sharded over data-parallel ranks (ZeRO-1)
    distributed_optimizer: bool = False
    sequence_parallel: bool = False


@dataclass
class ProfileSection:
    """Iterations between which torch.cuda.profiler is on (for nsys --capture-range=cudaProfilerApi)."""
    start_step: int | None = None
    end_step: int | None = None


@dataclass
class LogSection:
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    iterations: int = _range(1, None, default=60)
    seed: int = 0
    run_dir: str = "runs/omninft"
    resume: bool = False
    checkpoint_every: int = _range(0, None, default=20)  # iterations; 0 = only at the end
    # full: both models whole (official layout) + per-rank optimizer; dist: megatron dist_checkpointing,
    # every rank writes its shards, reshards on load; auto: dist when distributed on CUDA, else full.
    checkpoint_format: str = _choice("auto", "full", "dist", default="auto")
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    rewards: list[dict] = field(default_factory=lambda: [{"name": n, "weight": 1.0} for n in BUILTIN_REWARDS])
    advantage: AdvantageSection = field(default_factory=AdvantageSection)
    loss: LossSection = field(default_factory=LossSection)
    surgery: SurgerySection = field(default_factory=SurgerySection)
    reweight: ReweightSection = field(default_factory=ReweightSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    log: LogSection = field(default_factory=LogSection)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (so `reweight.mode=off` stays a string) and
    `1e-3` is a float (YAML 1.1 needs a dot)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the key."""


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp` (after YAML typing) and converts ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} fits none of "
                          f"{' | '.join(getattr(o, '__name__', str(o)) for o in options)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: "
                          f"{', '.join(names)}")
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
            continue
        value = _convert(key, data[name], tp)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"{key} must be {bounds}; got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Cross-field checks the per-key rules cannot express."""
    if len(cfg.task.video_grid) != 3 or any(n < 1 for n in cfg.task.video_grid):
        raise ConfigError(f"task.video_grid must be three positive integers [frames, height, width]; "
                          f"got {cfg.task.video_grid}")
    if cfg.task.video_grid[0] < 3:
        raise ConfigError("task.video_grid needs at least 3 latent frames (av_sync correlates motion over time)")
    if not cfg.task.prompts:
        raise ConfigError("task.prompts must hold at least one prompt")
    if cfg.model.init is not None and not Path(cfg.model.init).is_file():
        raise ConfigError(f"model.init: {cfg.model.init} is not a file (expected a safetensors checkpoint)")
    if cfg.parallel.tp > 1 and cfg.model.backend not in ("megatron", "te"):
        raise ConfigError(f"parallel.tp={cfg.parallel.tp} needs model.backend=megatron or te; got {cfg.model.backend!r}")
    if cfg.model.fp8_recipe != "tensorwise" and cfg.model.backend != "te":
        raise ConfigError(f"model.fp8_recipe={cfg.model.fp8_recipe} needs model.backend=te (the torch-native fp8 "
                          f"backend scales tensorwise)")
    if cfg.model.backend == "te" and cfg.train.activation_checkpointing:
        raise ConfigError("train.activation_checkpointing is not supported with model.backend=te: recomputed "
                          "blocks would run outside Transformer Engine's FP8 context")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    if cfg.parallel.distributed_optimizer and cfg.checkpoint_format == "full":
        raise ConfigError("parallel.distributed_optimizer needs checkpoint_format=dist or auto (the optimizer state "
                          "is sharded)")
    layers = MODEL_PRESETS[cfg.model.preset].num_layers
    if cfg.parallel.pp > layers:
        raise ConfigError(f"parallel.pp={cfg.parallel.pp}: model.preset={cfg.model.preset!r} has only {layers} "
                          f"blocks to split into pipeline stages")
    p = cfg.profile
    if (p.start_step is None) != (p.end_step is None) or p.start_step is not None and not 0 <= p.start_step <= p.end_step:
        raise ConfigError("profile.start_step and profile.end_step must be set together with 0 <= start_step <= end_step")
    if cfg.reweight.last_step < cfg.reweight.first_step:
        raise ConfigError("reweight.last_step must be >= reweight.first_step")
    if isinstance(cfg.surgery.schedule, str) and cfg.surgery.schedule not in SURGERY_PRESETS:
        raise ConfigError(f"surgery.schedule must be one of {', '.join(SURGERY_PRESETS)} or a list of per-block "
                          f"gradient scales; got {cfg.surgery.schedule!r}")
    from .rewards import build_rewards
    try:
        build_rewards(cfg.rewards)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.group_size=4)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), _yaml(raw) if raw else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `key=value` overrides; validated as a whole."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _yaml(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg
