"""bench.judges runs every judge end to end on a small clip with one-layer stacks and writes its JSON."""

from __future__ import annotations

import json
import math

from bench import judges


def test_judges_bench_writes_its_json(tmp_path):
    out = tmp_path / "judges.json"
    args = ["--layers", "1", "--frames", "9", "--height", "64", "--width", "96", "--audio-seconds", "1"]
    assert judges.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["judges"]) == set(judges.JUDGES) and result["layers"] == 1
    for row in result["judges"].values():
        assert row["seconds_per_clip"] > 0 and row["parameters"] > 0 and math.isfinite(row["score"])
    # One-layer stacks keep the released widths: the 7B's embeddings alone outweigh the whole cut 2B.
    assert result["judges"]["hpsv3"]["parameters"] > result["judges"]["videoalign"]["parameters"]
