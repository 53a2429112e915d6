"""The catalogue of benchmarks (names, sources, task counts): cheap to import, for the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "SOURCE_SHAPES",
    "default_data_root",
    "describe_benchmarks",
]

#: Input shape ``(channels, height, width)`` of every data source.
SOURCE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fmnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "tinyimagenet": (3, 32, 32),
}


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a benchmark name stands for.

    :param name: the CLI name.
    :param source: the dataset it reads (``digits``, ``mnist``, ``fmnist``, ``cifar10``,
        ``cifar100``, ``tinyimagenet``).
    :param kind: ``"split"`` (disjoint classes per task) or ``"permuted"`` (all classes in every
        task, a pixel permutation per task).
    :param n_tasks: number of tasks (experiences).
    :param needs_data_root: whether it reads files (``False``: bundled with scikit-learn).
    :param description: one line for ``--help``.
    """

    name: str
    source: str
    kind: str
    n_tasks: int
    needs_data_root: bool
    description: str


BENCHMARKS: dict[str, BenchmarkInfo] = {
    info.name: info
    for info in (
        BenchmarkInfo(
            "split-digits", "digits", "split", 5, False, "scikit-learn digits, 5 tasks x 2 classes"
        ),
        BenchmarkInfo(
            "perm-digits", "digits", "permuted", 5, False, "digits, 5 pixel permutations x 10"
        ),
        BenchmarkInfo(
            "split-fmnist", "fmnist", "split", 5, True, "Fashion-MNIST, 5 tasks x 2 classes"
        ),
        BenchmarkInfo(
            "perm-fmnist", "fmnist", "permuted", 10, True, "Fashion-MNIST, 10 permutations x 10"
        ),
        BenchmarkInfo("split-mnist", "mnist", "split", 5, True, "MNIST, 5 tasks x 2 classes"),
        BenchmarkInfo("perm-mnist", "mnist", "permuted", 10, True, "MNIST, 10 permutations x 10"),
        BenchmarkInfo(
            "split-cifar10", "cifar10", "split", 5, True, "CIFAR-10, 5 tasks x 2 classes"
        ),
        BenchmarkInfo("c10", "cifar100", "split", 10, True, "CIFAR-100, 10 tasks x 10 classes"),
        BenchmarkInfo("c20", "cifar100", "split", 20, True, "CIFAR-100, 20 tasks x 5 classes"),
        BenchmarkInfo(
            "t10", "tinyimagenet", "split", 10, True, "TinyImageNet 32x32, 10 tasks x 20 classes"
        ),
        BenchmarkInfo(
            "t20", "tinyimagenet", "split", 20, True, "TinyImageNet 32x32, 20 tasks x 10 classes"
        ),
    )
}


def default_data_root() -> Path:
    """``$AVALANCHE_SPG_DATA`` if set, else ``~/.avalanche/data`` (Avalanche's default)."""
    env = os.environ.get("AVALANCHE_SPG_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.avalanche/data").expanduser()


def describe_benchmarks() -> str:
    """One line per benchmark, for ``--help``."""
    lines = []
    for info in BENCHMARKS.values():
        where = "offline (scikit-learn)" if not info.needs_data_root else "--data-root"
        lines.append(f"  {info.name:<14} {info.description} [{where}]")
    return "\n".join(lines)
