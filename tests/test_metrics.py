"""Capacity metrics: SPG's importance as Avalanche metrics, recorded by any logger.

The metrics read the live ``SPGPlugin`` at ``after_training_exp``; Avalanche runs user plugins
before the evaluator, so the values must be those of the importance *after* the experience just
trained (checked against the plugin after every ``train`` call).
"""

from __future__ import annotations

import csv
import io
import warnings
from typing import Any

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import (
    CSVLogger,
    InteractiveLogger,
    TensorboardLogger,
    TextLogger,
)
from avalanche.training.plugins import EvaluationPlugin
from helpers import make_mlp, make_naive
from torch import Tensor

from avalanche_spg import SPGPlugin
from avalanche_spg.metrics import (
    ImportanceAboveFraction,
    ScalarCSVLogger,
    fraction_above,
    importance_history,
    layer_mean_importance,
    mean_importance,
    plot_importance_per_layer,
    spg_capacity_metrics,
)

SUFFIX = "train_phase/train_stream"
MEAN = f"SPG/mean_importance/{SUFFIX}"
ABOVE_05 = f"SPG/fraction_importance_above_0.5/{SUFFIX}"
ABOVE_09 = f"SPG/fraction_importance_above_0.9/{SUFFIX}"
HEAD = f"SPG/head_scale/{SUFFIX}"


def _layer(name: str) -> str:
    return f"SPG/layer_mean_importance/{SUFFIX}/{name}"


def _expected(importance: dict[str, Tensor]) -> dict[str, float]:
    """The metric values computed here, independently of avalanche_spg.metrics."""
    flat = torch.cat([v.detach().double().flatten() for v in importance.values()])
    expected = {
        MEAN: flat.mean().item(),
        ABOVE_05: (flat > 0.5).double().mean().item(),
        ABOVE_09: (flat > 0.9).double().mean().item(),
        HEAD: 1.0 - flat.mean().item(),
    }
    for name, value in importance.items():
        expected[_layer(name)] = value.double().mean().item()
    return expected


def _spg_strategy(evaluator: EvaluationPlugin, plugin: SPGPlugin | None = None) -> Any:
    plugins = [plugin if plugin is not None else SPGPlugin()]
    return make_naive(make_mlp(hidden=(16, 8)), plugins, evaluator=evaluator)


def test_metrics_are_recorded_after_each_experience_and_match_the_plugin(digits_til_small):
    evaluator = EvaluationPlugin(*spg_capacity_metrics(), loggers=[])
    strategy = _spg_strategy(evaluator)
    plugin = strategy.plugins[0]
    for index, experience in enumerate(digits_til_small.train_stream[:3]):
        strategy.train(experience)
        recorded = evaluator.get_all_metrics()
        expected = _expected(plugin.importance)
        assert set(recorded) == set(expected)
        assert set(plugin.importance) == {
            "features.1.weight",
            "features.1.bias",
            "features.3.weight",
            "features.3.bias",
        }
        for name, value in expected.items():
            xs, values = recorded[name]
            # One value per experience; the one just emitted is the importance *after* this
            # experience (SPG's after_training_exp ran before the evaluator's).
            assert len(values) == index + 1, name
            assert values[-1] == pytest.approx(value, rel=1e-9, abs=1e-12), name
            assert xs[-1] == strategy.clock.train_iterations
        assert recorded[HEAD][1][-1] == pytest.approx(plugin.head_scale, rel=1e-9)
    # Capacity fills up: the mean only grows (max-accumulation) and is non-trivial.
    means = evaluator.get_all_metrics()[MEAN][1]
    assert 0.0 < means[0] <= means[1] <= means[2] < 1.0
    assert means[2] > means[0]


def test_importance_history_recovers_the_per_layer_curves(digits_til_small):
    evaluator = EvaluationPlugin(*spg_capacity_metrics(), loggers=[])
    strategy = _spg_strategy(evaluator)
    plugin = strategy.plugins[0]
    per_experience = []
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
        per_experience.append(layer_mean_importance(plugin.importance))
    history = importance_history(evaluator.get_all_metrics())
    assert set(history) == set(plugin.importance)
    for name, values in history.items():
        assert values == pytest.approx([row[name] for row in per_experience], rel=1e-9)


