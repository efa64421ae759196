"""Compile every Triton kernel variant for Hopper (sm_90) ahead of time, without a GPU.

    python -m bench.compile_sm90 [--quick] [--jobs N] [--out PATH]

Why: the lent GPU machines run Triton 3.6 and CI runs 3.7.1, while GPU time is scarce and CI has no
GPU. So this compiles, with whatever Triton is installed, for GPUTarget("cuda", 90, 32) (what an H100
driver reports), every variant of the @triton.jit kernels in kernels/triton_attention.py and
kernels/triton_mass.py that the launchers can produce: each dtype (fp32, bf16, fp16), head dim (64,
128), direction (6144 video queries on 126 audio keys and the reverse), key mask or none, split or
unsplit loop, forward with and without V, and each autotune config left after the project's prune.
It checks that every variant yields a cubin, uses wgmma where it has a dot in bf16/fp16, and fits
the H100's 232448 bytes of shared memory per block; registers and spills (ptxas -v) are recorded for
tuning.

How: the arguments are built the way the launchers build them, at LTX-2 shapes (B=1, H=32) in the
model's (B, N, H, D)-transposed layout, with meta tensors standing in for device tensors (the binder
reads only dtypes, strides and the alignment of data pointers). Autotune configs and heuristics are
applied as Autotuner.run and Heuristics.run apply them, then the kernel's own binder and
`_pack_args` produce what JITFunction.run would compile. Identical specializations are compiled
once. When a kernel's signature no longer matches the launcher mirrored here, the binder raises and
that variant counts as a failure.

--quick compiles one variant per kernel and head dim, in bf16 (first launcher call, first autotune
config): a CI-sized check. Prints a table per (kernel, dtype, head dim), writes JSON (default
bench/results/compile-sm90-triton<version>-<date>.json) and exits 0 only when every variant
compiled, fits and uses wgmma where expected.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from itertools import product
from pathlib import Path
from typing import Any

import torch
import triton
from torch import Tensor
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import triton_attention as ta
from kernels import triton_mass as tm

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one block may use on an H100 (227 KiB, opt-in)
KERNELS = {
    "_attn_fwd": ta._attn_fwd,
    "_attn_bwd_delta": ta._attn_bwd_delta,
    "_attn_bwd_dq": ta._attn_bwd_dq,
    "_attn_bwd_dkdv": ta._attn_bwd_dkdv,
    "_attention_mass_kernel": tm._attention_mass_kernel,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (64, 128)
BATCH, HEADS, N_VIDEO, N_AUDIO = 1, 32, 6144, 126
# (n_q, n_k, key mask): video queries on audio keys (ragged: 126 is no multiple of any BLOCK_N), the
# reverse (6144 is a multiple of all), and a (B, Nk) key mask.
CASES = ((N_VIDEO, N_AUDIO, False), (N_AUDIO, N_VIDEO, False), (N_VIDEO, N_AUDIO, True))
# Unsplit, and what num_splits picks for the short side on an H100 (132 SMs, B*H = 32 programs).
SPLITS = (1, 9)


@dataclass
class Call:
    """A kernel call: positional and keyword arguments as a launcher passes them (after `expand`, with
    an autotune config and the heuristic values added), and tags that describe the variant."""

    kernel: str
    args: list[Any]
    kwargs: dict[str, Any]
    tags: dict[str, Any] = field(default_factory=dict)


def heads_layout(n: int, dim: int, dtype: torch.dtype) -> Tensor:
    """(B, H, N, D) as the model passes it: (B, N, H * D) projections split into heads, transposed."""
    return torch.empty(BATCH, n, HEADS * dim, dtype=dtype, device="meta").unflatten(-1, (HEADS, -1)).transpose(1, 2)


def forward_call(q: Tensor, k: Tensor, v: Tensor | None, key_mask: Tensor | None, splits: int) -> Call:
    """The _attn_fwd launch of `attention_forward` (splits as num_splits would pick them)."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    vv = k if v is None else v
    lse = torch.empty(splits, batch, heads, n_q, device=q.device, dtype=torch.float32)
    o = None
    if v is not None:
        o = torch.empty(
            splits, batch, heads, n_q, dim, device=q.device, dtype=q.dtype if splits == 1 else torch.float32
        )
    mask, stride_mb, stride_mn = ta.mask_args(key_mask)
    return Call(
        "_attn_fwd",
        [
            q,
            k,
            vv,
            mask,
            o,
            lse,
            *q.stride(),
            *k.stride(),
            *vv.stride(),
            stride_mb,
            stride_mn,
            heads,
            n_q,
            n_k,
            splits,
            ta.LOG2E / math.sqrt(dim),
        ],
        dict(HEAD_DIM=dim, WRITE_O=v is not None),
        {"split": splits},
    )


