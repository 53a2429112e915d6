"""Argument types and options shared by the suite's command lines (``python -m benchmarks``,
``python -m benchmarks.perf``, ``python -m benchmarks.paper_scale``): one wording for one kind
of bad value."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "add_clock_options",
    "fraction",
    "name_list",
    "parse_names",
    "positive_float",
    "positive_int",
    "resolve_clock",
]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def parse_names(text: str, valid: Sequence[str], what: str) -> list[str]:
    """``"a, B,a"`` -> ``["a", "b"]`` (lower case, first occurrence kept); ``"all"`` -> every
    name of ``valid``; :class:`ValueError` naming the unknown names (or the empty text) else."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(valid)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(
            f"unknown {what}(s) {', '.join(unknown) or repr(text)}; valid: "
            f"{', '.join(valid)} (or 'all')"
        )
    return list(dict.fromkeys(names))


def name_list(valid: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names of ``valid``, or ``all``
    (:func:`parse_names`)."""

    def parse(text: str) -> list[str]:
        try:
            return parse_names(text, valid, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_clock_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--clock`` of the timing commands (read them with
    :func:`resolve_clock`)."""
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="wall time, or this process's CPU time (what a dedicated CPU would take, on a "
        "shared machine with one thread); auto: CPU time on CPU with one torch thread, else "
        "wall time",
    )


def resolve_clock(clock: str, device: torch.device) -> str:
    """``--clock``: ``auto`` is ``cpu`` (process CPU time) on the CPU with one torch thread,
    ``wall`` else."""
    import torch

    if clock == "auto":
        return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    return clock
