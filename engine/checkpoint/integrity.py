"""Checksums of a checkpoint's files: written once the checkpoint is complete, verified before it is
resumed, so a disk or copy error is found before a run trains on damaged weights.

Both are collective: every rank hashes its share of the files (in parallel threads) and the digests
are gathered, so a 300 GB checkpoint costs each of N ranks 1/N of the reading, and no rank waits in a
collective while another hashes everything.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError
from ..parallel import ProcessLayout

MANIFEST = "checksums.json"
_CHUNK = 1 << 24  # 16 MiB reads; hashlib releases the GIL, so files hash in parallel threads


def _sha256(path: Path) -> str:
    """The file's sha256, or 'unreadable: <why>' (never raises: the other ranks are waiting)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """The files of `directory` (relative names, sorted), the manifest aside."""
    try:
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    except OSError:
        return []


def _hash_all(directory: Path, names: list[str], layout: ProcessLayout) -> dict[str, str]:
    """Collective: {name: sha256} of `names`, each rank hashing every world-size-th file."""
    mine = names[layout.ranks["world"] :: layout.sizes["world"]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = dict(zip(mine, pool.map(_sha256, [directory / n for n in mine])))
    return {k: v for part in layout.all_gather_object(digests) for k, v in part.items()}


def write_manifest(directory: Path, layout: ProcessLayout) -> None:
    """Collective: records the sha256 of every file in `directory` (once all of them are written)."""
    names = layout.from_first_rank(_files(directory))
    digests = _hash_all(directory, names, layout)
    unreadable = [f"{n} ({d})" for n, d in digests.items() if d.startswith("unreadable")]
    if unreadable:
        raise CheckpointError(f"{directory}: cannot checksum {', '.join(unreadable)}")
    if layout.is_main:
        (directory / MANIFEST).write_text(json.dumps(digests, indent=1))


def verify(directory: Path, layout: ProcessLayout) -> str | None:
    """Collective: what is wrong with the checkpoint at `directory` (None: every file is as written).
    One from before checksums were written passes unchecked."""
    expected, problem = None, None
    if layout.is_main:
        try:
            expected = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            problem = f"{MANIFEST} is unreadable ({e})"
        else:
            missing = sorted(set(expected) - set(_files(directory)))
            problem = f"missing {', '.join(missing)}" if missing else None
    expected, problem = layout.from_first_rank((expected, problem))
    if expected is None or problem is not None:
        return problem
    found = _hash_all(directory, sorted(expected), layout)
    damaged = [name for name in sorted(expected) if found[name] != expected[name]]
    return f"checksum mismatch in {', '.join(damaged)}" if damaged else None