def backward_calls(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, key_mask: Tensor | None, splits: int
) -> list[Call]:
    """The launches of `_attention_backward` with dQ and dK/dV needed (kv_grad_scale 0 launches no dK/dV)."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(dim)
    mask, stride_mb, stride_mn = ta.mask_args(key_mask)
    delta = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    calls = [Call("_attn_bwd_delta", [o, do, delta, *do.stride(), heads, n_q], dict(HEAD_DIM=dim, BLOCK_M=64))]
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), stride_mb, stride_mn, heads, n_q, n_k)
    dq = torch.empty(splits, *q.shape, device=q.device, dtype=q.dtype if splits == 1 else torch.float32)
    calls.append(
        Call(
            "_attn_bwd_dq",
            [q, k, v, do, lse, delta, mask, dq, *common, splits, sm_scale],
            dict(HEAD_DIM=dim),
            {"split": splits},
        )
    )
    dtype = k.dtype if splits == 1 else torch.float32
    dk = torch.empty(splits, *k.shape, device=k.device, dtype=dtype)
    dv = torch.empty(splits, *k.shape, device=k.device, dtype=dtype)
    calls.append(
        Call(
            "_attn_bwd_dkdv",
            [q, k, v, do, lse, delta, mask, dk, dv, *common, splits, sm_scale, 1.0],
            dict(HEAD_DIM=dim),
            {"split": splits},
        )
    )
    return calls


def mass_call(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Call:
    """The _attention_mass_kernel launch of `attention_mass` (LSE from the forward, fresh output)."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    out = torch.zeros(batch, n_k, device=q.device, dtype=torch.float32)
    mask, stride_mb, stride_mn = ta.mask_args(key_mask)
    return Call(
        "_attention_mass_kernel",
        [
            q,
            k,
            lse,
            mask,
            out,
            *q.stride(),
            *k.stride(),
            *lse.stride(),
            stride_mb,
            stride_mn,
            *out.stride(),
            heads,
            n_q,
            n_k,
            tm.LOG2E / math.sqrt(dim),
            1.0 / heads,
        ],
        dict(HEAD_DIM=dim),
    )


def launcher_calls(dtypes: dict[str, torch.dtype]) -> Iterator[Call]:
    """Every kernel call the launchers make at LTX-2 shapes, per dtype, head dim, case and split."""
    for (name, dtype), dim, (n_q, n_k, masked) in product(dtypes.items(), HEAD_DIMS, CASES):
        q, do = heads_layout(n_q, dim, dtype), heads_layout(n_q, dim, dtype)
        k, v = heads_layout(n_k, dim, dtype), heads_layout(n_k, dim, dtype)
        o = torch.empty(BATCH, HEADS, n_q, dim, dtype=dtype, device="meta")
        lse = torch.empty(BATCH, HEADS, n_q, dtype=torch.float32, device="meta")
        key_mask = torch.empty(BATCH, n_k, dtype=torch.bool, device="meta") if masked else None
        calls = [mass_call(q, k, key_mask)]
        for splits in SPLITS:
            calls += [
                forward_call(q, k, v, key_mask, splits),
                forward_call(q, k, None, key_mask, splits),
                *backward_calls(q, k, v, o, lse, do, key_mask, splits),
            ]
        for call in calls:
            call.tags = dict(dtype=name, head_dim=dim, n_q=n_q, n_k=n_k, key_mask=masked, **call.tags)
            yield call


