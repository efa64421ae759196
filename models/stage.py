"""Pipeline stages of the one model definition: which blocks a stage holds, and the one tensor that
crosses each stage boundary.

A stage holds a contiguous run of blocks (megatron's pre_process/post_process split): patchify,
caption projections and the adaLN-single embeddings on the first stage, the output norm and
projections on the last. Everything the later blocks and the output layer need from the first stage
(both residual streams, both projected contexts, the six modulation tensors, LTX-2.3's two prompt
modulations and the two embedded timesteps) crosses every boundary as one packed tensor, because
megatron's schedule sends exactly one tensor per microbatch and the two streams have different
widths (4096 and 2048 in the 19B), so they cannot share its (seq, batch, hidden) layout. Packing
them flat, (L, B, 1), keeps the schedule's fixed-shape fast path (no per-message shape handshake,
unlike its variable-length path): the receiving stage computes L and each part's shape from the
inputs it also sees. The conditioning tensors pass through the middle stages unchanged, so their
gradients flow back to the first stage's embeddings through the same tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# The parts of the carry, in packing order.
CARRY = (
    "video",
    "audio",
    "video_ctx",
    "audio_ctx",
    "mod_video",
    "mod_audio",
    "mod_video_ca",
    "mod_audio_ca",
    "mod_a2v_gate",
    "mod_v2a_gate",
    "emb_video",
    "emb_audio",
    "mod_prompt_video",  # LTX-2.3 only (cross_attention_adaln)
    "mod_prompt_audio",
)


@dataclass(frozen=True)
class Stage:
    """Stage `index` of `count`, holding blocks `layers` (global indices); `group` is the pipeline
    process group connecting the stages (None with one stage)."""

    index: int = 0
    count: int = 1
    layers: range | None = None  # None: every block
    group: object | None = field(default=None, repr=False, compare=False)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def stage_layers(num_layers: int, count: int, index: int) -> range:
    """Contiguous blocks of stage `index`, as even as possible (the first stages take one extra)."""
    if not 1 <= count <= num_layers:
        raise ValueError(f"parallel.pp={count} pipeline stages need 1 <= pp <= num_layers ({num_layers})")
    base, extra = divmod(num_layers, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def _parts(names) -> list[str]:
    """The CARRY parts among `names` (a model without text cross-attention adaLN has no prompt modulations)."""
    unknown = sorted(set(names) - set(CARRY))
    if unknown:
        raise ValueError(f"pipeline carry: unknown part(s) {unknown}")
    return [name for name in CARRY if name in names]


def pack(carry: dict[str, Tensor]) -> Tensor:
    """The parts (each (B, ...), in CARRY order) as one contiguous (L, B, 1) tensor."""
    return torch.cat([carry[name].flatten(1) for name in _parts(carry)], dim=1).t().unsqueeze(-1).contiguous()


def unpack(packed: Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of `pack`: views of `packed` shaped as `shapes` (each (B, ...)); gradients flow back."""
    names = _parts(shapes)
    sizes = [math.prod(shapes[name][1:]) for name in names]
    if packed.dim() != 3 or packed.shape[0] != sum(sizes) or packed.shape[2] != 1:
        raise ValueError(
            f"pipeline input tensor has shape {tuple(packed.shape)}, expected ({sum(sizes)}, B, 1) "
            f"for the carry {shapes}"
        )
    flat = packed.squeeze(-1).t()
    return {name: part.reshape(shapes[name]) for name, part in zip(names, flat.split(sizes, dim=1))}
