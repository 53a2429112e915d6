"""``SPGPlugin(importance_max_samples=N)``: the importance is SPG's importance computed on exactly
N samples of the experience (observed from the model's inputs during the pass), equal to the
test-suite's independent reference on those samples, and different from the whole experience's.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from avalanche.benchmarks import tensors_benchmark
from helpers import (
    CallbackProbe,
    digits_tensors,
    make_mlp,
    make_naive,
    reference_accumulate,
    reference_gamma,
)
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from avalanche_spg import SPGPlugin

PER_TASK = 60
SAMPLES = 20  # with minibatches of 8: 8 + 8 + 4, a smaller last minibatch too
BATCH = 8


def _task_tensors(pair: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``PER_TASK`` distinct digit images of the two classes (labels 0 and 1)."""
    x, y = digits_tensors()
    keep = (y == pair[0]) | (y == pair[1])
    x, y = x[keep], (y[keep] == pair[1]).long()
    seen: set[tuple[float, ...]] = set()
    distinct = []
    for index, row in enumerate(x.tolist()):
        if tuple(row) not in seen:  # a few digit images occur twice
            seen.add(tuple(row))
            distinct.append(index)
    return x[distinct][:PER_TASK].clone(), y[distinct][:PER_TASK].clone()


class _InputRecorder:
    """Records the model's inputs while enabled (a forward pre-hook)."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self._handle: Any = None

    def start(self, model: nn.Module) -> None:
        self.inputs = []
        self._handle = model.register_forward_pre_hook(
            lambda _module, args: self.inputs.append(args[0].detach().clone())
        )

    def stop(self) -> None:
        self._handle.remove()

    def positions(self, x: Tensor) -> list[int]:
        """The rows of ``x`` the model saw, in order of first appearance."""
        seen: list[int] = []
        for batch in self.inputs:
            for row in batch:
                matches = (x == row).all(dim=1).nonzero().flatten().tolist()
                assert len(matches) == 1, "an input that is not a row of the experience"
                if matches[0] not in seen:
                    seen.append(matches[0])
        return seen


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_importance_on_a_subset_is_the_reference_on_exactly_those_samples(method: str) -> None:
    tasks = [_task_tensors((0, 1)), _task_tensors((2, 3))]
    stream = tensors_benchmark(tasks, [(x[:4], y[:4]) for x, y in tasks], task_labels=[0, 1])
    model = make_mlp(hidden=(16,))
    recorder = _InputRecorder()
    snapshots: list[nn.Module] = []

    def before_spg(strategy: Any) -> None:
        snapshots.append(copy.deepcopy(strategy.model))
        recorder.start(strategy.model)

    plugin = SPGPlugin(importance_max_samples=SAMPLES, importance_method=method)
    probes = [CallbackProbe(after_training_exp=before_spg), plugin]
    probes.append(CallbackProbe(after_training_exp=lambda strategy: recorder.stop()))
    strategy = make_naive(model, probes, train_mb_size=BATCH)

    expected: dict[str, Tensor] = {}
    whole: dict[str, Tensor] = {}
    for task, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        x, y = tasks[task]
        used = recorder.positions(x)
        assert len(used) == SAMPLES  # N distinct samples of the experience, no more
        subset = TensorDataset(x[used], y[used])
        previous = list(range(task))
        gamma = reference_gamma(snapshots[-1], subset, previous, task, BATCH)
        reference_accumulate(expected, gamma)
        reference_accumulate(
            whole, reference_gamma(snapshots[-1], TensorDataset(x, y), previous, task, BATCH)
        )
        for name, value in plugin.importance.items():
            diff = float((value - expected[name]).abs().max())
            assert diff <= 1e-5, f"task {task}, {name}: {diff:.3g}"

    # not trivial: the importance is far from zero, and far from the whole experience's
    assert max(float(v.max()) for v in expected.values()) > 0.5
    assert max(float((expected[n] - whole[n]).abs().max()) for n in expected) > 0.05
