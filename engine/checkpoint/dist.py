"""Distributed training checkpoints that reshard: megatron-core dist_checkpointing, torch_dist format.

Every tensor (model, old model, AdamW moments and step) is a megatron `ShardedTensor` keyed by its
name in the single-process model, with this rank's slice placed by tensor-parallel offsets. Each rank
writes only the shards it owns (replica ids elect one writer per shard) and on load reads only the
slice its own layout needs, so a checkpoint written at one tp x dp resumes at any other, exactly:
the next iteration equals the one the saving run would have taken. Noise in the engine comes from
seeded generators keyed by (seed, iteration, ...), so no per-rank RNG state is stored.

The directory is built under a temporary name beside the target and renamed once every rank has
written (engine.checkpoint.atomic), so a crash leaves either no checkpoint or a whole one at `path`.
Every failure to read one is a CheckpointError naming the directory.

Saving and loading are collectives over torch.distributed (megatron exchanges shard metadata), so
even a one-process run needs a process group. On hosts without CUDA, megatron's save calls
`torch.cuda.synchronize()` (tests/dist/megatron_cpu_shim.py maps it to a no-op); loading does not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from torch import Tensor, nn

import models
from models.config import ModelConfig
from models.lora import AdapterView
from models.weights import check_finite, check_state

from ..errors import CheckpointError, one_line
from ..optim import MAIN, MOMENTS, DistributedAdamW
from ..policy import policy_state
from .atomic import atomic_directory
from .state import TrainState

MODELS = ("model", "old_model")
# torch DCP reports read failures as a BaseException subclass, which `except Exception` would miss.
READ_ERRORS = (Exception, dcp.CheckpointException)


def _sharded(key: str, tensor: Tensor, param: Tensor | None, sharding: models.Sharding, dp_rank: int) -> ShardedTensor:
    """A split parameter's slice sits at offset tp_rank along its partition dim and is written by
    dp rank 0; a replicated tensor is written by tp rank 0 of dp rank 0."""
    tp_rank = sharding.tp_rank
    if param is not None and getattr(param, "tensor_model_parallel", False):
        return ShardedTensor.from_rank_offsets(
            key, tensor, (param.partition_dim, tp_rank, sharding.tp_size), replica_id=(0, 0, dp_rank)
        )
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(0, tp_rank, dp_rank))


def _model_state(prefix: str, policy: nn.Module | AdapterView, dp_rank: int) -> dict[str, ShardedTensor]:
    """The policy's `policy_state` (whole models, or LoRA adapter sets) as ShardedTensors under `prefix`."""
    return {
        name: _sharded(f"{prefix}.{name}", t.detach(), t, policy.sharding, dp_rank)
        for name, t in policy_state(policy).items()
    }


def _adamw_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | DistributedAdamW, loading: bool, with_main: bool
) -> tuple[dict, list[dict]]:
    """{name: {exp_avg, exp_avg_sq[, main_param], step}} of this rank's parameters (whole, or this
    tensor-parallel rank's slice) and the param groups' hyper-parameters. A parameter not stepped
    yet gets zero moments and step 0, which is exactly what AdamW would initialise on its first step.
    Only the distributed optimizer on bf16/fp16 parameters has fp32 main copies to store."""
    if isinstance(optimizer, DistributedAdamW):
        state = optimizer.load_targets(with_main) if loading else optimizer.full_state()
        return state, [optimizer.hyper_parameters]
    names, out, groups = {id(p): n for n, p in model.named_parameters()}, {}, []
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("distributed checkpoints store AdamW without amsgrad (no max_exp_avg_sq)")
        # Hyper-parameters only: the parameters a group holds depend on the pipeline stage, and rank 0's
        # copy of this common (non-sharded) entry is the one stored. Per-parameter state is keyed by name.
        groups.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out[names[id(p)]] = {
                **{k: state.get(k, torch.zeros_like(p)).detach() for k in MOMENTS},
                "step": state.get("step", torch.tensor(0.0)),
            }
    return out, groups


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | DistributedAdamW, dp_rank: int, loading: bool, with_main: bool
) -> dict:
    """AdamW state as ShardedTensors keyed by parameter name, in the same form whichever optimizer
    (sharded over data-parallel ranks or not) holds it."""
    params = dict(model.named_parameters())
    state, groups = _adamw_state(model, optimizer, loading, with_main)
    out: dict = {k: {} for k in (*MOMENTS, "step")}
    for name, entry in state.items():
        for k in (k for k in (*MOMENTS, MAIN) if k in entry):
            out.setdefault(k, {})[name] = _sharded(
                f"optimizer.{k}.{name}", entry[k], params[name], model.sharding, dp_rank
            )
        out["step"][name] = _sharded(f"optimizer.step.{name}", entry["step"].reshape(1), None, model.sharding, dp_rank)
    out["param_groups"] = groups
    return out


def sharded_state(
    model: nn.Module,
    old_model: nn.Module,
    optimizer: torch.optim.Optimizer | DistributedAdamW,
    dp_rank: int,
    loading: bool = False,
    with_main: bool = False,
) -> dict:
    """This rank's megatron ShardedStateDict of both models and the AdamW state (tensors and the
    hyper-parameters of each param group); `loading` builds the buffers a load fills (`with_main`:
    the checkpoint has main copies)."""
    return {
        "model": _model_state("model", model, dp_rank),
        "old_model": _model_state("old_model", old_model, dp_rank),
        "optimizer": _optimizer_state(model, optimizer, dp_rank, loading, with_main),
    }


