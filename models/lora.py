"""LoRA adapters on whatever linear layers a backend built: nn.Linear, the FP8 linear, megatron's and
Transformer Engine's column/row parallel linears.

A targeted layer keeps its class, its parameters and their names (so weight loading, the official and
diffusers layouts and tensor-parallel slicing see the plain model); `apply_lora` adds the adapter sets
as a `lora` child and a forward hook, so the layer computes

    y = base(x) + (alpha / rank) * B_s(A_s(x))     for the active adapter set s (or base(x) with none)

with A_s (rank, in_features) and B_s (out_features, rank) fp32 parameters. The base is frozen and keeps
its own dtype (bf16, or the FP8 backends' weights); the adapter path runs in the adapters' dtype
(autocast, when on, casts it as it casts the base) and is added in the base output's dtype.

Several adapter sets share one frozen base: "default" is the trained policy, "old" the old policy
(moved by EMA over the adapters), and adapters off is the base itself (the KL reference), so no
second copy of the base is ever made. `use_adapter` picks the set a forward uses.

Targets. Patterns (`fnmatch.fnmatchcase`: `*` matches any characters, dots included; `?` one;
`[...]` a set) are matched against each linear layer's module path inside its block
(`attn1.to_q`, `ff.net.0.proj`) and against its full path (`transformer_blocks.3.attn1.to_q`,
`patchify_proj`), so `attn1.to_q` targets that layer in every block and `transformer_blocks.4[0-7].*`
every linear of blocks 40-47. Only layers a backend built (they carry `parallel_role`) are candidates.
The default is the authors' 28 patterns, which match all 28 linears of every block and nothing outside
the blocks: q, k, v and out of the six attentions (24) and both linears of the two FFNs (4). LTX-2.3's
blocks also hold six `to_gate_logits` (one output per head), which the default leaves frozen, as the
authors' patterns name the other layers only; `lora.targets` with `*.to_gate_logits` adapts them too
(column-split like Q/K/V, and exported under their official names, which diffusers shares).

Names. Inside the blocks our module names are the official checkpoint's and diffusers' alike (they
differ only at the top level: `patchify_proj` is diffusers' `proj_in`, see models.layouts), so the
LoRA file keys of layer `transformer_blocks.0.ff.net.0.proj` are
`diffusion_model.transformer_blocks.0.ff.net.0.proj.lora_A.weight` / `.lora_B.weight` (ltx-trainer,
ComfyUI, diffusers; models.lora_files writes and reads them). `lora_state_dict` uses these names
without the prefix.

Tensor parallelism: the adapter is split the way its layer is (recorded as `parallel_role`).
- column (Q/K/V, FFN-in; output features split): A replicated (rank, in), B this rank's output rows
  (out / tp, rank). The rank-wide h = A x is complete on every rank, so the only collective is h's
  gradient: summed over the group (each rank's B slice gives part of it), like megatron's
  copy-to-tensor-parallel region. Under sequence parallelism x holds this rank's tokens: h is
  all-gathered over the tokens (r channels, not in_features) and its gradient reduce-scattered.
- row (attention out, FFN-out; input features split): A this rank's input columns (rank, in / tp), B
  replicated (out, rank). The partial A_local x_local are summed over the group before B (megatron's
  row layer all-reduces its own output: the adapter path needs its own sum, on r channels); under
  sequence parallelism they are reduce-scattered over the tokens, as the row layer's output is.
- replicated: nothing to split or reduce.
Split adapters carry megatron's `tensor_model_parallel` / `partition_dim`, so `Sharding.is_split`,
`weight_slice` and `gather_weight` handle them as they handle the base. Replicated adapters that see
only this rank's tokens under sequence parallelism (A of column, B of row and replicated layers) get
their gradient summed over the group by the engine, as every replicated parameter does
(engine.parallel.grads).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .backends import ParallelRole
from .sharding import Sharding
from .weights import _check_shapes

if TYPE_CHECKING:
    from .transformer import LTX2AVTransformer

LoRAInit = Literal["gaussian", "kaiming"]
INITS = ("gaussian", "kaiming")

_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_FFNS = ("ff", "audio_ff")
# The authors' `target_modules` (config/nft.py; PEFT names, which are ours inside a block): 6 x 4 attention
# and 2 x 2 FFN linears.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    f"{attention}.{linear}" for attention in _ATTENTIONS for linear in ("to_q", "to_k", "to_v", "to_out.0")
) + tuple(f"{ffn}.{linear}" for ffn in _FFNS for linear in ("net.0.proj", "net.2"))
BLOCKS = "transformer_blocks."


@dataclass(frozen=True)
class LoRAConfig:
    """What `apply_lora` adds. `rank` 0 is full fine-tuning (no adapters). The authors (zghhui/OmniNFT,
    scripts/train_omninft_ltx_fsdp.py with config/nft.py) train PEFT rank 32, alpha 64 (scale 2), gaussian
    init, on the 28 default targets, with an "old" set that starts as a copy of "default"."""

    rank: int = 0
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-path patterns (module docstring)
    init: LoRAInit = "gaussian"  # A ~ N(0, 1/rank^2) (PEFT's gaussian) or U(+-1/sqrt(in)) (PEFT's kaiming); B = 0
    adapters: tuple[str, ...] = ("default", "old")  # the first is trained, the others frozen

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be a non-negative integer (0 = off), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if self.init not in INITS:
            raise ValueError(f"lora.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"lora.targets must be a non-empty list of module-name patterns, got {self.targets!r}")
        if not self.adapters or len(set(self.adapters)) != len(self.adapters) or not all(self.adapters):
            raise ValueError(f"lora.adapters must be distinct non-empty names, got {self.adapters!r}")

    @property
    def scale(self) -> float:
        """alpha / rank: what B(A(x)) is multiplied by."""
        return self.alpha / self.rank


def _mark_split(param: nn.Parameter, dim: int) -> None:
    """megatron's tensor-parallel attributes (`set_tensor_model_parallel_attributes`), which
    Sharding.is_split / weight_slice and megatron's DDP, optimizer and checkpoints read."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _tokens_first(x: Tensor) -> Tensor:
    """(B, T, r) -> contiguous (T, B, r): the collectives below gather and scatter dim 0."""
    return x.transpose(0, 1).contiguous()


