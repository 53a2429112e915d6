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


# ------------------------------------------------------------------- state that does not fit
def _state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``state_dict()`` results hold the same values."""
    if set(a) != set(b) or set(a["importance"]) != set(b["importance"]):
        return False
    same_tensors = all(torch.equal(a["importance"][n], b["importance"][n]) for n in a["importance"])
    rest = [k for k in a if k != "importance"]
    return same_tensors and all(a[k] == b[k] for k in rest)


def _changed_state(plugin: SPGPlugin) -> dict[str, Any]:
    """A valid state that differs from ``plugin``'s in every entry."""
    state = plugin.state_dict()
    state["importance"] = {n: torch.full_like(v, 0.5) for n, v in state["importance"].items()}
    state["seen_tasks"] = [7, 8, 9]
    state["class_groups"] = [[0], [1], [2]]
    state["experiences_seen"] = 3
    return state


@pytest.mark.parametrize("key", ["importance", "seen_tasks", "experiences_seen"])
def test_load_state_dict_with_a_missing_key_changes_nothing(trained: Any, key: str) -> None:
    _, trained_plugin = trained
    plugin = copy.deepcopy(trained_plugin)
    before = plugin.state_dict()
    state = _changed_state(plugin)
    del state[key]
    with pytest.raises(ValueError, match=key):
        plugin.load_state_dict(state)
    assert _state_equal(plugin.state_dict(), before)


@pytest.mark.parametrize(
    "key,value,shown",
    [
        ("seen_tasks", ["a"], "'a'"),
        ("seen_tasks", 3, "3"),
        ("seen_tasks", [1.5], "1.5"),
        ("class_groups", [[0, "x"]], "'x'"),
        ("class_groups", [5], "5"),
        ("experiences_seen", -1, "-1"),
        ("experiences_seen", "two", "'two'"),
        ("importance", [0.5], r"\[0.5\]"),
        ("importance", {"features.1.weight": "high"}, "features.1.weight"),
        ("importance", {3: torch.zeros(2)}, "3"),
        ("unexpected", 1, "unexpected"),
        ("version", True, "True"),
    ],
)
def test_load_state_dict_rejects_a_bad_entry_and_changes_nothing(
    trained: Any, key: str, value: Any, shown: str
) -> None:
    _, trained_plugin = trained
    plugin = copy.deepcopy(trained_plugin)
    before = plugin.state_dict()
    state = _changed_state(plugin)
    state[key] = value
    with pytest.raises(ValueError, match=shown) as info:
        plugin.load_state_dict(state)
    assert key in str(info.value)
    assert _state_equal(plugin.state_dict(), before)


def test_load_state_dict_rejects_a_non_mapping() -> None:
    plugin = SPGPlugin()
    with pytest.raises(ValueError, match="list"):
        plugin.load_state_dict([("version", 1)])  # type: ignore[arg-type]


def _loaded_plugin(trained_plugin: SPGPlugin) -> SPGPlugin:
    plugin = SPGPlugin()
    plugin.load_state_dict(trained_plugin.state_dict())
    return plugin


def test_importance_of_a_larger_parameter_is_refused_before_training(
    trained: Any, digits_til_small: Any
) -> None:
    """Importance fits a parameter that grew (its new part gets 0); it never gets cropped onto
    a smaller one: that would silently drop what earlier tasks needed."""
    _, trained_plugin = trained  # hidden layers (16, 12)
    state = trained_plugin.state_dict()
    state["seen_tasks"] = [0]  # a head the fresh model below has
    plugin = SPGPlugin()
    plugin.load_state_dict(state)
    loaded = plugin.state_dict()
    model = make_mlp(hidden=(16, 10))  # features.3 has 10 units instead of 12
    strategy = make_naive(model, [plugin])
    before = snapshot_params(model)
    with pytest.raises(ValueError, match="features.3.weight") as info:
        strategy.train(digits_til_small.train_stream[2])
    message = str(info.value)
    assert "(12, 16)" in message and "(10, 16)" in message
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)
    assert _state_equal(plugin.state_dict(), loaded)


