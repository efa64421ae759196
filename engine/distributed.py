"""The process layout of a run and the collectives that make its result independent of it.

Under torchrun the world is tp x pp x dp. Tensor-parallel ranks share each layer (models.megatron);
pipeline stages hold contiguous runs of blocks (models.stage, engine.pipeline); data-parallel ranks
split every global mini-batch of samples, so the optimizer takes the same steps
on the same samples as one process would. Rollout and training noise are keyed by (seed, iteration,
prompt, sample), rewards are gathered before the group advantages, gradients are averaged: the
same seed gives the same iteration for any layout.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from models import Stage

from .config import Config, ConfigError


@dataclass
class ParallelContext:
    """One process holding everything unless built by `init_parallel`."""
    tp: int = 1
    dp: int = 1
    dp_rank: int = 0
    rank: int = 0
    dp_group: object | None = field(default=None, repr=False)
    pp: int = 1
    pp_rank: int = 0
    pp_group: object | None = field(default=None, repr=False)
    pp_last_rank: int = 0  # global rank of this pipeline's last stage
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage(self) -> Stage:
        """The pipeline stage this rank builds (its blocks follow from the model's depth)."""
        return Stage(index=self.pp_rank, count=self.pp, group=self.pp_group)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def local_indices(self, n: int, batch_size: int) -> list[list[int]]:
        """This rank's samples, one list per global mini-batch (the optimizer step they feed)."""
        if self.dp > 1 and (batch_size % self.dp or n % batch_size):
            raise ConfigError(f"with {self.dp} data-parallel ranks, train.batch_size ({batch_size}) must be a "
                              f"multiple of {self.dp} and divide the {n} samples of an iteration")
        per = batch_size // self.dp if self.dp > 1 else batch_size
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return [b[self.dp_rank * per:(self.dp_rank + 1) * per] if self.dp > 1 else b for b in batches]

    def gather_samples(self, local: Tensor, indices: list[int], n: int) -> Tensor:
        """Per-sample values of this rank's samples -> the values of all n samples, on every rank."""
        if self.dp == 1:
            return local
        idx = torch.tensor(indices, device=local.device)
        parts_v = [torch.empty_like(local) for _ in range(self.dp)]
        parts_i = [torch.empty_like(idx) for _ in range(self.dp)]
        dist.all_gather(parts_v, local.contiguous(), group=self.dp_group)
        dist.all_gather(parts_i, idx, group=self.dp_group)
        out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        out[torch.cat(parts_i)] = torch.cat(parts_v)
        return out

    def from_last_stage(self, values: list[float]) -> list[float]:
        """Values computed on the last pipeline stage (the loss), on every stage."""
        if self.pp == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=self.pp_last_rank, group=self.pp_group)
        return t.tolist()

    def sum_over_stages(self, x: Tensor) -> Tensor:
        """Sum of per-stage partial values (each stage sees only its own blocks)."""
        if self.pp == 1:
            return x
        x = x.clone()
        dist.all_reduce(x, group=self.pp_group)
        return x

    def _over_dp(self, value: float, op: dist.ReduceOp) -> float:
        if self.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.dp_group)
        return float(t)

    def max(self, value: float) -> float:
        """Largest per-rank scalar over data-parallel ranks (for logging)."""
        return self._over_dp(value, dist.ReduceOp.MAX)

    def mean(self, value: float) -> float:
        """Mean of a per-rank scalar over data-parallel ranks (for logging)."""
        return self._over_dp(value, dist.ReduceOp.SUM) / self.dp


def init_parallel(cfg: Config) -> ParallelContext:
    """Process groups from the torchrun environment (gloo on CPU, NCCL on GPU) and megatron's
    parallel state; a plain `python` run (no WORLD_SIZE) stays single-process."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    megatron_layers = cfg.model.backend in ("megatron", "te")
    if "WORLD_SIZE" not in os.environ:
        if tp * pp > 1:
            raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} needs torchrun "
                              f"(e.g. torchrun --nproc-per-node {tp * pp} -m engine.train)")
        if megatron_layers or cfg.parallel.distributed_optimizer:
            what = "parallel.distributed_optimizer" if cfg.parallel.distributed_optimizer else \
                f"model.backend={cfg.model.backend}"
            raise ConfigError(f"{what} needs megatron's process groups: run under torchrun "
                              f"(torchrun --nproc-per-node 1 -m engine.train ... for one process)")
        return ParallelContext(device=device)
    world = int(os.environ["WORLD_SIZE"])
    if world % (tp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the {world} torchrun processes")
    if device.type == "cpu" and not megatron_cuda_calls_work():
        for wanted, part in ((pp > 1, f"parallel.pp={pp}: megatron-core's pipeline schedule"),
                             (cfg.parallel.distributed_optimizer, "parallel.distributed_optimizer: megatron-core's "
                                                                  "distributed optimizer")):
            if wanted:
                raise ConfigError(f"{part} allocates on CUDA, which this host lacks; run it on GPUs")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from megatron.core import parallel_state, tensor_parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        if device.type == "cuda":  # megatron initialises GPU weight shards under its own RNG tracker
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.model.init_seed)
    return megatron_context(device)


def init_one_process(device: torch.device) -> ParallelContext:
    """megatron's process groups for one process outside torchrun (benchmarks, tests): the megatron
    and te layers need them even alone."""
    if not dist.is_initialized():
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    return megatron_context(device)


def megatron_context(device: torch.device) -> ParallelContext:
    """This rank's place in the layout megatron's parallel_state was initialised with."""
    from megatron.core import parallel_state as ps
    return ParallelContext(tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                           dp_rank=ps.get_data_parallel_rank(), rank=dist.get_rank(),
                           dp_group=ps.get_data_parallel_group(), device=device,
                           pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                           pp_group=ps.get_pipeline_model_parallel_group(),
                           pp_last_rank=ps.get_pipeline_model_parallel_last_rank())


def megatron_cuda_calls_work() -> bool:
    """Whether megatron's `torch.cuda.current_device()` allocations can run (only a test shim makes
    them run on a CPU-only host)."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True
