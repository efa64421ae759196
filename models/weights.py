"""Model weights as safetensors: save, load (checked whole, each rank reading only its share),
convert between layouts, and the full (single-process) state of a model of any parallel layout.

Loading checks every key and shape and reports all problems at once (models.errors.CheckpointError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import ModelConfig
from .errors import CheckpointError
from .layouts import Layout, detect_layout, from_layout, our_name, to_layout


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """`safe_open` whose failures (no file, not a safetensors file) are one-line CheckpointErrors."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file (expected a safetensors file)")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    with handle as f:
        yield f


MAX_LISTED_PROBLEMS = 12  # a 19B checkpoint for another model would list thousands of keys


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    problems = [f"missing: {k} {expected[k]}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected: {k} {found[k]}" for k in sorted(set(found) - set(expected))]
    problems += [
        f"shape: {k} is {found[k]}, model has {expected[k]}"
        for k in sorted(set(found) & set(expected))
        if found[k] != expected[k]
    ]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise CheckpointError(
            f"{source} does not fit the model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )


def check_finite(state: dict[str, Tensor], source: str) -> None:
    """Refuses weights holding NaN or infinite entries, naming the tensors (a diverged run's weights
    must never become anyone's starting point)."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:MAX_LISTED_PROBLEMS]) + (
            f" and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
        )
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}")


def check_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raises one CheckpointError naming every missing, unexpected and mis-shaped key."""
    _check_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
        source,
    )


@functools.lru_cache(maxsize=4)
def whole_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Name and shape of every tensor of the whole single-process model (built on the meta device):
    what a full checkpoint holds, whatever the layout of the model it is loaded into."""
    from .transformer import LTX2AVTransformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LTX2AVTransformer(cfg).state_dict().items()}


def load_state(
    model: nn.Module, state: dict[str, Tensor], layout: Layout | None = None, source: str = "state dict"
) -> None:
    """Loads a state dict in either layout (detected when `layout` is None) after checking it whole."""
    load_full_state(model, from_layout(state, layout or detect_layout(state.keys())), source)


def config_metadata(cfg: ModelConfig) -> dict[str, str]:
    """safetensors header metadata: the model config, as the official files store theirs under `config`."""
    return {"config": json.dumps({"transformer": dataclasses.asdict(cfg)})}


def read_config(path: str | os.PathLike) -> ModelConfig | None:
    """The ModelConfig stored by `save_model`, or None for files that carry none we can read."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    try:
        fields = json.loads(meta["config"])["transformer"]
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})
    except (KeyError, TypeError, ValueError):
        return None


def atomic_save_file(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes beside the target and renames, so a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: nn.Module, path: str | os.PathLike, layout: Layout = "official") -> None:
    atomic_save_file(to_layout(model.state_dict(), layout), path, metadata=config_metadata(model.config))


def load_model_weights(model: nn.Module, path: str | os.PathLike, layout: Layout | None = None) -> None:
    """Loads a safetensors file (layout detected when None) after checking every key and shape.

    Reads only this rank's pipeline stage and its slice of each tensor-parallel tensor (safetensors
    slices), so a rank never holds more of the model than its share."""
    params, sharding = dict(model.named_parameters()), model.sharding
    with open_safetensors(path) as f:
        keys = list(f.keys())
        layout = layout or detect_layout(keys)
        names = {n: k for k in keys if (n := our_name(k, layout)) is not None}
        _check_shapes(
            whole_shapes(model.config), {n: tuple(f.get_slice(k).get_shape()) for n, k in names.items()}, str(path)
        )
        local = {}
        for name in model.state_dict():
            key = names[name]
            p = params.get(name)
            if sharding.is_split(p):
                local[name] = f.get_slice(key)[sharding.weight_slice(p)]
            else:
                local[name] = f.get_tensor(key)
    check_finite(local, str(path))
    model.load_state_dict(local, strict=True)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, layout: Layout) -> int:
    """Rewrites a checkpoint in `layout` (renaming only); returns the number of tensors written."""
    with open_safetensors(src) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    ours = from_layout(state, detect_layout(state.keys()))
    cfg = read_config(src)
    if cfg is not None:
        meta = {**meta, **config_metadata(cfg)}
    atomic_save_file(to_layout(ours, layout), dst, metadata=meta)
    return len(ours)


def load_full_state(model: nn.Module, state: dict[str, Tensor], source: str = "full state dict") -> None:
    """Loads a single-process state dict (our names) into a model of any layout: a pipeline stage
    takes its own tensors, and under tensor parallelism each rank keeps its slice of every split
    parameter (megatron marks them with `tensor_model_parallel` and `partition_dim`). Makes
    initialisation independent of the layout."""
    _check_shapes(whole_shapes(model.config), {k: tuple(v.shape) for k, v in state.items()}, source)
    sharding, params = model.sharding, dict(model.named_parameters())
    local = {
        k: state[k][sharding.weight_slice(params[k])] if sharding.is_split(params.get(k)) else state[k]
        for k in model.state_dict()
    }
    check_finite(local, source)
    model.load_state_dict(local, strict=True)


def gather_full_state(model: nn.Module) -> dict[str, Tensor]:
    """The single-process state dict of a model of any layout (collective: every rank gets all of it)."""
    sharding, params = model.sharding, dict(model.named_parameters())
    out = {
        name: sharding.gather_weight(t, params[name]) if sharding.is_split(params.get(name)) else t
        for name, t in model.state_dict().items()
    }
    stage = model.stage
    if stage.count > 1:
        stages: list[dict[str, Tensor] | None] = [None] * stage.count
        torch.distributed.all_gather_object(stages, {k: v.detach().cpu() for k, v in out.items()}, group=stage.group)
        device = next(iter(out.values())).device
        out = {k: v.to(device) for part in stages for k, v in part.items()}
    return out
