"""Distributed checkpoints resharded between tensor-parallel layouts: real torchrun, gloo, CPU.

Three runs chained so each layout saves once and loads once (tests/dist/ckpt_reshard.py): TP=1 (one
process) saves; TP=2 (2 ranks) loads it and saves; TP=1 (one process) loads that. They are the phases of
one 2-process torchrun launch (a launch costs ~10 s of start-up): rank 0 runs the one-process phases alone
in a world of its own. The export to the official file and the errors for missing or corrupt checkpoints
are checked here, in one process.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (see README: test command)")

from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica  # noqa: E402
from safetensors import safe_open  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import TrainState  # noqa: E402
from engine.checkpoint import dist as dist_checkpoint  # noqa: E402
from engine.checkpoint.dist import read_tensors, sharded_state  # noqa: E402
from engine.checkpoint.export import convert  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from models.errors import CheckpointError
from models.layouts import OFFICIAL_PREFIX
from models.weights import read_config  # noqa: E402
from tests.helpers import torchrun  # noqa: E402

TINY = models.PRESETS["tiny"]
SAVED_HYPER = [1e-3, [0.9, 0.999], 1e-6, 0.01]  # lr, betas, eps, weight decay of the saving runs


def test_one_writer_per_replicated_tensor():
    """Every tensor of a one-rank layout is whole; data-parallel rank 0 writes it, rank 1 only reads."""
    model = models.build_model("tiny")
    optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    n = len(model.state_dict())
    for dp_rank in (0, 1):
        tensors = [
            t
            for t in nested_values(sharded_state(model, models.build_model("tiny"), optimizer, dp_rank))
            if isinstance(t, ShardedTensor)
        ]
        assert len(tensors) == 5 * n  # model, old model, exp_avg, exp_avg_sq, step
        assert len({t.key for t in tensors}) == 5 * n
        assert all(is_main_replica(t.replica_id) == (dp_rank == 0) for t in tensors)
        assert all(t.local_shape == t.global_shape for t in tensors)


def test_save_and_load_name_the_missing_process_group(tmp_path):
    model, old_model = models.build_model("tiny"), models.build_model("tiny")
    optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    with pytest.raises(CheckpointError, match="torch.distributed initialised"):
        dist_checkpoint.save(tmp_path / "c", model, old_model, optimizer, TrainState(0, 0), {}, dp_rank=0)
    with pytest.raises(CheckpointError, match="torch.distributed initialised"):
        dist_checkpoint.load(tmp_path / "c", model, old_model, optimizer, dp_rank=0)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ckpt")
    ckpts = root / "checkpoints"
    ranks = torchrun("ckpt_reshard.py", 2, "--dir", str(ckpts), out=root / "run")
    # Each phase ran in the world it names: [processes, tensor-parallel size]; rank 1 sat out the one-process ones.
    assert [{k: v["world"] for k, v in r.items() if k != "rank"} for r in ranks] == [
        {"tp1_save": [1, 1], "tp2": [2, 2], "tp1_load": [1, 1]},
        {"tp2": [2, 2]},
    ], ranks
    tp1_save, tp2, tp1_load = [ranks[0]["tp1_save"]], [r["tp2"] for r in ranks], [ranks[0]["tp1_load"]]
    return {"ckpts": ckpts, "tp1_save": tp1_save, "tp2": tp2, "tp1_load": tp1_load}


def check_loaded(r: dict, q_rows: int) -> None:
    load = r["load"]
    assert load["mismatches"] == [], load["mismatches"][:10]
    assert load["state"] == [3, 1] and load["config"] == {"seed": 7, "run_dir": "runs/x"}, load
    assert load["hyper"] == SAVED_HYPER, load["hyper"]
    # The next step from the loaded state equals the saving run's (up to TP summation order).
    assert load["next_err"] < 1e-5, load["next_err"]
    assert load["q_shape"] == [q_rows, 64], load["q_shape"]  # this rank's share of the first video Q


def check_saved(r: dict) -> None:
    save = r["save"]
    assert save["saved"] and save["leftovers"] == [], save  # renamed into place, no temporary left
    assert save["resume_err"] == 0.0, save  # resuming in the saving layout: the next step is bitwise the same


def test_save_tp2_load_tp1(runs):
    for r in runs["tp2"]:
        check_saved(r)
    check_loaded(runs["tp1_load"][0], q_rows=64)  # whole video attention Q (4 heads x 16)


def test_save_tp1_load_tp2(runs):
    check_saved(runs["tp1_save"][0])
    for r in runs["tp2"]:
        check_loaded(r, q_rows=32)  # each rank holds 2 of the 4 heads


def test_export_official_loads_into_a_fresh_model(runs, tmp_path):
    out = tmp_path / "model.safetensors"
    convert(runs["ckpts"] / "tp2", out, "official")
    saved = torch.load(runs["ckpts"] / "tp2.reference.pt", weights_only=True)
    torch.manual_seed(123)
    fresh = models.build_model("tiny")
    models.load_model_weights(fresh, out, layout="official")
    state = fresh.state_dict()
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    assert not all(torch.equal(state[k], saved["old_model"][k]) for k in state)  # the policy, not the old model
    assert read_config(out) == TINY
    with safe_open(str(out), framework="pt") as f:
        assert all(k.startswith(OFFICIAL_PREFIX) for k in f.keys())


def test_missing_or_corrupt_checkpoint_errors(runs, tmp_path, capsys):
    errors = runs["tp1_load"][0]["load"]["errors"]
    assert errors["missing"].startswith("CheckpointError") and "absent" in errors["missing"], errors
    assert errors["no_metadata"].startswith("CheckpointError") and "no metadata.json" in errors["no_metadata"]
    assert errors["truncated"].startswith("CheckpointError") and "cannot load" in errors["truncated"], errors
    assert not any("\n" in e for e in errors.values()), errors  # one line each, megatron's traces cut

    with pytest.raises(CheckpointError, match="absent"):
        read_tensors(tmp_path / "absent", "model", TINY)
    with pytest.raises(
        CheckpointError, match=r"does not fit the model \(\d+ problem\(s\)\):\n  unexpected: transformer_blocks.2\."
    ):
        read_tensors(runs["ckpts"] / "tp2", "model", dataclasses.replace(TINY, num_layers=2))
    truncated = shutil.copytree(runs["ckpts"] / "tp2", tmp_path / "truncated")
    for f in truncated.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="cannot read the model tensors"):
        read_tensors(truncated, "model", TINY)
    assert not (tmp_path / "x.safetensors").exists()
    # The CLI: megatron's and torch DCP's exceptions reach the user as one line, exit status 2.
    capsys.readouterr()
    assert main(["convert", str(truncated), str(tmp_path / "x.safetensors"), "--to", "official"]) == 2
    err = capsys.readouterr().err
    # (the run config sits in the same truncated files, so reading it fails first)
    assert err.count("\n") == 1 and "cannot read the run config: CheckpointException" in err, err
