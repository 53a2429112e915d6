"""Bad input and unsupported setups: constructor validation, meta-learning strategies, a strategy
that skips ``before_update``, the optimizer warning, and a model without task heads."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from avalanche.training import Naive
from helpers import (
    PlainMLP,
    make_digits_benchmark,
    make_mlp,
    make_naive,
    quiet_evaluator,
    snapshot_params,
)
from torch import nn

from avalanche_spg import SPGOptimizerWarning, SPGPlugin


# ------------------------------------------------------------------------ constructor args
@pytest.mark.parametrize(
    "kwargs,shown",
    [
        ({"clip_head_grad_norm": 0.0}, "0.0"),
        ({"clip_head_grad_norm": -5.0}, "-5.0"),
        ({"clip_head_grad_norm": float("nan")}, "nan"),
        ({"importance_method": "exact"}, "'exact'"),
        ({"importance_batch_size": 0}, "0"),
        ({"importance_batch_size": -3}, "-3"),
        ({"importance_batch_size": 2.5}, "2.5"),
        ({"importance_batch_size": True}, "True"),
        ({"importance_pass_batch_size": 0}, "0"),
        ({"importance_max_samples": -1}, "-1"),
        ({"mask": "weights"}, "'weights'"),
        ({"num_workers": -1}, "-1"),
        ({"num_workers": True}, "True"),
        ({"heads": "classifier"}, "'classifier'"),
        ({"heads": [1, 2]}, "[1, 2]"),
    ],
)
def test_invalid_constructor_arguments_raise_value_error_naming_the_value(
    kwargs: dict[str, Any], shown: str
) -> None:
    (arg_name,) = kwargs
    with pytest.raises(ValueError) as info:
        SPGPlugin(**kwargs)
    message = str(info.value)
    assert arg_name in message
    assert re.search(re.escape(shown), message), message


def test_non_numeric_clip_norm_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'big'"):
        SPGPlugin(clip_head_grad_norm="big")  # type: ignore[arg-type]


def test_non_iterable_heads_raises_value_error() -> None:
    with pytest.raises(ValueError, match="42"):
        SPGPlugin(heads=42)  # type: ignore[arg-type]


def test_valid_constructor_arguments_are_accepted() -> None:
    SPGPlugin(
        heads=["classifier"],
        clip_head_grad_norm=None,
        importance_method="reference",
        importance_batch_size=8,
        importance_pass_batch_size=64,
        importance_max_samples=100,
        mask="update",
        reset_optimizer_state=True,
        warn_optimizer=False,
        num_workers=0,
    )
    SPGPlugin(heads=lambda name, param: name.startswith("classifier"))


# ------------------------------------------------------------------ unsupported strategies
def _mer(model: nn.Module, plugin: SPGPlugin) -> Any:
    from avalanche.training import MER

    return MER(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        plugins=[plugin],
        evaluator=quiet_evaluator(),
    )


def _lamaml(model: nn.Module, plugin: SPGPlugin) -> Any:
    from avalanche.training.supervised.lamaml import LaMAML

    return LaMAML(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        plugins=[plugin],
        evaluator=quiet_evaluator(),
    )


@pytest.mark.parametrize("build", [_mer, _lamaml], ids=["MER", "LaMAML"])
def test_meta_learning_strategies_are_refused_at_the_start_of_training(
    digits_til_small: Any, build: Callable[[nn.Module, SPGPlugin], Any]
) -> None:
    model = make_mlp()
    strategy = build(model, SPGPlugin())
    before = snapshot_params(model)
    with pytest.raises(RuntimeError, match="before_update") as info:
        strategy.train(digits_til_small.train_stream[0])
    assert type(strategy).__name__ in str(info.value)
    after = snapshot_params(model)
    # refused before any training step
    for name, value in before.items():
        assert torch.equal(after[name], value), name


class _SkipsBeforeUpdate(Naive):
    """A custom strategy that steps the optimizer without firing ``before_update``."""

    def _before_update(self, **kwargs: Any) -> None:
        return None


def test_a_strategy_that_never_fires_before_update_gets_a_clear_error(
    digits_til_small: Any,
) -> None:
    model = make_mlp()
    strategy = make_naive(model, [SPGPlugin()], strategy_cls=_SkipsBeforeUpdate)
    with pytest.raises(RuntimeError, match="before_update"):
        strategy.train(digits_til_small.train_stream[0])


class _SkipsOneBeforeUpdate(Naive):
    """Fires ``before_update`` on every iteration except one of a later experience, then steps
    the optimizer anyway; remembers the parameters as they were before that step."""

    skip_experience = 1
    skip_iteration = 2  # within the experience, counted from 0
    params_at_skip: dict[str, torch.Tensor] | None = None

    def _before_update(self, **kwargs: Any) -> None:
        if (
            self.clock.train_exp_counter == self.skip_experience
            and self.clock.train_exp_iterations == self.skip_iteration
        ):
            self.params_at_skip = snapshot_params(self.model)
            return None
        return super()._before_update(**kwargs)


@pytest.mark.parametrize("mask", ["grad", "update"])
def test_no_step_runs_unmasked_when_a_later_iteration_skips_before_update(
    digits_til_small: Any, mask: str
) -> None:
    """The guard holds on every iteration, not only the first of an experience: the optimizer
    step that follows a skipped ``before_update`` is refused before it changes anything."""
    model = make_mlp()
    plugin = SPGPlugin(mask=mask)  # type: ignore[arg-type]
    strategy = make_naive(model, [plugin], strategy_cls=_SkipsOneBeforeUpdate)
    strategy.train(digits_til_small.train_stream[0])
    assert plugin.importance  # importance exists: an unmasked step would break SPG
    with pytest.raises(RuntimeError, match="before_update") as info:
        strategy.train(digits_til_small.train_stream[1])
    assert "_SkipsOneBeforeUpdate" in str(info.value)
    assert strategy.params_at_skip is not None  # the skip happened, at iteration 2
    after = snapshot_params(model)
    for name, value in strategy.params_at_skip.items():
        assert torch.equal(after[name], value), name


def test_the_step_guard_is_removed_after_each_experience(digits_til_small: Any) -> None:
    """Between experiences (and after training) the optimizer carries no SPG hook, so the same
    optimizer can be stepped freely outside of SPG's training."""
    model = make_mlp()
    strategy = make_naive(model, [SPGPlugin()])
    strategy.train(digits_til_small.train_stream[0])
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    strategy.optimizer.step()  # no before_update: fine outside an experience


