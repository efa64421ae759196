"""Every attention implementation on every attention call of LTX-2, and the dispatch table from them.

    python -m bench.kernels [--reps N] [--shapes ltx2|small] [--dispatch TABLE] [--out PATH]

Calls (B=1, H=32, bf16 on CUDA): a block's six attentions at the training shapes of a 121-frame clip
at 512x768 (6144 video tokens, 126 audio tokens, 1024 text tokens of which the last 200 are real) and
at four times the pixels (24576 video, 504 audio): video and audio self-attention, video-text and
audio-text (key mask), A2V (video queries on audio keys, head dim 64) and V2A. Each is timed as the
model runs it: `fwd` (no gradient: rollouts), `fwd+bwd` (training; A2V also with the partial
stop-gradient, kv_grad_scale 0.9), V2A `fwd+lse` (the rollout's probe) and the V2A `mass` with the
forward's LSE. Candidates are `kernels.dispatch.candidates`: SDPA as torch picks, SDPA held to cuDNN,
flash or memory-efficient, flash-attn where installed, our Triton kernels; a candidate that refuses a
call or differs from SDPA by more than bf16 rounding (relative error 2e-2 on outputs and gradients) is
recorded with its error and never chosen. On a CPU only the torch paths run, at small shapes, in fp32,
labelled CPU figures.

Per row: median time, TFLOP/s (model FLOPs: backward counted as 2.5x forward), GB/s over the minimum
bytes (inputs read and outputs written once), those as fractions of the copy bandwidth and matmul rate
measured in the same run, and peak memory above the inputs (CUDA only). Writes the JSON after each call,
so a run cut short keeps what it measured. `--dispatch TABLE` merges the fastest candidate per shape
class into that dispatch table for this device and dtype (kernels/dispatch_table.json is the committed one).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from bench.measure import CUDA, DTYPE, device_label, device_peaks, package_versions, peak_mib, timer
from engine.errors import one_line
from kernels import dispatch
from kernels.dispatch import DispatchTable, Implementation

HEADS = {"ltx2": 32, "small": 4}
# (video tokens, audio tokens, text tokens, real text tokens) per shape set.
SHAPES = {"ltx2": [(6144, 126, 1024, 200), (24576, 504, 1024, 200)], "small": [(512, 26, 64, 20)]}
A2V_SCALE = 0.9  # kv_grad_scale of a shallow block under surgery
TOLERANCE = 2e-2  # relative error against SDPA: bf16 rounding, and far below any indexing bug


class WrongResult(Exception):
    """A candidate's result differs from the reference by more than TOLERANCE."""


@dataclass(frozen=True)
class Call:
    """One attention of a block: name, query and key lengths, head dim, real keys (None: no mask), ops."""

    name: str
    nq: int
    nk: int
    dim: int
    real_keys: int | None
    ops: tuple[str, ...]


def block_calls(video: int, audio: int, text: int, real_text: int) -> list[Call]:
    """The six attentions of an LTX-2 block (ARCHITECTURE.md section 2) and the ops each is run as."""
    both = ("fwd", "fwd+bwd")
    return [
        Call("video-self", video, video, 128, None, both),
        Call("audio-self", audio, audio, 64, None, both),
        Call("video-text", video, text, 128, real_text, both),
        Call("audio-text", audio, text, 64, real_text, both),
        Call("a2v", video, audio, 64, None, ("fwd", "fwd+bwd", "fwd+bwd/scaled")),
        Call("v2a", audio, video, 64, None, ("fwd", "fwd+lse", "fwd+bwd", "mass")),
    ]


