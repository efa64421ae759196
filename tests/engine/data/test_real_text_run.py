"""The real text path end to end on tiny random LTX-2 weights in a diffusers pipeline folder:
`omninft encode-prompts` (resumed, and sharded over two torchrun ranks), then training and sampling
that read the cache, with per-record negative prompts under CFG."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import models
from engine.cli import main
from engine.config import load_config
from engine.data.cache import EmbeddingCache
from engine.data.conditioning import run_texts
from engine.trainer import Trainer
from models.layouts import diffusers_config
from tests.helpers import ROOT, SMALL, TIMEOUT_S, free_port

from . import tiny_ltx2

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

RECORDS = [
    {"prompt": "a dog barks twice", "negative_prompt": "silence"},
    {"prompt": "rain on a tin roof", "prompt_audio": "rain drumming"},
    {"prompt": "waves at dusk"},
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    dit = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"]))
    folder = tiny_ltx2.write_pipeline(
        root / "pipe", tiny_ltx2.gemma(), tiny_ltx2.tokenizer(), tiny_ltx2.connectors(), dit
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return folder, prompts


def _overrides(pipe, cache, *extra: str) -> list[str]:
    folder, prompts = pipe
    return [
        *SMALL,
        f"model.init={folder}",
        f"text.encoder={folder}",
        f"text.cache={cache}",
        f"text.max_length={tiny_ltx2.MAX_LENGTH}",
        "text.dtype=float32",
        "text.batch_size=2",
        f"task.prompts={prompts}",
        *extra,
    ]


def _entries(cache) -> list:
    return sorted(cache.glob("*/*/*.safetensors"))


def test_encode_resume_then_train_and_sample_from_the_cache(pipe, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    args = _overrides(pipe, cache, f"run_dir={tmp_path / 'run'}")
    assert main(["encode-prompts", *args]) == 0
    texts = run_texts(load_config(None, args).task.records(), "")
    assert len(texts) == 5  # three prompts, "silence" and the default ""
    entries = _entries(cache)
    assert len(entries) == 5 and "encoded 5 of 5 prompts" in capsys.readouterr().out
    entries[0].unlink()  # as if the run had been killed before this entry
    before = {p: p.stat().st_mtime_ns for p in entries[1:]}
    assert main(["encode-prompts", *args]) == 0
    assert "encoded 1 of 5 prompts" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the others were not rewritten

    cfg = load_config(None, [*args, "iterations=1", "text.on_missing=error", "sampler.cfg_video=3.0"])
    trainer = Trainer(cfg)
    history = trainer.run()
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(history[0][k])) for k in ("loss", "grad_norm"))
    # The rollout conditioned on the cached features through the connectors.
    rollout, ctx, _ = trainer.rollout(0, trainer.prompts_for(0), [0])
    record = trainer.prompts_for(0)[0]
    fresh = trainer.conditioning.connectors(
        [EmbeddingCache(cache, trainer.conditioning.fingerprint).get(record.prompt)], torch.device("cpu"), torch.float32
    )
    assert torch.equal(ctx[0], fresh[0]) and torch.equal(ctx[1], fresh[1])
    assert rollout.audio_prompts == (record.prompt_audio,) and rollout.video_prompts == (record.prompt_video,)
    assert trainer.negative_prompt(trainer.cfg.task.records()[0]) == "silence"

    out = tmp_path / "samples"
    assert main(["sample", "--out", str(out), "--prompt", "a new prompt", *args, "text.on_missing=error"]) == 2
    assert "1 prompt(s) are not encoded" in capsys.readouterr().err
    assert main(["sample", "--out", str(out), "--prompt", "a new prompt", *args]) == 0  # encoded on the fly
    assert (out / "samples.safetensors").is_file()


def test_encode_prompts_shards_over_torchrun_ranks(pipe, tmp_path) -> None:
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "engine.cli", "encode-prompts", *_overrides(pipe, cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_entries(cache)) == 5
    # Rank 0 takes texts 0, 2, 4 and rank 1 texts 1, 3: each encoded only its share.
    done = dict(re.findall(r"rank (\d): encoded (\d) of 5 prompts", proc.stdout))
    assert done == {"0": "3", "1": "2"}, proc.stdout
