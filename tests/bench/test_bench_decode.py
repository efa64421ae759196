"""bench/decode.py end to end at a miniature size: it runs, and its JSON holds the shapes, rates and
iteration shares it promises (decode and every reward, each a fraction of the iteration)."""

from __future__ import annotations

import json

import pytest

from bench import decode

pytest.importorskip("diffusers")


def test_decode_bench_writes_its_json(tmp_path) -> None:
    out = tmp_path / "decode.json"
    argv = ["--divisor", "32", "--grid", "2", "2", "2", "--iterations", "1", "--reps", "1", "--out", str(out)]
    assert decode.main([*argv, "--iterations", "0"]) == 0  # the throughput part alone
    assert "iteration" not in json.loads(out.read_text())
    assert decode.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["throughput"]["frames"] == [9, 64, 64, 3] and result["throughput"]["sample_rate"] == 24000
    assert result["throughput"]["video_clips_per_s"] > 0 and result["throughput"]["audio_clips_per_s"] > 0
    share = result["iteration"]["share"]
    assert set(share) == {
        "decode",
        *(f"reward/{n}" for n in ("video_sharpness", "audio_steadiness", "av_sync", "av_align")),
    }
    assert all(0 < v < 1 for v in share.values()) and sum(share.values()) < 1