def relative_error(ours: Tensor, ref: Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


class CallInputs:
    """Random inputs of one call (never zeros), with its key mask: the last `real_keys` keys are real, as
    left-padded prompts leave them."""

    def __init__(self, call: Call, heads: int, device: torch.device):
        shape = (1, heads)
        self.q, self.k, self.v = (
            torch.randn(*shape, n, call.dim, device=device, dtype=DTYPE, requires_grad=True)
            for n in (call.nq, call.nk, call.nk)
        )
        self.do = torch.randn(*shape, call.nq, call.dim, device=device, dtype=DTYPE)
        self.mask = None
        if call.real_keys is not None:
            self.mask = torch.zeros(1, call.nk, dtype=torch.bool, device=device)
            self.mask[:, -call.real_keys :] = True

    def run(self, impl: Implementation, op: str, scale: float) -> Callable[[], object]:
        """A zero-argument call of `impl` doing `op`; it returns what is compared across implementations."""
        q, k, v, mask = self.q, self.k, self.v, self.mask
        if op == "mass":
            lse = dispatch.IMPLEMENTATIONS["sdpa"].attention_lse(q.detach(), k.detach(), k.detach(), 1.0, mask)[1]
            return lambda: impl.mass(q.detach(), k.detach(), key_mask=mask, lse=lse)
        if op == "fwd+bwd":
            return lambda: torch.autograd.grad(impl.attention(q, k, v, scale, mask), (q, k, v), self.do)

        def forward() -> object:
            with torch.no_grad():
                return (
                    impl.attention_lse(q, k, v, scale, mask)
                    if op == "fwd+lse"
                    else impl.attention(q, k, v, scale, mask)
                )

        return forward

    def counts(self, op: str) -> tuple[int, int]:
        """(model FLOPs, minimum bytes) of `op`: QK^T and PV 2*Nq*Nk*D each per head, backward 2.5x."""
        _, heads, nq, dim = self.q.shape
        nk, size = self.k.shape[2], self.q.element_size()
        fwd_flops = 4 * heads * nq * nk * dim
        fwd_bytes = size * heads * dim * (2 * nq + 2 * nk)
        if op == "mass":
            return fwd_flops // 2, size * heads * dim * (nq + nk) + 4 * heads * nq + 4 * nk
        if op == "fwd+bwd":  # also read q o dO k v, write dq dk dv
            return int(3.5 * fwd_flops), fwd_bytes + size * heads * dim * (4 * nq + 4 * nk)
        return fwd_flops, fwd_bytes + (4 * heads * nq if op == "fwd+lse" else 0)


def bench_call(call: Call, heads: int, device: torch.device, reps: int) -> list[dict]:
    """Rows for every op and candidate of `call`; the first candidate, the default (SDPA; the mass: the torch
    reference), is what the others are compared with."""
    inputs = CallInputs(call, heads, device)
    rows = []
    for op_name in call.ops:
        op, scaled = op_name.removesuffix("/scaled"), op_name.endswith("/scaled")
        scale = A2V_SCALE if scaled else 1.0
        cls = dispatch.call_class(op, inputs.q, inputs.k, scale, inputs.mask)
        flops, nbytes = inputs.counts(op)
        expected = None  # the reference's outputs: the first candidate's
        for n, impl in enumerate(dispatch.candidates(op, inputs.q, inputs.mask)):
            row = {
                "case": call.name,
                "class": cls.key,
                "op": op,
                "impl": impl.name,
                "shape": [1, heads, call.nq, call.nk, call.dim],
                "kv_grad_scale": scale,
                "real_keys": call.real_keys,
                "flops": flops,
                "bytes": nbytes,
            }
            fn = inputs.run(impl, op, scale)
            try:
                result = fn()
                outputs = list(result) if isinstance(result, tuple) else [result]
                if n == 0:
                    expected = outputs
                elif expected is None:
                    raise RuntimeError("the reference failed: nothing to check this candidate against")
                error = max(relative_error(ours, ref) for ours, ref in zip(outputs, expected, strict=True))
                row["rel_error_vs_reference"] = error
                if not error <= TOLERANCE:  # NaN fails too
                    raise WrongResult(f"relative error against the reference {error:.3g} > {TOLERANCE}")
                row["seconds"] = timer(fn, reps)
                row["peak_mib"] = peak_mib(fn)
            # Any failure of a candidate (a refused call, OOM, a Triton compile error, a wrong result) is its row's.
            except Exception as err:
                row["error"] = one_line(err, limit=300)
            rows.append(row)
    return rows


def add_rates(rows: list[dict], copy_gbps: float, matmul_tflops: float) -> None:
    for row in rows:
        if "seconds" in row:
            row["tflops"] = row["flops"] / row["seconds"] / 1e12
            row["gbps"] = row["bytes"] / row["seconds"] / 1e9
            row["frac_copy_bw"] = row["gbps"] / copy_gbps
            row["frac_matmul"] = row["tflops"] / matmul_tflops


HEADER = (
    f"{'case':10s} {'op':8s} {'impl':14s} {'B,H,Nq,Nk,D':>20s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
    f"{'%copy':>6s} {'%mm':>6s} {'peak MiB':>9s}"
)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        shape = ",".join(map(str, r["shape"]))
        op = r["op"] + ("/g" if r["kv_grad_scale"] != 1.0 else "")
        if "error" in r:
            print(f"{r['case']:10s} {op:8s} {r['impl']:14s} {shape:>20s}   {r['error'][:60]}")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(
            f"{r['case']:10s} {op:8s} {r['impl']:14s} {shape:>20s} {r['seconds'] * 1e3:9.3f} {r['tflops']:8.2f} "
            f"{r['gbps']:8.1f} {100 * r['frac_copy_bw']:6.1f} {100 * r['frac_matmul']:6.1f} {peak:>9s}"
        )


def update_table(path: Path, label: str, dtype: str, rows: list[dict], about: str) -> dict[str, dict]:
    """Merges the fastest candidate per class measured here into the table at `path`; returns the entries."""
    entries = dispatch.fastest(r for r in rows if "seconds" in r)
    table = DispatchTable.load(path) if path.exists() else DispatchTable(source=str(path))
    table.merged(label, dtype, entries).save(path, about)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default ltx2 on CUDA, small on CPU")
    parser.add_argument("--dispatch", default=None, help="dispatch table to merge the fastest candidates into")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-kernels.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    reps = args.reps or (20 if CUDA else 3)
    shapes = args.shapes or ("ltx2" if CUDA else "small")
    label, dtype, today = device_label(device), dispatch.dtype_name(DTYPE), date.today().isoformat()
    copy_gbps, matmul_tflops = device_peaks(device, DTYPE, reps)
    what = (
        f"GPU figures, {torch.cuda.get_device_name(device)}, {dtype}"
        if CUDA
        else f"CPU figures ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{dtype}, torch paths only)"
    )
    print(f"{what}; measured copy {copy_gbps:.1f} GB/s, {dtype} matmul {matmul_tflops:.3f} TFLOP/s", flush=True)
    print(HEADER)
    out = Path(args.out or f"bench/results/{label}-{today}-kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": label,
        "figures": what,
        "date": today,
        "reps": reps,
        "versions": package_versions("triton", "flash_attn"),
        "dtype": dtype,
        "shapes": shapes,
        "copy_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops,
        "rows": [],
    }
    for video, audio, text, real_text in SHAPES[shapes]:
        for call in block_calls(video, audio, text, real_text):
            rows = bench_call(call, HEADS[shapes], device, reps)
            add_rates(rows, copy_gbps, matmul_tflops)
            print_rows(rows)
            result["rows"] += rows
            out.write_text(json.dumps(result, indent=1) + "\n")  # after each call: a cut-short run keeps its rows
            if CUDA:
                torch.cuda.empty_cache()
    if args.dispatch:
        about = (
            "Attention implementation per device, dtype and shape class: the fastest that "
            "`python -m bench.kernels --dispatch` measured (kernels/dispatch.py); the 'ms' of every candidate."
        )
        result["dispatch"] = update_table(Path(args.dispatch), label, dtype, result["rows"], about)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"dispatch for {label}/{dtype} merged into {args.dispatch}:")
        for key, entry in result["dispatch"].items():
            others = ", ".join(f"{k} {v:.3f}" for k, v in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
            print(f"  {key:40s} -> {entry['impl']:14s} ms: {others}")
    print(f"wrote {out}")
    wrong = [
        f"{r['case']} {r['op']} {r['impl']}" for r in result["rows"] if r.get("error", "").startswith("WrongResult")
    ]
    if wrong:
        print(f"WRONG RESULTS (never chosen): {'; '.join(wrong)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
