"""Gradient-surgery schedules: presets element by element and their relative-depth mapping."""

import pytest

from engine.algorithm.surgery import SURGERY_PRESETS, a2v_grad_scales


def test_paper_preset_at_depth_48() -> None:
    assert a2v_grad_scales("paper", 48) == [0.9] * 10 + [1.0] * 38


def test_authors_preset_at_depth_48() -> None:
    expected = [0.0] + [0.1] * 10 + [1.0] * 29 + [0.3] * 8
    assert len(expected) == 48
    assert a2v_grad_scales("authors", 48) == expected


def test_off_preset() -> None:
    assert a2v_grad_scales("off", 48) == [1.0] * 48
    assert a2v_grad_scales("off", 3) == [1.0] * 3


def test_relative_depth_mapping() -> None:
    # depth 4 -> reference blocks 0, 12, 24, 36; depth 8 -> 0, 6, 12, ..., 42.
    assert a2v_grad_scales("paper", 4) == [0.9, 1.0, 1.0, 1.0]
    assert a2v_grad_scales("authors", 4) == [0.0, 1.0, 1.0, 1.0]
    assert a2v_grad_scales("paper", 8) == [0.9, 0.9] + [1.0] * 6
    assert a2v_grad_scales("authors", 8) == [0.0, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.3]
    assert a2v_grad_scales("paper", 96) == [0.9] * 20 + [1.0] * 76


def test_explicit_list_passes_through() -> None:
    assert a2v_grad_scales([0, 0.5, 1], 3) == [0.0, 0.5, 1.0]
    assert a2v_grad_scales((0.25, 0.75), 2) == [0.25, 0.75]


@pytest.mark.parametrize(
    "schedule", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.5, 1.0], [1.0, -0.1, 1.0], [float("nan")] * 3]
)
def test_bad_explicit_list(schedule: list[float]) -> None:
    with pytest.raises(ValueError, match="surgery.schedule"):
        a2v_grad_scales(schedule, 3)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError, match="shallow") as err:
        a2v_grad_scales("shallow", 48)
    assert all(p in str(err.value) for p in SURGERY_PRESETS)