# -------------------------------------------------------------------- optimizer honesty
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "plain_sgd": lambda p: torch.optim.SGD(p, lr=0.05),
}


def _optimizer_warnings(digits: Any, name: str, **plugin_kwargs: Any) -> list[Any]:
    model = make_mlp()
    strategy = make_naive(
        model, [SPGPlugin(**plugin_kwargs)], optimizer=OPTIMIZERS[name](model.parameters())
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for experience in digits.train_stream[:3]:
            strategy.train(experience)
    return [w for w in caught if issubclass(w.category, SPGOptimizerWarning)]


@pytest.mark.parametrize("name", ["sgd_momentum", "sgd_weight_decay", "adam"])
def test_optimizer_warning_is_emitted_exactly_once(digits_til_small: Any, name: str) -> None:
    caught = _optimizer_warnings(digits_til_small, name)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "mask='update'" in message or "reset_optimizer_state" in message


def test_no_optimizer_warning_for_plain_sgd(digits_til_small: Any) -> None:
    assert _optimizer_warnings(digits_til_small, "plain_sgd") == []


def test_optimizer_warning_can_be_turned_off(digits_til_small: Any) -> None:
    assert _optimizer_warnings(digits_til_small, "adam", warn_optimizer=False) == []


@pytest.mark.parametrize("reset", [False, True])
def test_a_strategy_without_an_optimizer_gets_no_optimizer_warning(reset: bool) -> None:
    """``StreamingLDA`` has no optimizer (``None``): nothing to warn about, nothing to reset."""
    from avalanche.training import StreamingLDA

    plugin = SPGPlugin(reset_optimizer_state=reset)
    strategy = StreamingLDA(
        slda_model=nn.Sequential(nn.Linear(64, 8), nn.ReLU()),
        criterion=nn.CrossEntropyLoss(),
        input_size=8,
        num_classes=10,
        plugins=[plugin],
        evaluator=quiet_evaluator(),
    )
    assert strategy.optimizer is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin.before_training_exp(strategy)
    assert [w for w in caught if issubclass(w.category, SPGOptimizerWarning)] == []


# ------------------------------------------------------------------- no task heads at all
def test_plain_module_gets_single_head_behaviour() -> None:
    """A plain ``nn.Module`` on a benchmark without task labels: every trainable parameter is
    a feature parameter, importance is finite, masking applies to all of them."""
    benchmark = make_digits_benchmark(2, task_labels=False, n_train=400, n_test=150)
    model = PlainMLP(hidden=16)
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
    names = {n for n, _ in model.named_parameters()}
    assert set(plugin.importance) == names
    features, heads = plugin.split_parameters(model)
    assert heads == {} and set(features) == names
    for value in plugin.importance.values():
        assert torch.isfinite(value).all()
        assert float(value.max()) < 1.0 and float(value.max()) > 0.0
    for param in model.parameters():
        assert torch.isfinite(param).all()


def test_multihead_model_without_task_labels_uses_one_head() -> None:
    benchmark = make_digits_benchmark(2, task_labels=False, n_train=400, n_test=150)
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in benchmark.train_stream:
        strategy.train(experience)
    assert plugin.seen_tasks == [0]
    assert set(plugin.importance) == {"features.1.weight", "features.1.bias"}
    for value in plugin.importance.values():
        assert torch.isfinite(value).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_new_api_benchmark_with_two_element_batches() -> None:
    """Avalanche's newer benchmarks yield ``[x, y]`` batches and experiences without task
    labels: the plugin treats them as one task."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from helpers import TensorDigits, digits_tensors

    x, y = digits_tensors()
    benchmark = class_incremental_benchmark(
        {
            "train": as_classification_dataset(TensorDigits(x[:500], y[:500])),
            "test": as_classification_dataset(TensorDigits(x[500:700], y[500:700])),
        },
        num_experiences=2,
    )
    assert len(benchmark.train_stream[0].dataset[0]) == 2
    model = PlainMLP(hidden=16)
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in benchmark.train_stream:
        strategy.train(experience)
    assert plugin.seen_tasks == [0]
    assert set(plugin.importance) == {n for n, _ in model.named_parameters()}
    for value in plugin.importance.values():
        assert torch.isfinite(value).all() and float(value.max()) < 1.0
