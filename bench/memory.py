"""Per-GPU training-state memory of full fine-tuning against LoRA, counted exactly from the model definition.

    python -m bench.memory [--preset ltx2-19b] [--rank 32] [--dp 8] [--out PATH] [--markdown]

Nothing runs on an accelerator: each layout's share of the model is built on the meta device by the one
model definition (`models.build_model`, megatron's column/row parallel layers for TP > 1, the pipeline stage
for PP > 1, `models.lora.apply_lora` for LoRA), and its parameters are counted. Per GPU, in bytes:

- weights: the trained model's parameters (LoRA: the frozen base and the trained "default" adapter set);
- gradients: one per trained element, in its parameter's dtype (megatron's DDP buffer with
  `grad_reduce_in_fp32=False`, or `p.grad` from backward to the optimizer step);
- optimizer: torch AdamW's exp_avg and exp_avg_sq in the parameter dtype; megatron's distributed optimizer
  keeps fp32 moments and, for non-fp32 trained parameters, fp32 main copies, each 1/dp of them per rank;
- old policy: a full frozen copy (`engine.policy.frozen_copy`) or LoRA's "old" adapter set;
- KL reference (only when `loss.kl_weight > 0`, default 0): another full frozen copy, or, with LoRA, none
  (the base with the adapters off is the reference).

Precisions are the engine's: full fine-tuning keeps fp32 master weights and fp32 AdamW state
(configs/ltx2-19b.yaml: model.dtype float32, autocast bf16); LoRA keeps the base in bf16
(model.dtype=bfloat16) and the adapters and their AdamW state in fp32. Layouts: TP8 x PP2 (its heavier
pipeline stage), TP8 (PP1), and data parallelism alone (TP1 PP1, `--dp` ranks) with plain AdamW and with the
distributed optimizer. "Fits" compares the state with an 80 GiB GPU; activations (which activation
checkpointing and the sequence length set), the CUDA context, communication buffers, allocator
fragmentation, megatron's bucket padding (under 128 x dp elements per bucket) and AdamW's step counters (one
fp32 scalar per trained tensor, in host memory) are not counted: 80 GiB less the state is what they have.

TP > 1 builds megatron's layers in this one process over a fake process group of tp ranks
(torch.testing's FakeStore, as torchtitan's dry runs do): the shapes are rank 0's, collectives never run.
Writes bench/results/<device>-<date>-memory.json; `--markdown` also prints the table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

import torch
import torch.distributed as dist
from torch import nn

import models
from bench.measure import CUDA, device_label, package_versions, report
from models import LTX2AVTransformer, ModelConfig, Sharding, Stage
from models.lora import LoRAConfig, apply_lora, lora_layers, lora_parameters

GIB = 2**30
GPU_GIB = 80  # H100 / A100 80 GB
FP32 = 4  # bytes: AdamW moments and main copies of the distributed optimizer


@dataclass(frozen=True)
class Method:
    """How the model is trained: `dtype` is model.dtype (the trained parameters, or LoRA's frozen base);
    LoRA adapters (`rank` > 0) are fp32."""

    name: str
    dtype: torch.dtype
    rank: int = 0  # LoRA rank; 0 is full fine-tuning


@dataclass(frozen=True)
class Layout:
    """`dp` data-parallel ranks over tp x pp model-parallel ones; `distributed`: megatron's distributed optimizer."""

    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    distributed: bool = False


@contextlib.contextmanager
def fake_world(tp: int) -> Iterator[None]:
    """megatron's parallel state for `tp` tensor-parallel ranks in this one process (it is rank 0), over a
    fake process group that accepts collectives without running them (none runs: nothing is computed)."""
    if tp == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("counting tensor-parallel layers needs a process without torch.distributed initialised")
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(tp, create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@functools.cache
def meta_model(config: ModelConfig, method: Method, tp: int = 1, pp: int = 1, index: int = 0) -> LTX2AVTransformer:
    """Tensor-parallel rank 0's share of pipeline stage `index` of `pp` on the meta device, in the method's
    dtype, with its LoRA adapters: the tensors the engine holds, without their storage. TP > 1 builds
    megatron's layers and needs `fake_world(tp)` (or megatron's parallel state for tp ranks)."""
    if tp == 1:
        backend = models.TorchBackend()
    else:
        from megatron.core import parallel_state

        from models.backends.megatron import MegatronBackend

        group = parallel_state.get_tensor_model_parallel_group()
        backend = MegatronBackend(Sharding(tp_size=tp, tp_rank=0, tp_group=group))
        backend.config.use_cpu_initialization = True  # on a GPU host megatron would allocate on the GPU
    stage = Stage(index, pp, models.stage_layers(config.num_layers, pp, index))
    model = models.build_model(config, device="meta", backend=backend, stage=stage).to(method.dtype)
    apply_lora(model, LoRAConfig(rank=method.rank))  # freezes the base; a no-op for rank 0
    return model


def numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def nbytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def state_bytes(model: nn.Module, dp: int = 1, distributed: bool = False) -> dict[str, int]:
    """Bytes this rank holds per part of the training state (module docstring), from `model`'s parameters:
    the ones with requires_grad are trained, LoRA's "old" set is the old policy, the rest (and any buffers)
    the weights."""
    params = list(model.parameters())
    old = lora_parameters(model, "old") if lora_layers(model) else []
    old_ids = {id(p) for p in old}
    weights = [p for p in params if id(p) not in old_ids] + list(model.buffers())
    trained = [p for p in params if p.requires_grad]
    if distributed:  # fp32 moments (and main copies of lower-precision parameters), sharded over the dp ranks
        low = [p for p in trained if p.dtype != torch.float32]
        optimizer = 2 * FP32 * math.ceil(numel(trained) / dp) + FP32 * math.ceil(numel(low) / dp)
    else:
        optimizer = 2 * nbytes(trained)
    return {
        "weights": nbytes(weights),
        "gradients": nbytes(trained),
        "optimizer": optimizer,
        "old_policy": nbytes(old) if old else nbytes(weights),
        "kl_reference": 0 if old else nbytes(weights),
    }


def host_step_bytes(model: nn.Module) -> int:
    """torch AdamW's step counters: one fp32 scalar per trained tensor, kept on the CPU (not capturable)."""
    return 4 * sum(p.requires_grad for p in model.parameters())


def split_numel(model: nn.Module) -> int:
    """Elements of this rank's tensor-parallel slices (megatron's `tensor_model_parallel` parameters)."""
    return sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))


