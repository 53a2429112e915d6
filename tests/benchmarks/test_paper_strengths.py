"""The paper protocol's regularisation strengths follow from the committed calibration runs.

``benchmarks/results/calibration/`` holds one run directory per (stream, method, strength), all on
seed 100 (a seed the result tables do not use), trained with the paper protocol. The rule stated
in :mod:`benchmarks.methods`: the best ACC of the grid, and the grid must extend past the chosen
value on both sides (so a better value cannot hide beyond an end of the grid). Where a strength
was calibrated at more than one training-set size, the grid with the most training images per
task (the tables' size) decides.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.methods import PAPER_STRENGTHS

CALIBRATION = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibration"
_METHOD_OF = {"ewc_lambda": "ewc", "si_lambda": "si", "lambda_reg": "mas"}


@functools.cache
def _grid() -> dict[tuple[str, str], dict[float, float]]:
    """``(benchmark, strength name) -> {strength: ACC}`` from every committed calibration run
    (read once for all the parametrized cases)."""
    by_size: dict[tuple[str, str], dict[int, dict[float, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for path in sorted(CALIBRATION.glob("*/runs/*/seed*/result.json")):
        result = json.loads(path.read_text())
        assert result["seed"] == 100, path
        assert result["protocol"]["name"] == "paper", path
        size = max(result["stream"]["train_per_task"])
        for name, method in _METHOD_OF.items():
            if result["method"] == method:
                strength = float(result["hparams"][name])
                by_size[(result["benchmark"], name)][size][strength] = result["acc"]
    return {key: sizes[max(sizes)] for key, sizes in by_size.items()}


def choose(accuracies: dict[float, float]) -> float:
    """The strength with the best ACC."""
    return max(accuracies, key=lambda value: accuracies[value])


@pytest.mark.parametrize(
    ("benchmark", "name"),
    [(b, n) for b, strengths in PAPER_STRENGTHS.items() for n in strengths],
)
def test_each_paper_strength_is_the_calibrated_choice(benchmark: str, name: str) -> None:
    accuracies = _grid().get((benchmark, name))
    assert accuracies, f"no calibration runs for {name} on {benchmark}"
    chosen = choose(accuracies)
    assert PAPER_STRENGTHS[benchmark][name] == chosen, (benchmark, name, sorted(accuracies.items()))
    assert min(accuracies) < chosen < max(accuracies), (
        f"{name} on {benchmark}: the grid {sorted(accuracies)} does not extend past {chosen}"
    )


def test_every_calibrated_stream_has_all_three_strengths() -> None:
    for benchmark, strengths in PAPER_STRENGTHS.items():
        assert set(strengths) == set(_METHOD_OF), benchmark
