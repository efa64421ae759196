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

from ..errors import ConfigError
from .cache import EmbeddingCache
from .conditioning import connectors_source, encode_into, run_texts
from .text import DTYPES, PromptEncoder, TextConfig, encoding_fingerprint, load_connectors


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


def encode_prompts(
    text: TextConfig, records: tuple, eval_records: tuple | None, model_init: str | None
) -> EncodeReport:
    """Encodes this rank's share of the config's texts that the cache lacks; returns what was done."""
    if text.encoder is None or text.cache is None:
        raise ConfigError("omninft encode-prompts needs text.encoder and text.cache")
    rank, world, device = _process()
    connectors = load_connectors(connectors_source(text, model_init), DTYPES[text.dtype])
    cache = EmbeddingCache(text.cache, encoding_fingerprint(text, connectors))
    encoder = PromptEncoder.load(text, connectors, device)
    texts = run_texts((*records, *(eval_records or ())), text.negative_prompt)
    mine = [t for i, t in enumerate(texts) if i % world == rank and t not in cache]
    if rank == 0:
        cache.write_info(
            {
                "encoder": str(text.encoder),
                "connectors": connectors_source(text, model_init),
                "max_length": text.max_length,
                "dtype": text.dtype,
                "caption_channels": encoder.caption_channels,
            }
        )
    start = time.perf_counter()
    with tqdm(total=len(mine), desc=f"encode-prompts rank {rank}", unit="prompt", disable=rank != 0) as bar:
        encode_into(encoder, mine, cache.put, bar.update)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.barrier()
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
