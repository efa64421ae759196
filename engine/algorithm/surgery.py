"""Per-block gradient scales for the audio keys/values of A2V cross-attention (SPEC 4).

Shallow audio layers do intra-modal generation, and without surgery the video loss dominates their
update through A2V. The model scales dK and dV of the audio K/V in block l by g_l = 1 - a_l; this
module only decides the list of g_l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from models.latents import reference_block

SURGERY_PRESETS = ("paper", "authors", "off")


@dataclass
class SurgeryConfig:
    """`surgery.*`: a preset name or one gradient scale per block (`a2v_grad_scales` checks it against
    the model's depth when the config is loaded)."""

    schedule: str | list[float] = "paper"


def _preset_scale(preset: str, block: int) -> float:
    """Gradient scale of a block of the 48-block reference model."""
    if preset == "paper":
        return 0.9 if block < 10 else 1.0
    if preset == "authors":
        if block == 0:
            return 0.0
        if block <= 10:
            return 0.1
        return 0.3 if block >= 40 else 1.0
    return 1.0


def a2v_grad_scales(schedule: str | Sequence[float], num_layers: int) -> list[float]:
    """Gradient scale of the A2V audio K/V for each of num_layers blocks.

    Presets are stated on LTX-2's 48 blocks; on another depth block l takes the value of reference
    block floor(l * 48 / num_layers), so "the first fifth of the network" stays the first fifth.
    An explicit list is taken as is after checking its length and range.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(schedule, str):
        if schedule not in SURGERY_PRESETS:
            raise ValueError(
                f"surgery.schedule must be one of {', '.join(SURGERY_PRESETS)} or a list of per-block "
                f"gradient scales; got {schedule!r}"
            )
        return [_preset_scale(schedule, reference_block(l, num_layers)) for l in range(num_layers)]
    scales = [float(g) for g in schedule]
    if len(scales) != num_layers:
        raise ValueError(f"surgery.schedule has {len(scales)} entries, the model has {num_layers} blocks")
    bad = [(i, g) for i, g in enumerate(scales) if not (math.isfinite(g) and 0.0 <= g <= 1.0)]
    if bad:
        raise ValueError(f"surgery.schedule entries must be in [0, 1]; bad (block, value): {bad}")
    return scales
