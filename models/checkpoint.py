"""Model weights in the official LTX-2 layout and the diffusers layout, as safetensors.

Our module names are the official ones, so the official layout is our state dict under the
`model.diffusion_model.` prefix; the diffusers layout renames a few path components (the table
below is the whole difference). Loading checks every key and shape and reports all problems at once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import ModelConfig

Layout = Literal["official", "diffusers"]
LAYOUTS = ("official", "diffusers")
OFFICIAL_PREFIX = "model.diffusion_model."
# Text connectors live under the DiT prefix in official files but are not part of the DiT.
_CONNECTOR_PREFIXES = tuple(OFFICIAL_PREFIX + n for n in ("video_embeddings_connector.", "audio_embeddings_connector."))

# Official path component -> diffusers path component (scripts/convert_ltx2_to_diffusers.py in diffusers).
_TO_DIFFUSERS = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
}
_FROM_DIFFUSERS = {v: k for k, v in _TO_DIFFUSERS.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every missing, unexpected and mis-shaped key."""


def _rename(key: str, table: dict[str, str]) -> str:
    return ".".join(table.get(part, part) for part in key.split("."))


def to_layout(state: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Our (official, unprefixed) names -> names in `layout`."""
    if layout == "official":
        return {OFFICIAL_PREFIX + k: v for k, v in state.items()}
    if layout == "diffusers":
        return {_rename(k, _TO_DIFFUSERS): v for k, v in state.items()}
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def detect_layout(keys) -> Layout:
    """Official files carry the `model.diffusion_model.` prefix; diffusers files do not."""
    return "official" if any(k.startswith(OFFICIAL_PREFIX) for k in keys) else "diffusers"


def our_name(key: str, layout: Layout) -> str | None:
    """A file key in `layout` -> our parameter name; None for official keys outside the DiT (VAE, connectors)."""
    if layout == "official":
        if not key.startswith(OFFICIAL_PREFIX) or key.startswith(_CONNECTOR_PREFIXES):
            return None
        return key[len(OFFICIAL_PREFIX):]
    if layout == "diffusers":
        return _rename(key, _FROM_DIFFUSERS)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_layout(state: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Names in `layout` -> our names. Official keys outside the DiT (VAE, connectors) are dropped."""
    renamed = {our_name(k, layout): v for k, v in state.items()}
    renamed.pop(None, None)
    return renamed


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    problems = [f"missing: {k} {expected[k]}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected: {k} {found[k]}" for k in sorted(set(found) - set(expected))]
    problems += [f"shape: {k} is {found[k]}, model has {expected[k]}"
                 for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def check_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raises one CheckpointError naming every missing, unexpected and mis-shaped key."""
    _check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                  {k: tuple(v.shape) for k, v in state.items()}, source)


@functools.lru_cache(maxsize=4)
def whole_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Name and shape of every tensor of the whole single-process model (built on the meta device):
    what a full checkpoint holds, whatever the layout of the model it is loaded into."""
    from .transformer import LTX2AVTransformer
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LTX2AVTransformer(cfg).state_dict().items()}


def load_state(model: nn.Module, state: dict[str, Tensor], layout: Layout | None = None, source: str = "state dict") -> None:
    """Loads a state dict in either layout (detected when `layout` is None) after checking it whole."""
    load_full_state(model, from_layout(state, layout or detect_layout(state.keys())), source)


def config_metadata(cfg: ModelConfig) -> dict[str, str]:
    """safetensors header metadata: the model config, as the official files store theirs under `config`."""
    return {"config": json.dumps({"transformer": dataclasses.asdict(cfg)})}


def read_config(path: str | os.PathLike) -> ModelConfig | None:
    """The ModelConfig stored by `save_model`, or None for files that carry none we can read."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        fields = json.loads(meta["config"])["transformer"]
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})
    except (KeyError, TypeError, ValueError):
        return None


def atomic_save_file(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
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
    params, backend = dict(model.named_parameters()), model.backend
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        layout = layout or detect_layout(keys)
        names = {n: k for k in keys if (n := our_name(k, layout)) is not None}
        _check_shapes(whole_shapes(model.config), {n: tuple(f.get_slice(k).get_shape()) for n, k in names.items()},
                      str(path))
        local = {}
        for name in model.state_dict():
            key = names[name]
            p = params.get(name)
            if p is not None and getattr(p, "tensor_model_parallel", False) and backend.tp_size > 1:
                index = [slice(None)] * p.dim()
                n = p.shape[p.partition_dim]
                index[p.partition_dim] = slice(backend.tp_rank * n, (backend.tp_rank + 1) * n)
                local[name] = f.get_slice(key)[tuple(index)]
            else:
                local[name] = f.get_tensor(key)
    model.load_state_dict(local, strict=True)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, layout: Layout) -> int:
    """Rewrites a checkpoint in `layout` (renaming only); returns the number of tensors written."""
    with safe_open(str(src), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    ours = from_layout(state, detect_layout(state.keys()))
    cfg = read_config(src)
    if cfg is not None:
        meta = {**meta, **config_metadata(cfg)}
    atomic_save_file(to_layout(ours, layout), dst, metadata=meta)
    return len(ours)


def diffusers_config(cfg: ModelConfig) -> dict:
    """Keyword arguments for `diffusers.LTX2VideoTransformer3DModel` describing the same model."""
    if cfg.timestep_embed_dim != 256:
        raise ValueError(f"timestep_embed_dim={cfg.timestep_embed_dim} has no diffusers equivalent (fixed at 256)")
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.video_head_dim, cross_attention_dim=cfg.video_dim,
        vae_scale_factors=cfg.vae_scale_factors, pos_embed_max_pos=int(cfg.rope_max_pos[0]),
        base_height=int(cfg.rope_max_pos[1]), base_width=int(cfg.rope_max_pos[2]),
        audio_in_channels=cfg.audio_in_channels, audio_out_channels=cfg.audio_in_channels,
        audio_num_attention_heads=cfg.num_heads, audio_attention_head_dim=cfg.audio_head_dim,
        audio_cross_attention_dim=cfg.audio_dim, audio_scale_factor=cfg.audio_scale_factor,
        audio_pos_embed_max_pos=int(cfg.audio_rope_max_pos), audio_sampling_rate=cfg.audio_sampling_rate,
        audio_hop_length=cfg.audio_hop_length, num_layers=cfg.num_layers, norm_eps=cfg.norm_eps,
        caption_channels=cfg.caption_channels, rope_theta=cfg.rope_theta, causal_offset=cfg.causal_offset,
        timestep_scale_multiplier=int(cfg.timestep_scale_multiplier),
        cross_attn_timestep_scale_multiplier=int(cfg.av_ca_timestep_scale_multiplier), rope_type="split",
    )


# diffusers config values our model does not implement (LTX-2.3/2.5 features, legacy RoPE): key -> required value.
_DIFFUSERS_REQUIRED = {
    "patch_size": 1, "patch_size_t": 1, "audio_patch_size": 1, "audio_patch_size_t": 1, "gated_attn": False,
    "cross_attn_mod": False, "audio_gated_attn": False, "audio_cross_attn_mod": False, "rope_type": "split",
    "activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False,
    "attention_bias": True, "attention_out_bias": True, "use_prompt_embeddings": True, "rope_double_precision": True,
    "ff_bias": True, "audio_ff_bias": True, "use_keyframes_abs_pos_embedding": False, "perturbed_attn": False,
}


def config_from_diffusers(dcfg) -> ModelConfig:
    """The ModelConfig of a diffusers LTX-2 transformer config; unsupported variants fail naming the key."""
    for key, want in _DIFFUSERS_REQUIRED.items():
        if key in dcfg and dcfg[key] != want:
            raise ValueError(f"diffusers config {key}={dcfg[key]!r} is not supported (need {want!r})")
    if dcfg["num_attention_heads"] != dcfg["audio_num_attention_heads"]:
        raise ValueError("diffusers config: num_attention_heads must equal audio_num_attention_heads")
    cfg = ModelConfig(
        num_layers=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
        video_head_dim=dcfg["attention_head_dim"], audio_head_dim=dcfg["audio_attention_head_dim"],
        in_channels=dcfg["in_channels"], audio_in_channels=dcfg["audio_in_channels"],
        caption_channels=dcfg["caption_channels"], norm_eps=dcfg["norm_eps"], rope_theta=dcfg["rope_theta"],
        rope_max_pos=(float(dcfg["pos_embed_max_pos"]), float(dcfg["base_height"]), float(dcfg["base_width"])),
        audio_rope_max_pos=float(dcfg["audio_pos_embed_max_pos"]), vae_scale_factors=tuple(dcfg["vae_scale_factors"]),
        audio_scale_factor=dcfg["audio_scale_factor"], audio_sampling_rate=dcfg["audio_sampling_rate"],
        audio_hop_length=dcfg["audio_hop_length"], causal_offset=dcfg["causal_offset"],
        timestep_scale_multiplier=float(dcfg["timestep_scale_multiplier"]),
        av_ca_timestep_scale_multiplier=float(dcfg["cross_attn_timestep_scale_multiplier"]),
    )
    for key, ours in (("cross_attention_dim", cfg.video_dim), ("audio_cross_attention_dim", cfg.audio_dim)):
        if dcfg[key] != ours:
            raise ValueError(f"diffusers config {key}={dcfg[key]} must equal the stream width {ours}")
    for key, ours in (("out_channels", cfg.in_channels), ("audio_out_channels", cfg.audio_in_channels)):
        if dcfg.get(key) not in (None, ours):
            raise ValueError(f"diffusers config {key}={dcfg[key]} must equal the input channels {ours}")
    return cfg


def _shard(t: Tensor, param: Tensor, rank: int, world: int) -> Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return t
    return t.chunk(world, dim=param.partition_dim)[rank]


def load_full_state(model: nn.Module, state: dict[str, Tensor], source: str = "full state dict") -> None:
    """Loads a single-process state dict (our names) into a model of any layout: a pipeline stage
    takes its own tensors, and under tensor parallelism each rank keeps its slice of every split
    parameter (megatron marks them with `tensor_model_parallel` and `partition_dim`). Makes
    initialisation independent of the layout."""
    _check_shapes(whole_shapes(model.config), {k: tuple(v.shape) for k, v in state.items()}, source)
    backend, params = model.backend, dict(model.named_parameters())
    local = {k: _shard(state[k], params[k], backend.tp_rank, backend.tp_size) if k in params else state[k]
             for k in model.state_dict()}
    model.load_state_dict(local, strict=True)


def gather_full_state(model: nn.Module) -> dict[str, Tensor]:
    """The single-process state dict of a model of any layout (collective: every rank gets all of it)."""
    backend = model.backend
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False) and backend.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(backend.tp_size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=backend.group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t
    stage = model.stage
    if stage.count > 1:
        stages: list[dict[str, Tensor] | None] = [None] * stage.count
        torch.distributed.all_gather_object(stages, {k: v.detach().cpu() for k, v in out.items()}, group=stage.group)
        device = next(iter(out.values())).device
        out = {k: v.to(device) for part in stages for k, v in part.items()}
    return out
