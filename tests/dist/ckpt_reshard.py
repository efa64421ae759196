"""torchrun worker: distributed checkpoints saved in one tensor-parallel layout, loaded in another.

`--load CKPT`: fresh models with other weights and an AdamW with other hyper-parameters load CKPT;
each rank compares its shards with the slices of the full states the saving run recorded (exactly),
takes the next step and compares both models with the saving run's next step. With one process
the errors of a missing and of corrupt checkpoints are recorded too.
`--save CKPT` (after any load): every rank loads the same seeded single-process weights into its
layout, takes one AdamW step (and an EMA step of the old model), saves CKPT, takes the next step;
rank 0 writes the gathered full states of both moments to CKPT.reference.pt beside it. Then fresh
models resume from CKPT in the same layout and take that next step again.
Each rank writes <out>/rank<r>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.megatron_cpu_shim import install  # noqa: E402

install()

from megatron.core import parallel_state  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import dist as dist_checkpoint  # noqa: E402
from engine.checkpoint import TrainState  # noqa: E402
from engine.optim import build_optimizer, clip_and_step  # noqa: E402
from engine.parallel import ProcessLayout  # noqa: E402
from engine.policy import ema_update  # noqa: E402
from models.weights import gather_full_state, load_full_state  # noqa: E402
from models.backends.megatron import MegatronBackend  # noqa: E402

SAVED_LR, SAVED_STATE, SAVED_CONFIG = 1e-3, TrainState(iteration=3, step=1), {"seed": 7, "run_dir": "runs/x"}


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
    args = (torch.randn(b, 12, cfg.in_channels, generator=g), torch.randn(b, ta, cfg.audio_in_channels, generator=g),
            torch.rand(b, generator=g), torch.randn(b, tc, cfg.caption_channels, generator=g),
            torch.randn(b, tc, cfg.caption_channels, generator=g), (3, 2, 2), 24.0)
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
    saved = {"model": full_state(model), "old_model": full_state(old_model),
             "optimizer": full_optimizer_state(model, optimizer)}
    dist_checkpoint.save(ckpt, model, old_model, optimizer, SAVED_STATE, SAVED_CONFIG, dp_rank=0)
    train_step(model, old_model, optimizer)
    saved["next"] = {"model": full_state(model), "old_model": full_state(old_model)}
    if dist.get_rank() == 0:
        torch.save(saved, reference_file(ckpt))
    model, old_model, optimizer = fresh(tp)
    dist_checkpoint.load(ckpt, model, old_model, optimizer, dp_rank=0)
    return {"saved": ckpt.is_dir(), "leftovers": [p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")],
            "resume_err": next_step_err(model, old_model, optimizer, saved["next"])}


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
    return {name: expect_error(dist_checkpoint.load, path, model, old_model, optimizer, 0)
            for name, path in (("missing", work / "absent"), ("no_metadata", no_meta), ("truncated", truncated))}


def load_phase(tp: int, ckpt: Path, work: Path) -> dict:
    """Loads into fresh models and optimizer, compares with the saved full states, steps once."""
    model, old_model, optimizer = fresh(tp)
    errors = corrupt_checkpoints(ckpt, work, model, old_model, optimizer) if dist.get_world_size() == 1 else {}
    state, config = dist_checkpoint.load(ckpt, model, old_model, optimizer, dp_rank=0)
    saved = torch.load(reference_file(ckpt), weights_only=True)
    params, sharding = dict(model.named_parameters()), model.sharding
    mismatches = [f"{key}.{name}" for key, m in (("model", model), ("old_model", old_model))
                  for name, t in m.state_dict().items()
                  if not torch.equal(t, local_slice(saved[key][name], params[name], sharding))]
    for name, p in params.items():
        state_p, full = optimizer.state[p], saved["optimizer"]
        mismatches += [f"optimizer.{k}.{name}" for k in ("exp_avg", "exp_avg_sq")
                       if not torch.equal(state_p[k], local_slice(full[k][name], p, sharding))]
        if not torch.equal(state_p["step"], full["step"][name]):
            mismatches.append(f"optimizer.step.{name}")
    group = optimizer.param_groups[0]
    return {"mismatches": mismatches, "state": [state.iteration, state.step], "config": config,
            "hyper": [group["lr"], list(group["betas"]), group["eps"], group["weight_decay"]],
            "q_shape": list(model.state_dict()["transformer_blocks.0.attn1.to_q.weight"].shape),
            "next_err": next_step_err(model, old_model, optimizer, saved["next"]), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--load", help="checkpoint to load (before saving, when both are given)")
    parser.add_argument("--save", help="checkpoint to write")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    out, result = Path(args.out), {"rank": dist.get_rank()}
    if args.load:
        result["load"] = load_phase(args.tp, Path(args.load), out / "corrupt")
    if args.save:
        result["save"] = save_phase(args.tp, Path(args.save))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
