"""Which implementation runs an attention call, decided by measurement.

Every attention of the model goes through `kernels.cross_attention` (or `cross_attention_lse`, and the
V2A probe through `kernels.attention_mass`); this module picks what runs it. The candidates
(IMPLEMENTATIONS) compute the same function: torch SDPA as torch chooses its backend ("sdpa", the
reference), SDPA held to one backend ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"), flash-attn where
installed ("flash-attn") and our Triton kernel ("triton"). Those without a fused partial stop-gradient
take `kv_grad_scale` as a gradient hook on K and V; Triton scales dK and dV in registers.

The choice is a table (kernels/dispatch_table.json, committed) keyed by device label (the CUDA device
name, lower-case, dashes), dtype and shape class (CallClass): the operation (`fwd` without gradient,
`fwd+lse` for the V2A probe, `fwd+bwd` with gradient, `mass`), whether K and V carry a gradient scale,
whether keys are masked, the head dim and the query and key lengths rounded up to powers of two. The
table holds what `python -m bench.kernels` measured fastest; a class it lacks takes the nearest
measured class of the same kind within two doublings of the lengths, and without a measurement the
call goes to SDPA (the mass to the chunked torch reference), the safe choice. The committed table
holds GPUs only, so CPU tensors take the reference. Batch and heads are not in the key: the lengths
and head dim set the ranking.

`OMNINFT_ATTENTION=<name>` forces one implementation wherever it can take the call (benchmarks, a
suspected kernel bug); `OMNINFT_DISPATCH_TABLE=<path>` reads another table (a fresh measurement).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import reference

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (64, 128)
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
OPS = ("fwd", "fwd+lse", "fwd+bwd", "mass")
DEFAULT = {"fwd": "sdpa", "fwd+lse": "sdpa", "fwd+bwd": "sdpa", "mass": "torch"}
NEAREST_DOUBLINGS = 2  # how far (in log2 of the lengths, summed) a measured class may stand in for a missing one


def length_class(n: int) -> int:
    """The power of two a sequence length of `n` counts as (6144 -> 8192, 126 -> 128)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class CallClass:
    """What a table entry is keyed by, besides device and dtype; `key` is its string form."""

    op: str
    scaled: bool
    masked: bool
    head_dim: int
    q_len: int
    k_len: int

    @property
    def key(self) -> str:
        scale = "scaled" if self.scaled else "plain"
        mask = "masked" if self.masked else "dense"
        return f"{self.op}/{scale}/{mask}/d{self.head_dim}/q{self.q_len}/k{self.k_len}"

    @classmethod
    def parse(cls, key: str) -> CallClass:
        match = re.fullmatch(r"([a-z+]+)/(scaled|plain)/(masked|dense)/d(\d+)/q(\d+)/k(\d+)", key)
        if match is None or match[1] not in OPS:
            raise ValueError(
                f"dispatch table key {key!r} is not op/scaled|plain/masked|dense/dD/qN/kN with op in {OPS}"
            )
        op, scale, mask, d, nq, nk = match.groups()
        return cls(op, scale == "scaled", mask == "masked", int(d), int(nq), int(nk))

    def distance(self, other: CallClass) -> float:
        """Doublings between the two classes' lengths, or inf when they differ in anything else."""
        if (self.op, self.scaled, self.masked, self.head_dim) != (other.op, other.scaled, other.masked, other.head_dim):
            return math.inf
        return abs(math.log2(self.q_len / other.q_len)) + abs(math.log2(self.k_len / other.k_len))


