"""How full the network is: SPG's accumulated importance as Avalanche metrics.

SPG's plasticity is driven by how much of the feature extractor is already important: a
parameter with importance ``A`` keeps only ``1 - A`` of its gradient, and the heads learn with
``1 - mean(A)`` (paper Section 3.2, Eq. 4-5; ``docs/algorithm.md``). These metrics make that
capacity visible after every experience, through Avalanche's
:class:`~avalanche.training.plugins.EvaluationPlugin`, so that every logger records them
(text, TensorBoard, W&B, :class:`ScalarCSVLogger`)::

    from avalanche_spg.metrics import spg_capacity_metrics
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), *spg_capacity_metrics(),
                                 loggers=[InteractiveLogger(), TensorboardLogger()])
    strategy = Naive(model, optimizer, plugins=[SPGPlugin()], evaluator=evaluator, ...)

Each metric reads the live :class:`~avalanche_spg.SPGPlugin` from ``strategy.plugins`` at
``after_training_exp``. Avalanche calls the user's plugins before the evaluator, so SPG has
already folded the experience's importance into ``A`` when the metrics read it. Values are
emitted once per experience, at x = ``strategy.clock.train_iterations`` (Avalanche's convention
for training metrics), with names in Avalanche's style:

* ``SPG/mean_importance/train_phase/train_stream`` — mean of ``A`` over every element;
* ``SPG/layer_mean_importance/train_phase/train_stream/<parameter name>`` — mean of ``A`` of one
  parameter tensor (names of ``model.named_parameters()``);
* ``SPG/fraction_importance_above_0.5/train_phase/train_stream`` (and ``_0.9``) — fraction of
  elements with ``A > threshold``;
* ``SPG/head_scale/train_phase/train_stream`` — the scalar ``1 - mean(A)`` the heads train with
  in the next experience.

:func:`importance_history` turns ``evaluator.get_all_metrics()`` back into per-layer curves and
:func:`plot_importance_per_layer` draws them (matplotlib, imported only there).
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.logging import BaseLogger
from torch import Tensor

from avalanche_spg.importance import float64_device

if TYPE_CHECKING:
    from avalanche_spg.plugin import SPGPlugin

__all__ = [
    "MeanImportance",
    "LayerMeanImportance",
    "ImportanceAboveFraction",
    "HeadScale",
    "ScalarCSVLogger",
    "spg_capacity_metrics",
    "mean_importance",
    "layer_mean_importance",
    "fraction_above",
    "importance_history",
    "plot_importance_per_layer",
]

#: Default thresholds of :class:`ImportanceAboveFraction` in :func:`spg_capacity_metrics`.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.9)

LAYER_METRIC = "SPG/layer_mean_importance"


# ------------------------------------------------------------------------------ pure summaries
def mean_importance(importance: Mapping[str, Tensor]) -> float | None:
    """Mean of every element of every tensor (``None`` when there is no element)."""
    total = sum(float(_as_float64(value).sum()) for value in importance.values())
    count = sum(value.numel() for value in importance.values())
    return total / count if count else None


def _as_float64(value: Tensor) -> Tensor:
    """``value`` in float64, on the CPU when its device has no float64 (Apple's MPS)."""
    return value.detach().to(float64_device(value.device)).double()


def layer_mean_importance(importance: Mapping[str, Tensor]) -> dict[str, float]:
    """``{parameter name: mean of its importance}`` (empty tensors are left out)."""
    return {
        name: float(_as_float64(value).mean())
        for name, value in importance.items()
        if value.numel()
    }


def fraction_above(importance: Mapping[str, Tensor], threshold: float) -> float | None:
    """Fraction of all elements whose importance is strictly above ``threshold``."""
    above = sum(int((value > threshold).sum()) for value in importance.values())
    count = sum(value.numel() for value in importance.values())
    return above / count if count else None


# ------------------------------------------------------------------------------------ metrics
class _SPGCapacityMetric(PluginMetric[Any]):
    """Base: find the live SPG plugin after each training experience and emit values from it."""

    #: Name before the ``/train_phase/train_stream`` suffix.
    base_name = "SPG"

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._warned_missing = False

    def reset(self) -> None:
        """Forget the last emitted values."""
        self._last = {}

    def result(self) -> Any:
        """The values emitted after the last training experience."""
        return dict(self._last)

    def _values(self, plugin: SPGPlugin) -> dict[str, float]:
        """``{name suffix ("" for none): value}`` computed from the plugin."""
        raise NotImplementedError

    def after_training_exp(self, strategy: Any) -> MetricResult:
        plugin = self._find_plugin(strategy)
        if plugin is None:
            return None
        self._last = self._values(plugin)
        base = get_metric_name(self.base_name, strategy, add_experience=False, add_task=False)
        x = strategy.clock.train_iterations
        return [
            MetricValue(self, f"{base}/{suffix}" if suffix else base, value, x)
            for suffix, value in self._last.items()
        ]

    def _find_plugin(self, strategy: Any) -> SPGPlugin | None:
        from avalanche_spg.plugin import SPGPlugin

        plugins = list(getattr(strategy, "plugins", []))
        found = [i for i, p in enumerate(plugins) if isinstance(p, SPGPlugin)]
        if not found:
            if not self._warned_missing:
                self._warned_missing = True
                warnings.warn(
                    f"{type(self).__name__}: the strategy has no SPGPlugin; SPG capacity "
                    "metrics emit nothing.",
                    stacklevel=2,
                )
            return None
        evaluator = getattr(strategy, "evaluator", None)
        positions = [i for i, p in enumerate(plugins) if p is evaluator]
        if positions and found[0] > positions[0]:
            raise RuntimeError(
                "SPGPlugin comes after the EvaluationPlugin in strategy.plugins, so its "
                "importance is not updated yet when the capacity metrics read it; pass "
                "SPGPlugin in the strategy's plugins (they run before the evaluator)."
            )
        return plugins[found[0]]


class MeanImportance(_SPGCapacityMetric):
    """Mean accumulated importance over every feature-parameter element (0: empty, 1: full)."""

    base_name = "SPG/mean_importance"

    def _values(self, plugin: SPGPlugin) -> dict[str, float]:
        value = mean_importance(plugin.importance)
        return {} if value is None else {"": value}

    def __str__(self) -> str:
        return self.base_name


class LayerMeanImportance(_SPGCapacityMetric):
    """Mean accumulated importance of each parameter tensor, one value per tensor name."""

    base_name = LAYER_METRIC

    def _values(self, plugin: SPGPlugin) -> dict[str, float]:
        return layer_mean_importance(plugin.importance)

    def __str__(self) -> str:
        return self.base_name


class ImportanceAboveFraction(_SPGCapacityMetric):
    """Fraction of feature-parameter elements whose importance exceeds ``threshold``.

    :param threshold: in ``[0, 1)``; ``0.9`` counts the nearly frozen parameters.
    """

    def __init__(self, threshold: float) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not 0.0 <= threshold < 1.0
        ):
            raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
        super().__init__()
        self.threshold: float = float(threshold)
        self.base_name = f"SPG/fraction_importance_above_{self.threshold:g}"

    def _values(self, plugin: SPGPlugin) -> dict[str, float]:
        value = fraction_above(plugin.importance, self.threshold)
        return {} if value is None else {"": value}

    def __str__(self) -> str:
        return self.base_name


