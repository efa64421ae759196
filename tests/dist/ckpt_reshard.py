"""torchrun worker (2 processes): distributed checkpoints saved in one tensor-parallel layout, loaded in another.

One launch runs the three phases of tests/engine/checkpoint/test_dist.py in sequence, each in a fresh
default process group with megatron's parallel state initialised for it (and torn down after it), from
the torch, Python and numpy RNG states the process started with:
`tp1_save`: rank 0 alone, in a one-process world (TP=1), saves <dir>/tp1;
`tp2`: both ranks (TP=2) load <dir>/tp1, then save <dir>/tp2;
`tp1_load`: rank 0 alone again, in a one-process world (TP=1), loads <dir>/tp2.
A one-process world is what `torchrun --nproc-per-node 1` would give rank 0 (its group is built over an
in-process store, rank 1 takes no part): the checkpoints and the checks are those of three launches
(1, 2 and 1 processes), without two of their start-ups (~10 s each: every worker imports torch and
megatron-core).

Load: fresh models with other weights and an AdamW with other hyper-parameters load the checkpoint;
each rank compares its shards with the slices of the full states the saving run recorded (exactly),
takes the next step and compares both models with the saving run's next step. In a one-process world
the errors of a missing and of corrupt checkpoints are recorded too.
Save (after any load): every rank loads the same seeded single-process weights into its layout, takes
one AdamW step (and an EMA step of the old model), saves the checkpoint, takes the next step; rank 0
writes the gathered full states of both moments to <checkpoint>.reference.pt beside it. Then fresh
models resume from the checkpoint in the same layout and take that next step again.
Each rank writes <out>/rank<r>.json: {"rank": r, phase: {"world": [processes, tp], "load": ..., "save": ...}}
for each phase it took part in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":
    # Only in torchrun's workers: megatron's first save in a process starts a helper (a multiprocessing Manager
    # for its results queue, `spawn` start method) that runs this file again as `__mp_main__`; it needs none
    # of this, and importing torch and megatron-core there would cost ~6 CPU-seconds.
    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.dist.megatron_cpu_shim import install

    install()

    from megatron.core import parallel_state

    import models
    from engine.checkpoint import TrainState
    from engine.checkpoint import dist as dist_checkpoint
    from engine.optim import build_optimizer, clip_and_step
    from engine.parallel import ProcessLayout
    from engine.policy import ema_update
    from models.backends.megatron import MegatronBackend
    from models.weights import gather_full_state, load_full_state

    SAVED_LR, SAVED_STATE, SAVED_CONFIG = 1e-3, TrainState(iteration=3, step=1), {"seed": 7, "run_dir": "runs/x"}

PHASES = (  # name, processes, tensor-parallel size, checkpoint to load, checkpoint to save (names under --dir)
    ("tp1_save", 1, 1, None, "tp1"),
    ("tp2", 2, 2, "tp1", "tp2"),
    ("tp1_load", 1, 1, "tp2", None),
)


def build(tp: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model and old model in this layout (megatron backend only when split) from seeded weights."""
    torch.manual_seed(seed)
    ref = models.build_model("tiny")
    pair = []
    for _ in range(2):
        m = models.build_model("tiny", backend=MegatronBackend(layout().sharding()) if tp > 1 else None)
        load_full_state(m, ref.state_dict())
        pair.append(m)
    return pair[0], pair[1].requires_grad_(False)


def train_step(model, old_model, optimizer) -> None:
    """One AdamW step on a fixed regression loss, then the old model's EMA step."""
    cfg, g = model.config, torch.Generator().manual_seed(1)
    b, ta, tc = 2, 14, 8
    args = (
        torch.randn(b, 12, cfg.in_channels, generator=g),
        torch.randn(b, ta, cfg.audio_in_channels, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, tc, cfg.caption_channels, generator=g),
        torch.randn(b, tc, cfg.caption_channels, generator=g),
        (3, 2, 2),
        24.0,
    )
    v, a = model(*args)
    loss = ((v - torch.randn(v.shape, generator=g)) ** 2).mean() + ((a - torch.randn(a.shape, generator=g)) ** 2).mean()
    loss.backward()
    clip_and_step(model, optimizer, 1.0, layout())
    ema_update(old_model, model, 0.5)


def layout() -> ProcessLayout:
    return ProcessLayout.from_megatron(torch.device("cpu"))


def local_slice(full: torch.Tensor, param: torch.Tensor, sharding) -> torch.Tensor:
    return full[sharding.weight_slice(param)] if sharding.is_split(param) else full


def full_state(model) -> dict[str, torch.Tensor]:
    """A copy: with one rank `gather_full_state` returns the live tensors, which the next step changes."""
    return {k: v.clone() for k, v in gather_full_state(model).items()}


