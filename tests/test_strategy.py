"""The convenience strategy ``SPG``: Naive training plus an ``SPGPlugin`` appended after the
user's plugins, or the one the user put in ``plugins``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from avalanche.training.templates import SupervisedTemplate
from helpers import CallbackProbe, GradRecorder, feature_param_names, make_mlp, quiet_evaluator
from torch import nn

from avalanche_spg import SPG, SPGPlugin


def test_spg_strategy_appends_the_plugin_after_user_plugins_and_trains(
    digits_til_small: Any,
) -> None:
    order: list[str] = []
    first = CallbackProbe(after_training_exp=lambda s: order.append("first"))
    second = CallbackProbe(after_training_exp=lambda s: order.append("second"))
    model = make_mlp()
    strategy = SPG(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        plugins=[first, second],
        train_mb_size=32,
        train_epochs=1,
        eval_mb_size=256,
        evaluator=quiet_evaluator(),
    )
    assert isinstance(strategy, SupervisedTemplate)
    plugin = strategy.spg_plugin
    assert isinstance(plugin, SPGPlugin)
    plugins = list(strategy.plugins)
    position = next(i for i, p in enumerate(plugins) if p is plugin)
    assert plugins.index(first) < plugins.index(second) < position
    assert sum(isinstance(p, SPGPlugin) for p in plugins) == 1
    assert isinstance(strategy._criterion, nn.CrossEntropyLoss)  # default criterion

    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    assert order == ["first", "second"] * 2
    assert plugin.seen_tasks == [0, 1]
    assert set(plugin.importance) == feature_param_names(model)
    assert all(torch.isfinite(v).all() for v in plugin.importance.values())
    assert 0.0 < plugin.head_scale < 1.0


def test_spg_strategy_forwards_plugin_arguments() -> None:
    model = make_mlp()
    strategy = SPG(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        spg_kwargs={"clip_head_grad_norm": None, "importance_method": "reference"},
        evaluator=quiet_evaluator(),
    )
    assert strategy.spg_plugin.clip_head_grad_norm is None
    assert strategy.spg_plugin.importance_method == "reference"
    assert strategy.plugins[0] is strategy.spg_plugin


def test_spg_strategy_uses_an_spg_plugin_given_in_plugins_and_masks_once(
    digits_til_small: Any,
) -> None:
    """``SPG(..., plugins=[SPGPlugin(...)])`` uses that plugin, where it was put, and appends no
    second one: the gradient reaching the optimizer is masked by (1 - A), not (1 - A)^2."""
    model = make_mlp()
    plugin = SPGPlugin(clip_head_grad_norm=None)
    raw, final = GradRecorder(), GradRecorder()
    strategy = SPG(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        plugins=[raw, plugin],
        train_mb_size=32,
        eval_mb_size=256,
        evaluator=quiet_evaluator(),
    )
    assert strategy.spg_plugin is plugin
    assert [p for p in strategy.plugins if isinstance(p, SPGPlugin)] == [plugin]
    strategy.plugins.append(final)  # the last plugin: sees what optimizer.step() will use
    strategy.train(digits_til_small.train_stream[0])
    importance = {n: v.clone() for n, v in plugin.importance.items()}
    strategy.train(digits_til_small.train_stream[1])
    assert importance and raw.records[1]
    for before, after in zip(raw.records[1], final.records[1]):
        for name, value in importance.items():
            assert torch.equal(after[name], (1 - value) * before[name]), name


def test_spg_strategy_refuses_two_ways_of_configuring_the_plugin() -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="spg_kwargs.*SPGPlugin in plugins"):
        SPG(model, optimizer, spg_kwargs={"mask": "update"}, plugins=[SPGPlugin()])
    with pytest.raises(ValueError, match="2 SPGPlugin entries"):
        SPG(model, optimizer, plugins=[SPGPlugin(), SPGPlugin()])
    plugin = SPGPlugin()
    with pytest.raises(ValueError, match="2 SPGPlugin entries"):
        SPG(model, optimizer, plugins=[plugin, plugin])


def test_spg_strategy_does_not_change_the_list_it_is_given() -> None:
    model = make_mlp()
    given = [CallbackProbe()]
    SPG(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=given)
    assert len(given) == 1


def test_spg_strategy_names_arguments_of_the_wrong_kind() -> None:
    """A bare TypeError ('argument after ** must be a mapping', 'object is not iterable')
    named neither the argument nor the value."""
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="spg_kwargs must be a dict .* got 'mask=update'"):
        SPG(model, optimizer, spg_kwargs="mask=update")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plugins must be a list of plugins"):
        SPG(model, optimizer, plugins=SPGPlugin())  # type: ignore[arg-type]