class HeadScale(_SPGCapacityMetric):
    """The head scale ``1 - mean(A)`` (paper Eq. 5) that the heads train with next."""

    base_name = "SPG/head_scale"

    def _values(self, plugin: SPGPlugin) -> dict[str, float]:
        return {"": float(plugin.head_scale)}

    def __str__(self) -> str:
        return self.base_name


def spg_capacity_metrics(
    *,
    mean: bool = True,
    per_layer: bool = True,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    head_scale: bool = True,
) -> list[PluginMetric[Any]]:
    """The capacity metrics to pass to ``EvaluationPlugin(...)``.

    :param mean: emit the overall mean importance.
    :param per_layer: emit the mean importance of every parameter tensor.
    :param thresholds: emit the fraction of elements above each of these values (distinct
        numbers in ``[0, 1)``).
    :param head_scale: emit the head scale.
    :raises ValueError: naming ``thresholds`` if it is not a sequence of distinct numbers in
        ``[0, 1)`` (a repeated one would log its metric twice under one name).
    """
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise ValueError(f"thresholds must be a sequence of numbers in [0, 1), got {thresholds!r}")
    repeated = sorted({t for t in thresholds if list(thresholds).count(t) > 1}, key=repr)
    if repeated:
        raise ValueError(f"thresholds must be distinct, got {repeated} more than once")
    metrics: list[PluginMetric[Any]] = []
    if mean:
        metrics.append(MeanImportance())
    if per_layer:
        metrics.append(LayerMeanImportance())
    metrics += [ImportanceAboveFraction(t) for t in thresholds]
    if head_scale:
        metrics.append(HeadScale())
    return metrics


