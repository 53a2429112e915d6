"""Update masking (``SPGPlugin(mask="update")``) and ``reset_optimizer_state``.

``docs/algorithm.md`` §3 (paper Section 3.2): masking the gradient is an exact soft freeze only
under plain SGD.
Update masking scales the parameter change of each optimizer step instead,
``theta <- theta_before + (1 - A) * (theta_after - theta_before)``, so a parameter with importance
1 stays put under any optimizer, and a parameter with importance 0 gets the optimizer's update
unchanged.

Every test trains two real Avalanche experiences with ``Naive``: experience 0 without masking
(it fills the optimizer state: momentum buffers, Adam moments), then a crafted importance is
loaded into the plugin and experience 1 is trained with the optimizer state carried over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor, nn

from avalanche_spg import SPGPlugin
from avalanche_spg.models import MultiHeadMLP

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
Trajectory = list[dict[str, Tensor]]

FROZEN = "features.1.weight"  # gets importance 1 in the freeze tests
FREE = "features.1.bias"  # gets importance 0 in the freeze tests

# Optimizers whose state or decay moves a parameter whose gradient is masked to zero.
STATEFUL_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
}
PLAIN_SGD: OptimizerFactory = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731


class _Recorder(SupervisedPlugin):
    """Records the parameters after every training iteration of the experience being watched,
    and whether the optimizer holds any state at the start of each experience."""

    def __init__(self) -> None:
        super().__init__()
        self.watch = False
        self.trajectory: Trajectory = []
        self.state_at_start: list[bool] = []

    def before_training_exp(self, strategy, *args, **kwargs):
        self.state_at_start.append(_has_optimizer_state(strategy.optimizer))

    def after_training_iteration(self, strategy, *args, **kwargs):
        if self.watch:
            self.trajectory.append(
                {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
            )


def _has_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """True if any parameter has a momentum buffer / Adam moments (not just an empty dict)."""
    return any(bool(state) for state in optimizer.state.values())


@pytest.fixture(scope="module")
def benchmark():
    generator = torch.Generator().manual_seed(0)
    train, test = [], []
    for _ in range(2):
        x = torch.randn(48, 6, generator=generator)
        y = torch.randint(0, 3, (48,), generator=generator)
        train.append((x, y))
        test.append((x[:8], y[:8]))
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0, 1])


def _crafted_state(importance: dict[str, Tensor]) -> dict:
    """A plugin state as if experience 0 (task 0) had produced ``importance``."""
    return {"version": 1, "importance": importance, "seen_tasks": [0], "experiences_seen": 1}


def _run(
    benchmark,
    make_optimizer: OptimizerFactory,
    plugin: SPGPlugin | None,
    importance: Callable[[nn.Module], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], Trajectory, _Recorder]:
    """Train experiences 0 and 1; ``importance`` is loaded into ``plugin`` between them.

    Returns the parameters right before experience 1, the trajectory during it, the recorder.
    """
    torch.manual_seed(0)
    model = MultiHeadMLP(input_size=6, hidden_sizes=(5,), dropout=0.0)
    recorder = _Recorder()
    strategy = Naive(
        model=model,
        optimizer=make_optimizer(model.parameters()),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=2,
        eval_mb_size=64,
        plugins=([plugin] if plugin is not None else []) + [recorder],
        evaluator=EvaluationPlugin(loggers=[BaseLogger()]),
    )
    strategy.train(benchmark.train_stream[0])
    if plugin is not None and importance is not None:
        plugin.load_state_dict(_crafted_state(importance(model)))
    # The importance pass of the SPG runs draws random numbers (DataLoader seeds): reseed so
    # that every run sees the same minibatches in experience 1.
    torch.manual_seed(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder.watch = True
    strategy.train(benchmark.train_stream[1])
    assert len(recorder.trajectory) == 6  # 48 samples / 16 per batch * 2 epochs
    return before, recorder.trajectory, recorder


def _frozen_weight(model: nn.Module) -> dict[str, Tensor]:
    return {FROZEN: torch.ones_like(model.features[1].weight), FREE: torch.zeros(5)}


def _all_zero(model: nn.Module) -> dict[str, Tensor]:
    return {FROZEN: torch.zeros(5, 6), FREE: torch.zeros(5)}


def _random_importance(model: nn.Module) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        FROZEN: torch.rand(5, 6, generator=generator),
        FREE: torch.rand(5, generator=generator),
    }


@pytest.mark.parametrize("name", sorted(STATEFUL_OPTIMIZERS))
def test_update_mask_freezes_importance_one_exactly(benchmark, name):
    plugin = SPGPlugin(mask="update")
    before, trajectory, _ = _run(benchmark, STATEFUL_OPTIMIZERS[name], plugin, _frozen_weight)
    for step in trajectory:
        assert torch.equal(step[FROZEN], before[FROZEN])
    # Training did happen: the parameter with importance 0 moved.
    assert not torch.equal(trajectory[-1][FREE], before[FREE])


@pytest.mark.parametrize("name", sorted(STATEFUL_OPTIMIZERS))
def test_grad_mask_lets_importance_one_drift(benchmark, name):
    # The problem update masking solves: carried optimizer state / weight decay move a
    # parameter whose gradient is masked to exactly zero.
    plugin = SPGPlugin(mask="grad", warn_optimizer=False)
    before, trajectory, _ = _run(benchmark, STATEFUL_OPTIMIZERS[name], plugin, _frozen_weight)
    drift = (trajectory[-1][FROZEN] - before[FROZEN]).abs().max().item()
    assert drift > 1e-4


@pytest.mark.parametrize("name", sorted(STATEFUL_OPTIMIZERS) + ["sgd"])
def test_update_mask_with_importance_zero_matches_no_spg_exactly(benchmark, name):
    make_optimizer = STATEFUL_OPTIMIZERS.get(name, PLAIN_SGD)
    _, with_spg, _ = _run(benchmark, make_optimizer, SPGPlugin(mask="update"), _all_zero)
    _, without_spg, _ = _run(benchmark, make_optimizer, None)
    for step_spg, step_plain in zip(with_spg, without_spg, strict=True):
        assert step_spg.keys() == step_plain.keys()
        for param_name in step_plain:
            assert torch.equal(step_spg[param_name], step_plain[param_name]), param_name


def test_plain_sgd_grad_and_update_masks_give_the_same_trajectory(benchmark):
    _, by_grad, _ = _run(benchmark, PLAIN_SGD, SPGPlugin(mask="grad"), _random_importance)
    _, by_update, _ = _run(benchmark, PLAIN_SGD, SPGPlugin(mask="update"), _random_importance)
    before, unmasked, _ = _run(benchmark, PLAIN_SGD, None)
    for step_grad, step_update in zip(by_grad, by_update, strict=True):
        for param_name in step_grad:
            torch.testing.assert_close(
                step_update[param_name], step_grad[param_name], rtol=1e-5, atol=1e-7
            )
    # The masks did something: the masked trajectory differs from the unmasked one, for the
    # feature parameters (elementwise factors) and the heads (scalar head rule).
    for param_name in (FROZEN, FREE, "classifier.classifiers.1.classifier.weight"):
        assert not torch.allclose(by_grad[-1][param_name], unmasked[-1][param_name], atol=1e-4)


def test_reset_optimizer_state_clears_momentum_at_experience_start(benchmark):
    momentum = STATEFUL_OPTIMIZERS["sgd_momentum"]
    _, _, kept = _run(benchmark, momentum, SPGPlugin(warn_optimizer=False), _frozen_weight)
    assert kept.state_at_start == [False, True]  # Avalanche carries the buffers over

    plugin = SPGPlugin(reset_optimizer_state=True, warn_optimizer=False)
    before, trajectory, reset = _run(benchmark, momentum, plugin, _frozen_weight)
    assert reset.state_at_start == [False, False]
    # Momentum still works inside the experience ...
    assert not torch.equal(trajectory[-1][FREE], before[FREE])
    # ... and with fresh buffers a zero gradient stays zero: gradient masking is exact again.
    for step in trajectory:
        assert torch.equal(step[FROZEN], before[FROZEN])