def full_optimizer_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    sharding, out = model.sharding, {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        out["step"][name] = state["step"].clone()
        for k in ("exp_avg", "exp_avg_sq"):
            t = state[k]
            out[k][name] = (sharding.gather_weight(t, p) if sharding.is_split(p) else t).clone()
    return out


def reference_file(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}.reference.pt"


def fresh(tp: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """Models with other weights and an AdamW with other hyper-parameters, for a checkpoint to overwrite."""
    model, old_model = build(tp, seed=1)
    return model, old_model, build_optimizer(model, 0.5, 0.0, (0.5, 0.5), 1e-3)


def next_step_err(model, old_model, optimizer, expected: dict[str, dict[str, torch.Tensor]]) -> float:
    """Takes the next step; its largest difference from the saving run's next step (both models)."""
    train_step(model, old_model, optimizer)
    fulls = {"model": gather_full_state(model), "old_model": gather_full_state(old_model)}
    return max(float((full[k] - expected[key][k]).abs().max()) for key, full in fulls.items() for k in full)


def save_phase(tp: int, ckpt: Path) -> dict:
    """Writes the checkpoint and, beside it, the full states it holds and both models one step later;
    then resumes from it in this same layout, where the next step must be bitwise the same."""
    model, old_model = build(tp, seed=0)
    optimizer = build_optimizer(model, SAVED_LR, 0.01, (0.9, 0.999), 1e-6)
    train_step(model, old_model, optimizer)
    saved = {
        "model": full_state(model),
        "old_model": full_state(old_model),
        "optimizer": full_optimizer_state(model, optimizer),
    }
    dist_checkpoint.save(ckpt, model, old_model, optimizer, SAVED_STATE, SAVED_CONFIG, dp_rank=0)
    train_step(model, old_model, optimizer)
    saved["next"] = {"model": full_state(model), "old_model": full_state(old_model)}
    if dist.get_rank() == 0:
        torch.save(saved, reference_file(ckpt))
    model, old_model, optimizer = fresh(tp)
    dist_checkpoint.load(ckpt, model, old_model, optimizer, dp_rank=0)
    return {
        "saved": ckpt.is_dir(),
        "leftovers": [p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")],
        "resume_err": next_step_err(model, old_model, optimizer, saved["next"]),
    }


def expect_error(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as e:  # the test checks the type and the message
        return f"{type(e).__name__}: {e}"
    return "no error"


def corrupt_checkpoints(ckpt: Path, work: Path, model, old_model, optimizer) -> dict[str, str]:
    """The errors `load` gives for a missing path, a directory without megatron's metadata and one
    whose data files are truncated."""
    no_meta, truncated = work / "no_metadata", work / "truncated"
    for d in (no_meta, truncated):
        shutil.copytree(ckpt, d)
    (no_meta / "metadata.json").unlink()
    for f in truncated.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:64])
    return {
        name: expect_error(dist_checkpoint.load, path, model, old_model, optimizer, 0)
        for name, path in (("missing", work / "absent"), ("no_metadata", no_meta), ("truncated", truncated))
    }


def load_phase(tp: int, ckpt: Path, work: Path) -> dict:
    """Loads into fresh models and optimizer, compares with the saved full states, steps once."""
    model, old_model, optimizer = fresh(tp)
    errors = corrupt_checkpoints(ckpt, work, model, old_model, optimizer) if dist.get_world_size() == 1 else {}
    state, config = dist_checkpoint.load(ckpt, model, old_model, optimizer, dp_rank=0)
    saved = torch.load(reference_file(ckpt), weights_only=True)
    params, sharding = dict(model.named_parameters()), model.sharding
    mismatches = [
        f"{key}.{name}"
        for key, m in (("model", model), ("old_model", old_model))
        for name, t in m.state_dict().items()
        if not torch.equal(t, local_slice(saved[key][name], params[name], sharding))
    ]
    for name, p in params.items():
        state_p, full = optimizer.state[p], saved["optimizer"]
        mismatches += [
            f"optimizer.{k}.{name}"
            for k in ("exp_avg", "exp_avg_sq")
            if not torch.equal(state_p[k], local_slice(full[k][name], p, sharding))
        ]
        if not torch.equal(state_p["step"], full["step"][name]):
            mismatches.append(f"optimizer.step.{name}")
    group = optimizer.param_groups[0]
    return {
        "mismatches": mismatches,
        "state": [state.iteration, state.step],
        "config": config,
        "hyper": [group["lr"], list(group["betas"]), group["eps"], group["weight_decay"]],
        "q_shape": list(model.state_dict()["transformer_blocks.0.attn1.to_q.weight"].shape),
        "next_err": next_step_err(model, old_model, optimizer, saved["next"]),
        "errors": errors,
    }


@contextmanager
def world(nproc: int, tp: int):
    """A fresh default process group of torchrun's ranks below `nproc` (all of them, or rank 0 alone in
    a world of its own) and megatron's parallel state at tensor-parallel size `tp` in it."""
    if nproc == int(os.environ["WORLD_SIZE"]):
        dist.init_process_group("gloo")  # torchrun's rendezvous (env://)
    else:
        assert nproc == 1, nproc
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="folder of the checkpoints the phases save and load")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert os.environ["WORLD_SIZE"] == "2", "run under torchrun --nproc-per-node 2"
    rank, ckpts, out = int(os.environ["RANK"]), Path(args.dir), Path(args.out)
    start = torch.get_rng_state(), random.getstate(), np.random.get_state()
    result: dict = {"rank": rank}
    for name, nproc, tp, load, save in PHASES:
        if rank >= nproc:
            continue
        torch.set_rng_state(start[0])
        random.setstate(start[1])
        np.random.set_state(start[2])
        with world(nproc, tp):
            phase = {"world": [dist.get_world_size(), parallel_state.get_tensor_model_parallel_world_size()]}
            if load:
                phase["load"] = load_phase(tp, ckpts / load, out / "corrupt")
            if save:
                phase["save"] = save_phase(tp, ckpts / save)
        result[name] = phase
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
