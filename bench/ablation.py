"""The paper's Table 3 in miniature: the embedded task under each method, equal seeds and steps.

    python -m bench.ablation [--iterations N] [--seeds 0 1] [--out bench/results/ablation-cpu.json] [key=value ...]

Rows: vanilla NFT (global routing), GDPO (per-reward normalisation), OmniNFT routing, + layer-wise
gradient surgery (paper preset), + region-wise reweighting (the full method). Each row reports,
per reward, the mean over the last `--window` iterations minus the mean of iteration 0, averaged
over seeds. The task is not tuned for any method.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from engine.config import load_config
from engine.trainer import Trainer

METHODS: dict[str, list[str]] = {
    "vanilla NFT (global)": ["advantage.routing=global", "surgery.schedule=off", "reweight.mode=off"],
    "GDPO": ["advantage.routing=gdpo", "surgery.schedule=off", "reweight.mode=off"],
    "+ routing (omninft)": ["advantage.routing=omninft", "surgery.schedule=off", "reweight.mode=off"],
    "+ surgery": ["advantage.routing=omninft", "surgery.schedule=paper", "reweight.mode=off"],
    "+ reweighting (full)": ["advantage.routing=omninft", "surgery.schedule=paper", "reweight.mode=minmax"],
}


def run_method(overrides: list[str], seed: int, iterations: int, window: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                *overrides,
                f"seed={seed}",
                f"iterations={iterations}",
                f"run_dir={tmp}",
                "log.progress=false",
                "log.tensorboard=false",
                "log.plot=false",
                "checkpoint_every=0",
            ],
        )
        trainer = Trainer(cfg)
        history = trainer.run()
    gains = {}
    for name in trainer.reward_names:
        last = [m[f"reward/{name}"] for m in history[-window:]]
        gains[name] = sum(last) / len(last) - history[0][f"reward/{name}"]
    return gains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--window", type=int, default=5, help="last iterations averaged")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/ablation-cpu-<date>.json)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every method")
    args = parser.parse_args(argv)

    rows, start = {}, time.perf_counter()
    for method, overrides in METHODS.items():
        per_seed = [run_method([*args.overrides, *overrides], s, args.iterations, args.window) for s in args.seeds]
        rows[method] = {k: sum(g[k] for g in per_seed) / len(per_seed) for k in per_seed[0]}
        print(
            f"[{time.perf_counter() - start:6.0f}s] {method}: "
            + ", ".join(f"{k} {v:+.4f}" for k, v in rows[method].items()),
            flush=True,
        )

    names = list(next(iter(rows.values())))
    print(
        f"\nreward gain (mean of last {args.window} iterations - iteration 0), {args.iterations} iterations, "
        f"seeds {args.seeds}, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"{'method':24s}" + "".join(f"{n:>18s}" for n in names))
    for method, gains in rows.items():
        print(f"{method:24s}" + "".join(f"{gains[n]:+18.4f}" for n in names))

    out = Path(args.out or f"bench/results/ablation-cpu-{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": "cpu",
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "iterations": args.iterations,
                "window": args.window,
                "seeds": args.seeds,
                "overrides": args.overrides,
                "methods": METHODS,
                "gain": rows,
                "seconds": time.perf_counter() - start,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
