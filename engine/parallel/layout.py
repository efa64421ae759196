"""The process layout of a run: one object that knows every process group and does every reduction.

Under torchrun the world is tp x pp x dp (context parallelism, `cp`, has its place here and is 1
for now). Tensor-parallel ranks share each layer (models.backends.megatron), pipeline stages hold
contiguous runs of blocks (models.stage, engine.parallel.pipeline), data-parallel ranks split every
global mini-batch of samples, so the optimizer takes the same steps on the same samples as one
process would. Rollout and training noise are keyed by (seed, iteration, prompt, sample), rewards
are gathered before the group advantages, gradients are averaged: the same seed gives the same
iteration for any layout.

The model's `Stage` and `Sharding` are derived from this object (`stage()`, `sharding()`), and every
reduction the engine owes (the V2A mass averaged over tensor-parallel heads and summed over stages,
gradient norms, logged means) goes through `sum_over` / `mean_over` / `max_over`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from models import Sharding, Stage

from ..errors import ConfigError, UserError
from ..fields import bounded

DIMENSIONS = ("tp", "cp", "pp", "dp", "world")


@dataclass
class ParallelConfig:
    """`parallel.*`: process layout under torchrun, world = tp x pp x dp (dp is what remains)."""

    tp: int = bounded(1, None, default=1)
    pp: int = bounded(1, None, default=1)  # pipeline stages of contiguous blocks
    # megatron-core's distributed optimizer: AdamW moments sharded over data-parallel ranks (ZeRO-1)
    distributed_optimizer: bool = False
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")


@dataclass
class ProcessLayout:
    """This rank's place in the layout; one process holding everything unless built by `init_layout`."""

    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 1))
    ranks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0))
    groups: dict[str, object] = field(default_factory=dict, repr=False)  # dimension -> process group
    rank: int = 0  # global rank
    pp_last_rank: int = 0  # global rank of this pipeline's last stage
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def tp(self) -> int:
        return self.sizes["tp"]

    @property
    def pp(self) -> int:
        return self.sizes["pp"]

    @property
    def dp(self) -> int:
        return self.sizes["dp"]

    @property
    def dp_rank(self) -> int:
        return self.ranks["dp"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def group(self, dim: str):
        """The process group of dimension `dim` (tp, cp, pp, dp, or world: every rank); None for the
        default group or one rank alone."""
        if dim not in DIMENSIONS:
            raise ValueError(f"unknown layout dimension {dim!r}; one of {DIMENSIONS}")
        return self.groups.get(dim)

    # ---- what the model is built for ---------------------------------------------------------------
    def stage(self) -> Stage:
        """The pipeline stage this rank builds (its blocks follow from the model's depth)."""
        return Stage(index=self.ranks["pp"], count=self.pp, group=self.group("pp"))

    def sharding(self, sequence_parallel: bool = False) -> Sharding:
        """How this rank's layers and sequences are cut over its tensor-parallel group."""
        return Sharding(
            tp_size=self.tp,
            tp_rank=self.ranks["tp"],
            tp_group=self.group("tp"),
            sequence_parallel=sequence_parallel and self.tp > 1,
        )

    # ---- reductions ----------------------------------------------------------------------------------
    def _all_reduce(self, dim: str, x: Tensor | float, op: dist.ReduceOp) -> Tensor | float:
        if isinstance(x, Tensor):
            x = x.clone()
            dist.all_reduce(x, op=op, group=self.group(dim))
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group(dim))
        return float(t)

    def sum_over(self, dim: str, x: Tensor | float) -> Tensor | float:
        """Sum of a per-rank tensor or scalar over dimension `dim` (a new tensor; x as is alone)."""
        return x if self.sizes[dim] == 1 else self._all_reduce(dim, x, dist.ReduceOp.SUM)

    def mean_over(self, dim: str, x: Tensor | float) -> Tensor | float:
        """Mean of a per-rank tensor or scalar over dimension `dim`."""
        return x if self.sizes[dim] == 1 else self._all_reduce(dim, x, dist.ReduceOp.SUM) / self.sizes[dim]

    def max_over(self, dim: str, x: Tensor | float) -> Tensor | float:
        """Largest per-rank value over dimension `dim`."""
        return x if self.sizes[dim] == 1 else self._all_reduce(dim, x, dist.ReduceOp.MAX)

    def sum_over_(self, dim: str, tensors: list[Tensor], divide_by: int = 1) -> None:
        """Sums `tensors` in place over `dim` (then divides) with one collective on a flat copy."""
        if self.sizes[dim] == 1 or not tensors:
            return
        flat = torch._utils._flatten_dense_tensors(tensors)
        dist.all_reduce(flat, group=self.group(dim))
        if divide_by != 1:
            flat /= divide_by
        for t, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
            t.copy_(synced)

    def sum_to_first_(self, dim: str, x: Tensor) -> None:
        """Sums `x` over dimension `dim` into its copy on the dimension's first rank (in place; the
        other ranks' copies are left undefined). Host-memory friendly gathering of sharded state."""
        if self.sizes[dim] > 1:
            dist.reduce(x, dst=dist.get_global_rank(self.group(dim), 0), group=self.group(dim))

    def all_gather_object(self, value: object) -> list:
        """Every rank's `value` (any picklable object), in global rank order, on every rank."""
        if self.sizes["world"] == 1:
            return [value]
        values = [None] * self.sizes["world"]
        dist.all_gather_object(values, value)
        return values

    @contextlib.contextmanager
    def collectively(self, what: str) -> Iterator[None]:
        """Runs the block on every rank and makes a UserError raised on any rank an error on all of them
        (the others would otherwise wait in their next collective until a timeout). The block itself
        must not call collectives."""
        error = None
        try:
            yield
        except UserError as e:
            error = e
        if self.max_over("world", float(error is not None)) and error is None:
            raise UserError(f"{what} failed on another rank (its error is printed there)")
        if error is not None:
            raise error

    def from_first_rank(self, value: object) -> object:
        """Global rank 0's `value` (any picklable object) on every rank."""
        if self.sizes["world"] == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_last_stage(self, values: list[float]) -> list[float]:
        """Values computed on the last pipeline stage (the loss), on every stage."""
        if self.pp == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=self.pp_last_rank, group=self.group("pp"))
        return t.tolist()

    def broadcast_from_last_stage(self, tensors: list[Tensor]) -> None:
        """Overwrites `tensors` on every stage with the last stage's (in place)."""
        if self.pp > 1:
            for t in tensors:
                dist.broadcast(t, src=self.pp_last_rank, group=self.group("pp"))

    # ---- data parallelism ----------------------------------------------------------------------------
    def local_indices(self, n: int, batch_size: int) -> list[list[int]]:
        """This rank's samples, one list per global mini-batch (the optimizer step they feed)."""
        if self.dp > 1 and (batch_size % self.dp or n % batch_size):
            raise ConfigError(
                f"with {self.dp} data-parallel ranks, train.batch_size ({batch_size}) must be a "
                f"multiple of {self.dp} and divide the {n} samples of an iteration"
            )
        per = batch_size // self.dp if self.dp > 1 else batch_size
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return [b[self.dp_rank * per : (self.dp_rank + 1) * per] if self.dp > 1 else b for b in batches]

    def gather_samples(self, local: Tensor, indices: list[int], n: int) -> Tensor:
        """Per-sample values of this rank's samples -> the values of all n samples, on every rank."""
        if self.dp == 1:
            return local
        idx = torch.tensor(indices, device=local.device)
        parts_v = [torch.empty_like(local) for _ in range(self.dp)]
        parts_i = [torch.empty_like(idx) for _ in range(self.dp)]
        dist.all_gather(parts_v, local.contiguous(), group=self.group("dp"))
        dist.all_gather(parts_i, idx, group=self.group("dp"))
        out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        out[torch.cat(parts_i)] = torch.cat(parts_v)
        return out

    @classmethod
    def from_megatron(cls, device: torch.device) -> ProcessLayout:
        """This rank's place in the layout megatron's parallel_state was initialised with."""
        from megatron.core import parallel_state as ps

        sizes = {
            "tp": ps.get_tensor_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "world": dist.get_world_size(),
        }
        ranks = {
            "tp": ps.get_tensor_model_parallel_rank(),
            "cp": ps.get_context_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(),
            "world": dist.get_rank(),
        }
        groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "cp": ps.get_context_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            "dp": ps.get_data_parallel_group(),
        }
        return cls(
            sizes=sizes,
            ranks=ranks,
            groups=groups,
            rank=dist.get_rank(),
            device=device,
            pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        )


