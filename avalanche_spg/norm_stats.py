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
trained, or that mix several tasks, use the shared statistics; so do layers added to the model
after the task was trained (a new column, say), which the task's stored statistics do not
cover. Statistics are named as in the model inside a data-parallel wrapper, so they are stored
and loaded the same with and without ``DistributedDataParallel`` (a checkpoint written under
``torchrun`` resumes in one process). A stored statistic that the model no longer has, or
whose shape changed, is refused with a ``ValueError`` naming it, before any statistic is
replaced. This is not part of SPG's paper; use it on top of any strategy
(``plugins=[SPGPlugin(), TaskNormStatsPlugin()]``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from avalanche_spg.process_group import unwrap_model

__all__ = ["TaskNormStatsPlugin", "normalisation_statistics"]


def normalisation_statistics(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(qualified name, tensor)`` of every running statistic of ``model``'s normalisation
    layers: the buffers of ``torch.nn`` batch/instance norm layers, and tensors held as plain
    attributes named ``running_*`` (Avalanche's ``BatchRenorm2D`` keeps its statistics so).
    Names are those of the model inside a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    from torch.nn.modules.batchnorm import _NormBase

    for module_name, module in unwrap_model(model).named_modules():
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

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, all or nothing: a malformed entry raises
        ``ValueError`` naming it and leaves the plugin as it was."""
        per_task = state.get("per_task") if isinstance(state, Mapping) else None
        if not isinstance(per_task, Mapping):
            raise ValueError(
                "TaskNormStatsPlugin state must be a mapping with a 'per_task' mapping, got "
                f"{_shown(state)}"
            )
        loaded: dict[int, dict[str, Tensor]] = {}
        for key, stats in per_task.items():
            task = _task_label(key)
            if task is None:
                raise ValueError(
                    f"TaskNormStatsPlugin state: per_task must be keyed by task labels (ints), "
                    f"got {key!r}"
                )
            if not isinstance(stats, Mapping):
                raise ValueError(
                    f"TaskNormStatsPlugin state: the statistics of task {task} must map names "
                    f"to tensors, got {_shown(stats)}"
                )
            loaded[task] = {}
            for name, value in stats.items():
                if not isinstance(name, str):
                    raise ValueError(
                        f"TaskNormStatsPlugin state: the statistics of task {task} must be "
                        f"keyed by their names, got {name!r}"
                    )
                try:
                    loaded[task][name] = torch.as_tensor(value).detach().clone()
                except (TypeError, ValueError, RuntimeError) as error:
                    raise ValueError(
                        f"TaskNormStatsPlugin state: statistic {name!r} of task {task} is not "
                        f"a tensor: {_shown(value)}"
                    ) from error
        self._per_task = loaded

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Store the statistics training left, under the experience's task label(s)."""
        stats = {n: v.detach().clone() for n, v in normalisation_statistics(strategy.model)}
        for task in getattr(strategy.experience, "task_labels", [0]):
            self._per_task[int(task)] = stats

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Train with the statistics training left, even if an evaluation that loaded a task's
        own was interrupted (an exception skips ``after_eval_exp``)."""
        self._put_back(strategy)

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Load the evaluated task's own statistics (when it has a single, trained task)."""
        self._put_back(strategy)  # an earlier evaluation that was interrupted
        labels = [int(t) for t in getattr(strategy.experience, "task_labels", [])]
        if len(labels) != 1 or labels[0] not in self._per_task:
            return
        stored = self._per_task[labels[0]]
        live = dict(normalisation_statistics(strategy.model))
        # Everything is checked before any statistic is replaced.
        _check_fits(labels[0], stored, live)
        self._shared = {n: v.detach().clone() for n, v in live.items()}
        try:
            _copy_into(live, stored)
        except BaseException:
            _copy_into(live, self._shared)
            self._shared = None
            raise

    def after_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Put back the statistics training left."""
        self._put_back(strategy)

    def _put_back(self, strategy: Any) -> None:
        if self._shared is None:
            return
        _copy_into(dict(normalisation_statistics(strategy.model)), self._shared)
        self._shared = None


def _check_fits(task: int, stored: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> None:
    """``ValueError`` unless every statistic stored for ``task`` is one of the model's, with its
    shape (statistics of layers added since are not stored: they keep the shared values)."""
    missing = sorted(set(stored) - set(live))
    misfits = [
        f"{name!r}: model {tuple(live[name].shape)}, stored {tuple(value.shape)}"
        for name, value in stored.items()
        if name in live and value.shape != live[name].shape
    ]
    if missing or misfits:
        problems = []
        if missing:
            problems.append(f"the model has no statistics {missing[:5]}")
        if misfits:
            problems.append("shapes differ for " + "; ".join(misfits[:5]))
        raise ValueError(
            f"TaskNormStatsPlugin: the normalisation statistics stored for task {task} do not "
            f"fit the model ({', and '.join(problems)}); the model's normalisation layers "
            "changed since the task was trained. No statistic was replaced."
        )


def _copy_into(targets: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """Copy every statistic of ``values`` into the model's tensor of that name."""
    with torch.no_grad():
        for name, value in values.items():
            target = targets[name]
            target.copy_(value.to(target.device, target.dtype))


def _task_label(key: Any) -> int | None:
    """A task label from a state key (an int, or its decimal string), else ``None``."""
    if isinstance(key, bool):
        return None
    if isinstance(key, str):
        return int(key) if key.strip().lstrip("-").isdigit() else None
    try:
        return operator.index(key)
    except TypeError:
        return None


def _shown(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
