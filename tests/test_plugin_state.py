"""The plugin's public state: ``importance`` keyed by parameter name (feature parameters only),
``head_scale`` as a float, ``state_dict`` / ``load_state_dict`` round trip and validation."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from helpers import feature_param_names, make_mlp, make_naive, snapshot_params

from avalanche_spg import SPGPlugin


@pytest.fixture(scope="module")
def trained(digits_til_small: Any) -> tuple[Any, SPGPlugin]:
    """A model and plugin after two experiences."""
    model = make_mlp(hidden=(16, 12))
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    return model, plugin


def test_importance_is_keyed_by_feature_parameter_names(trained: Any) -> None:
    model, plugin = trained
    names = [n for n, _ in model.named_parameters()]
    assert set(plugin.importance) == feature_param_names(model)
    assert set(plugin.importance) == {
        "features.1.weight",
        "features.1.bias",
        "features.3.weight",
        "features.3.bias",
    }
    assert all(name in names for name in plugin.importance)
    assert not any(name.startswith("classifier.") for name in plugin.importance)
    features, heads = plugin.split_parameters(model)
    assert set(features) == set(plugin.importance)
    assert set(heads) == {n for n in names if n.startswith("classifier.")}


def test_head_scale_is_a_float_equal_to_one_minus_mean_importance(trained: Any) -> None:
    _, plugin = trained
    assert type(plugin.head_scale) is float
    flat = torch.cat([v.flatten().double().cpu() for v in plugin.importance.values()])
    assert math.isclose(plugin.head_scale, 1.0 - float(flat.mean()), rel_tol=0, abs_tol=1e-9)
    assert 0.0 < plugin.head_scale < 1.0


def test_fresh_plugin_has_empty_state() -> None:
    plugin = SPGPlugin()
    assert plugin.importance == {}
    assert plugin.head_scale == 1.0
    assert plugin.seen_tasks == []


def test_state_dict_round_trip(trained: Any) -> None:
    _, plugin = trained
    state = plugin.state_dict()
    assert all(v.device.type == "cpu" for v in state["importance"].values())
    restored = SPGPlugin()
    restored.load_state_dict(copy.deepcopy(state))
    assert set(restored.importance) == set(plugin.importance)
    for name, value in plugin.importance.items():
        assert torch.equal(restored.importance[name], value.cpu())
    assert restored.head_scale == plugin.head_scale
    assert restored.seen_tasks == plugin.seen_tasks == [0, 1]
    # the state is a copy: editing it does not touch the plugin
    for value in state["importance"].values():
        value.fill_(0.5)
    assert not any(
        torch.equal(v.cpu(), torch.full_like(v, 0.5)) for v in plugin.importance.values()
    )


def test_a_loaded_plugin_continues_exactly_like_the_original(digits_til_small: Any) -> None:
    model = make_mlp(hidden=(16,))
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    results = []
    for use_copy in (False, True):
        continued_model = copy.deepcopy(model)
        continued_plugin = plugin
        if use_copy:
            continued_plugin = SPGPlugin()
            continued_plugin.load_state_dict(plugin.state_dict())
        else:
            continued_plugin = copy.deepcopy(plugin)
        torch.manual_seed(5)
        make_naive(continued_model, [continued_plugin]).train(digits_til_small.train_stream[2])
        results.append((snapshot_params(continued_model), continued_plugin.importance))
    (params_a, imp_a), (params_b, imp_b) = results
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    for name in imp_a:
        assert torch.equal(imp_a[name], imp_b[name]), name


@pytest.mark.parametrize(
    "bad_value", [float("nan"), float("inf"), -0.1, 1.5], ids=["nan", "inf", "neg", "gt1"]
)
def test_load_state_dict_rejects_values_outside_unit_interval(bad_value: float) -> None:
    plugin = SPGPlugin()
    state = plugin.state_dict()
    state["importance"] = {"features.1.weight": torch.tensor([0.2, bad_value])}
    with pytest.raises(ValueError, match="features.1.weight"):
        plugin.load_state_dict(state)
    assert plugin.importance == {}


def test_load_state_dict_rejects_an_unknown_version() -> None:
    plugin = SPGPlugin()
    state = plugin.state_dict()
    state["version"] = 999
    with pytest.raises(ValueError, match="999"):
        plugin.load_state_dict(state)
