"""The convenience strategy ``SPG``: Naive training plus an ``SPGPlugin`` appended after the
user's plugins."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from helpers import CallbackProbe, feature_param_names, make_mlp, quiet_evaluator
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