def test_every_logger_records_the_metrics_without_error(digits_til_small, tmp_path, capsys):
    text = io.StringIO()
    tensorboard = TensorboardLogger(tb_log_dir=tmp_path / "tb")
    loggers = [
        InteractiveLogger(),
        TextLogger(file=text),
        CSVLogger(log_folder=str(tmp_path / "csv")),
        tensorboard,
        ScalarCSVLogger(tmp_path / "scalars.csv"),
    ]
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True), *spg_capacity_metrics(), loggers=loggers
    )
    strategy = _spg_strategy(evaluator)
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    strategy.eval(digits_til_small.test_stream[:2])
    expected = _expected(strategy.plugins[0].importance)

    # Text and interactive loggers print the values (at the next epoch / evaluation).
    assert f"{MEAN} = {expected[MEAN]:.4f}" in text.getvalue()
    assert f"{HEAD} = {expected[HEAD]:.4f}" in text.getvalue()
    assert MEAN in capsys.readouterr().out

    # TensorBoard: one scalar per experience under each name.
    tensorboard.writer.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {MEAN, ABOVE_05, ABOVE_09, HEAD, _layer("features.1.weight")} <= tags
    last = events.Scalars(MEAN)[-1]
    assert len(events.Scalars(MEAN)) == 2
    assert last.value == pytest.approx(expected[MEAN], rel=1e-6)

    # Avalanche's CSVLogger has fixed columns (SPG's metrics are not among them): the
    # accuracies it does know are still written, one row per experience and epoch.
    history = evaluator.get_all_metrics()
    with open(tmp_path / "csv" / "training_results.csv", newline="") as fh:
        train_rows = list(csv.DictReader(fh))
    assert [(r["training_exp"], r["epoch"]) for r in train_rows] == [("0", "0"), ("1", "0")]
    for task, row in enumerate(train_rows):
        logged = history[f"Top1_Acc_Epoch/train_phase/train_stream/Task00{task}"][1][-1]
        assert float(row["training_accuracy"]) == pytest.approx(logged, abs=5e-5)

    # ScalarCSVLogger keeps every scalar, the capacity metrics included.
    with open(tmp_path / "scalars.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    spg_rows = [r for r in rows if r["metric"] == MEAN]
    assert len(spg_rows) == 2
    assert float(spg_rows[-1]["value"]) == pytest.approx(expected[MEAN], rel=1e-12)
    assert any(r["metric"].startswith("Top1_Acc_Exp") for r in rows)


def test_without_spg_plugin_the_metrics_warn_once_and_emit_nothing(digits_til_small):
    evaluator = EvaluationPlugin(*spg_capacity_metrics(per_layer=False, thresholds=()), loggers=[])
    strategy = make_naive(make_mlp(), [], evaluator=evaluator)
    with pytest.warns(UserWarning, match="no SPGPlugin") as caught:
        for experience in digits_til_small.train_stream[:2]:
            strategy.train(experience)
    # One warning per metric object (mean, head scale), not one per experience.
    assert len([w for w in caught if "no SPGPlugin" in str(w.message)]) == 2
    assert not [name for name in evaluator.get_all_metrics() if name.startswith("SPG/")]


def test_spg_plugin_after_the_evaluator_is_refused(digits_til_small):
    evaluator = EvaluationPlugin(*spg_capacity_metrics(), loggers=[])
    strategy = _spg_strategy(evaluator)
    plugin = strategy.plugins.pop(0)
    strategy.plugins.insert(strategy.plugins.index(evaluator) + 1, plugin)
    with pytest.raises(RuntimeError, match="after the EvaluationPlugin"):
        strategy.train(digits_til_small.train_stream[0])


def test_summaries_on_known_values():
    importance = {
        "a": torch.tensor([[0.0, 0.5], [0.9, 1.0]]),
        "b": torch.tensor([0.2, 0.95]),
        "empty": torch.zeros(0),
    }
    assert mean_importance(importance) == pytest.approx((0.0 + 0.5 + 0.9 + 1.0 + 0.2 + 0.95) / 6)
    assert layer_mean_importance(importance) == pytest.approx({"a": 0.6, "b": 0.575})
    # Strictly above the threshold: 0.5 and 0.9 themselves do not count.
    assert fraction_above(importance, 0.5) == pytest.approx(3 / 6)
    assert fraction_above(importance, 0.9) == pytest.approx(2 / 6)
    assert mean_importance({}) is None
    assert fraction_above({}, 0.5) is None


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5])
def test_threshold_outside_unit_interval_is_rejected(threshold):
    with pytest.raises(ValueError, match="threshold"):
        ImportanceAboveFraction(threshold)


def test_plot_importance_per_layer_writes_an_image(tmp_path):
    history = {"features.1.weight": [0.1, 0.3, 0.4], "features.1.bias": [0.2, 0.25]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend or layout warnings
        out = plot_importance_per_layer(history, tmp_path / "plots" / "importance.png", title="t")
    assert out == tmp_path / "plots" / "importance.png"
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="empty"):
        plot_importance_per_layer({}, tmp_path / "none.png")


@pytest.mark.parametrize(
    ("thresholds", "named"),
    [(0.5, "got 0.5"), ("0.5", "got '0.5'"), ([0.5, 0.5], r"\[0.5\] more than once")],
)
def test_thresholds_that_are_not_distinct_numbers_are_rejected(thresholds, named):
    """A bare number (a TypeError before), a string (compared character by character), a
    repeated threshold (two metrics of one name, each value logged twice)."""
    with pytest.raises(ValueError, match=named):
        spg_capacity_metrics(thresholds=thresholds)


def test_scalar_csv_logger_keeps_numpy_scalars_and_nested_values(tmp_path):
    """Every real number is a scalar: NumPy's (Avalanche metrics and user metrics return them)
    and the numbers inside per-task / per-class mappings were dropped without a trace."""
    import numpy as np
    from avalanche.evaluation.metric_results import MetricValue

    logger = ScalarCSVLogger(tmp_path / "scalars.csv")
    values = {
        "np_float": np.float32(0.5),
        "np_int": np.int64(3),
        "np_0d": np.array(0.25),
        "tensor": torch.tensor([0.75]),
        "nested": {0: {1: 0.125}},
        "image": torch.zeros(2, 2),
        "flag": True,
    }
    logger.log_metrics([MetricValue(object(), name, v, 7) for name, v in values.items()])
    with open(tmp_path / "scalars.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["metric", "x", "value"],
        ["np_float", "7", "0.5"],
        ["np_int", "7", "3.0"],
        ["np_0d", "7", "0.25"],
        ["tensor", "7", "0.75"],
        ["nested/0/1", "7", "0.125"],
    ]


@pytest.mark.parametrize("values", [0.5, [0.1, float("nan")], [0.1, 1.5], ["0.1"]])
def test_plot_importance_per_layer_names_a_layer_whose_values_are_not_importances(tmp_path, values):
    """A NaN was drawn as a gap and a value above 1 cut off by the axis, silently."""
    with pytest.raises(ValueError, match="'features.1.bias'"):
        plot_importance_per_layer(
            {"features.1.weight": [0.1, 0.2], "features.1.bias": values}, tmp_path / "x.png"
        )
