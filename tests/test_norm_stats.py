"""``TaskNormStatsPlugin``: each task is evaluated with the normalisation statistics it was
trained with, and training is left exactly as it would be without the plugin."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from helpers import CallbackProbe, make_naive
from torch import Tensor, nn

from avalanche_spg import SPGPlugin
from avalanche_spg.norm_stats import TaskNormStatsPlugin, normalisation_statistics


class BatchNormMLP(MultiTaskModule):
    """A multi-head MLP with a BatchNorm layer (running statistics outside the parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = MultiHeadClassifier(16, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.features(x), task_label)


def _stats(model: nn.Module) -> dict[str, Tensor]:
    return {n: v.clone() for n, v in normalisation_statistics(model)}


def _test_logits(model: nn.Module, experience: Any) -> Tensor:
    model.eval()
    x = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
    with torch.no_grad():
        return model(x, experience.task_label)


def test_statistics_are_swapped_in_for_evaluation_and_restored(digits_til_small: Any) -> None:
    model = BatchNormMLP()
    plugin = TaskNormStatsPlugin()
    seen_in_eval: list[dict[str, Tensor]] = []
    probe = CallbackProbe()
    probe.before_eval_exp = (  # type: ignore[method-assign]
        lambda strategy, *args, **kwargs: seen_in_eval.append(_stats(strategy.model))
    )
    strategy = make_naive(model, [plugin, probe], train_mb_size=20)
    train, test = digits_til_small.train_stream, digits_til_small.test_stream
    strategy.train(train[0])
    after_first = _stats(model)
    strategy.train(train[1])
    after_second = _stats(model)
    assert any(not torch.equal(after_first[n], after_second[n]) for n in after_first)
    assert plugin.tasks == [0, 1]
    strategy.eval(test[:3])
    # Task 0 with its own statistics, task 1 with its own, task 2 (never trained): shared.
    for name in after_first:
        assert torch.equal(seen_in_eval[0][name], after_first[name]), name
        assert torch.equal(seen_in_eval[1][name], after_second[name]), name
        assert torch.equal(seen_in_eval[2][name], after_second[name]), name
    # Training statistics are back after evaluation.
    for name, value in _stats(model).items():
        assert torch.equal(value, after_second[name]), name


class _EvalLogits(CallbackProbe):
    """Records the model's logits on the evaluated experience when it starts (placed after
    ``TaskNormStatsPlugin``, so with whatever statistics that plugin loaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[Tensor] = []

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.logits.append(_test_logits(strategy.model, strategy.experience))
        strategy.model.eval()


def test_with_frozen_parameters_an_old_task_keeps_its_outputs_exactly(
    digits_til_small: Any,
) -> None:
    """lr = 0: parameters never move, so any change of task 0's outputs comes from the
    statistics; with the plugin there is none."""
    results = {}
    for use_plugin in (False, True):
        probe = _EvalLogits()
        plugins: list[Any] = [SPGPlugin(), *([TaskNormStatsPlugin()] if use_plugin else []), probe]
        strategy = make_naive(BatchNormMLP(), plugins, lr=0.0, train_mb_size=20)
        train, test = digits_til_small.train_stream, digits_til_small.test_stream
        strategy.train(train[0])
        strategy.eval(test[:1])
        strategy.train(train[1])
        strategy.eval(test[:1])
        results[use_plugin] = probe.logits
    right_after, at_the_end = results[True]
    assert torch.equal(right_after, at_the_end)
    right_after, at_the_end = results[False]
    assert not torch.allclose(right_after, at_the_end)  # without it the statistics drifted


def test_state_round_trip_and_clear_errors() -> None:
    plugin = TaskNormStatsPlugin()
    plugin.load_state_dict({"per_task": {"3": {"bn.running_mean": [0.0, 1.0]}}})
    assert plugin.tasks == [3]
    state = plugin.state_dict()
    again = TaskNormStatsPlugin()
    again.load_state_dict(state)
    assert torch.equal(
        again.state_dict()["per_task"][3]["bn.running_mean"], torch.tensor([0.0, 1.0])
    )
    try:
        plugin.load_state_dict({"nope": 1})
    except ValueError as err:
        assert "per_task" in str(err)
    else:
        raise AssertionError("a state without 'per_task' was accepted")
