"""Continual-learning metrics from an accuracy matrix, and their mean ± std over seeds.

``R[i][j]`` is the test accuracy on task ``j`` right after training on task ``i`` (every task
is evaluated after every experience, task label given). With ``T`` tasks:

* **ACC** — mean final accuracy, ``mean_j R[T-1][j]`` (the SPG paper's metric);
* **BWT** — backward transfer (Lopez-Paz & Ranzato, 2017),
  ``mean_{t<T-1} (R[T-1][t] - R[t][t])``; negative means forgetting;
* **forgetting** — Chaudhry et al. (2018), ``mean_{t<T-1} (max_{t<=i<T-1} R[i][t] - R[T-1][t])``;
* **ACC after task i** — ``mean_{j<=i} R[i][j]``, the curve of the "ACC after each task" plot.

A run that only has the final row (the ``joint`` upper bound, trained once on everything) has an
ACC but no BWT or forgetting (``None``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "accuracy",
    "backward_transfer",
    "forgetting",
    "acc_curve",
    "summarize_matrix",
    "mean_std",
]

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> int:
    if not matrix or not matrix[0]:
        raise ValueError("the accuracy matrix is empty")
    width = len(matrix[0])
    if any(len(row) != width for row in matrix):
        raise ValueError("every row of the accuracy matrix must have one entry per task")
    return width


def accuracy(matrix: Matrix) -> float:
    """ACC: the mean of the last row (final accuracy of every task)."""
    _check(matrix)
    last = matrix[-1]
    return float(sum(last) / len(last))


def _is_full(matrix: Matrix) -> bool:
    return len(matrix) == _check(matrix)


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT: mean over ``t < T-1`` of ``R[T-1][t] - R[t][t]`` (``None`` without a full matrix)."""
    if not _is_full(matrix):
        return None
    n = len(matrix)
    if n < 2:
        return None
    return float(sum(matrix[n - 1][t] - matrix[t][t] for t in range(n - 1)) / (n - 1))


def forgetting(matrix: Matrix) -> float | None:
    """Average forgetting: best earlier accuracy minus final accuracy, over ``t < T-1``."""
    if not _is_full(matrix):
        return None
    n = len(matrix)
    if n < 2:
        return None
    drops = [max(matrix[i][t] for i in range(t, n - 1)) - matrix[n - 1][t] for t in range(n - 1)]
    return float(sum(drops) / len(drops))


def acc_curve(matrix: Matrix) -> list[float]:
    """Mean accuracy on the tasks seen so far, after each task (one value per row)."""
    if not _is_full(matrix):
        return [accuracy(matrix)]
    return [float(sum(row[: i + 1]) / (i + 1)) for i, row in enumerate(matrix)]


def summarize_matrix(matrix: Matrix) -> dict[str, Any]:
    """``{"acc", "bwt", "forgetting", "acc_curve"}`` of one run."""
    return {
        "acc": accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "acc_curve": acc_curve(matrix),
    }


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for one value); ``None`` values are
    skipped, ``(None, None)`` when nothing is left."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return None, None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0
