"""Prompt datasets (`task.prompts`, `task.eval_prompts`) and the order a run visits them in.

A dataset is a list in the config or a file: `.txt` (one prompt per line), `.jsonl` (one JSON object
per line) or `.csv` (a header row, then one row per prompt). A record may hold, besides `prompt`, the
texts the video and audio rewards judge (`prompt_video`, `prompt_audio`: a caption of just the
picture or just the sound; default: `prompt`) and its own `negative_prompt` (default: the run's).
An absent, null or blank optional value takes its default in every format, since a CSV row cannot
leave a cell out. Every problem is a one-line DataError that names the file and line (or the config
key and list index) and says what is allowed, so a bad dataset stops the run when the config is read,
not hours into it.

The order is a pure function of (seed, iteration): every epoch visits each record once, in a fresh
shuffle, so resuming at any iteration reproduces exactly the prompts an uninterrupted run would see,
without any sampler state in the checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import DataError
from ..noise import stable_seed

COLUMNS = ("prompt", "prompt_video", "prompt_audio", "negative_prompt")
FORMATS = {
    ".txt": "one prompt per line",
    ".jsonl": 'one JSON object per line, like {"prompt": "..."}',
    ".csv": "a header row with a prompt column",
}
_ALLOWED = f"allowed columns: {', '.join(COLUMNS)}"
_EXAMPLE = '{"prompt": "..."}'

T = TypeVar("T")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a dataset. The rewards judge `prompt_video` / `prompt_audio` rather than `prompt`
    so a dataset can describe each modality on its own; `negative_prompt` None means the run's default."""

    prompt: str
    prompt_video: str
    prompt_audio: str
    negative_prompt: str | None = None


def load_prompts(source: str | os.PathLike | Sequence[str | Mapping], key: str) -> tuple[PromptRecord, ...]:
    """The records of `source`: a list of prompts (strings or mappings of the columns) or the path of a
    .txt, .jsonl or .csv file, relative to the current directory. `key` (e.g. "task.prompts") names the
    source in the messages of list items and of file-level problems."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records = _read_file(path, key)
        where = str(path)
    elif isinstance(source, Sequence):
        records = tuple(_record(item, f"{key}[{i}]") for i, item in enumerate(source))
        where = key
    else:
        raise DataError(f"{key} must be a list of prompts or the path of a prompts file; got {source!r}")
    if not records:
        raise DataError(f"{where} holds no prompts; {key} needs at least one")
    return records


def prompts_for(records: Sequence[T], seed: int, iteration: int, per_iteration: int) -> list[T]:
    """The `per_iteration` records of iteration `iteration`. The run walks one endless sequence of
    epochs, each a fresh shuffle of all records seeded by (seed, epoch), and iteration i takes positions
    [i * per_iteration, (i + 1) * per_iteration) of it, so every epoch visits each record exactly once
    and the choice depends on nothing but (seed, iteration)."""
    assert records, "no records to choose from"
    assert iteration >= 0 and per_iteration >= 0, (iteration, per_iteration)
    n = len(records)
    orders: dict[int, list[int]] = {}
    chosen = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, index = divmod(position, n)
        if epoch not in orders:
            generator = torch.Generator(device="cpu").manual_seed(stable_seed(seed, "prompt-order", epoch))
            orders[epoch] = torch.randperm(n, generator=generator).tolist()
        chosen.append(records[orders[epoch][index]])
    return chosen


def _read_file(path: Path, key: str) -> tuple[PromptRecord, ...]:
    """The records of a prompts file, by its extension."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        allowed = "; ".join(f"{ext} ({what})" for ext, what in FORMATS.items())
        raise DataError(f"{key}: {path} has extension {path.suffix or '(none)'!r}; allowed: {allowed}")
    if not path.is_file():
        raise DataError(f"{key}: prompts file {path} does not exist (relative paths start at {Path.cwd()})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start}); {key} files must be UTF-8") from e
    if suffix == ".txt":
        return tuple(
            _record(line, f"{path}:{lineno}") for lineno, line in enumerate(text.splitlines(), 1) if line.strip()
        )
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_csv(path, text)


def _read_jsonl(path: Path, text: str) -> tuple[PromptRecord, ...]:
    """One JSON object per line; blank lines are skipped."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one object like {_EXAMPLE}"
            ) from e
        if not isinstance(item, dict):
            raise DataError(
                f"{where}: expected a JSON object like {_EXAMPLE}, got {type(item).__name__} {line.strip()[:60]}"
            )
        records.append(_record(item, where))
    return tuple(records)


def _read_csv(path: Path, text: str) -> tuple[PromptRecord, ...]:
    """A header row naming the columns, then one row per prompt; blank lines are skipped. Line numbers
    are those of the file, where a row starts (a quoted cell may span lines)."""
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    records = []
    start = 1  # the line the next row starts on
    for row in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if not row:
            continue
        if header is None:
            header = [name.strip() for name in row]
            _check_header(header, where)
            continue
        if len(row) != len(header):
            raise DataError(
                f"{where}: row has {len(row)} cell{'s' * (len(row) != 1)}, the header has {len(header)} "
                f"({', '.join(header)}); quote cells that contain commas"
            )
        records.append(_record(dict(zip(header, row)), where))
    if header is None:
        raise DataError(f"{path}: is empty; a CSV prompts file needs a header row ({_ALLOWED}; prompt is required)")
    return tuple(records)


def _check_header(header: list[str], where: str) -> None:
    """The header names known columns, each once, `prompt` among them."""
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise DataError(
            f"{where}: unknown column{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; {_ALLOWED}"
        )
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"{where}: column{'s' * (len(twice) > 1)} {', '.join(twice)} named twice in the header")
    if "prompt" not in header:
        raise DataError(f"{where}: the header row has no prompt column; {_ALLOWED} (prompt is required)")


def _record(item: object, where: str) -> PromptRecord:
    """A record from a string (the prompt) or a mapping of the columns; `where` prefixes every message."""
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected a prompt string or a mapping like {_EXAMPLE}; got {item!r}")
    unknown = [str(k) for k in item if k not in COLUMNS]
    if unknown:
        raise DataError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; {_ALLOWED}")
    values = {}
    for column, value in item.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {column} must be a string, got {value!r}")
        if value is not None and value.strip():
            values[column] = value.strip()
    if "prompt" not in values:
        problem = "has no prompt" if item.get("prompt") is None else "has an empty prompt"
        raise DataError(f"{where}: {problem}; every record needs a non-empty prompt ({_ALLOWED})")
    prompt = values["prompt"]
    return PromptRecord(
        prompt=prompt,
        prompt_video=values.get("prompt_video", prompt),
        prompt_audio=values.get("prompt_audio", prompt),
        negative_prompt=values.get("negative_prompt"),
    )