def jit_function(kernel: str) -> JITFunction:
    """The JITFunction under a kernel's autotune and heuristics decorators."""
    obj = KERNELS[kernel]
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def expand(call: Call) -> list[Call]:
    """The calls a kernel's JITFunction receives for one launcher call: one per autotune config left
    after pruning, with the heuristics applied, in decorator order (as Autotuner and Heuristics do)."""
    obj = KERNELS[call.kernel]
    named = dict(zip(obj.arg_names, call.args))
    pending = [dict(call.kwargs)]
    while not isinstance(obj, JITFunction):
        if isinstance(obj, Autotuner):
            configs = obj.configs
            if len(configs) > 1:  # Autotuner.run neither prunes nor benchmarks a single config
                obj.nargs = named
                try:
                    configs = obj.prune_configs(dict(call.kwargs))
                finally:
                    obj.nargs = None
            pending = [{**kw, **c.all_kwargs()} for kw in pending for c in configs]
        elif isinstance(obj, Heuristics):
            for kw in pending:
                kw.update({name: fn({**named, **kw}) for name, fn in obj.values.items()})
        else:
            raise TypeError(f"{call.kernel}: unexpected decorator {type(obj).__name__}")
        obj = obj.fn
    return [Call(call.kernel, call.args, kw, call.tags) for kw in pending]


def run_kwargs(jit: JITFunction, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options JITFunction.run adds to a call's keyword arguments."""
    return {
        **kwargs,
        "debug": kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug,
        "instrumentation_mode": triton.knobs.compilation.instrumentation_mode,
    }


def variants(quick: bool) -> tuple[list[Call], list[dict[str, Any]]]:
    """(distinct kernel calls to compile, failure records of launcher calls that did not bind).

    The JIT binder runs here too, so a launcher that no longer matches its kernel fails at once and
    calls with the same specialization (e.g. _attn_bwd_delta, which ignores the key mask) count once.
    """
    backend = make_backend(TARGET)
    calls, failures, families, keys = [], [], set(), set()
    for launch in launcher_calls({"bf16": DTYPES["bf16"]} if quick else DTYPES):
        family = (launch.kernel, launch.tags["dtype"], launch.tags["head_dim"])
        if quick and family in families:
            continue
        families.add(family)
        try:
            jit = jit_function(launch.kernel)
            binder = create_function_from_signature(jit.signature, jit.params, backend)
            expanded = expand(launch)
            for call in expanded[:1] if quick else expanded:
                _, specialization, options = binder(*call.args, **run_kwargs(jit, call.kwargs))
                key = (call.kernel, repr(specialization), repr(sorted(options.items())))
                if key not in keys:
                    keys.add(key)
                    calls.append(call)
        except Exception as e:  # noqa: BLE001 - any drift between launcher and kernel is a reported failure
            failures.append(failure(launch, e))
    return calls, failures


def failure(call: Call, error: Exception) -> dict[str, Any]:
    """Record of a call that did not compile."""
    return dict(
        kernel=call.kernel,
        **call.tags,
        cubin=False,
        error=f"{type(error).__name__}: {error}"[:2000],
        problems=["did not compile"],
    )


def init_worker(tmp_dir: str) -> None:
    """Triton's cache and ptxas's temporary files in `tmp_dir`, every variant compiled afresh (so ptxas
    really runs) and its -v log printed to stdout."""
    tempfile.tempdir = tmp_dir
    triton.knobs.cache.dir = os.path.join(tmp_dir, "cache")
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True


def compile_call(call: Call) -> dict[str, Any]:
    """Compile one variant for TARGET as JITFunction.run would, and describe the result."""
    start = time.perf_counter()
    try:
        jit = jit_function(call.kernel)
        backend = make_backend(TARGET)
        kwargs = run_kwargs(jit, call.kwargs)
        bound, specialization, _ = create_function_from_signature(jit.signature, jit.params, backend)(
            *call.args, **kwargs
        )
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, None)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(jit, signature, constexprs, attrs), target=TARGET, options=options.__dict__
            )
    except Exception as e:  # noqa: BLE001 - a compile error is a reported failure
        return failure(call, e)
    ptxas = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    rec = dict(
        kernel=call.kernel,
        **call.tags,
        constexprs={jit.arg_names[i]: value for (i, *_), value in constexprs.items() if jit.params[i].is_constexpr},
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        cubin=bool(compiled.asm.get("cubin")),
        dots=len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"])),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", compiled.asm["ptx"])),
        shared=compiled.metadata.shared,
        regs=int(regs.group(1)) if regs else None,
        stack=int(spills.group(1)) if spills else None,
        spill_store=int(spills.group(2)) if spills else None,
        spill_load=int(spills.group(3)) if spills else None,
        seconds=round(time.perf_counter() - start, 1),
        error=None,
    )
    rec["problems"] = problems(rec)
    return rec


