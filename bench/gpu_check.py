"""One command that validates and times everything on a lent GPU, within a fixed time budget.

    python3 -m bench.gpu_check --out "$OUT" --wheels .whl      (on the GPU machine; 450 s by default)
    python -m bench.gpu_check --fetch-wheels --wheels .whl     (here, where pip reaches a registry)
    python -m bench.gpu_check --dry-run --out DIR              (on a CPU: every stage at CPU size)
    python3 -m bench.gpu_check --out "$OUT" --wheels .whl --stages wheels kernels step --budget-s 300   (a rerun)

A lent GPU comes with about 15 minutes of device time, start-up included, and no network, so this is
prepared and tested here and run there once. Stages, each a subprocess with its own time limit (never
past the whole budget), all run whatever the previous ones did, their output streamed to the console
and to gpu_check.log:

  env      the device, driver, torch, Triton and CUDA versions (env.json)
  wheels   installs the carried wheels (WHEELS: what the GPU machines' image lacks) into a private
           site directory that the later stages see on PYTHONPATH
  kernels  `bench.kernels`: every attention implementation on a block's six attentions, each checked
           against SDPA before it is timed (a wrong one is never chosen); the fastest per shape class merged
           into a copy of the committed dispatch table (kernels.json, dispatch_table.json)
  step     `bench.step`: a 2-block 19B training step in bf16, torch-native fp8 and LoRA, with the new
           dispatch table in force (step.json)
  pytest   `pytest -m gpu -x` on the test files that hold GPU tests: every attention candidate and the
           Triton kernels against float64 at LTX-2 shapes, the model on CUDA per implementation
           (pytest.xml); last, so that it finds the Triton kernels compiled (Triton's cache) and the
           measurements are in before it

Last, the issue's targets judged from those figures (summary.json), with what limits each missed one:
its FLOPs and bytes against the matmul rate and copy bandwidth measured in the same run. At most eight
files land in --out, as the device tool brings back. Exit status 0 when every stage passed.

On a lent device: `python -m bench.gpu_check --fetch-wheels --wheels .whl` here (.whl/ is ignored by git),
then one device run of `python3 -m bench.gpu_check --out "$OUT" --wheels .whl` carrying `.whl`, timeout_s 540.
Copy what came back before another run (each run empties $OUT); while device time is left, rerun what failed
with `--stages wheels <failed stages> --budget-s N` (wheels again: every run starts a fresh site folder); give
the machine back; commit kernels.json, step.json and summary.json as bench/results/<device>-<date>-{kernels,
step,gpu-check}.json and dispatch_table.json over kernels/dispatch_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("megatron-core==0.19.2", "nvtx==0.2.17")  # absent from the GPU machines' image (device KINDS.md)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DEVICE_PYTHON = "3.12"
STAGES = ("env", "wheels", "kernels", "step", "pytest")
TARGETS = {
    "a2v_fused_vs_sdpa_hook": 1.0,  # Triton A2V fwd+bwd with the scale fused, speed-up over SDPA + hook: >=
    "mass_over_forward": 0.6,  # Triton mass (LSE given) time over the V2A forward at the same shape: <=
    "step_mfu_bf16": 0.40,  # bf16 step model FLOP/s over the measured bf16 matmul rate: >=
    "fp8_step_speedup": 1.3,  # fp8 step rate over the bf16 step rate: >=
}
ENV_SCRIPT = """
import json, platform, sys, torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
                memory_gib=p.total_memory / 2**30, cudnn=torch.backends.cudnn.version())
import shutil, subprocess
if shutil.which("nvidia-smi"):  # the card's state as found (clocks, power, memory in use): read, never set
    query = "name,driver_version,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
    info["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\\n")
"""


@dataclass
class Stage:
    name: str
    argv: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    returncode: int | None  # None: stopped at its time limit
    seconds: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0


# --- wheels -------------------------------------------------------------------------------------------------------


def _pinned_name(spec: str) -> str:
    """'megatron-core==0.19.2' -> 'megatron_core', as wheel file names spell it."""
    return spec.split("==")[0].replace("-", "_").lower()


def _wheel_name(path: Path) -> str:
    """'megatron_core-0.19.2-cp312-....whl' -> 'megatron_core'."""
    return path.name.split("-")[0].lower()


def check_wheels(directory: Path) -> list[Path]:
    """The wheels in `directory`, exactly one per WHEELS pin at its version; otherwise one line saying what is off."""
    found = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    problems = []
    for spec in WHEELS:
        name, version = _pinned_name(spec), spec.split("==")[1]
        mine = [w for w in found if _wheel_name(w) == name]
        if len(mine) != 1 or f"-{version}-" not in mine[0].name:
            have = ", ".join(w.name for w in mine) or "none"
            problems.append(f"{spec} (found {have})")
    extra = [w.name for w in found if _wheel_name(w) not in {_pinned_name(s) for s in WHEELS}]
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if problems:
        raise ValueError(
            f"--wheels {directory}: need one wheel per pin of bench.gpu_check.WHEELS: {'; '.join(problems)}"
        )
    return found


def fetch_wheels(directory: Path) -> None:
    """Downloads WHEELS for the GPU machines' Python into `directory` (here, where pip reaches a registry)."""
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp"]
    command += ["--python-version", DEVICE_PYTHON, *platforms, "-d", str(directory), *WHEELS]
    subprocess.run(command, check=True)
    print("\n".join(w.name for w in check_wheels(directory)))


