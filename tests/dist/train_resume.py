"""torchrun worker: the trainer's distributed checkpoints across layouts.

`--phase save` trains 2 iterations at the given layout and leaves a megatron distributed checkpoint;
`--phase resume` resumes from it (any layout) and runs iteration 2; `--phase straight` runs iterations
0-2 without stopping (the reference where no single-process run is one). Rank 0 writes the metrics
of the iterations it ran to <out>/<phase>.json.

One launch may run several cases (`--out DIR --case ID ARGS...`, tests.helpers.torchrun_cases: each from the
state a fresh worker starts in, tests.helpers.worker_cases), each with its own --run-dir, writing to DIR/ID;
without --case the launch is one case writing to DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    # Imported here rather than at module level: megatron's first save in a process starts a helper (a
    # multiprocessing Manager, `spawn`) that imports this file again as __mp_main__ and needs none of it;
    # torch, megatron-core and the engine would cost it ~6 CPU-seconds per rank.
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.dist.megatron_cpu_shim import install

    install()

    from engine.config import load_config
    from engine.trainer import Trainer
    from tests.helpers import TASK, worker_cases

    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("save", "resume", "straight"), required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dist-opt", action="store_true", help="megatron's distributed optimizer")
    parser.add_argument("--dtype", default="float32", help="model.dtype")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value for every phase (e.g. lora.rank=4)")
    for case_args, out in worker_cases():  # the first case's Trainer initialises the process group
        args = parser.parse_args(case_args)
        layout = [
            f"parallel.tp={args.tp}",
            f"parallel.pp={args.pp}",
            f"parallel.distributed_optimizer={str(args.dist_opt).lower()}",
            f"model.dtype={args.dtype}",
            f"model.backend={'megatron' if args.tp > 1 else 'torch'}",
            "checkpoint_format=dist",
            f"run_dir={args.run_dir}",
        ]
        steps = {"save": ["iterations=2"], "resume": ["iterations=3", "resume=true"], "straight": ["iterations=3"]}
        config = load_config(None, [*TASK, *args.overrides, *layout, *steps[args.phase], "checkpoint_every=0"])
        history = Trainer(config).run()
        out.mkdir(parents=True, exist_ok=True)
        if dist.get_rank() == 0:
            (out / f"{args.phase}.json").write_text(json.dumps(history))
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"phase": args.phase, "ran": len(history)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
