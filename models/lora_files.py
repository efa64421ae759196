"""LoRA files: export and import of models.lora's adapters in the formats LTX-2 LoRAs are published in.

The interoperable file (`export_lora`, `save_lora_file`) holds, per adapted layer,
`diffusion_model.<official module name>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank) with
alpha / rank folded into B, so every reader applies W + B @ A (scale 1): ltx-core's fuse_loras, ltx-trainer,
ComfyUI, and diffusers' `LTX2Pipeline.load_lora_weights` (which refuses `.alpha` keys and reads alpha only from
its own header key, so none is written).

Reading (`read_lora_file`) accepts that format and the ones LTX-2 LoRAs are published in; the result is in our
names with the *effective* update folded into B (delta W = B @ A, scale 1), whatever scale the file implied;
`load_lora_file` then divides B by the model's alpha / rank, so the adapted layer adds exactly the file's delta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layouts import our_name, to_layout
from .lora import BLOCKS, load_lora_state_dict, lora_layers, lora_named_parameters, lora_state_dict, stage_share
from .sharding import Sharding
from .weights import atomic_save_file, check_finite, open_safetensors, raise_problems, shape_problems

if TYPE_CHECKING:
    from .transformer import LTX2AVTransformer

LORA_FILE_PREFIX = "diffusion_model."  # official module names (ltx-trainer, ComfyUI, ltx-core)
_DIFFUSERS_LORA_PREFIX = "transformer."  # diffusers module names (`save_lora_weights`)
_KOHYA_PREFIX = "lora_unet_"  # kohya: module path with dots as underscores
_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B"}
_ALPHA_SUFFIX = ".alpha"


def export_lora(
    model: LTX2AVTransformer, adapter: str = "default", dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Set `adapter` as the interoperable LoRA file content (`lora_file_tensors`), whole tensors: tensor-parallel
    slices gathered (a collective over the tensor-parallel group; a pipeline stage gives its own layers)."""
    return lora_file_tensors(lora_state_dict(model, adapter, whole=True), _scale(model), dtype)