def test_seen_tasks_without_a_head_in_the_model_are_refused_before_training(
    trained: Any, digits_til_small: Any
) -> None:
    """A plugin state restored onto a model that lacks the heads of earlier tasks: the
    importance pass needs every earlier head (Section 3.1), so training is refused before the
    first step, naming the missing tasks."""
    _, trained_plugin = trained  # tasks 0 and 1
    plugin = _loaded_plugin(trained_plugin)
    loaded = plugin.state_dict()
    model = make_mlp(hidden=(16, 12))  # a fresh model: only head 0 exists
    strategy = make_naive(model, [plugin])
    before = snapshot_params(model)
    with pytest.raises(ValueError, match=r"\[1\]") as info:
        strategy.train(digits_til_small.train_stream[2])
    assert "head" in str(info.value)
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)
    assert _state_equal(plugin.state_dict(), loaded)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_a_head_selection_that_leaves_no_feature_parameter_is_refused(
    digits_til_small: Any, method: str
) -> None:
    """Every trainable parameter selected as a head: SPG would have nothing to protect (the
    fast pass used to crash after training, the reference pass to return nothing)."""
    model = make_mlp()
    plugin = SPGPlugin(heads=lambda name, param: True, importance_method=method)  # type: ignore[arg-type]
    strategy = make_naive(model, [plugin])
    before = snapshot_params(model)
    with pytest.raises(ValueError, match="no trainable feature parameter"):
        strategy.train(digits_til_small.train_stream[0])
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert plugin.importance == {} and plugin.seen_tasks == []


# ------------------------------------------------------------------- devices without float64
def test_the_head_scale_sum_leaves_devices_without_float64() -> None:
    """Apple's MPS has no float64: the head scale's float64 sum runs on the CPU for it, on the
    tensor's own device otherwise."""
    from avalanche_spg.importance import float64_device

    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_the_head_scale_is_unchanged_bit_for_bit_on_cpu(trained: Any) -> None:
    from avalanche_spg.importance import head_scale

    _, plugin = trained
    importance = plugin.importance
    total = sum(float(v.double().sum()) for v in importance.values())
    count = sum(v.numel() for v in importance.values())
    assert head_scale(importance) == 1.0 - total / count == plugin.head_scale


def test_importance_of_parameters_the_model_does_not_have_is_refused_before_training(
    trained: Any, digits_til_small: Any
) -> None:
    """A state saved with another model (here: under a wrapper's names): SPG would protect
    none of these parameters, so training is refused before the first step (it used to warn
    and train unmasked), naming them, with the plugin and the model unchanged."""
    _, trained_plugin = trained
    state = trained_plugin.state_dict()
    state["importance"] = {f"module.{n}": v for n, v in state["importance"].items()}
    state["seen_tasks"] = [0]
    plugin = SPGPlugin()
    plugin.load_state_dict(state)
    loaded = plugin.state_dict()
    model = make_mlp(hidden=(16, 12))
    strategy = make_naive(model, [plugin])
    before = snapshot_params(model)
    with pytest.raises(ValueError, match=r"module\.features\.1\.weight"):
        strategy.train(digits_til_small.train_stream[2])
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)
    assert _state_equal(plugin.state_dict(), loaded)


def test_importance_on_parameters_that_are_heads_here_is_refused_before_training(
    digits_til_small: Any,
) -> None:
    """A class-incremental state (classifier rows carry importance) loaded into a
    task-incremental plugin: heads get the scalar rule only (Section 3.2), so that importance
    masked nothing and silently lowered the head scale. Refused before the first step."""
    model = make_mlp(hidden=(16, 12))
    ci_plugin = SPGPlugin(class_incremental=True)
    make_naive(model, [ci_plugin]).train(digits_til_small.train_stream[0])
    state = ci_plugin.state_dict()
    assert any(name.startswith("classifier.") for name in state["importance"])
    plugin = SPGPlugin()
    plugin.load_state_dict(state)
    loaded = plugin.state_dict()
    strategy = make_naive(model, [plugin])
    before = snapshot_params(model)
    with pytest.raises(ValueError, match="heads here") as info:
        strategy.train(digits_til_small.train_stream[1])
    assert "classifier." in str(info.value)
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)
    assert _state_equal(plugin.state_dict(), loaded)
