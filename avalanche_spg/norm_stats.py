"""Per-task normalisation statistics: an option for BatchNorm backbones, off by default.

SPG (like every gradient-based method) protects parameters, but a BatchNorm layer also keeps
*running statistics* (mean and variance of its inputs) that are not parameters: training a new
task keeps updating them, so an old task is evaluated with statistics of later tasks' data even
when its parameters did not move. :class:`TaskNormStatsPlugin` removes this source of
forgetting in the task-incremental setting, where the task label is known at test time:

* at the end of every training experience it stores a copy of every normalisation layer's
  running statistics under the experience's task label;
* when an evaluation experience of a single, known task starts, those stored statistics are
  loaded; when it ends, the statistics as training left them are put back.

Training itself is unchanged (the layers keep normalising with minibatch statistics and
keep updating one shared running estimate). Evaluation experiences whose task was never
trained, or that mix several tasks, use the shared statistics. This is not part of SPG's paper;
use it on top of any strategy (``plugins=[SPGPlugin(), TaskNormStatsPlugin()]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

__all__ = ["TaskNormStatsPlugin", "normalisation_statistics"]


def normalisation_statistics(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(qualified name, tensor)`` of every running statistic of ``model``'s normalisation
    layers: the buffers of ``torch.nn`` batch/instance norm layers, and tensors held as plain
    attributes named ``running_*`` (Avalanche's ``BatchRenorm2D`` keeps its statistics so)."""
    from torch.nn.modules.batchnorm import _NormBase

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _NormBase):
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    yield prefix + name, buffer
            continue
        for name, value in vars(module).items():
            if name.startswith("running_") and isinstance(value, Tensor):
                yield prefix + name, value


class TaskNormStatsPlugin(SupervisedPlugin):
    """Keep normalisation layers' running statistics per task and evaluate each task with its
    own (task-incremental; see the module docstring). State: :meth:`state_dict`."""

    def __init__(self) -> None:
        super().__init__()
        self._per_task: dict[int, dict[str, Tensor]] = {}
        self._shared: dict[str, Tensor] | None = None

    @property
    def tasks(self) -> list[int]:
        """Task labels whose statistics are stored."""
        return sorted(self._per_task)

    def state_dict(self) -> dict[str, Any]:
        """The stored statistics (CPU copies), by task label."""
        return {
            "per_task": {
                t: {n: v.detach().cpu().clone() for n, v in stats.items()}
                for t, stats in self._per_task.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        per_task = state.get("per_task")
        if not isinstance(per_task, dict):
            raise ValueError(f"expected a dict with a 'per_task' mapping, got {type(state)!r}")
        self._per_task = {
            int(t): {str(n): torch.as_tensor(v).clone() for n, v in stats.items()}
            for t, stats in per_task.items()
        }

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Store the statistics training left, under the experience's task label(s)."""
        stats = {n: v.detach().clone() for n, v in normalisation_statistics(strategy.model)}
        for task in getattr(strategy.experience, "task_labels", [0]):
            self._per_task[int(task)] = stats

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Load the evaluated task's own statistics (when it has a single, trained task)."""
        labels = [int(t) for t in getattr(strategy.experience, "task_labels", [])]
        if len(labels) != 1 or labels[0] not in self._per_task:
            return
        stored = self._per_task[labels[0]]
        live = dict(normalisation_statistics(strategy.model))
        if set(stored) != set(live):
            return  # the model's normalisation layers changed: shared statistics
        self._shared = {n: v.detach().clone() for n, v in live.items()}
        _copy_into(live, stored)

    def after_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Put back the statistics training left."""
        if self._shared is None:
            return
        _copy_into(dict(normalisation_statistics(strategy.model)), self._shared)
        self._shared = None


def _copy_into(targets: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, target in targets.items():
            value = values[name]
            if value.shape != target.shape:
                raise ValueError(
                    f"normalisation statistic {name!r} has shape {tuple(target.shape)}, the "
                    f"stored one {tuple(value.shape)}"
                )
            target.copy_(value.to(target.device, target.dtype))