# --- stages -------------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """Test files that hold `@pytest.mark.gpu` tests (collecting the others would import what the device lacks)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "@pytest.mark.gpu" in p.read_text()
    )


def stages(out: Path, wheels: Path | None, site: Path, dry_run: bool) -> list[Stage]:
    python = sys.executable
    table = out / "dispatch_table.json"
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    wheel_files = [] if wheels is None else [str(w) for w in check_wheels(wheels)]
    if dry_run or not wheel_files:  # the carried wheels are for the device's Python: only checked here
        install_stage = [python, "-c", f"print('wheels checked, not installed: {len(wheel_files)} files')"]
    else:
        install_stage = [*install, "--upgrade", "--target", str(site), *wheel_files]
    step = ["--blocks", "1", "--steps", "1", "--backends", "torch"] if dry_run else []
    return [
        Stage("env", [python, "-c", ENV_SCRIPT, str(out / "env.json")], 15),
        Stage("wheels", install_stage, 20),
        Stage("kernels", [python, "-m", "bench.kernels", "--out", str(out / "kernels.json"), "--dispatch", str(table)],
              170, {"OMP_NUM_THREADS": "1"} if dry_run else {}),
        Stage("step", [python, "-m", "bench.step", "--out", str(out / "step.json"), *step], 110,
              {"OMNINFT_DISPATCH_TABLE": str(table), **({"OMP_NUM_THREADS": "1"} if dry_run else {})}),
        Stage("pytest", [python, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", "--junitxml",
                         str(out / "pytest.xml"), *gpu_test_files()], 135),
    ]  # fmt: skip


