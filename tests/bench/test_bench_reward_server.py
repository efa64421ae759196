"""bench/reward_server.py end to end at a miniature size: one real server, and a JSON row per batch size with
the times, rates, overhead and bytes it promises (the request's bytes growing with the batch)."""

from __future__ import annotations

import json

import pytest

from bench import reward_server

pytest.importorskip("aiohttp")


def test_reward_server_bench_writes_its_json(tmp_path) -> None:
    out = tmp_path / "reward-server.json"
    assert (
        reward_server.main(["--rewards", "av_sync", "--batch-sizes", "1", "8", "--reps", "1", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["bench"] == "reward_server" and result["shapes"]["audio_tokens"] == 51
    one, eight = result["rows"]
    assert (one["reward"], one["batch"], eight["batch"]) == ("av_sync", 1, 8)
    for row in (one, eight):
        assert row["in_process_s"] > 0 and row["remote_s"] > 0 and row["answer_bytes"] > 0
        assert row["remote_samples_per_s"] == pytest.approx(row["batch"] / row["remote_s"])
        assert row["overhead_ms"] == pytest.approx((row["remote_s"] - row["in_process_s"]) * 1e3)
    latents = (7 * 3 * 4 + 51) * 16 * 4  # bytes a sample's fp32 latents add (av_sync reads no prompts)
    assert 7 * latents <= eight["request_bytes"] - one["request_bytes"] < 7 * latents + 200