def problems(rec: dict[str, Any]) -> list[str]:
    """Why a compiled variant would fail on an H100 or miss the tensor cores."""
    found = []
    if not rec["cubin"]:
        found.append("no cubin")
    if rec["shared"] > MAX_SHARED:
        found.append(f"shared memory {rec['shared']} > {MAX_SHARED} bytes")
    if rec["dtype"] in ("bf16", "fp16") and rec["dots"] and not rec["wgmma"]:
        found.append(f"{rec['dtype']} dot without wgmma")
    return found


def span(values: list[int]) -> str:
    """'a' or 'a-b' for the range of some integers."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def table(records: list[dict[str, Any]]) -> list[str]:
    """One line per (kernel, dtype, head dim) family, then one per failed variant."""
    families: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        families.setdefault((r["kernel"], r["dtype"], r["head_dim"]), []).append(r)
    lines = [
        f"{'kernel':24s} {'dtype':5s} {'D':>3s} {'variants':>8s} {'compiled':>8s} {'wgmma':>7s} "
        f"{'max smem B':>10s} {'regs':>7s} {'spilling':>8s} {'max spill B':>11s}"
    ]
    for (kernel, dtype, dim), recs in families.items():
        done = [r for r in recs if r["error"] is None]
        wgmma = "-" if not done or not any(r["dots"] for r in done) else span([r["wgmma"] for r in done])
        regs = span([r["regs"] for r in done if r["regs"] is not None] or [0])
        spill = [r["spill_store"] or 0 for r in done]
        lines.append(
            f"{kernel:24s} {dtype:5s} {dim:3d} {len(recs):8d} {len(done):8d} {wgmma:>7s} "
            f"{max([r['shared'] for r in done] or [0]):10d} {regs:>7s} "
            f"{sum(s > 0 for s in spill):8d} {max(spill or [0]):11d}"
        )
    for r in records:
        if r["problems"]:
            what = r["error"].splitlines()[0][:300] if r["error"] else "; ".join(r["problems"])
            config = " ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
            lines.append(
                f"FAILED {r['kernel']} {r['dtype']} D={r['head_dim']} n_q={r['n_q']} n_k={r['n_k']} "
                f"mask={r['key_mask']} split={r.get('split', '-')} {config}: {what}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, one variant per kernel and head dim")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/compile-sm90-triton<version>-<date>.json)"
    )
    args = parser.parse_args(argv)
    if ta.INTERPRET:
        parser.error("TRITON_INTERPRET=1 was set when the kernels were imported: unset it to compile them")

    start = time.perf_counter()
    calls, records = variants(args.quick)
    print(
        f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET}: compiling {len(calls)} "
        f"variants with {args.jobs} processes",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="compile-sm90-") as tmp_dir,
        ProcessPoolExecutor(args.jobs, initializer=init_worker, initargs=(tmp_dir,)) as pool,
    ):
        records += pool.map(compile_call, calls)
    compiled = sum(r["cubin"] for r in records)
    failed = sum(bool(r["problems"]) for r in records)
    print("\n".join(table(records)))
    print(
        f"{len(records)} variants, {compiled} compiled, {failed} failed; max shared memory "
        f"{max([r.get('shared', 0) for r in records] or [0])} of {MAX_SHARED} bytes; "
        f"{sum(bool(r.get('spill_store')) for r in records)} variants spill; {time.perf_counter() - start:.0f}s"
    )

    out = Path(
        args.out
        or Path(__file__).resolve().parent
        / "results"
        / f"compile-sm90-triton{triton.__version__}-{date.today().isoformat()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(
        {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "target": {"backend": TARGET.backend, "arch": TARGET.arch, "warp_size": TARGET.warp_size},
            "max_shared": MAX_SHARED,
            "date": date.today().isoformat(),
            "quick": args.quick,
            "variants": len(records),
            "compiled": compiled,
            "failed": failed,
        },
        indent=1,
    )
    # one line per record: the file stays short and diffs variant by variant
    out.write_text(summary[:-2] + ',\n "records": [\n  ' + ",\n  ".join(map(json.dumps, records)) + "\n ]\n}\n")
    print(f"wrote {out}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
