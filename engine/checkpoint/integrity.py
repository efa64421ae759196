"""Checksums of a checkpoint's files: written when the checkpoint is complete, verified before it is
resumed, so a disk or copy error is found before a run trains on damaged weights."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "checksums.json"
_CHUNK = 1 << 24  # 16 MiB reads; hashlib releases the GIL, so files hash in parallel threads


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(directory: Path, files: list[Path]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = pool.map(_sha256, files)
    return {str(f.relative_to(directory)): d for f, d in zip(files, digests)}


def write_manifest(directory: Path) -> None:
    """Records the sha256 of every file in `directory` (call once all of them are written)."""
    (directory / MANIFEST).write_text(json.dumps(_hash_all(directory, _files(directory)), indent=1))


def verify(directory: Path) -> str | None:
    """What is wrong with the checkpoint at `directory` (None: every file is as written). One from
    before checksums were written passes unchecked."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    present = {str(f.relative_to(directory)) for f in _files(directory)}
    missing = sorted(set(expected) - present)
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        found = _hash_all(directory, [directory / name for name in sorted(expected)])
    except OSError as e:
        return f"unreadable ({e})"
    damaged = [name for name in sorted(expected) if found[name] != expected[name]]
    return f"checksum mismatch in {', '.join(damaged)}" if damaged else None
