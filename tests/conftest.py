"""pytest configuration shared by the whole suite: deterministic seeds, one CPU thread, quiet
Avalanche warnings, and session-wide digits data and benchmarks (read them, never write them:
every test of the session sees the same objects)."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(__file__))

from helpers import digits_tensors, make_digits_benchmark, set_seed  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Avalanche noise that says nothing about SPG (our own SPGOptimizerWarning is never hidden).
    for message in (
        "No loggers specified",
        "Metric .* used by the EarlyStopping plugin",
        "higher not found",
        "Plugin .* implements incompatible callbacks",
        "Avalanche is transitioning to strategy constructors",
    ):
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Every test starts from the same seeds and uses one thread (the CI machine has 2 cores)."""
    torch.set_num_threads(1)
    set_seed(0)


@pytest.fixture(scope="session")
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits, ``(x, y)`` in a fixed shuffled order (``helpers.digits_tensors``)."""
    return digits_tensors()


@pytest.fixture(scope="session")
def digits_til(digits: tuple[Tensor, Tensor]) -> Any:
    """Digits in 5 task-incremental experiences (2 classes each, task labels 0..4)."""
    return make_digits_benchmark(5, data=digits)


@pytest.fixture(scope="session")
def digits_til_small(digits: tuple[Tensor, Tensor]) -> Any:
    """A smaller digits stream (about 100 training samples per experience) for quick checks."""
    return make_digits_benchmark(5, n_train=500, n_test=200, data=digits)
