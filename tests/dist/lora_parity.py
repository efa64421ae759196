"""torchrun worker: LoRA adapters on the tensor(-and-sequence)-parallel megatron model against the
single-process model with the same adapters.

Every rank builds the same single-process model (same seed), loads its tensor-parallel slices of the
base into the parallel model, adapts both (the parallel model must draw the same initial adapters,
sliced), loads random whole adapters (B non-zero) into both, runs forward and backward on the same
inputs and writes to <out>/rank<r>.json the largest differences of the outputs, the loss, the gathered
adapter gradients, the "old" set's and the base's (adapters off) outputs, and of the outputs after
each rank merged its slice of the adapters.

One launch runs several cases (`--out DIR --case ID ARGS...`, tests.helpers.torchrun_cases), so that
start-up (~10-20 s on a 2-core machine: every process imports torch and megatron-core) is paid once. Each
case initialises megatron's parallel state with its own tp from the state a fresh worker starts in
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
from models.backends.megatron import MegatronBackend  # noqa: E402
from models.lora import (  # noqa: E402
    DEFAULT_TARGETS,
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_named_parameters,
    lora_state_dict,
    merge_lora,
    use_adapter,
)
from models.weights import load_full_state  # noqa: E402
from tests.helpers import worker_cases  # noqa: E402

LORA = LoRAConfig(rank=4, alpha=8.0)
# LTX-2.3 also adapts its per-head gate logits (column-split like Q/K/V) and the replicated prompt adaLN.
LORA_23 = LoRAConfig(rank=4, alpha=8.0, targets=(*DEFAULT_TARGETS, "*.to_gate_logits", "prompt_adaln_single.linear"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def adapter_grads(model) -> dict[str, torch.Tensor | None]:
    """Whole gradients of the "default" set (tensor-parallel slices joined), keyed as lora_state_dict."""
    sharding = model.sharding
    return {
        k: sharding.gather_weight(p.grad, p) if sharding.is_split(p) and p.grad is not None else p.grad
        for k, p in lora_named_parameters(model).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--preset", default="tiny")
    dist.init_process_group("gloo")
    for args, out in worker_cases():
        run_case(parser.parse_args(args), out)
    dist.destroy_process_group()


def run_case(args: argparse.Namespace, out: Path) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    layout = ProcessLayout.from_megatron(torch.device("cpu"))

    cfg = models.PRESETS[args.preset]
    lora = LORA_23 if cfg.gated_attention else LORA
    torch.manual_seed(0)
    ref = models.build_model(cfg)
    with torch.no_grad():  # non-trivial QK norm weights so their sharding matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    par = models.build_model(cfg, backend=MegatronBackend(layout.sharding(sequence_parallel=args.sp)))
    load_full_state(par, ref.state_dict())
    for model in (ref, par):
        model.set_a2v_grad_scales([0.5, 1.0, 0.9, 1.0])  # surgery scales the A2V to_k/to_v adapters' gradients
        apply_lora(model, lora, seed=3)
    # Layout-independent init: the parallel model's adapters are slices of the single process's. Each set is
    # gathered once, on every rank (gathering it again for every key took ~50k all-gathers, ~27 s a case).
    whole = {s: lora_state_dict(par, s, whole=True) for s in lora.adapters}
    init_equal = all(torch.equal(whole[s][k], v) for s in lora.adapters for k, v in lora_state_dict(ref, s).items())

    g = torch.Generator().manual_seed(2)
    for adapter in lora.adapters:
        random = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(ref, adapter).items()}
        load_lora_state_dict(ref, random, adapter)
        load_lora_state_dict(par, random, adapter, whole=True)

    # Odd token counts: under sequence parallelism every stream is padded to split over 2 ranks.
    b, grid, tv, ta, tc = 2, (3, 1, 3), 9, 13, 7
    mask = torch.ones(b, tc, dtype=torch.bool)
    mask[1, 5:] = False
    inputs = dict(
        video=torch.randn(b, tv, cfg.in_channels, generator=g),
        audio=torch.randn(b, ta, cfg.audio_in_channels, generator=g),
        sigma=torch.rand(b, generator=g),
        video_context=torch.randn(b, tc, cfg.video_context_dim, generator=g),
        audio_context=torch.randn(b, tc, cfg.audio_context_dim, generator=g),
        video_grid=grid,
        video_context_mask=mask,
        audio_context_mask=mask,
    )
    targets = (torch.randn(b, tv, cfg.in_channels, generator=g), torch.randn(b, ta, cfg.audio_in_channels, generator=g))

    outputs, losses = [], []
    for model in (ref, par):
        v, a = model(**inputs)
        loss = ((v - targets[0]) ** 2).mean() + ((a - targets[1]) ** 2).mean()
        loss.backward()
        outputs.append((v.detach(), a.detach()))
        losses.append(loss.detach())
    GradSync(par, layout).finish()  # the sums sequence parallelism owes replicated adapters
    ref_grads, par_grads = adapter_grads(ref), adapter_grads(par)
    # Error of each adapter gradient relative to its largest entry.
    grad_err = {
        k: max_err(par_grads[k], ref_grads[k]) / float(ref_grads[k].abs().max() + 1e-30)
        for k in ref_grads
        if par_grads[k] is not None
    }
    worst = max(grad_err, key=grad_err.get)

    errors = {}
    with torch.no_grad():
        for label, adapter in (("old", "old"), ("off", None)):
            with use_adapter(ref, adapter), use_adapter(par, adapter):
                (rv, ra), (pv, pa) = ref(**inputs), par(**inputs)
            errors[f"{label}_err"] = max(max_err(pv, rv), max_err(pa, ra))
            # How far the adapters move the outputs: the parity above is not the base's alone.
            errors[f"{label}_vs_default"] = max(max_err(rv, outputs[0][0]), max_err(ra, outputs[0][1]))
        merge_lora(par)  # each rank folds its slices into its base slices
        pv, pa = par(**inputs)
        errors["merged_err"] = max(max_err(pv, outputs[0][0]), max_err(pa, outputs[0][1]))

    result = {
        "rank": dist.get_rank(),
        "tp": args.tp,
        "sp": args.sp,
        "init_equal": init_equal,
        "video_err": max_err(outputs[1][0], outputs[0][0]),
        "audio_err": max_err(outputs[1][1], outputs[0][1]),
        "loss_rel_err": float((losses[1] - losses[0]).abs() / losses[0].abs()),
        "grad_rel_err": grad_err[worst],
        "worst_grad": worst,
        "adapter_grads": len(par_grads),
        "none_adapter_grads": sorted(k for k, g in par_grads.items() if g is None),
        "base_grads": sorted(n for n, p in par.named_parameters() if p.grad is not None and ".lora." not in n),
        **errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
