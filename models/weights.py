"""Model weights as safetensors: save, load (checked whole, each rank reading only its share),
convert between layouts, and the full (single-process) state of a model of any parallel layout.

A weights source is a safetensors file in either key layout (ours, or the official single file with its
VAEs, vocoder and text connectors beside the DiT), or a diffusers folder (a pipeline folder with
`transformer/`, or a transformer folder itself; one weights file or shards with an index); `weights_source`
resolves it to its files, their layout and the ModelConfig the weights carry. Loading checks every key
and shape and reports all problems at once (models.errors.CheckpointError).
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
from .layouts import (
    Layout,
    config_from_diffusers,
    config_from_official,
    detect_layout,
    from_layout,
    official_config,
    our_name,
    to_layout,
)
from .sharding import Sharding
from .stage import Stage


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


def shape_problems(expected: dict[str, tuple], found: dict[str, tuple], prefix: str = "") -> list[str]:
    """One line per missing, unexpected and mis-shaped key of `found` against `expected` (name -> shape)."""
    problems = [f"{prefix}missing: {k} {expected[k]}" for k in sorted(set(expected) - set(found))]
    problems += [f"{prefix}unexpected: {k} {found[k]}" for k in sorted(set(found) - set(expected))]
    problems += [
        f"{prefix}shape: {k} is {found[k]}, expected {expected[k]}"
        for k in sorted(set(found) & set(expected))
        if found[k] != expected[k]
    ]
    return problems


def raise_problems(source: str, problems: list[str], what: str = "the model") -> None:
    """Raises one CheckpointError listing `problems` (the first MAX_LISTED_PROBLEMS), if there are any."""
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise CheckpointError(
            f"{source} does not fit {what} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )


def _check_shapes(
    expected: dict[str, tuple], found: dict[str, tuple], source: str, problems: list[str] | None = None
) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key (after `problems`
    already found, such as keys held twice)."""
    raise_problems(source, [*(problems or []), *shape_problems(expected, found)])


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
    """safetensors header metadata: the model config under `config`, in the official names (layouts.official_config),
    so ltx-core builds the same DiT from our exports as from a release file."""
    return {"config": json.dumps({"transformer": official_config(cfg)})}


