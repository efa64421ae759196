"""Prompt datasets: every file format and list form, every error a user can make (one line naming the
file and line), and the per-epoch reshuffle that makes the prompt order a pure function of (seed, iteration)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import load_config, to_dict
from engine.data import DEFAULT_PROMPTS, PromptRecord, TaskConfig, load_prompts, prompts_for
from engine.errors import DataError, UserError


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _error(source: object, key: str = "task.prompts") -> str:
    """The message of the DataError that loading `source` raises; it is one line."""
    with pytest.raises(DataError) as err:
        load_prompts(source, key)
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---- formats ------------------------------------------------------------------------------------


def test_txt_is_one_stripped_prompt_per_line_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "p.txt", "  a dog barks \n\n   \nrain falls\n")
    assert load_prompts(str(path), "task.prompts") == (
        PromptRecord("a dog barks", "a dog barks", "a dog barks", None),
        PromptRecord("rain falls", "rain falls", "rain falls", None),
    )


def test_jsonl_reads_optional_columns_and_defaults_the_rest(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        '{"prompt": " a dog barks "}\n'
        "\n"
        '{"prompt": "rain", "prompt_video": "a tin roof", "prompt_audio": "drumming rain", '
        '"negative_prompt": "blurry"}\n'
        '{"prompt": "owl", "prompt_video": null, "prompt_audio": "  ", "negative_prompt": null}\n',
    )
    assert load_prompts(str(path), "task.prompts") == (
        PromptRecord("a dog barks", "a dog barks", "a dog barks", None),
        PromptRecord("rain", "a tin roof", "drumming rain", "blurry"),
        PromptRecord("owl", "owl", "owl", None),
    )


def test_csv_reads_the_header_quoted_cells_and_a_byte_order_mark(tmp_path):
    path = _write(
        tmp_path / "p.csv",
        "\ufeffprompt,prompt_audio,negative_prompt\n"
        '"waves, at dusk",crashing surf,\n'
        "\n"
        'a drummer,"a slow, steady beat",low quality\n',
    )
    assert load_prompts(path, "task.prompts") == (
        PromptRecord("waves, at dusk", "waves, at dusk", "crashing surf", None),
        PromptRecord("a drummer", "a drummer", "a slow, steady beat", "low quality"),
    )


def test_a_relative_path_starts_at_the_current_directory(tmp_path, monkeypatch):
    _write(tmp_path / "p.txt", "a dog barks\n")
    monkeypatch.chdir(tmp_path)
    assert load_prompts("p.txt", "task.prompts")[0].prompt == "a dog barks"


def test_a_list_holds_strings_and_mappings():
    records = load_prompts(
        ["  a dog barks ", {"prompt": "rain", "prompt_video": "a roof", "negative_prompt": "noise"}], "task.prompts"
    )
    assert records == (
        PromptRecord("a dog barks", "a dog barks", "a dog barks", None),
        PromptRecord("rain", "a roof", "rain", "noise"),
    )


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, line, words",
    [
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', 3, ["malformed JSON", '{"prompt": "..."}']),
        ("p.jsonl", '{"prompt": "a"}\n["b"]\n', 2, ["expected a JSON object", "list"]),
        ("p.jsonl", '{"prompt_video": "a roof"}\n', 1, ["has no prompt", "allowed columns: prompt"]),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', 2, ["has an empty prompt"]),
        ("p.jsonl", '{"prompt": 3}\n', 1, ["prompt must be a string, got 3"]),
        ("p.jsonl", '{"prompt": "a", "negative_prompt": ["x"]}\n', 1, ["negative_prompt must be a string"]),
        (
            "p.jsonl",
            '{"prompt": "a", "caption": "b", "seed": 1}\n',
            1,
            ["unknown keys 'caption', 'seed'", "allowed columns: prompt, prompt_video, prompt_audio, negative_prompt"],
        ),
        ("p.csv", "prompt,caption\na,b\n", 1, ["unknown column 'caption'", "allowed columns: prompt, prompt_video"]),
        ("p.csv", "\nprompt_video,prompt_audio\na,b\n", 2, ["no prompt column", "prompt is required"]),
        ("p.csv", "prompt,prompt\na,b\n", 1, ["prompt named twice"]),
        ("p.csv", "prompt,prompt_audio\na,b\nc,d,e\n", 3, ["row has 3 cells, the header has 2", "quote cells"]),
        ("p.csv", "prompt,prompt_audio\na,b\nc\n", 3, ["row has 1 cell,"]),
        ("p.csv", 'prompt,prompt_audio\n"a\nb",c\n ,d\n', 4, ["has an empty prompt"]),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_line_number(tmp_path, name, text, line, words):
    path = _write(tmp_path / name, text)
    message = _error(str(path))
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("p.txt", "\n  \n", ["holds no prompts", "task.prompts needs at least one"]),
        ("p.jsonl", "\n", ["holds no prompts"]),
        ("p.csv", "prompt,negative_prompt\n", ["holds no prompts"]),
        ("p.csv", "", ["is empty", "needs a header row", "prompt is required"]),
        ("p.txt", b"a dog \xff barks\n", ["not UTF-8"]),
    ],
)
def test_a_file_without_usable_prompts_is_named(tmp_path, name, text, words):
    path = _write(tmp_path / name, text)
    message = _error(str(path))
    assert message.startswith(f"{path}"), message
    for word in words:
        assert word in message, message


def test_a_missing_file_names_the_key_the_path_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _error("data/missing.jsonl", "task.eval_prompts")
    assert message.startswith("task.eval_prompts: prompts file data/missing.jsonl does not exist"), message
    assert str(tmp_path) in message


def test_an_unknown_extension_lists_the_allowed_ones(tmp_path):
    path = _write(tmp_path / "p.json", '[{"prompt": "a"}]')
    message = _error(str(path))
    assert f"{path} has extension '.json'" in message
    for ext in (".txt", ".jsonl", ".csv"):
        assert ext in message


@pytest.mark.parametrize(
    "items, words",
    [
        (["a", "b", 42], ["task.prompts[2]: expected a prompt string or a mapping", "42"]),
        (["a", {"prompt": "b", "caption": "c"}], ["task.prompts[1]: unknown key 'caption'", "allowed columns"]),
        ([{"prompt": "a", "prompt_audio": 1.5}], ["task.prompts[0]: prompt_audio must be a string, got 1.5"]),
        (["a", " "], ["task.prompts[1]: has an empty prompt"]),
        ([{"negative_prompt": "x"}], ["task.prompts[0]: has no prompt"]),
        ([], ["task.prompts holds no prompts"]),
    ],
)
def test_a_bad_list_item_is_named_with_its_index(items, words):
    message = _error(items)
    for word in words:
        assert word in message, message


def test_a_source_that_is_neither_a_list_nor_a_path_is_refused():
    assert "task.prompts must be a list of prompts or the path of a prompts file" in _error(7)


# ---- order --------------------------------------------------------------------------------------


def _epoch(records: list[int], seed: int, epoch: int) -> list[int]:
    """Epoch `epoch` of the order, read as one iteration of len(records) prompts."""
    return prompts_for(records, seed, epoch, len(records))


def test_every_epoch_is_a_fresh_permutation():
    records = list(range(10))
    epochs = [_epoch(records, 0, e) for e in range(4)]
    for order in epochs:
        assert sorted(order) == records
    assert len({tuple(order) for order in epochs}) == 4


def test_the_order_is_a_pure_function_of_seed_and_iteration():
    records = list(range(10))
    assert prompts_for(records, 3, 5, 4) == prompts_for(records, 3, 5, 4)
    assert _epoch(records, 0, 0) != _epoch(records, 1, 0)


def test_iterations_walk_the_epochs_in_order_even_across_their_boundaries():
    records = list(range(5))
    walked = [r for i in range(6) for r in prompts_for(records, 11, i, 3)]  # 18 positions: 3 epochs and 3 more
    expected = [r for e in range(4) for r in _epoch(records, 11, e)][:18]
    assert walked == expected
    assert prompts_for(records, 11, 1, 3) == [*_epoch(records, 11, 0)[3:], _epoch(records, 11, 1)[0]]


def test_an_iteration_may_take_more_prompts_than_an_epoch_holds():
    records = ["a", "b", "c"]
    taken = prompts_for(records, 0, 0, 7)
    assert taken == [*_epoch(records, 0, 0), *_epoch(records, 0, 1), _epoch(records, 0, 2)[0]]


def test_records_are_chosen_as_they_are():
    records = load_prompts(["a", "b"], "task.prompts")
    assert set(prompts_for(records, 0, 0, 2)) == set(records)


# ---- TaskConfig ---------------------------------------------------------------------------------


def test_task_config_reads_a_prompts_file_and_keeps_the_path(tmp_path):
    train = _write(tmp_path / "train.jsonl", '{"prompt": "a dog barks", "prompt_audio": "barking"}\n')
    held = _write(tmp_path / "eval.txt", "rain falls\n")
    cfg = load_config(None, [f"task.prompts={train}", f"task.eval_prompts={held}"])
    assert cfg.task.records() == (PromptRecord("a dog barks", "a dog barks", "barking", None),)
    assert cfg.task.eval_records() == (PromptRecord("rain falls", "rain falls", "rain falls", None),)
    saved = to_dict(cfg)["task"]
    assert saved["prompts"] == str(train) and saved["eval_prompts"] == str(held)
    assert "_records" not in saved


def test_task_config_defaults_to_the_built_in_prompts_and_no_eval_set():
    task = TaskConfig()
    assert [r.prompt for r in task.records()] == list(DEFAULT_PROMPTS)
    assert task.eval_prompts is None and task.eval_records() is None
    assert dataclasses.asdict(task)["prompts"] == list(DEFAULT_PROMPTS)


def test_task_config_takes_mappings_in_its_list():
    task = TaskConfig(prompts=["a", {"prompt": "b", "negative_prompt": "c"}])
    assert task.records()[1] == PromptRecord("b", "b", "b", "c")


def test_a_bad_prompts_file_fails_when_the_config_is_read(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: unknown key 'text'"):
        load_config(None, [f"task.prompts={path}"])
    with pytest.raises(DataError, match="task.eval_prompts: prompts file"):
        load_config(None, [f"task.eval_prompts={tmp_path / 'missing.csv'}"])
