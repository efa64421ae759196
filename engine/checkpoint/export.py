"""`omninft convert`: a training checkpoint's trained policy, or a weights file, in the formats other tools load.

- `--to official|diffusers`: the whole DiT as one safetensors file in that key layout. From a LoRA run's
  checkpoint the adapters are merged into the base first (W + (alpha / rank) B A, in fp32): the base is the
  run's `model.init` (or its seeded random init), read again from the run config the checkpoint stores.
- `--to lora`: a LoRA run's "default" adapters as the interoperable LoRA file (models.lora_files:
  `diffusion_model.<official name>.lora_A/B.weight`, alpha / rank folded into B), which diffusers'
  `LTX2Pipeline.load_lora_weights`, ltx-trainer and ComfyUI read.

`--dtype` casts what is written; without it a LoRA file keeps the adapters' training precision (fp32) and a
DiT file its weights' dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from models import convert_file
from models.lora import merge_lora
from models.lora_files import write_lora_file
from models.weights import atomic_save_file, config_metadata, to_layout

from ..errors import CheckpointError, ConfigError
from ..parallel import ProcessLayout
from ..policy import DTYPES, add_adapters, build_policy, load_whole_policy_state
from . import full
from .manager import is_checkpoint, is_distributed_checkpoint

TARGETS = ("official", "diffusers", "lora")


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None) -> str:
    """Writes `dst` from `src` (a checkpoints/iter_NNNNNN directory, full or distributed, or anything
    `model.init` accepts) as `to` says; returns what was written, in words."""
    src, cast = Path(src), None if dtype is None else DTYPES[dtype]
    checkpoint = src.is_dir() and is_checkpoint(src)
    if checkpoint and _holds_adapters(src):
        config, adapters = _run_config(src), _adapters(src)
        if to == "lora":
            lora = config["lora"]
            write_lora_file(adapters, lora["alpha"] / lora["rank"], dst, cast or torch.float32)
            return f"wrote the LoRA adapters of {src} to {dst} (rank {lora['rank']}, alpha/rank folded into lora_B)"
        model = merged_model(config, adapters, str(src))
        state = model.state_dict()
        atomic_save_file(_cast(to_layout(state, to), cast), dst, metadata=config_metadata(model.config))
        return f"wrote the base of {src} with its LoRA adapters merged to {dst} ({to} layout)"
    if to == "lora":
        raise ConfigError(
            f"--to lora exports a LoRA run's adapters, and {src} is "
            + ("a full fine-tuning checkpoint" if checkpoint else "not a training checkpoint")
            + ": use --to official or --to diffusers"
        )
    if checkpoint and is_distributed_checkpoint(src):
        from .dist import read_model_config, read_tensors

        model_config = read_model_config(src)
        state = read_tensors(src, "model", model_config)
        atomic_save_file(_cast(to_layout(state, to), cast), dst, metadata=config_metadata(model_config))
        return f"wrote the model weights of {src} to {dst} ({to} layout)"
    weights = src / full.MODEL_FILES[0] if checkpoint else src  # a full checkpoint's trained policy
    try:
        n = convert_file(weights, dst, to, cast)
    except CheckpointError as e:
        if not src.is_dir():
            raise
        raise CheckpointError(
            f"{src} is not a training checkpoint (no {full.STATE_FILE} and {full.MODEL_FILES[0]}, and no "
            f"distributed checkpoint metadata.json), and {e}"
        ) from e
    return f"wrote {n} tensors of {weights} to {dst} ({to} layout)"


def merged_model(config: dict, adapters: dict[str, Tensor], source: str):
    """The run's base (its `model.init`, or the seeded random init) on the CPU with `adapters` (whole
    "default" set, our names) merged in: the plain one-process model, in the run's `model.dtype`."""
    from ..config import from_dict

    # One process with plain layers (they hold the same tensors); the adapters come from the checkpoint.
    config = {k: v for k, v in config.items() if k != "parallel"}
    config["model"] = {**config["model"], "backend": "torch"}
    config["lora"] = {**config["lora"], "init_from": None}
    cfg = from_dict(config)
    model = build_policy(cfg.model, ProcessLayout())
    add_adapters(cfg.lora, model, cfg.model.init_seed)
    load_whole_policy_state(model, adapters, source)
    merge_lora(model)
    return model


def _holds_adapters(src: Path) -> bool:
    if is_distributed_checkpoint(src):
        from .dist import holds_adapters

        return holds_adapters(src)
    return full.holds_adapters(src)


def _run_config(src: Path) -> dict:
    if is_distributed_checkpoint(src):
        from .dist import read_run_config

        return read_run_config(src)
    return full.read_run_config(src)


def _adapters(src: Path, policy: int = 0) -> dict[str, Tensor]:
    """An adapter set of a LoRA run's checkpoint (`policy` 0: the trained "default", 1: the "old"), whole, in
    our names, alpha not folded."""
    if is_distributed_checkpoint(src):
        from .dist import MODELS, read_tensors

        return read_tensors(src, MODELS[policy])
    return load_file(src / full.ADAPTER_FILES[policy])


def lora_checkpoint(src: str | Path) -> bool:
    """A LoRA run's training checkpoint directory (full or distributed)."""
    src = Path(src)
    return src.is_dir() and is_checkpoint(src) and _holds_adapters(src)


def checkpoint_overrides(src: str | Path) -> list[str]:
    """Config overrides that make a run use the policy of `src` (`--checkpoint` of sample and eval): for a LoRA
    checkpoint its run's base and adapter settings (then `load_checkpoint_adapters`), else `model.init`: the
    weights as given, or a full checkpoint's trained model."""
    src = Path(src)
    if not lora_checkpoint(src):
        weights = src / full.MODEL_FILES[0] if src.is_dir() and full.is_full_checkpoint(src) else src
        return [f"model.init={weights}"]
    config = _run_config(src)
    model, lora = config["model"], config["lora"]
    keys = {"model.init": model["init"], "model.init_seed": model["init_seed"], "model.preset": model["preset"]}
    keys.update({f"lora.{k}": lora[k] for k in ("rank", "alpha", "targets", "init")})
    return [f"{k}={json.dumps(v)}" for k, v in keys.items()]


def load_checkpoint_adapters(src: str | Path, model, old_model) -> None:
    """Both adapter sets of the LoRA checkpoint `src` into the policies of a run built with
    `checkpoint_overrides(src)`."""
    for i, policy in enumerate((model, old_model)):
        load_whole_policy_state(policy, _adapters(Path(src), i), str(src))


def _cast(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return state if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