def call_class(op: str, q: Tensor, k: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> CallClass:
    """The class of one call; a gradient scale matters only when a backward follows."""
    return CallClass(
        op=op,
        scaled=op == "fwd+bwd" and kv_grad_scale != 1.0,
        masked=key_mask is not None,
        head_dim=q.shape[-1],
        q_len=length_class(q.shape[2]),
        k_len=length_class(k.shape[2]),
    )


# --- the implementations ------------------------------------------------------------------------------------------


def _sdpa_backend(backend: SDPBackend) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    """The reference under `sdpa_kernel`: `backend` first, then torch's usual ones, so a call the backend
    refuses (a shape the measurement did not cover) runs slower, never fails."""
    order = [backend, *(b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION) if b != backend)]
    order.append(SDPBackend.MATH)

    def attention(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> Tensor:
        with sdpa_kernel(order, set_priority=True):
            return reference.cross_attention(q, k, v, kv_grad_scale, key_mask)

    def attention_lse(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None):
        with sdpa_kernel(order, set_priority=True):
            return reference.cross_attention_lse(q, k, v, kv_grad_scale, key_mask)

    return attention, attention_lse


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> Tensor:
    """flash-attn on (B, H, N, D) tensors (it takes (B, N, H, D)), the gradient scale as a hook."""
    from flash_attn import flash_attn_func

    reference.check_attention_inputs(q, k, v, kv_grad_scale, key_mask)
    k, v = reference.scale_grad(k, kv_grad_scale), reference.scale_grad(v, kv_grad_scale)
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _flash_attn_lse(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None):
    out = _flash_attn(q, k, v, kv_grad_scale, key_mask)
    with torch.no_grad():
        return out, reference.row_lse(q, k, key_mask)


def _triton(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None) -> Tensor:
    from kernels import triton_attention

    return triton_attention.cross_attention(q, k, v, kv_grad_scale, key_mask)


def _triton_lse(q: Tensor, k: Tensor, v: Tensor, kv_grad_scale: float, key_mask: Tensor | None):
    from kernels import triton_attention

    return triton_attention.cross_attention_lse(q, k, v, kv_grad_scale, key_mask)


def _triton_mass(q: Tensor, k: Tensor, **kwargs) -> Tensor:
    from kernels import triton_mass

    return triton_mass.attention_mass(q, k, **kwargs)


def _triton_refuses(q: Tensor, key_mask: Tensor | None) -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if not q.is_cuda:
        return "the Triton kernels run on CUDA tensors"
    if q.dtype not in TRITON_DTYPES or q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"the Triton kernels take {TRITON_DTYPES} at head dims {TRITON_HEAD_DIMS}"
    return None


def _cuda_flash_refuses(q: Tensor, key_mask: Tensor | None) -> str | None:
    """CUDA flash kernels (SDPA's and flash-attn's): fp16/bf16, no key mask."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return "flash kernels take CUDA fp16/bf16 tensors"
    return "flash kernels take no key mask" if key_mask is not None else None


def _sdpa_flash_refuses(q: Tensor, key_mask: Tensor | None) -> str | None:
    """SDPA's flash backend: on a CPU torch's own flash kernel takes any float and masks."""
    return _cuda_flash_refuses(q, key_mask) if q.is_cuda else None


def _cuda_refuses(q: Tensor, key_mask: Tensor | None) -> str | None:
    return None if q.is_cuda and q.dtype != torch.float64 else "this SDPA backend takes CUDA fp32/fp16/bf16 tensors"


@dataclass(frozen=True)
class Implementation:
    """One way to run an attention call. `refuses(q, key_mask)` says why it cannot take a call (None
    when it can); `attention` and `attention_lse` have `reference.cross_attention`'s positional
    signature, `mass` has `reference.attention_mass`'s (None: not a mass implementation)."""

    name: str
    attention: Callable[..., Tensor] | None
    attention_lse: Callable[..., tuple[Tensor, Tensor]] | None
    mass: Callable[..., Tensor] | None
    refuses: Callable[[Tensor, Tensor | None], str | None]


def _implementations() -> dict[str, Implementation]:
    impls = [
        Implementation("sdpa", reference.cross_attention, reference.cross_attention_lse, None, lambda q, m: None),
        Implementation("sdpa-cudnn", *_sdpa_backend(SDPBackend.CUDNN_ATTENTION), None, _cuda_refuses),
        Implementation("sdpa-flash", *_sdpa_backend(SDPBackend.FLASH_ATTENTION), None, _sdpa_flash_refuses),
        Implementation("sdpa-efficient", *_sdpa_backend(SDPBackend.EFFICIENT_ATTENTION), None, _cuda_refuses),
        Implementation(
            "flash-attn",
            _flash_attn,
            _flash_attn_lse,
            None,
            lambda q, m: _cuda_flash_refuses(q, m) or (None if HAS_FLASH_ATTN else "flash-attn is not installed"),
        ),
        Implementation("triton", _triton, _triton_lse, _triton_mass, _triton_refuses),
        Implementation("torch", None, None, reference.attention_mass, lambda q, m: None),
    ]
    return {impl.name: impl for impl in impls}


IMPLEMENTATIONS = _implementations()


def candidates(op: str, q: Tensor, key_mask: Tensor | None) -> list[Implementation]:
    """The implementations that can run `op` on these inputs, the default (the reference) first."""
    kind = "mass" if op == "mass" else "attention"
    able = [i for i in IMPLEMENTATIONS.values() if getattr(i, kind) is not None and i.refuses(q, key_mask) is None]
    return sorted(able, key=lambda i: i.name != DEFAULT[op])


# --- the table ----------------------------------------------------------------------------------------------------


@functools.cache
def device_label(device: torch.device | None = None) -> str:
    """The table's device key: the CUDA device's name, lower-case with dashes ('nvidia-h200'); 'cpu'."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DispatchTable:
    """device label -> dtype name -> class key -> {"impl": name, "ms": {impl: median ms, ...}}."""

    def __init__(self, devices: dict[str, dict[str, dict[str, dict]]] | None = None, source: str = "<memory>"):
        self.devices = devices or {}
        self.source = source
        self._classes: dict[tuple[str, str], list[tuple[CallClass, str]]] = {}
        self._chosen: dict[tuple[str, str, CallClass], str | None] = {}
        for device, dtypes in self.devices.items():
            for dtype, entries in dtypes.items():
                for key, entry in entries.items():
                    impl = entry.get("impl") if isinstance(entry, dict) else None
                    if impl not in IMPLEMENTATIONS:
                        raise ValueError(
                            f"{source}: {device}/{dtype}/{key}: impl must be one of {', '.join(IMPLEMENTATIONS)}; "
                            f"got {impl!r}"
                        )
                    cls = CallClass.parse(key)
                    wanted = "mass" if cls.op == "mass" else "attention"
                    if getattr(IMPLEMENTATIONS[impl], wanted) is None:
                        raise ValueError(f"{source}: {device}/{dtype}/{key}: {impl!r} is not a {wanted} implementation")
                    self._classes.setdefault((device, dtype), []).append((cls, impl))

    @classmethod
    def load(cls, path: str | Path) -> DispatchTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"attention dispatch table {path}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise ValueError(f"attention dispatch table {path}: needs a 'devices' object")
        return cls(data["devices"], source=str(path))

    def save(self, path: str | Path, about: str) -> None:
        """Writes the table atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"about": about, "devices": self.devices}, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)

    def merged(self, device: str, dtype: str, entries: dict[str, dict]) -> DispatchTable:
        """This table with `entries` replacing what it held for (device, dtype)."""
        devices = {d: {t: dict(e) for t, e in dtypes.items()} for d, dtypes in self.devices.items()}
        devices.setdefault(device, {})[dtype] = dict(entries)
        return DispatchTable(devices, self.source)

    def choose(self, device: str, dtype: str, cls: CallClass) -> str | None:
        """The measured implementation of `cls`, of the nearest measured class within NEAREST_DOUBLINGS, or None."""
        key = (device, dtype, cls)
        if key not in self._chosen:  # a model makes hundreds of calls per forward, of a handful of classes
            best, best_distance = None, math.inf
            for measured, impl in self._classes.get((device, dtype), ()):
                distance = cls.distance(measured)
                if distance < best_distance:
                    best, best_distance = impl, distance
            self._chosen[key] = best if best_distance <= NEAREST_DOUBLINGS else None
        return self._chosen[key]