# ------------------------------------------------------------------------------------ logging
class ScalarCSVLogger(BaseLogger):
    """Writes every scalar metric value as a row ``name,x,value`` of one CSV file.

    Avalanche's own ``CSVLogger`` has a fixed set of columns (accuracy, loss, forgetting) and
    drops every other metric; this logger keeps all scalars, the SPG capacity metrics included.
    A scalar is a real number of any kind (Python, NumPy, a one-element tensor or array); a
    metric whose value is a mapping (per task, per class, nested) gives one row per number in
    it, named ``name/key/...``. Other values (images, whole tensors) are not scalars and are
    left out.

    :param path: the CSV file to write (its folder is created; an existing file is replaced).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerow(["metric", "x", "value"])

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        rows = list(_scalar_rows(name, value))
        if not rows:
            return
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerows([row_name, x_plot, repr(number)] for row_name, number in rows)


def _scalar_rows(name: str, value: Any) -> list[tuple[str, float]]:
    """``(name, number)`` for ``value`` if it is a scalar, for every scalar inside it if it is
    a mapping (names extended by the keys), else nothing."""
    if isinstance(value, Mapping):
        return [row for key, inner in value.items() for row in _scalar_rows(f"{name}/{key}", inner)]
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":
        size = value.numel() if isinstance(value, Tensor) else getattr(value, "size", 0)
        if size != 1 or getattr(value, "dtype", None) in (bool, torch.bool):
            return []
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return []
    return [(name, float(value))]


# ------------------------------------------------------------------------------ history, plot
def importance_history(
    all_metrics: Mapping[str, tuple[Sequence[int], Sequence[Any]]],
) -> dict[str, list[float]]:
    """``{parameter name: [mean importance after each experience]}`` from
    ``evaluator.get_all_metrics()`` (values of :class:`LayerMeanImportance`)."""
    history: dict[str, list[float]] = {}
    for name, (_, values) in all_metrics.items():
        if not name.startswith(LAYER_METRIC + "/"):
            continue
        # SPG/layer_mean_importance/<phase>/<stream>/<parameter name (may contain dots)>
        parameter = name[len(LAYER_METRIC) + 1 :].split("/", 2)[-1]
        history[parameter] = [float(v) for v in values]
    return history


def plot_importance_per_layer(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plot the mean importance of each layer after each task and save it to ``path``.

    :param history: ``{layer name: [mean importance after task 1, after task 2, ...]}``, e.g.
        :func:`importance_history` of ``evaluator.get_all_metrics()``. A shorter list (a tensor
        that appeared later) is aligned to the last task.
    :param path: the image file (format from its suffix, e.g. ``.png``, ``.pdf``).
    :param title: the figure title.
    :return: ``path`` as a :class:`~pathlib.Path`.
    """
    if not history or not any(len(v) for v in history.values()):
        raise ValueError("history is empty: nothing to plot")
    for name, values in history.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"history[{name!r}] must be a list of numbers, got {values!r}")
        bad = [
            v
            for v in values
            if isinstance(v, bool)
            or not isinstance(v, numbers.Real)
            or not (math.isfinite(v) and 0.0 <= v <= 1.0)
        ]
        if bad:
            raise ValueError(
                f"history[{name!r}] holds {bad[0]!r}: mean importances are numbers in [0, 1]"
            )
    # Figure without pyplot: no global backend state, works headless.
    from matplotlib.figure import Figure

    n_tasks = max(len(v) for v in history.values())
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, values in history.items():
        if not len(values):
            continue
        xs = range(n_tasks - len(values) + 1, n_tasks + 1)
        ax.plot(list(xs), [float(v) for v in values], marker="o", markersize=3, label=name)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("mean importance")
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(list(range(1, n_tasks + 1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
