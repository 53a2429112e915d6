"""Parameters that appear, grow, are frozen or get no gradient; which parameters are heads
(default, module names, predicate, bad selector). ``docs/algorithm.md``, section 4, "Parameters
that appear or grow": Avalanche creates heads lazily and grows ``IncrementalClassifier``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from avalanche.models import IncrementalClassifier
from helpers import (
    DIGITS_FEATURES,
    GradRecorder,
    make_digits_benchmark,
    make_mlp,
    make_naive,
    snapshot_params,
)
from torch import Tensor, nn

from avalanche_spg import SPGPlugin


def _assert_valid(importance: dict[str, Tensor], model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name, value in importance.items():
        assert value.shape == params[name].shape, name
        assert torch.isfinite(value).all(), name
        assert float(value.min()) >= 0.0 and float(value.max()) < 1.0, name


# ----------------------------------------------------------------------------- lazy heads
def test_heads_created_lazily_during_eval_are_heads(digits_til_small: Any) -> None:
    model = make_mlp()
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin()
    strategy = make_naive(model, [raw, plugin, masked])
    strategy.train(digits_til_small.train_stream[0])
    n_before = len(list(model.parameters()))
    strategy.eval(digits_til_small.test_stream)  # creates the heads of tasks 1..4
    assert len(list(model.parameters())) == n_before + 2 * 4
    scales = []
    for experience in digits_til_small.train_stream[1:3]:
        scales.append(plugin.head_scale)  # the scalar this experience applies
        strategy.train(experience)
        strategy.eval(digits_til_small.test_stream)
    _, heads = plugin.split_parameters(model)
    assert {f"classifier.classifiers.{t}.classifier.weight" for t in range(5)} <= set(heads)
    assert set(plugin.importance) == {"features.1.weight", "features.1.bias"}
    _assert_valid(plugin.importance, model)
    # the eval-created head of task 2 was trained in experience 2 with the head rule
    name = "classifier.classifiers.2.classifier.weight"
    assert scales[1] < 1.0
    for before, after in zip(raw.records[2], masked.records[2]):
        assert before[name] is not None
        assert torch.equal(after[name], before[name] * scales[1])


def test_heads_created_by_periodic_eval_during_training(digits_til_small: Any) -> None:
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin], train_epochs=2, eval_every=1)
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience, eval_streams=[digits_til_small.test_stream])
    assert set(plugin.importance) == {"features.1.weight", "features.1.bias"}
    _assert_valid(plugin.importance, model)


# ------------------------------------------------------------------ a classifier that grows
class _IncrementalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(DIGITS_FEATURES, 16), nn.ReLU())
        self.classifier = IncrementalClassifier(16, initial_out_features=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def class_incremental_digits() -> Any:
    # classes 0,1 | 2,3 | ...: the classifier grows by two rows per experience
    return make_digits_benchmark(
        5, task_labels=False, n_train=500, n_test=200, fixed_class_order=range(10)
    )


def test_incremental_classifier_that_grows_is_a_head(class_incremental_digits: Any) -> None:
    model = _IncrementalNet()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    weights = []
    for experience in class_incremental_digits.train_stream[:3]:
        strategy.train(experience)
        weights.append(model.classifier.classifier.weight)
    assert weights[0] is not weights[2] and weights[0].shape != weights[2].shape
    assert set(plugin.importance) == {"features.0.weight", "features.0.bias"}
    _, heads = plugin.split_parameters(model)
    assert set(heads) == {"classifier.classifier.weight", "classifier.classifier.bias"}
    _assert_valid(plugin.importance, model)


def test_grown_feature_tensor_keeps_old_importance_and_new_part_is_unmasked(
    class_incremental_digits: Any,
) -> None:
    """With ``heads`` selecting nothing, the growing classifier is a *feature* tensor: its
    importance is padded, never a shape error, and its new rows get importance 0."""
    model = _IncrementalNet()
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin(heads=lambda name, param: False)
    strategy = make_naive(model, [raw, plugin, masked])
    strategy.train(class_incremental_digits.train_stream[0])
    old = plugin.importance["classifier.classifier.weight"].clone()
    assert old.shape[0] == 2
    strategy.train(class_incremental_digits.train_stream[1])
    name = "classifier.classifier.weight"
    assert model.classifier.classifier.weight.shape[0] == 4
    for before, after in zip(raw.records[1], masked.records[1]):
        assert torch.equal(after[name][:2], (1 - old) * before[name][:2])
        assert torch.equal(after[name][2:], before[name][2:])  # new rows: importance 0
    _assert_valid(plugin.importance, model)
    assert plugin.importance[name].shape == (4, 16)
    assert (plugin.importance[name][:2] >= old).all()


# ------------------------------------------------------- frozen and gradient-less parameters
def test_frozen_parameters_are_excluded(digits_til_small: Any) -> None:
    model = make_mlp(hidden=(16, 12))
    model.features[1].bias.requires_grad_(False)
    frozen_before = model.features[1].bias.detach().clone()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in digits_til_small.train_stream[:3]:
        strategy.train(experience)
    assert "features.1.bias" not in plugin.importance
    assert set(plugin.importance) == {"features.1.weight", "features.3.weight", "features.3.bias"}
    assert torch.equal(model.features[1].bias, frozen_before)
    _assert_valid(plugin.importance, model)


def _mlp_with_unused_layer() -> nn.Module:
    """A multi-head MLP with a trainable feature layer that the forward never uses."""
    model = make_mlp()
    model.unused = nn.Linear(4, 3)
    return model


def test_parameters_without_gradient_are_skipped(digits_til_small: Any) -> None:
    model = _mlp_with_unused_layer()
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin()
    strategy = make_naive(model, [raw, plugin, masked])
    before = snapshot_params(model)
    for experience in digits_til_small.train_stream[:3]:
        strategy.train(experience)
    assert torch.equal(plugin.importance["unused.weight"], torch.zeros(3, 4))
    assert torch.equal(plugin.importance["unused.bias"], torch.zeros(3))
    assert all(record["unused.weight"] is None for record in masked.records[2])
    assert torch.equal(model.unused.weight, before["unused.weight"])
    assert float(plugin.importance["features.1.weight"].max()) > 0.0
    _assert_valid(plugin.importance, model)


# ----------------------------------------------------------------------- the head selector
@pytest.mark.parametrize(
    "heads",
    [
        ["classifier", "features.3"],
        lambda name, param: name.startswith(("classifier.", "features.3.")),
    ],
    ids=["module_names", "predicate"],
)
def test_custom_head_selector(digits_til_small: Any, heads: Any) -> None:
    model = make_mlp(hidden=(16, 12))
    plugin = SPGPlugin(heads=heads)
    strategy = make_naive(model, [plugin])
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    assert set(plugin.importance) == {"features.1.weight", "features.1.bias"}
    features, head_params = plugin.split_parameters(model)
    assert {"features.3.weight", "features.3.bias"} <= set(head_params)
    assert set(features) == {"features.1.weight", "features.1.bias"}


def test_custom_head_selector_layer_gets_the_head_rule(digits_til_small: Any) -> None:
    model = make_mlp(hidden=(16, 12))
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin(heads=["classifier", "features.3"])
    strategy = make_naive(model, [raw, plugin, masked])
    strategy.train(digits_til_small.train_stream[0])
    scale = plugin.head_scale
    assert scale < 1.0
    strategy.train(digits_til_small.train_stream[1])
    for before, after in zip(raw.records[1], masked.records[1]):
        for name in ("features.3.weight", "features.3.bias"):
            assert torch.equal(after[name], before[name] * scale), name


def test_bad_head_selector_raises_value_error_naming_it(digits_til_small: Any) -> None:
    model = make_mlp()
    plugin = SPGPlugin(heads=["classifier", "no_such_module"])
    with pytest.raises(ValueError, match="no_such_module"):
        plugin.split_parameters(model)
    strategy = make_naive(model, [plugin])
    with pytest.raises(ValueError, match="no_such_module"):
        strategy.train(digits_til_small.train_stream[0])


def test_bad_head_selector_fails_before_any_training_step(digits_til_small: Any) -> None:
    """Fail early (conventions): a wrong module name must not cost a whole experience."""
    model = make_mlp()
    before = snapshot_params(model)
    strategy = make_naive(model, [SPGPlugin(heads=["no_such_module"])])
    with pytest.raises(ValueError, match="no_such_module"):
        strategy.train(digits_til_small.train_stream[0])
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_a_head_selector_naming_a_module_without_parameters_fails_before_training(
    digits_til_small: Any,
) -> None:
    """``features.0`` exists (a Flatten) but holds no parameter: the selection chose no head,
    so the classifier it was meant to name got importance instead of the head rule, silently."""
    model = make_mlp()
    before = snapshot_params(model)
    strategy = make_naive(model, [SPGPlugin(heads=["features.0"])])
    with pytest.raises(ValueError, match=r"without a trainable parameter: \['features.0'\]"):
        strategy.train(digits_til_small.train_stream[0])
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