def row(config: ModelConfig, method: Method, layout: Layout) -> dict:
    """One table row: the heaviest pipeline stage's parameter counts and state bytes under `layout`."""
    stages = []
    for index in range(layout.pp):
        model = meta_model(config, method, layout.tp, layout.pp, index)
        stage = model.stage
        state = state_bytes(model, layout.dp, layout.distributed)
        stages.append(
            {
                "stage": index,
                "blocks": [stage.layers.start, stage.layers.stop],
                "parameters": numel(list(model.parameters())),
                "trained_parameters": numel([p for p in model.parameters() if p.requires_grad]),
                "split_parameters": split_numel(model),
                "bytes": state,
            }
        )
    heaviest = max(stages, key=lambda s: sum(s["bytes"].values()))
    state = heaviest["bytes"]
    total = sum(state.values()) - state["kl_reference"]
    return {
        **dataclasses.asdict(layout),
        "method": method.name,
        "dtype": str(method.dtype).removeprefix("torch."),
        "lora_rank": method.rank,
        "optimizer": "distributed" if layout.distributed else "AdamW",
        "stage": heaviest["stage"],
        "stages": stages,
        "bytes": state,
        "total_bytes": total,
        "total_bytes_with_kl": total + state["kl_reference"],
        "fits": total <= GPU_GIB * GIB,
        "fits_with_kl": total + state["kl_reference"] <= GPU_GIB * GIB,
    }


COLUMNS = ("weights", "gradients", "optimizer", "old_policy", "kl_reference")
HEADER = (
    "layout",
    "method",
    "weights",
    "grads",
    "optimizer",
    "old policy",
    "KL ref",
    "total",
    "+KL ref",
    "fits 80 GiB (KL off / on)",
)


def cells(r: dict) -> list[str]:
    """A row's table cells, sizes in GiB; 'fits' for loss.kl_weight 0 / > 0 (no KL reference / with one)."""
    method = "full FT fp32" if r["lora_rank"] == 0 else f"LoRA r{r['lora_rank']}, bf16 base"
    layout = r["name"] + (f" (stage {r['stage']})" if r["pp"] > 1 else "")
    sizes = [f"{r['bytes'][k] / GIB:.2f}" for k in COLUMNS]
    yes = {True: "yes", False: "no"}
    return [
        layout,
        method,
        *sizes,
        f"{r['total_bytes'] / GIB:.2f}",
        f"{r['total_bytes_with_kl'] / GIB:.2f}",
        f"{yes[r['fits']]} / {yes[r['fits_with_kl']]}",
    ]


def text_table(rows: list[dict]) -> str:
    table = [list(HEADER), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in table
    )


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ltx2-19b", choices=sorted(models.PRESETS))
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32, the authors')")
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks of the DP-only rows (default 8)")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel ranks of the TP rows (default 8)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-memory.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    if min(args.rank, args.dp, args.tp) < 1:
        parser.error("--rank, --dp and --tp must be >= 1")
    config = models.resolve_config(args.preset)
    methods = (Method("full", torch.float32), Method("lora", torch.bfloat16, args.rank))
    t, d = args.tp, args.dp
    layouts = (
        Layout(f"TP{t}xPP2", tp=t, pp=2),
        Layout(f"TP{t}", tp=t),
        Layout(f"DP{d}", dp=d),
        Layout(f"DP{d} dist-opt", dp=d, distributed=True),
    )
    with fake_world(t):
        rows = [row(config, method, layout) for layout in layouts for method in methods]

    whole = meta_model(config, methods[1])
    lora = numel(lora_parameters(whole))
    total = numel(list(whole.parameters())) - 2 * lora  # the base: both adapter sets excluded
    print(
        f"{args.preset}: {total:,} parameters; LoRA rank {args.rank}: {lora:,} per adapter set "
        f"({len(lora_layers(whole))} layers). Per-GPU training state in GiB (2^30 bytes); activations excluded."
    )
    print(text_table(rows))
    if args.markdown:
        print()
        print(markdown_table(rows))
    versions = package_versions()
    if importlib.util.find_spec("megatron") is not None:  # the layers the TP rows count
        versions["megatron-core"] = importlib.metadata.version("megatron-core")
    result = {
        "bench": "memory",
        "device": device_label(torch.device("cuda" if CUDA else "cpu")),
        "date": date.today().isoformat(),
        "versions": versions,
        "preset": args.preset,
        "model": dataclasses.asdict(config),
        "parameters": total,
        "lora": {"rank": args.rank, "alpha": LoRAConfig().alpha, "layers": len(lora_layers(whole)), "per_set": lora},
        "capacity_gib": GPU_GIB,
        "counted": "parameters, gradients, AdamW state, old policy, KL reference (bytes per GPU)",
        "excluded": "activations, CUDA context, communication buffers, fragmentation, bucket padding, "
        "AdamW step counters (host)",
        "rows": rows,
    }
    report(result, args.out, "memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
