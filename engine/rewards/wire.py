"""What travels between a remote reward and its server, in one place: a rollout as safetensors bytes (tensors
in their own dtype, so a remote score equals the in-process one bit for bit; the rest as JSON metadata), and
the (N,) scores back the same way. Both carry the format version; whatever cannot be read is a one-line
ValueError, which the server answers with 400.

A rollout carries only what the reward reads: the latents for `latents` (else placeholders with 0 channels,
which keep the token counts and cost no bytes), the frames for `frames`, the waveforms and their sample rate
for `waveform`, the three prompt lists for `text` (else empty strings). The grid, fps and latent geometry
always travel: they are a few bytes of metadata and rewards time their inputs with them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import torch
from safetensors.torch import load, save
from torch import Tensor

from models.latents import LatentGeometry

from ..errors import one_line
from .base import Rollout

FORMAT = "omninft-reward"
VERSION = 1  # bump on any change a peer of the previous version would misread
CONTENT_TYPE = "application/octet-stream"
TEXTS = ("prompts", "video_prompts", "audio_prompts")


def encode_rollout(rollout: Rollout, reads: frozenset[str]) -> bytes:
    """The parts of `rollout` a reward reading `reads` needs, as safetensors bytes (tensors moved to the CPU).
    ValueError if the rollout lacks media the reward reads."""
    n = rollout.num_samples
    tensors: dict[str, Tensor] = {}
    if "latents" in reads:
        tensors.update(video=rollout.video, audio=rollout.audio)
    else:  # Rollout needs the latents' shapes; their channels are not read
        tensors.update(video=rollout.video.new_empty(*rollout.video.shape[:2], 0))
        tensors.update(audio=rollout.audio.new_empty(*rollout.audio.shape[:2], 0))
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "video_grid": json.dumps(list(rollout.video_grid)),
        "fps": json.dumps(rollout.fps),
        "geometry": json.dumps(dataclasses.asdict(rollout.geometry)),
    }
    if "frames" in reads:
        if rollout.frames is None:
            raise ValueError("the reward reads frames, but the rollout has none")
        tensors["frames"] = rollout.frames
    if "waveform" in reads:
        if rollout.waveforms is None:
            raise ValueError("the reward reads the waveform, but the rollout has none")
        tensors["waveforms"] = rollout.waveforms
        metadata["sample_rate"] = str(rollout.sample_rate)
    for key in TEXTS:
        metadata[key] = json.dumps(list(getattr(rollout, key)) if "text" in reads else [""] * n)
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def decode_rollout(data: bytes) -> Rollout:
    """The Rollout of `encode_rollout`'s bytes; ValueError naming what is wrong (not safetensors, another
    format or version, a missing or malformed field, shapes that disagree)."""
    tensors, metadata = _read(data, "rollout")
    missing = sorted({"video", "audio"} - set(tensors)) + sorted(
        {"video_grid", "fps", "geometry", *TEXTS} - set(metadata)
    )
    if missing:
        raise ValueError(f"the rollout lacks {', '.join(missing)}")
    unknown = sorted(set(tensors) - {"video", "audio", "frames", "waveforms"})
    if unknown:
        raise ValueError(f"the rollout holds unknown tensors {unknown}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    try:
        grid = tuple(_json(metadata, "video_grid", list))
        if len(grid) != 3 or not all(isinstance(g, int) and g > 0 for g in grid):
            raise ValueError(f"video_grid must be three integers > 0, got {list(grid)}")
        geometry = _json(metadata, "geometry", dict)
        values = [v for k, v in geometry.items() if k != "pixel_stride"] + list(geometry.get("pixel_stride", ()))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"geometry must hold integers >= 0, got {geometry}")
        geometry = LatentGeometry(**{**geometry, "pixel_stride": tuple(geometry.get("pixel_stride", (32, 32)))})
        fps = _json(metadata, "fps", (int, float))
        rate = metadata.get("sample_rate")
        return Rollout(
            video=tensors["video"],
            audio=tensors["audio"],
            video_grid=grid,
            fps=float(fps),
            prompts=_texts(metadata, "prompts"),
            geometry=geometry,
            video_prompts=_texts(metadata, "video_prompts"),
            audio_prompts=_texts(metadata, "audio_prompts"),
            frames=tensors.get("frames"),
            waveforms=tensors.get("waveforms"),
            sample_rate=int(rate) if rate is not None else None,
        )
    except (TypeError, ValueError) as e:  # a field of the wrong type, or Rollout's own shape checks
        raise ValueError(f"malformed rollout: {one_line(e)}") from e


def encode_scores(scores: Tensor) -> bytes:
    """(N,) scores as safetensors bytes, in float32."""
    metadata = {"format": FORMAT, "version": str(VERSION)}
    return save({"scores": scores.detach().float().cpu().contiguous()}, metadata=metadata)


def decode_scores(data: bytes, n: int) -> Tensor:
    """(n,) float32 finite scores from `encode_scores`' bytes; ValueError if they are not exactly that."""
    tensors, _ = _read(data, "scores")
    if "scores" not in tensors:
        raise ValueError(f"no 'scores' tensor (got {sorted(tensors)})")
    scores = tensors["scores"]
    if scores.shape != (n,) or not scores.is_floating_point():
        raise ValueError(f"scores must be ({n},) floats, got {tuple(scores.shape)} {scores.dtype}")
    scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError(f"non-finite scores {scores.tolist()}")
    return scores


def _read(data: bytes, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors bytes of our format and version."""
    try:
        tensors = load(data)
        (size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except Exception as e:  # safetensors' own error type, struct, json: all mean "not safetensors"
        raise ValueError(f"the {what} is not safetensors bytes ({one_line(e, 120)})") from e
    if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
        raise ValueError(
            f"the {what} is format {metadata.get('format')!r} version {metadata.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return tensors, metadata


def _json(metadata: dict[str, str], key: str, kind: type | tuple[type, ...]):
    """The JSON value of a metadata `key`, of type `kind` (a finite number for numbers)."""
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{key} is not JSON: {e}") from e
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} must be a {getattr(kind, '__name__', 'number')}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return value


def _texts(metadata: dict[str, str], key: str) -> tuple[str, ...]:
    """A metadata list of strings as a tuple."""
    texts = _json(metadata, key, list)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{key} must be a list of strings")
    return tuple(texts)
