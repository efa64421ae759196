"""`omninft encode-prompts`: fill the embedding cache with every training, eval and negative prompt of a
config, sharded over torchrun ranks and resumable (a rerun encodes only what is missing).

Rank r takes every world-th text of the config's list (not of the missing ones, which other ranks
may be writing as it looks), so ranks never need to agree on anything but the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import ConfigError, UserError
from .cache import EmbeddingCache
from .conditioning import connectors_source, encode_into, run_texts
from .text import DTYPES, ContextConnectors, PromptEncoder, TextConfig, encoding_fingerprint, load_connectors


@dataclass
class EncodeReport:
    rank: int
    texts: int  # distinct texts of the config
    encoded: int  # encoded by this rank now
    seconds: float  # this rank's encoding time
    missing_after: int  # texts still without an entry (after every rank finished)
    bytes_per_prompt: float  # mean size of a cache entry on disk
    directory: str


def _process() -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun (a gloo group for the final barrier), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def _agree(failed: bool, world: int) -> bool:
    """Whether any rank failed (every rank learns it, instead of waiting at the barrier for it)."""
    if world == 1:
        return failed
    flag = torch.tensor([float(failed)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def encode_prompts(
    text: TextConfig, records: tuple, eval_records: tuple | None, model_init: str | None
) -> EncodeReport:
    """Encodes this rank's share of the config's texts that the cache lacks; returns what was done.
    An error on any rank stops every rank (the others name it as having happened elsewhere)."""
    if text.encoder is None or text.cache is None:
        raise ConfigError("omninft encode-prompts needs text.encoder and text.cache")
    rank, world, device = _process()
    error: BaseException | None = None
    try:
        source = connectors_source(text, model_init)
        connectors = load_connectors(source, DTYPES[text.dtype])
        ContextConnectors(connectors, text.max_length)  # what the trainer will need: fail now, not after encoding
        cache = EmbeddingCache(text.cache, encoding_fingerprint(text, connectors))
        texts = run_texts((*records, *(eval_records or ())), text.negative_prompt)
        mine = [t for i, t in enumerate(texts) if i % world == rank and t not in cache]
        if rank == 0:
            cache.write_info(
                {
                    "encoder": str(text.encoder),
                    "connectors": source,
                    "max_length": text.max_length,
                    "dtype": text.dtype,
                    "caption_channels": connectors.config.caption_channels,
                }
            )
        start = time.perf_counter()
        if mine:  # Gemma (24 GB for 12B) is loaded only by ranks with something left to encode
            encoder = PromptEncoder.load(text, connectors, device)
            with tqdm(total=len(mine), desc=f"encode-prompts rank {rank}", unit="prompt", disable=rank != 0) as bar:
                encode_into(encoder, mine, cache.put, bar.update)
        seconds = time.perf_counter() - start
    except Exception as e:  # re-raised below, after telling the other ranks
        error = e
    if _agree(error is not None, world):
        if error is not None:
            raise error
        raise UserError(f"omninft encode-prompts failed on another rank (rank {rank} finished its share)")
    sizes = [cache.path(t).stat().st_size for t in texts if t in cache]
    return EncodeReport(
        rank=rank,
        texts=len(texts),
        encoded=len(mine),
        seconds=seconds,
        missing_after=len(texts) - len(sizes),
        bytes_per_prompt=sum(sizes) / max(1, len(sizes)),
        directory=str(cache.dir),
    )