def run_stage(stage: Stage, limit_s: float, env: dict[str, str], log) -> Outcome:
    """Runs one stage in its own process group, streaming its output; stopped (the group killed) at `limit_s`."""
    banner = f"\n===== {stage.name} (limit {limit_s:.0f} s): {' '.join(stage.argv)[:300]}\n"
    print(banner, end="", flush=True)
    log.write(banner)
    start = time.monotonic()
    proc = subprocess.Popen(
        stage.argv,
        cwd=ROOT,
        env={**env, **stage.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def pump() -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = None
    reader.join(timeout=10)
    outcome = Outcome(stage.name, returncode, time.monotonic() - start)
    status = "passed" if outcome.passed else ("stopped at its time limit" if returncode is None else f"rc {returncode}")
    line = f"===== {stage.name}: {status} in {outcome.seconds:.1f} s\n"
    print(line, end="", flush=True)
    log.write(line)
    log.flush()
    return outcome


# --- targets ------------------------------------------------------------------------------------------------------


def _rows(kernels: dict, **match) -> list[dict]:
    return [r for r in kernels.get("rows", []) if "seconds" in r and all(r.get(k) == v for k, v in match.items())]


def _limit(row: dict, kernels: dict) -> str:
    """What bounds a kernel row: its FLOPs over the measured matmul rate against its bytes over the copy bandwidth."""
    compute_s = row["flops"] / (kernels["matmul_tflops"] * 1e12)
    memory_s = row["bytes"] / (kernels["copy_gbps"] * 1e9)
    bound = "compute" if compute_s >= memory_s else "memory"
    floor = max(compute_s, memory_s)
    return (
        f"{row['impl']} {row['seconds'] * 1e3:.3f} ms against a {bound}-bound floor of {floor * 1e3:.3f} ms "
        f"({row['flops'] / 1e9:.1f} GFLOP at {kernels['matmul_tflops']:.0f} TFLOP/s: {compute_s * 1e3:.3f} ms; "
        f"{row['bytes'] / 1e6:.1f} MB at {kernels['copy_gbps']:.0f} GB/s: {memory_s * 1e3:.3f} ms)"
    )


def judge(kernels: dict, step: dict) -> list[dict]:
    """The issue's targets from bench.kernels' and bench.step's JSON: value, target, met, and for kernel
    targets what bounds the measured time."""
    results = []
    for scaled in _rows(kernels, case="a2v", op="fwd+bwd", impl="triton", kv_grad_scale=0.9):
        hook = _rows(kernels, case="a2v", op="fwd+bwd", impl="sdpa", kv_grad_scale=0.9, shape=scaled["shape"])
        if hook:
            value = hook[0]["seconds"] / scaled["seconds"]
            results.append(
                {
                    "target": "a2v_fused_vs_sdpa_hook",
                    "shape": scaled["shape"],
                    "value": value,
                    "goal": f">= {TARGETS['a2v_fused_vs_sdpa_hook']}",
                    "met": value >= TARGETS["a2v_fused_vs_sdpa_hook"],
                    "limit": _limit(scaled, kernels),
                }
            )
    for mass in _rows(kernels, case="v2a", op="mass", impl="triton"):
        forwards = _rows(kernels, case="v2a", op="fwd", shape=mass["shape"])
        if forwards:
            fastest = min(forwards, key=lambda r: r["seconds"])
            value = mass["seconds"] / fastest["seconds"]
            results.append(
                {
                    "target": "mass_over_forward",
                    "shape": mass["shape"],
                    "value": value,
                    "goal": f"<= {TARGETS['mass_over_forward']} (forward: {fastest['impl']})",
                    "met": value <= TARGETS["mass_over_forward"],
                    "limit": _limit(mass, kernels),
                }
            )
    backends = step.get("backends", {})
    if "torch" in backends:
        torch_row = backends["torch"]
        value = torch_row["mfu_measured"]
        results.append(
            {
                "target": "step_mfu_bf16",
                "value": value,
                "goal": f">= {TARGETS['step_mfu_bf16']}",
                "met": value >= TARGETS["step_mfu_bf16"],
                "limit": f"{torch_row['tflops']:.0f} TFLOP/s of a measured {step['matmul_tflops']:.0f} (matmul); "
                f"datasheet MFU {torch_row['mfu_datasheet']}",
            }
        )
        if "fp8" in backends:
            value = torch_row["step_s"] / backends["fp8"]["step_s"]
            results.append(
                {
                    "target": "fp8_step_speedup",
                    "value": value,
                    "goal": f">= {TARGETS['fp8_step_speedup']}",
                    "met": value >= TARGETS["fp8_step_speedup"],
                    "limit": f"bf16 {torch_row['step_s'] * 1e3:.1f} ms, fp8 {backends['fp8']['step_s'] * 1e3:.1f} ms "
                    f"per step ({step['forward_flops_parts']} forward FLOPs by part)",
                }
            )
    return results


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def summarize(out: Path, outcomes: list[Outcome], dry_run: bool) -> dict:
    kernels, step = _read(out / "kernels.json"), _read(out / "step.json")
    summary = {
        "dry_run": dry_run,
        "env": _read(out / "env.json"),
        "stages": [{"name": o.name, "returncode": o.returncode, "seconds": round(o.seconds, 1)} for o in outcomes],
        "targets": judge(kernels, step),
        "dispatch": kernels.get("dispatch", {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n===== summary" + (" (dry run on a CPU: targets are not judged)" if dry_run else ""))
    for o in outcomes:
        status = "ok" if o.passed else ("TIMEOUT" if o.returncode is None else f"FAILED rc {o.returncode}")
        print(f"  {o.name:8s} {status:14s} {o.seconds:6.1f} s")
    for key, entry in summary["dispatch"].items():
        print(f"  dispatch {key:40s} -> {entry['impl']}")
    for t in summary["targets"]:
        verdict = "-" if dry_run else ("met" if t["met"] else "MISSED")
        print(f"  {t['target']:24s} {t['value']:8.3f} {t['goal']:30s} {verdict:7s} {t.get('shape', '')}")
        if not (t["met"] or dry_run):
            print(f"      limit: {t['limit']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the logs and JSON (default $OUT)")
    parser.add_argument("--wheels", default=None, help="folder of the carried wheels (WHEELS)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time for all stages together (default 450)")
    parser.add_argument("--dry-run", action="store_true", help="run every stage on this machine's CPU")
    parser.add_argument("--fetch-wheels", action="store_true", help="download WHEELS into --wheels and stop")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these (a rerun of what failed)"
    )
    args = parser.parse_args(argv)
    wheels = Path(args.wheels) if args.wheels else None
    if args.fetch_wheels:
        if wheels is None:
            parser.error("--fetch-wheels needs --wheels DIR")
        fetch_wheels(wheels)
        return 0
    if not args.out:
        parser.error("--out DIR is needed where $OUT is not set")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))  # the carried wheels, ahead of the image's packages
    try:
        plan = stages(out, wheels, site, args.dry_run)
    except ValueError as err:
        parser.error(str(err))
    if not (out / "dispatch_table.json").exists():  # merged into, not replaced (also by a rerun)
        shutil.copyfile(ROOT / "kernels" / "dispatch_table.json", out / "dispatch_table.json")
    path = [p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + args.budget_s
    outcomes = []
    with open(out / "gpu_check.log", "a") as log:  # a rerun of some stages adds to the first run's log
        for stage in (s for s in plan if s.name in args.stages):
            limit = min(stage.budget_s, deadline - time.monotonic())
            if limit < 1:
                outcomes.append(Outcome(stage.name, None, 0.0))
                continue
            outcomes.append(run_stage(stage, limit, env, log))
    summarize(out, outcomes, args.dry_run)
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