def fastest(rows: Iterable[dict]) -> dict[str, dict]:
    """Table entries from bench.kernels rows ({"class": key, "impl": name, "seconds": s} for the ones that
    ran): per class the implementation with the least median time, with every candidate's time in ms."""
    timings: dict[str, dict[str, float]] = {}
    for row in rows:
        timings.setdefault(row["class"], {})[row["impl"]] = row["seconds"] * 1e3
    return {key: {"impl": min(ms, key=ms.get), "ms": ms} for key, ms in sorted(timings.items())}


@functools.cache
def _table(path: str) -> DispatchTable:
    return DispatchTable.load(path) if Path(path).exists() else DispatchTable(source=path)


def table() -> DispatchTable:
    """The table in force: OMNINFT_DISPATCH_TABLE or the committed one (read once per path)."""
    return _table(os.environ.get("OMNINFT_DISPATCH_TABLE") or str(TABLE_PATH))


def forced() -> str | None:
    """OMNINFT_ATTENTION, checked: an implementation's name, or None when unset."""
    name = os.environ.get("OMNINFT_ATTENTION") or None
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"OMNINFT_ATTENTION must be one of {', '.join(IMPLEMENTATIONS)}; got {name!r}")
    return name


def choose(op: str, q: Tensor, k: Tensor, kv_grad_scale: float = 1.0, key_mask: Tensor | None = None) -> Implementation:
    """The implementation that runs this call: forced, else measured, else the default (SDPA; the mass:
    the torch reference). A choice that cannot take the call (a forced flash kernel on a masked call, a
    CUDA-only one on a CPU tensor) gives way to the default."""
    kind = "mass" if op == "mass" else "attention"
    default = IMPLEMENTATIONS[DEFAULT[op]]
    name = forced()
    if name is None or getattr(IMPLEMENTATIONS[name], kind) is None:
        name = table().choose(
            device_label(q.device), dtype_name(q.dtype), call_class(op, q, k, kv_grad_scale, key_mask)
        )
    impl = IMPLEMENTATIONS.get(name) if name else None
    if impl is None or impl.refuses(q, key_mask) is not None:
        return default
    return impl


def attention_op(q: Tensor, k: Tensor, v: Tensor, with_lse: bool) -> str:
    """`fwd+bwd` when autograd will differentiate the call, else `fwd` (`fwd+lse` with the LSE)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "fwd+bwd"
    return "fwd+lse" if with_lse else "fwd"


__all__ = [
    "DEFAULT",
    "IMPLEMENTATIONS",
    "CallClass",
    "DispatchTable",
    "Implementation",
    "attention_op",
    "call_class",
    "candidates",
    "choose",
    "device_label",
    "fastest",
    "length_class",
    "table",
]