def _header_config(meta: dict[str, str], source: str) -> ModelConfig | None:
    """The ModelConfig in a safetensors header's `config` (official names, or the dataclass field names that
    versions before the official header wrote); None when the header carries no DiT config."""
    if "config" not in meta:
        return None
    try:
        section = json.loads(meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{source}: the header's config is not JSON ({e})") from e
    fields = section.get("transformer") if isinstance(section, dict) else None
    if not isinstance(fields, dict):
        return None
    try:
        if "num_heads" in fields:  # our field names: no official key is called so
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})
        return config_from_official(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot use the config in its header: {e}") from e


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
DIFFUSERS_CLASS = "LTX2VideoTransformer3DModel"


def _diffusers_config(path: Path) -> ModelConfig:
    """The ModelConfig of a diffusers transformer config.json; a config of another model, or of an LTX-2
    variant we do not implement, fails naming the file and the key."""
    try:
        dcfg = json.loads(path.read_text())
        if dcfg.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise ValueError(f"_class_name is {dcfg['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
        return config_from_diffusers(dcfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]!r} entry (not an LTX-2 transformer config)") from e
    except (AttributeError, TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot use this diffusers config: {e}") from e


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """A resolved weights source: the safetensors files holding the DiT, their key layout, and the
    ModelConfig the weights carry (None: they carry none, the caller picks the shape)."""

    path: str  # as given, for messages
    files: tuple[Path, ...]
    layout: Layout
    config: ModelConfig | None


def _diffusers_folder(path: Path) -> WeightsSource:
    """A diffusers transformer folder (config.json beside the weights) or a pipeline folder holding one as
    `transformer/`; the weights are one file, or shards listed by the index's weight_map."""
    folder = path if (path / "config.json").is_file() else path / "transformer"
    single, index = folder / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_INDEX
    if not (folder / "config.json").is_file() or not (single.is_file() or index.is_file()):
        raise CheckpointError(
            f"{path} is not a diffusers LTX-2 folder: expected a pipeline folder with transformer/config.json and "
            f"transformer/{DIFFUSERS_WEIGHTS} (or shards listed in transformer/{DIFFUSERS_INDEX}), or a transformer "
            f"folder with config.json and {DIFFUSERS_WEIGHTS} (or {DIFFUSERS_INDEX})"
        )
    if single.is_file():
        files = (single,)
    else:
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no readable weight_map: {e})") from e
        files = tuple(folder / n for n in names)
        absent = [n for n, f in zip(names, files) if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that are not in {folder}: {', '.join(absent)}")
    return WeightsSource(str(path), files, "diffusers", _diffusers_config(folder / "config.json"))


def weights_source(path: str | os.PathLike) -> WeightsSource:
    """Resolves a weights file or diffusers folder; reads headers and configs only.

    A file's config is its header's; a diffusers weights file without one (`diffusion_pytorch_model*`)
    takes the config.json beside it, as the folder would."""
    path = Path(path)
    if path.is_dir():
        return _diffusers_folder(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder (expected a safetensors file, or a diffusers LTX-2 pipeline or "
            f"transformer folder)"
        )
    with open_safetensors(path) as f:
        layout, meta = detect_layout(f.keys()), f.metadata() or {}
    config = _header_config(meta, str(path))
    beside = path.parent / "config.json"
    if (
        config is None
        and layout == "diffusers"
        and path.name.startswith("diffusion_pytorch_model")
        and beside.is_file()
    ):
        config = _diffusers_config(beside)
    return WeightsSource(str(path), (path,), layout, config)


def read_config(path: str | os.PathLike) -> ModelConfig | None:
    """The ModelConfig a weights file or diffusers folder carries, or None when it carries none."""
    return weights_source(path).config


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
    """Loads a weights file or diffusers folder (`weights_source`; `layout` overrides the detected one)
    after checking every key and shape; keys outside the DiT (official VAEs, connectors) are skipped.

    Reads only this rank's pipeline stage and its slice of each tensor-parallel tensor (safetensors
    slices, file by file for shards), so a rank never holds more of the model than its share."""
    source = weights_source(path)
    layout = layout or source.layout
    params, sharding = dict(model.named_parameters()), model.sharding
    with contextlib.ExitStack() as stack:
        where, twice = {}, []  # our name -> (open file, its key there)
        for file in source.files:
            f = stack.enter_context(open_safetensors(file))
            for key in f.keys():
                if (name := our_name(key, layout)) is not None:
                    if name in where:
                        twice.append(f"held twice: {key} (in {file.name})")
                    where[name] = (f, key)
        found = {n: tuple(f.get_slice(k).get_shape()) for n, (f, k) in where.items()}
        _check_shapes(whole_shapes(model.config), found, source.path, twice)
        local = {}
        for name in model.state_dict():
            f, key = where[name]
            p = params.get(name)
            local[name] = f.get_slice(key)[sharding.weight_slice(p)] if sharding.is_split(p) else f.get_tensor(key)
    check_finite(local, source.path)
    model.load_state_dict(local, strict=True)


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, layout: Layout, dtype: torch.dtype | None = None
) -> int:
    """Rewrites the DiT of a weights file or diffusers folder as one file in `layout` (renaming only, and
    floating-point tensors cast to `dtype` if given; keys outside the DiT are dropped); returns the number
    of tensors written."""
    source = weights_source(src)
    state, meta = {}, {}
    for file in source.files:
        with open_safetensors(file) as f:
            state.update(from_layout({k: f.get_tensor(k) for k in f.keys()}, source.layout))
            if len(source.files) == 1:
                meta = f.metadata() or {}
    if source.config is not None:
        meta = {**meta, **config_metadata(source.config)}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_file(to_layout(state, layout), dst, metadata=meta)
    return len(state)


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
    return gather_whole(model.state_dict(keep_vars=True), model.sharding, model.stage)


def gather_whole(tensors: dict[str, Tensor], sharding: Sharding, stage: Stage) -> dict[str, Tensor]:
    """This rank's `tensors` (parameters carry megatron's split attributes) as the single process holds them:
    split ones gathered over the tensor-parallel group, and every pipeline stage's entries joined
    (collective over both: every rank gets all of it)."""
    out = {
        name: sharding.gather_weight(t.detach(), t) if sharding.is_split(t) else t.detach()
        for name, t in tensors.items()
    }
    if stage.count > 1:
        stages: list[dict[str, Tensor] | None] = [None] * stage.count
        torch.distributed.all_gather_object(stages, {k: v.cpu() for k, v in out.items()}, group=stage.group)
        device = next(iter(tensors.values())).device
        out = {k: v.to(device) for part in stages for k, v in part.items()}
    return out
