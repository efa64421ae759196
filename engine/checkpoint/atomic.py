"""Writing so that a crash never leaves half a file or half a checkpoint under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist


def barrier() -> None:
    """Waits for every rank (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Collective: every rank writes its files into the yielded temporary directory beside `final`;
    once all have, rank 0 renames it to `final` (replacing an older one). On an error the temporary
    directory is removed and `final` is left as it was."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    writer = _is_writer()
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        yield tmp
        barrier()
        if writer:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def write_text_atomic(path: Path, text: str) -> None:
    """Replaces `path` with `text` in one rename (written and fsynced beside it first)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
