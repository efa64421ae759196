"""torchrun worker: one OmniNFT iteration in a parallel layout (tp x pp x dp, optionally with
microbatches) against the single-process iteration.

Every rank also runs the single-process trainer on the same config (it is tiny) and writes the
differences of the iteration's rewards, loss and updated weights to <out>/rank<r>.json.

One launch runs several cases (`--out DIR --case ID ARGS...`, tests.helpers.torchrun_cases), so that
start-up (~10-20 s on a 2-core machine: every process imports torch and megatron-core) is paid once. Each
case's Trainer initialises megatron's parallel state with the case's tp x pp (engine.parallel.init_layout,
from the state a fresh worker starts in: tests.helpers.worker_cases destroys the previous case's) and
writes to DIR/ID/rank<r>.json and its runs to DIR/ID/par, DIR/ID/single<r>.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.megatron_cpu_shim import install  # noqa: E402

install()

from engine.config import load_config  # noqa: E402
from engine.parallel import ProcessLayout  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from models.weights import gather_full_state  # noqa: E402
from tests.helpers import TASK, worker_cases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro", type=int, default=0, help="train.micro_batch_size of the parallel run")
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--dist-opt", action="store_true", help="megatron's distributed optimizer in the parallel run")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing in the parallel run")
    parser.add_argument("overrides", nargs="*", help="key=value applied to both runs")
    for args, out in worker_cases():  # the first case's Trainer initialises the process group
        run_case(parser.parse_args(args), out)
    dist.destroy_process_group()


def run_case(args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    layout = [
        f"parallel.tp={args.tp}",
        f"parallel.pp={args.pp}",
        f"train.micro_batch_size={args.micro}",
        f"parallel.sequence_parallel={str(args.sp).lower()}",
        f"parallel.distributed_optimizer={str(args.dist_opt).lower()}",
        f"model.backend={'megatron' if args.tp > 1 else 'torch'}",
        f"train.activation_checkpointing={str(args.recompute).lower()}",
    ]
    parallel = Trainer(load_config(None, [*TASK, *args.overrides, *layout, f"run_dir={out}/par"]))
    single = Trainer(
        load_config(None, [*TASK, *args.overrides, f"run_dir={out}/single{dist.get_rank()}"]), layout=ProcessLayout()
    )
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    mp, ms = parallel.iteration(0), single.iteration(0)

    keys = ["loss", "loss/video", "loss/audio", "grad_norm"] + [
        k for k in ms if k.startswith(("reward/", "adv/", "region_weight/"))
    ]
    metric_err = {k: abs(mp[k] - ms[k]) / max(abs(ms[k]), 1.0) for k in keys}  # absolute near 0 (advantage means)
    weights_p, weights_s = gather_full_state(parallel.model), single.model.state_dict()
    old_p, old_s = gather_full_state(parallel.old_model), single.old_model.state_dict()
    errs = {k: float((weights_p[k] - weights_s[k]).abs().max()) for k in weights_s}
    worst_w = max(errs, key=errs.get)
    weight_err = errs[worst_w]
    old_err = max(float((old_p[k] - old_s[k]).abs().max()) for k in old_s)
    moved = max(float((weights_s[k] - start[k]).abs().max()) for k in weights_s)
    worst = max(metric_err, key=metric_err.get)
    result = {
        "rank": dist.get_rank(),
        "dp": parallel.layout.dp,
        "tp": parallel.layout.tp,
        "pp": parallel.layout.pp,
        "worst_metric": worst,
        "metric_rel_err": metric_err[worst],
        "weight_err": weight_err,
        "old_weight_err": old_err,
        "weights_moved": moved,
        "worst_weight": worst_w,
        "steps": [parallel.state.step, single.state.step],
        "grad_sync": type(parallel.grad_sync).__name__,
        "optimizer": type(parallel.optimizer).__name__,
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