def _all_reduce(x: Tensor, sharding: Sharding) -> Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=sharding.tp_group)
    return out


def _all_gather_tokens(x: Tensor, sharding: Sharding) -> Tensor:
    """(B, T/tp, r) of every rank -> (B, T, r), rank order."""
    local = _tokens_first(x)
    out = local.new_empty((local.shape[0] * sharding.tp_size, *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=sharding.tp_group)
    return out.transpose(0, 1)


def _reduce_scatter_tokens(x: Tensor, sharding: Sharding) -> Tensor:
    """(B, T, r) summed over the ranks, this rank's (B, T/tp, r) kept."""
    full = _tokens_first(x)
    out = full.new_empty((full.shape[0] // sharding.tp_size, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=sharding.tp_group)
    return out.transpose(0, 1)


class _ToColumn(torch.autograd.Function):
    """h = A x ahead of a column layer's B slice. Forward: h as it is (all-gathered over the tokens under
    sequence parallelism); backward: the ranks' partial dh summed (reduce-scattered under SP)."""

    @staticmethod
    def forward(ctx, h: Tensor, sharding: Sharding) -> Tensor:
        ctx.sharding = sharding
        return _all_gather_tokens(h, sharding) if sharding.sequence_parallel else h

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        sharding = ctx.sharding
        if sharding.sequence_parallel:
            return _reduce_scatter_tokens(grad, sharding), None
        return _all_reduce(grad, sharding), None


class _FromRow(torch.autograd.Function):
    """h_local = A_local x_local of a row layer. Forward: summed over the ranks (reduce-scattered over
    the tokens under sequence parallelism); backward: dh as it is (all-gathered under SP)."""

    @staticmethod
    def forward(ctx, h: Tensor, sharding: Sharding) -> Tensor:
        ctx.sharding = sharding
        return _reduce_scatter_tokens(h, sharding) if sharding.sequence_parallel else _all_reduce(h, sharding)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        sharding = ctx.sharding
        return (_all_gather_tokens(grad, sharding) if sharding.sequence_parallel else grad), None


class LoRA(nn.Module):
    """The adapter sets of one linear layer (its `lora` child): `A[s]` (rank, in_local) and `B[s]`
    (out_local, rank) per set s, split as the layer is (module docstring). `active` is the set the
    layer's forward adds, or None (the base alone)."""

    def __init__(self, weight: Tensor, role: ParallelRole, cfg: LoRAConfig, sharding: Sharding):
        super().__init__()
        out_local, in_local = weight.shape
        self.role = role if sharding.tp_size > 1 else "replicated"
        self.sharding, self.scale, self.active = sharding, cfg.scale, cfg.adapters[0]
        kw = dict(device=weight.device, dtype=torch.float32)
        self.A = nn.ParameterDict({s: nn.Parameter(torch.zeros(cfg.rank, in_local, **kw)) for s in cfg.adapters})
        self.B = nn.ParameterDict({s: nn.Parameter(torch.zeros(out_local, cfg.rank, **kw)) for s in cfg.adapters})
        for s in cfg.adapters:
            if self.role == "row":
                _mark_split(self.A[s], 1)
            elif self.role == "column":
                _mark_split(self.B[s], 0)
            trained = s == cfg.adapters[0]
            self.A[s].requires_grad_(trained)
            self.B[s].requires_grad_(trained)
        self.hook: RemovableHandle | None = None  # the base layer's forward hook, set by apply_lora

    @property
    def in_features(self) -> int:
        """The whole layer's input width (A's columns over every rank)."""
        a = next(iter(self.A.values()))
        return a.shape[1] * (self.sharding.tp_size if self.role == "row" else 1)

    def init_(self, init: LoRAInit, generator: torch.Generator) -> None:
        """A from `generator` (the whole (rank, in) tensor, then this rank's columns, so any layout
        draws the same adapter), the same in every set; B zero, so the adapted model starts as the base."""
        a = next(iter(self.A.values()))
        rank, n_in = a.shape[0], self.in_features
        if init == "gaussian":  # PEFT: normal_(std=1/r)
            whole = torch.randn(rank, n_in, generator=generator) / rank
        else:  # PEFT: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))
            whole = (torch.rand(rank, n_in, generator=generator) * 2 - 1) / math.sqrt(n_in)
        local = whole[self.sharding.weight_slice(a)] if self.role == "row" else whole
        with torch.no_grad():
            for s in self.A:
                self.A[s].copy_(local)
                self.B[s].zero_()

    def delta(self, x: Tensor, adapter: str) -> Tensor:
        """scale * B(A(x)) of set `adapter` for the base layer's input x (B, T, in_local): (B, T, out_local),
        with the base layer's collectives (this rank's tokens under sequence parallelism, as the base)."""
        a, b = self.A[adapter], self.B[adapter]
        h = F.linear(x.to(a.dtype), a) * self.scale
        if self.role == "column":
            h = _ToColumn.apply(h, self.sharding)
        elif self.role == "row":
            h = _FromRow.apply(h, self.sharding)
        return F.linear(h, b)

    def merged_delta(self, adapter: str) -> Tensor:
        """scale * B @ A of set `adapter`: this rank's slice of the weight update, (out_local, in_local) fp32."""
        return self.scale * (self.B[adapter].detach() @ self.A[adapter].detach())


def _add_adapter(layer: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    """Forward hook of an adapted layer: its output plus the active set's delta (None: unchanged)."""
    lora: LoRA = layer.lora
    if lora.active is None:
        return None
    return output + lora.delta(args[0], lora.active).to(output.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRA]:
    """Module path of every adapted layer -> its adapters, in module order."""
    return {name: m.lora for name, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRA)}


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module path `name` matches a target pattern, by its full path or its path inside its block."""
    inside = name.split(".", 2)[2] if name.startswith(BLOCKS) and name.count(".") >= 2 else None
    return any(
        fnmatch.fnmatchcase(name, p) or (inside is not None and fnmatch.fnmatchcase(inside, p)) for p in patterns
    )


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by (seed, module path): a layer's init depends on nothing else, so every
    tensor- and pipeline-parallel layout draws the single process's adapters."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def apply_lora(model: LTX2AVTransformer, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freezes every parameter of `model` and adds `cfg.adapters` to each linear layer matching
    `cfg.targets`; returns the adapted layers' module paths. A no-op with rank 0.

    Call it after the base weights are loaded (the loaders check for exactly the plain model's keys).
    On a whole model every pattern must match a layer; a pipeline stage may lack the layers of some.
    A is drawn per layer from `seed` and the module path (layout-independent), every set starts equal."""
    if cfg.rank == 0:
        return []
    if lora_layers(model):
        raise ValueError("the model has LoRA adapters already")
    sharding: Sharding = model.sharding
    candidates = {name: m for name, m in model.named_modules() if hasattr(m, "parallel_role")}
    chosen = {name: m for name, m in candidates.items() if matches(name, cfg.targets)}
    unmatched = [p for p in cfg.targets if not any(matches(name, (p,)) for name in candidates)]
    if unmatched and model.stage.count == 1:
        raise ValueError(f"lora.targets {unmatched} match no linear layer of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in chosen.items():
        weight = layer.weight
        assert weight.dim() == 2, f"{name}: a linear layer's weight is (out, in), got {tuple(weight.shape)}"
        layer.lora = LoRA(weight, layer.parallel_role, cfg, sharding)
        if weight.device.type != "meta":
            layer.lora.init_(cfg.init, _generator(seed, name))
        layer.lora.hook = layer.register_forward_hook(_add_adapter)
    return list(chosen)


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Runs the model's forwards with adapter set `adapter`, or with none (None: the base model, i.e.
    the KL reference). With activation checkpointing, backward recomputes with the set active at
    backward time: run the backward of a forward under the same selection."""
    layers = list(lora_layers(model).values())
    if adapter is not None and layers and adapter not in layers[0].A:
        raise ValueError(f"no LoRA adapter set {adapter!r}; the model has {', '.join(layers[0].A)}")
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = adapter
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer.active = active


def lora_named_parameters(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """Set `adapter`'s A and B of every adapted layer (this rank's slices) as `<module path>.lora_A.weight`
    (rank, in) and `.lora_B.weight` (out, rank), in module order: the names a LoRA file uses (without
    its `diffusion_model.` prefix)."""
    return {
        f"{name}.{key}.weight": p
        for name, layer in lora_layers(model).items()
        for key, p in (("lora_A", layer.A[adapter]), ("lora_B", layer.B[adapter]))
    }


def lora_parameters(model: nn.Module, adapter: str = "default") -> list[nn.Parameter]:
    """`lora_named_parameters` as a list: what the optimizer steps for "default", and zipped with "old"
    for the EMA."""
    return list(lora_named_parameters(model, adapter).values())


def lora_state_dict(model: LTX2AVTransformer, adapter: str = "default", *, whole: bool = False) -> dict[str, Tensor]:
    """Set `adapter` under the names of `lora_named_parameters`, alpha not folded in: this rank's slices,
    or with `whole` every tensor-parallel rank's joined (collective over the tensor-parallel group; a
    pipeline stage gives its own layers)."""
    sharding: Sharding = model.sharding
    return {
        k: sharding.gather_weight(p.detach(), p) if whole and sharding.is_split(p) else p.detach()
        for k, p in lora_named_parameters(model, adapter).items()
    }


def load_lora_state_dict(
    model: LTX2AVTransformer,
    state: dict[str, Tensor],
    adapter: str = "default",
    *,
    whole: bool = False,
    source: str = "LoRA state",
) -> None:
    """Copies `state` (names and shapes of `lora_state_dict`) into set `adapter`; with `whole`, `state`
    holds whole tensors and each rank keeps its slice. Every missing, unexpected or mis-shaped key is
    reported in one CheckpointError."""
    sharding: Sharding = model.sharding
    params = lora_named_parameters(model, adapter)
    if whole:
        state = stage_share(model, state)
    sliced = {k for k, p in params.items() if whole and sharding.is_split(p)}
    expected = {k: tuple(p.shape) for k, p in params.items()}
    for k in sliced:  # the whole tensor is tp slices along the split dim
        dim = params[k].partition_dim
        expected[k] = expected[k][:dim] + (expected[k][dim] * sharding.tp_size,) + expected[k][dim + 1 :]
    _check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k][sharding.weight_slice(p)] if k in sliced else state[k])


def stage_share(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a whole model's LoRA state (`<module path>.lora_A/B.weight`) that this pipeline stage
    holds: all of them without pipeline stages; with stages, those of its blocks and of the other layers it
    has (another stage's entries are that stage's to check)."""
    stage = model.stage
    if stage.count == 1:
        return state
    modules = {name for name, _ in model.named_modules()}

    def here(key: str) -> bool:
        module = key.rsplit(".", 2)[0]
        if module.startswith(BLOCKS):
            return int(module.split(".")[1]) in stage.layers
        return module in modules

    return {k: v for k, v in state.items() if here(k)}


class AdapterView:
    """`model` run with adapter set `adapter`, or with none (None: the base): the old policy ("old") and
    the KL reference (None) of a LoRA run, on the trained model's one frozen base. A call runs the model
    under `use_adapter`; every other attribute is the model's (config, stage, set_input_tensor, ...).
    For no-grad forwards: a backward through activation checkpointing would recompute under whatever
    set is active then."""

    def __init__(self, model: nn.Module, adapter: str | None):
        self.model, self.adapter = model, adapter

    def __call__(self, *args, **kwargs):
        with use_adapter(self.model, self.adapter):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def merge_lora(model: nn.Module, adapter: str = "default") -> list[str]:
    """Folds set `adapter` into the base weights (W += scale * B @ A, each tensor-parallel rank its
    slice, computed in fp32) and removes every adapter, leaving the plain model (its parameters still
    frozen) for export. Returns the merged layers' module paths."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, lora in layers.items():
            base = model.get_submodule(name)
            base.weight.copy_((base.weight.float() + lora.merged_delta(adapter)).to(base.weight.dtype))
            lora.hook.remove()
            del base.lora
    return list(layers)