def lora_file_tensors(state: dict[str, Tensor], scale: float, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Whole adapters in our names (`lora_state_dict`'s `<layer>.lora_A/B.weight`, trained at `scale` = alpha /
    rank) as the interoperable file: `diffusion_model.<official module name>.lora_A.weight` (rank, in) and
    `.lora_B.weight` (out, rank) with the scale folded into B, so that every reader's W + B @ A is our update, in
    `dtype` (fp32, the adapters' training precision, by default); no alpha keys. Folding happens in fp32, before
    any cast."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        folded = t.float() * scale if key.endswith(".lora_B.weight") else t.float()
        out[f"{LORA_FILE_PREFIX}{key}"] = folded.to(dtype).contiguous()
    return out


def _scale(model: LTX2AVTransformer) -> float:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    return next(iter(layers.values())).scale


def _targets_summary(names: Sequence[str]) -> list[str]:
    """The adapted layers' paths inside their blocks (or full paths outside the blocks), deduplicated: a short,
    human-readable record of the targets for a file's header."""
    seen: dict[str, None] = {}
    for name in names:
        inside = name.split(".", 2)[2] if name.startswith(BLOCKS) and name.count(".") >= 2 else name
        seen.setdefault(inside, None)
    return list(seen)


def save_lora_file(
    model: LTX2AVTransformer, path: str | os.PathLike, adapter: str = "default", dtype: torch.dtype | None = None
) -> None:
    """Writes set `adapter` as an interoperable LoRA file (`write_lora_file`). Collective over the tensor-parallel
    group: every rank must call it (each writes the same file; call it on one data/pipeline rank set, or give each
    rank its own path)."""
    scale = _scale(model)
    write_lora_file(lora_state_dict(model, adapter, whole=True), scale, path, dtype, adapter)


def write_lora_file(
    state: dict[str, Tensor],
    scale: float,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    adapter: str = "default",
) -> None:
    """Writes `lora_file_tensors(state, scale, dtype)` (fp32 without `dtype`) as a safetensors file, atomically
    (models.weights.atomic_save_file). The header's `omninft_lora` (JSON: rank, alpha, scale folded into B, targets,
    layer count) is for humans only; readers need nothing but the tensors."""
    layers = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    rank = int(state[f"{layers[0]}.lora_A.weight"].shape[0])
    info = {
        "format": "diffusion_model.<official module>.lora_A/B.weight, alpha/rank folded into lora_B (scale 1)",
        "adapter": adapter,
        "rank": rank,
        "alpha": scale * rank,
        "scale_folded_into_B": scale,
        "layers": len(layers),
        "targets": _targets_summary(layers),
    }
    tensors = lora_file_tensors(state, scale, torch.float32 if dtype is None else dtype)
    atomic_save_file(tensors, path, metadata={"format": "pt", "omninft_lora": json.dumps(info)})


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """A LoRA file key -> (prefix family, module path as written, suffix family, part) with part "A", "B" or
    "alpha"; None for a key no format we read has."""
    endings = [(suffix, "lora_A/lora_B", part) for suffix, part in _PEFT_SUFFIXES.items()]
    endings += [(suffix, "lora_down/lora_up", part) for suffix, part in _KOHYA_SUFFIXES.items()]
    endings.append((_ALPHA_SUFFIX, "alpha", "alpha"))
    match = next(((suffix, kind, part) for suffix, kind, part in endings if key.endswith(suffix)), None)
    if match is None:
        return None
    suffix, kind, part = match
    module = key[: -len(suffix)]
    if module.startswith(_KOHYA_PREFIX) and "." not in module:
        return "lora_unet_ (underscores)", module[len(_KOHYA_PREFIX) :], kind, part
    for prefix, family in ((LORA_FILE_PREFIX, "diffusion_model."), (_DIFFUSERS_LORA_PREFIX, "transformer.")):
        if module.startswith(prefix):
            return family, module[len(prefix) :], kind, part
    if module and "." in module:
        return "unprefixed", module, kind, part
    return None


def read_lora_file(path: str | os.PathLike, modules: Sequence[str] | None = None) -> dict[str, Tensor]:
    """A LoRA safetensors file in our names: `<module path>.lora_A.weight` (rank, in) and `.lora_B.weight`
    (out, rank), fp32, with the file's effective scale folded into B, so that the file's weight update is
    delta W = B @ A (scale 1). To apply it under a model's scale alpha / rank, divide B by that scale
    (`load_lora_file` does).

    Formats read (one per file):
    - `diffusion_model.<official module name>.lora_A.weight` / `.lora_B.weight` (ours, ltx-trainer, ComfyUI):
      scale 1;
    - `transformer.<diffusers module name>.lora_A/B.weight` (diffusers' `save_lora_weights`; top-level modules
      renamed to ours with models.layouts): scale 1 (the alpha of diffusers' own header key is not read);
    - kohya/ComfyUI `<prefix><module>.lora_down.weight` / `.lora_up.weight` with an optional `.alpha` scalar
      per module: scale alpha / rank (1 without alpha). The prefix is `diffusion_model.` (official names) or
      `transformer.` (diffusers names), or kohya's `lora_unet_` with the module path's dots as underscores,
      resolved against `modules` (the model's module paths, which must then be given);
    - our unprefixed names (`lora_state_dict`'s) with lora_A/B: scale 1.
    An `.alpha` scalar beside lora_A/B is honoured the same way. Every key that fits none of these, a module
    the underscore form cannot resolve, incomplete or inconsistent modules, mixed formats, and non-finite values
    are reported together in one CheckpointError."""

    source = str(path)
    with open_safetensors(path) as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    problems: list[str] = []
    underscored: dict[str, str] = {}
    if modules is not None:
        for name in modules:  # our names and their diffusers spellings, dots as underscores
            for spelled in (name, _rename_to_diffusers(name)):
                underscored.setdefault(spelled.replace(".", "_"), name)
    parts: dict[str, dict[str, Tensor]] = {}
    prefixes: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for key, tensor in raw.items():
        split = _split_key(key)
        if split is None:
            problems.append(f"not a LoRA key: {key} {tuple(tensor.shape)}")
            continue
        family, written, kind, part = split
        prefixes.setdefault(family, key)
        if kind != "alpha":
            kinds.setdefault(kind, key)
        if family == "transformer.":
            module = our_name(written, "diffusers")
        elif family == "lora_unet_ (underscores)":
            if modules is None:
                problems.append(f"kohya key {key} needs the model's module names to be resolved")
                continue
            module = underscored.get(written)
            if module is None:
                problems.append(f"no module of the model is named {written!r} (key {key})")
                continue
        else:
            module = written
        if part in parts.setdefault(module, {}):
            problems.append(f"held twice: {module} {part} (key {key})")
        parts[module][part] = tensor
    if len(prefixes) > 1:
        problems.append("mixed formats: " + ", ".join(f"{fam} ({key})" for fam, key in prefixes.items()))
    if len(kinds) > 1:
        problems.append("mixed formats: " + ", ".join(f"{kind} ({key})" for kind, key in kinds.items()))
    out: dict[str, Tensor] = {}
    for module, got in parts.items():
        a, b, alpha = got.get("A"), got.get("B"), got.get("alpha")
        if a is None or b is None:
            have = ", ".join(sorted(got))
            problems.append(f"incomplete: {module} has {have} but needs both down/A and up/B")
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"rank: {module} lora_A/down is {tuple(a.shape)}, lora_B/up {tuple(b.shape)}")
            continue
        scale = 1.0
        if alpha is not None:
            if alpha.numel() != 1:
                problems.append(f"alpha: {module}.alpha is {tuple(alpha.shape)}, expected a scalar")
                continue
            scale = float(alpha.float().item()) / a.shape[0]
        out[f"{module}.lora_A.weight"] = a.float()
        out[f"{module}.lora_B.weight"] = b.float() * scale
    raise_problems(source, problems, what="any LoRA format read here")
    check_finite(out, source)
    return out


def _rename_to_diffusers(name: str) -> str:

    return next(iter(to_layout({name: torch.empty(0)}, "diffusers")))


def load_lora_file(model: LTX2AVTransformer, path: str | os.PathLike, adapter: str = "default") -> None:
    """Loads a LoRA file (any format `read_lora_file` reads) into set `adapter` of an adapted model: B is divided
    by each layer's alpha / rank, so the layer adds exactly the file's B @ A. The file must hold exactly the
    model's adapted layers (a pipeline stage: its own) at the model's rank: every layer the file has and the
    model lacks, every adapted layer the file lacks, each rank mismatch (named as such) and each shape mismatch
    are reported together in one CheckpointError. Each tensor-parallel rank keeps its slice."""

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to load a LoRA file into")
    source = str(path)
    state = stage_share(model, read_lora_file(path, [name for name, _ in model.named_modules()]))
    sharding: Sharding = model.sharding
    params = lora_named_parameters(model, adapter)
    expected: dict[str, tuple] = {}
    for k, p in params.items():  # whole shapes: a split tensor is tp slices along its split dim
        shape = tuple(p.shape)
        if sharding.is_split(p):
            dim = p.partition_dim
            shape = shape[:dim] + (shape[dim] * sharding.tp_size,) + shape[dim + 1 :]
        expected[k] = shape
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems: list[str] = []
    for name in layers:
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if a_key in found and found[a_key][0] != expected[a_key][0]:
            problems.append(
                f"rank: {name} has rank {found[a_key][0]} in the file, the model's adapter {expected[a_key][0]}"
            )
            del found[a_key], found[b_key]
            expected.pop(a_key), expected.pop(b_key)
    problems += shape_problems(expected, found)
    raise_problems(source, problems)
    with torch.no_grad():
        for name, layer in layers.items():
            state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"] / layer.scale
    load_lora_state_dict(model, state, adapter, whole=True, source=source)
