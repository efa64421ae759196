"""Run configuration: each feature's section (declared beside the feature), composed here, read from
dataclass defaults (the embedded tiny CPU task), YAML files and `key=value` overrides.

The defaults *are* the `tiny` config (configs/tiny.yaml spells them out), so `omninft train` needs no
file. Each rule is checked once, when the config is read: per key (types, choices, bounds), per
section (its `__post_init__`) and across sections (`_validate`); every error is a ConfigError that
names the offending key and what it allows.
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

import yaml

from .algorithm.advantages import AdvantageConfig
from .algorithm.loss import LossConfig
from .algorithm.reweighting import ReweightConfig
from .algorithm.surgery import SurgeryConfig, a2v_grad_scales
from .checkpoint import FORMATS as CHECKPOINT_FORMATS
from .data import TaskConfig, TextConfig
from .errors import ConfigError
from .fields import bounded, choice
from .metrics import LogConfig
from .optim import OptimConfig
from .parallel import ParallelConfig
from .policy import EMAConfig, LoRASection, PolicyConfig, model_config
from .profiling import ProfileConfig
from .rewards import LATENT_REWARDS, RewardSpec, check_rewards
from .rewards.base import check_video_grid
from .rewards.decode import DecodeConfig
from .rollout import EvalConfig
from .sampler import SamplerConfig
from .trainer import TrainConfig


@dataclass
class Config:
    iterations: int = bounded(1, None, default=60)
    seed: int = 0
    run_dir: str = "runs/omninft"
    resume: bool | str = False  # true: continue run_dir's latest checkpoint; auto: if there is one
    overwrite: bool = False  # a fresh run may delete a previous run in run_dir
    resume_overrides: bool = False  # resume although seed or model changed (engine.run_dir.PROTECTED)
    checkpoint_every: int = bounded(0, None, default=20)  # iterations; 0 = only at the end
    checkpoint_keep: int = bounded(0, None, default=0)  # keep the last N checkpoints; 0 = all
    checkpoint_keep_every: int = bounded(0, None, default=0)  # ... and every checkpoint at a multiple of this
    # full: both models whole (official layout) + per-rank optimizer; dist: megatron dist_checkpointing,
    # every rank writes its shards, reshards on load; auto: dist when distributed on CUDA, else full.
    checkpoint_format: str = choice(*CHECKPOINT_FORMATS, default="auto")
    model: PolicyConfig = field(default_factory=PolicyConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    task: TaskConfig = field(default_factory=TaskConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name) for name in LATENT_REWARDS])
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if isinstance(self.resume, str) and self.resume != "auto":
            raise ConfigError(f"resume must be true, false or auto; got {self.resume!r}")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (so `reweight.mode=off` stays a string), `1e-3`
    is a float (YAML 1.1 needs a dot), and integers are read as written: `010` is 10, not octal 8, and
    `1:30` is the string it looks like, not sexagesimal 90."""


_CORE_TAGS = tuple(f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float"))
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _CORE_TAGS]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# In this order: a scalar that is an integer is not a float.
_Loader.add_implicit_resolver(_CORE_TAGS[0], re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _CORE_TAGS[1], re.compile(r"^[-+]?[0-9]+$|^0o[0-7]+$|^0x[0-9a-fA-F]+$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _CORE_TAGS[2],
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0 if text[:2] in ("0o", "0x") else 10)


_Loader.add_constructor(_CORE_TAGS[1], _construct_int)


def _yaml(text: str, source: str):
    """YAML 1.2 scalars; a syntax error is a ConfigError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from e


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
        raise ConfigError(
            errors[-1]
            if len(errors) == 1
            else f"{key}: {value!r} fits none of {' | '.join(getattr(o, '__name__', str(o)) for o in options)}"
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is dict:  # a record whose keys the section checks itself (e.g. a prompt with its columns)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
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
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """An instance of the dataclass `cls` from `data`, every value checked against its field; the
    section's own rules run in its `__post_init__`. A class's `__config_hints__` explain keys that
    users try but that do not exist; its `__config_aliases__` map keys as users write them to fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    aliases = getattr(cls, "__config_aliases__", {})  # key as written -> field name
    for alias, name in aliases.items():
        if alias in data:
            if name in data:
                raise ConfigError(f"{prefix}: give {alias} or {name}, not both")
            data = {**{k: v for k, v in data.items() if k != alias}, name: data[alias]}
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - set(names)))
    if unknown:
        where = f"{prefix}." if prefix else ""
        explained = [hint for k in unknown if (hint := getattr(cls, "__config_hints__", {}).get(k))]
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            + "".join(f" ({hint})" for hint in explained)
        )
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is required")
            continue
        value = _convert(key, data[name], hints[name])
        if dataclasses.is_dataclass(value):
            kwargs[name] = value
            continue
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
    """Rules that span sections."""
    if cfg.parallel.tp > 1 and cfg.model.backend not in ("megatron", "te"):
        raise ConfigError(
            f"parallel.tp={cfg.parallel.tp} needs model.backend=megatron or te; got {cfg.model.backend!r}"
        )
    if cfg.model.backend == "te" and cfg.train.activation_checkpointing:
        raise ConfigError(
            "train.activation_checkpointing is not supported with model.backend=te: recomputed "
            "blocks would run outside Transformer Engine's FP8 context"
        )
    if cfg.parallel.distributed_optimizer and cfg.checkpoint_format == "full":
        raise ConfigError(
            "parallel.distributed_optimizer needs checkpoint_format=dist or auto (the optimizer state is sharded)"
        )
    model = model_config(cfg.model)  # the shape model.init's weights carry, else model.preset's
    which = f"model.init={cfg.model.init}" if cfg.model.init else f"model.preset={cfg.model.preset!r}"
    layers = model.num_layers
    if cfg.parallel.pp > layers:
        raise ConfigError(
            f"parallel.pp={cfg.parallel.pp}: the model ({which}) has only {layers} blocks to split into pipeline stages"
        )
    cfg.sampler.check_blocks(layers)
    cfg.eval.sampler.check_blocks(layers)
    if cfg.eval.every and cfg.task.eval_records() is None:
        raise ConfigError(f"eval.every={cfg.eval.every} needs task.eval_prompts (the held-out prompts to evaluate)")
    try:
        a2v_grad_scales(cfg.surgery.schedule, layers)
    except ValueError as e:
        raise ConfigError(f"{e} ({which})") from e
    if cfg.text.encoder is not None and cfg.text.connectors is None and cfg.model.init is None:
        raise ConfigError(
            "text.encoder is set, but no weights for the text connectors: set text.connectors or model.init "
            "(the official file and a diffusers pipeline folder hold them)"
        )
    check_rewards(cfg.rewards)
    check_video_grid(cfg.rewards, cfg.task.video_grid)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.group_size=4)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), _yaml(raw, f"override {key}") if raw else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `key=value` overrides; validated as a whole."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _yaml(path.read_text(), str(path)) or {}
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
