"""torchrun worker: a tensor(-and-sequence)- and/or pipeline-parallel model against the
single-process model.

Every rank builds the same single-process model (same seed), loads its share (pipeline stage,
tensor-parallel slices) into the parallel model, runs forward and backward on the same inputs (with
pp > 1 through megatron's schedule, two microbatches of one sample) and writes the largest
differences of the outputs, the loss and the gathered gradients to <out>/rank<r>.json.

One launch runs several cases (`--out DIR --case ID ARGS...`, tests.helpers.torchrun_cases), so that
start-up (~10-20 s on a 2-core machine: every process imports torch and megatron-core) is paid once. Each
case initialises megatron's parallel state with its own tp x pp from the state a fresh worker starts in
(tests.helpers.worker_cases) and writes to DIR/ID/rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.megatron_cpu_shim import install  # noqa: E402

install()

from megatron.core import parallel_state  # noqa: E402

import models  # noqa: E402
from engine.parallel import GradSync, ProcessLayout  # noqa: E402
from engine.parallel.pipeline import Microbatch, Pipeline  # noqa: E402
from models.backends.megatron import MegatronBackend  # noqa: E402
from models.weights import load_full_state  # noqa: E402
from tests.helpers import worker_cases  # noqa: E402


def gathered_grads(model) -> dict[str, torch.Tensor]:
    sharding = model.sharding
    return {
        name: sharding.gather_weight(p.grad, p) if sharding.is_split(p) and p.grad is not None else p.grad
        for name, p in model.named_parameters()
    }


def run(model, inputs, weights):
    v, a = model(*inputs["args"], **inputs["kwargs"])
    loss = ((v - weights[0]) ** 2).mean() + ((a - weights[1]) ** 2).mean()
    loss.backward()
    return v, a, loss


def run_pipelined(model, inputs, weights, layout):
    """The same loss over two one-sample microbatches (each half of the batch mean) through the
    pipeline; outputs and loss are known on the last stage (None elsewhere)."""
    mbs = [
        Microbatch(
            tuple(x[i : i + 1] if torch.is_tensor(x) else x for x in inputs["args"]),
            {k: x[i : i + 1] for k, x in inputs["kwargs"].items()},
        )
        for i in range(2)
    ]
    outputs = []

    def loss_fn(i, out):
        outputs.append(out)
        loss = ((out[0] - weights[0][i : i + 1]) ** 2).mean() + ((out[1] - weights[1][i : i + 1]) ** 2).mean()
        return loss / 2, {"loss": float(loss.detach()) / 2}

    logged = Pipeline(layout).forward_backward(model, mbs, loss_fn)
    if not model.stage.last:
        return None, None, None
    v, a = (torch.cat([o[k] for o in outputs]).detach() for k in (0, 1))
    return v, a, torch.tensor(sum(x["loss"] for x in logged))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--backend", default="megatron")
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--preset", default="tiny")  # tiny-2.3: LTX-2.3's gated attention and text adaLN
    dist.init_process_group("gloo")
    for args, out in worker_cases():
        run_case(parser.parse_args(args), out)
    dist.destroy_process_group()


def run_case(args: argparse.Namespace, out: Path) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    layout = ProcessLayout.from_megatron(torch.device("cpu"))

    def parallel_model():
        sharding = layout.sharding(sequence_parallel=args.sp)
        backend = MegatronBackend(sharding) if args.backend == "megatron" else args.backend
        return models.build_model(cfg, backend=backend, stage=layout.stage())

    cfg = models.PRESETS[args.preset]
    torch.manual_seed(0)
    ref = models.build_model(cfg)
    with torch.no_grad():  # non-trivial QK norm weights so their sharding matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if "to_gate_logits" in name:  # gates away from 1 and different per head, so their split matters
                p.normal_(0, 0.5)
    ref.set_a2v_grad_scales([0.5, 1.0, 0.9, 1.0])
    par = parallel_model()
    load_full_state(par, ref.state_dict())
    par.set_a2v_grad_scales([0.5, 1.0, 0.9, 1.0])

    # Reading only this rank's slices from an official-layout file gives the same shards.
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ref.safetensors"
    if dist.get_rank() == 0:
        models.save_model(ref, path, "official")
    dist.barrier()
    from_file = parallel_model()
    models.load_model_weights(from_file, path)
    file_equal = all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), par.state_dict().values()))

    g = torch.Generator().manual_seed(1)
    # Odd token counts: under sequence parallelism every stream is padded to split over 2 ranks.
    b, grid, tv, ta, tc = 2, (3, 1, 3), 9, 13, 7
    mask = torch.ones(b, tc, dtype=torch.bool)
    mask[1, 5:] = False
    inputs = {
        "args": (
            torch.randn(b, tv, cfg.in_channels, generator=g),
            torch.randn(b, ta, cfg.audio_in_channels, generator=g),
            torch.rand(b, generator=g),
            torch.randn(b, tc, cfg.video_context_dim, generator=g),
            torch.randn(b, tc, cfg.audio_context_dim, generator=g),
            grid,
            24.0,
        ),
        "kwargs": {"video_context_mask": mask, "audio_context_mask": mask},
    }
    weights = (torch.randn(b, tv, cfg.in_channels, generator=g), torch.randn(b, ta, cfg.audio_in_channels, generator=g))

    rv, ra, rloss = run(ref, inputs, weights)
    if args.pp > 1:
        pv, pa, ploss = run_pipelined(par, inputs, weights, layout)
    else:
        pv, pa, ploss = run(par, inputs, weights)
    GradSync(par, layout).finish()  # the sums sequence parallelism owes replicated parameters
    ref_grads, par_grads = dict((n, p.grad) for n, p in ref.named_parameters()), gathered_grads(par)
    # Error of each gradient relative to the largest entry of that parameter's gradient.
    grad_err = {
        n: float((par_grads[n] - ref_grads[n]).abs().max() / (ref_grads[n].abs().max() + 1e-30))
        for n in par_grads
        if par_grads[n] is not None
    }
    worst = max(grad_err, key=grad_err.get)
    # Every parameter has a gradient on exactly one stage.
    stages = [None] * args.pp
    dist.all_gather_object(stages, sorted(n for n, g in par_grads.items() if g is not None), group=layout.group("pp"))
    held = [n for names in stages for n in names]
    result = {
        "rank": dist.get_rank(),
        "tp": args.tp,
        "pp": args.pp,
        "sp": args.sp,
        "stage": layout.ranks["pp"],
        "preset": args.preset,
        "ltx23_params": sum("gate_logits" in n or "prompt" in n for n in ref.state_dict()),
        "last_stage": par.stage.last,
        "grad_rel_err": grad_err[worst],
        "worst_grad": worst,
        "missing_grads": sorted(set(ref_grads) - set(held)),
        "duplicate_grads": len(held) - len(set(held)),
        "none_grads": sorted(n for n, g in par_grads.items() if g is None),
        "file_load_equal": file_equal,
    }
    if par.stage.last:
        result.update(
            video_err=float((pv - rv).abs().max()),
            audio_err=float((pa - ra).abs().max()),
            loss_rel_err=float((ploss - rloss).abs() / rloss.abs()),
        )
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
