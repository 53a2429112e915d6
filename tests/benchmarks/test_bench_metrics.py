"""ACC, BWT, forgetting and the ACC curve on hand-made accuracy matrices (R[i][j] = accuracy on
task j after learning task i), and mean ± std over seeds."""

from __future__ import annotations

import math

import pytest

from benchmarks.metrics import (
    acc_curve,
    accuracy,
    backward_transfer,
    forgetting,
    mean_std,
    summarize_matrix,
)

# Three tasks. Task 0: 0.9 -> 0.8 -> 0.6; task 1: 0.7 -> 0.75 (improves); task 2: 0.5.
R = [
    [0.9, 0.1, 0.2],
    [0.8, 0.7, 0.3],
    [0.6, 0.75, 0.5],
]


def test_acc_is_the_mean_of_the_last_row() -> None:
    assert accuracy(R) == pytest.approx((0.6 + 0.75 + 0.5) / 3)


def test_bwt_compares_final_with_just_learned_accuracy() -> None:
    # ((0.6 - 0.9) + (0.75 - 0.7)) / 2
    assert backward_transfer(R) == pytest.approx((-0.3 + 0.05) / 2)


def test_forgetting_uses_the_best_earlier_accuracy() -> None:
    # task 0: max(0.9, 0.8) - 0.6 = 0.3; task 1: max(0.7) - 0.75 = -0.05
    assert forgetting(R) == pytest.approx((0.3 - 0.05) / 2)


def test_forgetting_differs_from_minus_bwt_when_accuracy_peaks_later() -> None:
    peaked = [[0.5, 0.0], [0.9, 0.8], [0.6, 0.8]]  # not square: no BWT / forgetting
    assert backward_transfer(peaked) is None and forgetting(peaked) is None
    square = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]]
    assert backward_transfer(square) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)
    assert forgetting(square) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)


def test_acc_curve_averages_the_tasks_seen_so_far() -> None:
    assert acc_curve(R) == pytest.approx([0.9, 0.75, (0.6 + 0.75 + 0.5) / 3])


def test_a_single_final_row_has_acc_but_no_bwt() -> None:
    joint = [[0.95, 0.9, 0.85]]
    summary = summarize_matrix(joint)
    assert summary["acc"] == pytest.approx(0.9)
    assert summary["bwt"] is None and summary["forgetting"] is None
    assert summary["acc_curve"] == pytest.approx([0.9])


def test_one_task_has_no_backward_transfer() -> None:
    assert backward_transfer([[0.7]]) is None
    assert accuracy([[0.7]]) == pytest.approx(0.7)


def test_no_forgetting_means_zero() -> None:
    perfect = [[1.0, 0.5], [1.0, 1.0]]
    assert backward_transfer(perfect) == 0.0 and forgetting(perfect) == 0.0


def test_malformed_matrices_are_rejected() -> None:
    with pytest.raises(ValueError):
        accuracy([])
    with pytest.raises(ValueError):
        accuracy([[0.1, 0.2], [0.3]])


def test_mean_std_uses_the_sample_std_and_skips_missing_values() -> None:
    mean, std = mean_std([0.5, 0.7, None, 0.9])
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(0.2)  # sqrt(((-0.2)^2 + 0 + 0.2^2) / 2)
    assert mean_std([0.4]) == (0.4, 0.0)
    assert mean_std([None, math.nan]) == (None, None)
