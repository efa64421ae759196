"""bench/text.py end to end on a miniature of its stand-ins: it runs, and its JSON holds the rates and
sizes it promises, with bytes per token equal to caption_channels x the element size."""

from __future__ import annotations

import json

import pytest

from bench import text

pytest.importorskip("transformers")


def test_text_bench_writes_its_json(tmp_path) -> None:
    out = tmp_path / "text.json"
    argv = ["--layers", "1", "--width", "64", "--max-length", "16", "--batch", "2", "--reps", "1", "--out", str(out)]
    assert text.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["shapes"]["caption_channels"] == 64 and result["shapes"]["gemma_hidden_states"] == 2
    assert result["cache_bytes_per_token"] == 64 * 4  # fp32 on a CPU
    assert result["encode_prompts_per_s"] > 0 and result["connector_contexts_per_s"] > 0
    # A cache entry is its real tokens' features plus a small header.
    mean_tokens = result["shapes"]["real_tokens_mean"]
    assert 0 < result["cache_bytes_per_prompt_mean"] - mean_tokens * 64 * 4 < 1024
