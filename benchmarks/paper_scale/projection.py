"""The projection of a whole run from the timed pieces (the formula: the package's
docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def linear_in_k(k_lo: int, v_lo: float, k_hi: int, v_hi: float, k: int) -> float:
    """The value at task ``k`` of the line through ``(k_lo, v_lo)`` and ``(k_hi, v_hi)``, with
    its slope clipped at 0 (a cost that measured lower at the later task is noise) and the
    value at 0."""
    if k_hi <= k_lo:
        raise ValueError(f"k_hi must be above k_lo, got k_lo={k_lo}, k_hi={k_hi}")
    slope = max(0.0, (v_hi - v_lo) / (k_hi - k_lo))
    return max(0.0, v_lo + slope * (k - k_lo))


@dataclass
class MethodTiming:
    """The timed pieces of one method, in seconds at the full size (already scaled).

    Pairs are the values after tasks ``ks = (k_lo, k_hi)``; ``joint`` has one value per pair
    (both entries equal) and ``ks = (0, 0)``.
    """

    method: str
    ks: tuple[int, int]
    epoch: tuple[float, float]
    validation: float
    end_of_task: tuple[float, float]
    importance_pass: tuple[float, float] | None
    evaluation: float
    checkpoint: tuple[float, float]
    overhead: float
    checkpoint_bytes: tuple[int, int] = (0, 0)
    #: The same pieces as measured, before scaling to the full size.
    raw: dict[str, Any] = field(default_factory=dict)

    def at(self, name: str, k: int) -> float:
        """Piece ``name`` (``epoch``, ``end_of_task``, ``checkpoint``) after task ``k``."""
        values: tuple[float, float] = getattr(self, name)
        if self.method == "joint":
            return values[0]
        return linear_in_k(self.ks[0], values[0], self.ks[1], values[1], k)


def seconds_per_seed(timing: MethodTiming, n_tasks: int, epochs: int) -> float:
    """Projected seconds of one seed of ``timing.method`` on ``n_tasks`` tasks, ``epochs``
    epochs each (see the module docstring for the formula)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if timing.method == "joint":
        return (
            timing.overhead
            + epochs * (timing.epoch[0] + timing.validation)
            + timing.end_of_task[0]
            + timing.evaluation
        )
    total = 0.0
    for k in range(n_tasks):
        total += timing.overhead + epochs * (timing.at("epoch", k) + timing.validation)
        total += timing.at("end_of_task", k) + timing.evaluation
        if k < n_tasks - 1:
            total += timing.at("checkpoint", k)
    return total


def projections(
    results: dict[str, Any], epochs: int, seeds: int, minimum: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Per benchmark and method: seconds of one seed at ``epochs`` and ``minimum`` epochs per
    task, and of ``seeds`` seeds at both."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for benchmark, entry in results.items():
        n_tasks = entry["full_sizes"]["n_tasks"]
        out[benchmark] = {}
        for fields in entry["methods"]:
            timing = MethodTiming(
                **{
                    **fields,
                    "ks": tuple(fields["ks"]),
                    "epoch": tuple(fields["epoch"]),
                    "end_of_task": tuple(fields["end_of_task"]),
                    "checkpoint": tuple(fields["checkpoint"]),
                }
            )
            one = seconds_per_seed(timing, n_tasks, epochs)
            low = seconds_per_seed(timing, n_tasks, minimum)
            out[benchmark][timing.method] = {
                "seed_seconds": one,
                "seeds_seconds": seeds * one,
                "seed_seconds_minimum": low,
                "seeds_seconds_minimum": seeds * low,
            }
    return out