def _require_process_group(path: Path) -> None:
    if not dist.is_initialized():
        raise CheckpointError(
            f"{path} is a distributed checkpoint: it needs torch.distributed initialised (run "
            f"under torchrun, also with one process: torchrun --nproc-per-node 1 -m engine.train)"
        )


def save(
    path: str | Path,
    model: nn.Module,
    old_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: dict,
    dp_rank: int,
) -> Path:
    """Collective (every rank calls it, with the same `state` and `config`): writes the directory `path`."""
    path = Path(path)
    _require_process_group(path)
    with atomic_directory(path) as tmp:
        sd = sharded_state(model, old_model, optimizer, dp_rank)
        # The DiT shape beside the run config: it may come from model.init's own config, not the preset.
        sd.update(**dataclasses.asdict(state), config=config, model_config=dataclasses.asdict(model.config))
        dist_checkpointing.save(sd, str(tmp))
    return path


def _check_is_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no distributed checkpoint there (no such directory)")
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise CheckpointError(f"{path} is not a complete distributed checkpoint (no metadata.json)")


def load(
    path: str | Path, model: nn.Module, old_model: nn.Module, optimizer: torch.optim.Optimizer, dp_rank: int
) -> tuple[TrainState, dict]:
    """Collective: restores this rank's share of both models and of the AdamW state (any saving
    layout); returns the counters and the run config stored with them. Tensors are read in place,
    so after a failed load the models are partly overwritten."""
    path = Path(path)
    _require_process_group(path)
    _check_is_checkpoint(path)
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
        with_main = any(k.startswith(f"optimizer.{MAIN}.") for k in saved)
        loaded = dist_checkpointing.load(
            sharded_state(model, old_model, optimizer, dp_rank, loading=True, with_main=with_main), str(path)
        )
    except READ_ERRORS as e:
        raise CheckpointError(f"{path}: cannot load the distributed checkpoint: {one_line(e)}") from e
    with torch.no_grad():
        for key, m in zip(MODELS, (model, old_model)):
            check_finite(loaded[key], f"{path} ({key})")
            for name, t in policy_state(m).items():  # the keys sharded_state asked for
                t.copy_(loaded[key][name])
    opt, sharded = loaded["optimizer"], isinstance(optimizer, DistributedAdamW)
    groups = 1 if sharded else len(optimizer.param_groups)
    if len(opt["param_groups"]) != groups:
        raise CheckpointError(
            f"{path}: the checkpoint has {len(opt['param_groups'])} optimizer parameter groups, this optimizer {groups}"
        )
    kept = [k for k in (*MOMENTS, MAIN) if k in opt]
    state = {name: {"step": opt["step"][name].reshape(()), **{k: opt[k][name] for k in kept}} for name in opt["step"]}
    if sharded:
        optimizer.set_hyper_parameters(opt["param_groups"][0])
        optimizer.load_full_state(state)
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        for group, saved in zip(optimizer.param_groups, opt["param_groups"]):
            group.update(saved)
            for p in group["params"]:
                optimizer.state[p] = state[names[id(p)]]
    return TrainState.from_saved(loaded), loaded["config"]


def holds_adapters(path: str | Path) -> bool:
    """A checkpoint of a LoRA run (adapter sets, no base weights)."""
    _check_is_checkpoint(Path(path))
    return any(".lora_A." in k for k in dist_checkpointing.load_tensors_metadata(str(path)))


def read_run_config(path: str | Path) -> dict:
    """The run config stored with the checkpoint (no process group needed)."""
    return _common_state(path)["config"]


def read_model_config(path: str | Path) -> ModelConfig:
    """The DiT shape of the checkpoint (no process group needed). Checkpoints written before it was
    stored come from runs that always built `model.preset`, so their run config's preset is their shape."""
    common = _common_state(path)
    if "model_config" in common:
        return models.ModelConfig(**common["model_config"])
    return models.PRESETS[common["config"]["model"]["preset"]]


def _common_state(path: str | Path) -> dict:
    """The checkpoint's non-tensor entries: counters, run config, model config."""
    path = Path(path)
    _check_is_checkpoint(path)
    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except READ_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read the run config: {one_line(e)}") from e


def read_tensors(path: str | Path, prefix: str, model_config: ModelConfig | None = None) -> dict[str, Tensor]:
    """The whole tensors stored under `prefix` ("model": the trained policy, whole model or LoRA set;
    "old_model"), in our names, checked against the DiT shape `model_config` when given (whole models).

    Runs in a plain process: megatron's own full-tensor loader needs a process group, so the
    torch_dist files (torch DCP underneath) are read whole with `dcp.load(no_dist=True)`."""
    path = Path(path)
    _check_is_checkpoint(path)
    meta = dist_checkpointing.load_tensors_metadata(str(path))
    head = prefix + "."
    state = {k[len(head) :]: torch.empty(t.global_shape, dtype=t.dtype) for k, t in meta.items() if k.startswith(head)}
    if model_config is not None:
        check_state(models.build_model(model_config, device="meta"), state, str(path))
    try:
        dcp.load({head + k: v for k, v in state.items()}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    except READ_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read the {prefix} tensors: {one_line(e)}") from e
    return state
