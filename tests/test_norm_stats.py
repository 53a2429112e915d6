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


# ------------------------------------------------------------------ models that changed
class _TwoNorms(nn.Module):
    """Two BatchNorm layers (a second one can be left out, or given another width)."""

    def __init__(self, second: int | None = 4) -> None:
        super().__init__()
        self.first = nn.BatchNorm1d(3)
        self.second = nn.BatchNorm1d(second) if second else None


def _strategy(model: nn.Module, task: int) -> Any:
    """A stand-in strategy whose experience has ``task`` as its only task label."""
    from types import SimpleNamespace

    return SimpleNamespace(model=model, experience=SimpleNamespace(task_labels=[task]))


def _store(plugin: TaskNormStatsPlugin, model: nn.Module, task: int, value: float) -> None:
    """Fill every statistic of ``model`` with ``value`` and let the plugin store them."""
    with torch.no_grad():
        for _, tensor in normalisation_statistics(model):
            tensor.fill_(value)
    plugin.after_training_exp(_strategy(model, task))


def test_statistics_stored_inside_a_data_parallel_wrapper_load_into_the_plain_model() -> None:
    """A run under DDP stores the statistics of the wrapped model; the checkpoint holds the
    plain module (resumed in one process): the task's own statistics must still be used."""
    model = _TwoNorms()
    plugin = TaskNormStatsPlugin()
    _store(plugin, nn.DataParallel(model), task=0, value=2.0)
    assert sorted(plugin.state_dict()["per_task"][0])[0] == "first.num_batches_tracked"
    _store(plugin, model, task=1, value=5.0)
    plugin.before_eval_exp(_strategy(model, 0))
    assert torch.equal(model.first.running_mean, torch.full((3,), 2.0))
    plugin.after_eval_exp(_strategy(model, 0))
    assert torch.equal(model.first.running_mean, torch.full((3,), 5.0))


def test_a_layer_added_after_the_task_keeps_the_shared_statistics() -> None:
    """Task 0 was trained before the second layer existed: its own statistics are loaded for
    the first layer, the second keeps what training left, and both come back afterwards."""
    plugin = TaskNormStatsPlugin()
    _store(plugin, _TwoNorms(second=None), task=0, value=2.0)
    model = _TwoNorms()
    _store(plugin, model, task=1, value=5.0)
    plugin.before_eval_exp(_strategy(model, 0))
    assert torch.equal(model.first.running_var, torch.full((3,), 2.0))
    assert model.second is not None
    assert torch.equal(model.second.running_var, torch.full((4,), 5.0))
    plugin.after_eval_exp(_strategy(model, 0))
    assert torch.equal(model.first.running_var, torch.full((3,), 5.0))


def test_stored_statistics_that_do_not_fit_are_refused_with_the_model_unchanged() -> None:
    """A stored statistic of another shape (or one the model no longer has) is named in a
    ValueError raised before any statistic is replaced; the model keeps its own."""
    for changed in (_TwoNorms(second=6), _TwoNorms(second=None)):
        plugin = TaskNormStatsPlugin()
        _store(plugin, _TwoNorms(), task=0, value=2.0)
        _store(plugin, changed, task=1, value=5.0)
        before = _stats(changed)
        try:
            plugin.before_eval_exp(_strategy(changed, 0))
        except ValueError as err:
            assert "task 0" in str(err) and "second.running_mean" in str(err), str(err)
        else:
            raise AssertionError(f"statistics that do not fit {changed} were accepted")
        for name, value in _stats(changed).items():
            assert torch.equal(value, before[name]), name
        plugin.after_eval_exp(_strategy(changed, 0))  # nothing to put back
        for name, value in _stats(changed).items():
            assert torch.equal(value, before[name]), name


def test_a_malformed_state_is_refused_naming_the_entry_and_nothing_is_replaced() -> None:
    plugin = TaskNormStatsPlugin()
    plugin.load_state_dict({"per_task": {0: {"bn.running_mean": [1.0]}}})
    for bad, named in (
        ({"per_task": {"zero": {}}}, "'zero'"),
        ({"per_task": {0: {"bn.running_mean": [1.0]}, 1: [2.0]}}, "task 1"),
        ({"per_task": {0: {"bn.running_mean": "high"}}}, "'bn.running_mean'"),
        ({"per_task": {0: {3: [1.0]}}}, "3"),
        ([("per_task", {})], "per_task"),
    ):
        try:
            plugin.load_state_dict(bad)  # type: ignore[arg-type]
        except ValueError as err:
            assert named in str(err), (bad, str(err))
        else:
            raise AssertionError(f"{bad!r} was accepted")
        assert plugin.tasks == [0]
        assert torch.equal(
            plugin.state_dict()["per_task"][0]["bn.running_mean"], torch.tensor([1.0])
        )


def test_an_interrupted_evaluation_does_not_leave_the_task_statistics_for_training() -> None:
    """An exception during evaluation skips after_eval_exp: the task's own statistics used to
    stay in the model, and the next experience trained on top of them."""
    model = _TwoNorms()
    plugin = TaskNormStatsPlugin()
    _store(plugin, model, task=0, value=2.0)
    _store(plugin, model, task=1, value=5.0)
    plugin.before_eval_exp(_strategy(model, 0))  # ... and the evaluation raises here
    assert torch.equal(model.first.running_mean, torch.full((3,), 2.0))
    plugin.before_training_exp(_strategy(model, 2))
    assert torch.equal(model.first.running_mean, torch.full((3,), 5.0))
    plugin.before_eval_exp(_strategy(model, 0))
    plugin.before_eval_exp(_strategy(model, 1))  # a new evaluation after an interrupted one
    plugin.after_eval_exp(_strategy(model, 1))
    assert torch.equal(model.first.running_mean, torch.full((3,), 5.0))