def init_layout(parallel: ParallelConfig, backend: str, init_seed: int) -> ProcessLayout:
    """Process groups from the torchrun environment (gloo on CPU, NCCL on GPU) and megatron's
    parallel state; a plain `python` run (no WORLD_SIZE) stays single-process."""
    tp, pp = parallel.tp, parallel.pp
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    megatron_layers = backend in ("megatron", "te")
    if "WORLD_SIZE" not in os.environ:
        if tp * pp > 1:
            raise ConfigError(
                f"parallel.tp={tp} x parallel.pp={pp} needs torchrun "
                f"(e.g. torchrun --nproc-per-node {tp * pp} -m engine.train)"
            )
        if megatron_layers or parallel.distributed_optimizer:
            what = "parallel.distributed_optimizer" if parallel.distributed_optimizer else f"model.backend={backend}"
            raise ConfigError(
                f"{what} needs megatron's process groups: run under torchrun "
                f"(torchrun --nproc-per-node 1 -m engine.train ... for one process)"
            )
        return ProcessLayout(device=device)
    world = int(os.environ["WORLD_SIZE"])
    if world % (tp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the {world} torchrun processes")
    if device.type == "cpu" and not megatron_cuda_calls_work():
        for wanted, part in (
            (pp > 1, f"parallel.pp={pp}: megatron-core's pipeline schedule"),
            (parallel.distributed_optimizer, "parallel.distributed_optimizer: megatron-core's distributed optimizer"),
        ):
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
            tensor_parallel.model_parallel_cuda_manual_seed(init_seed)
    return ProcessLayout.from_megatron(device)


def init_one_process(device: torch.device) -> ProcessLayout:
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
    return ProcessLayout.from_megatron(device)


def megatron_cuda_calls_work() -> bool:
    """Whether megatron's `torch.cuda.current_device()` allocations can run (only a test shim makes
    them run on a CPU-only host)."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True
