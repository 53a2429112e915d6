"""The class-incremental scenario (``--scenario class``): no task label at test time.

The same splits as the task-incremental streams, with three differences:

* labels are the dataset's global classes ``0..C-1`` (not relabelled from 0 in every task);
* every experience carries task label 0, so no method can use a task label;
* the backbone is the same feature extractor as in the task-incremental scenario, followed by a
  single :class:`avalanche.models.IncrementalClassifier` (default masking of the logits of
  classes not seen yet), which Avalanche grows to the classes of each new experience.

SPG runs as ``SPGPlugin(class_incremental=True)`` (see :mod:`avalanche_spg.class_incremental`).
The accuracy matrix ``R[i][j]`` is the accuracy on experience ``j``'s test samples (its classes),
predicted among all classes, after learning experience ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from benchmarks.data import TaskStream
from benchmarks.plugins import TensorBatches, TensorDataPlugin

__all__ = [
    "SCENARIOS",
    "CLASS_METHODS",
    "SingleHeadNet",
    "ClassTensorDataPlugin",
    "check_class_methods",
    "make_class_backbone",
    "make_class_benchmark",
    "to_class_incremental",
]

SCENARIOS = ("task", "class")

#: Methods that make sense without task labels and with one shared head (PackNet needs a task
#: label to select its masks; SI and MAS are left out only because they were not calibrated).
CLASS_METHODS = ("naive", "ewc", "lwf", "replay", "spg", "spg+replay", "spg+lwf", "joint")


def check_class_methods(methods: Sequence[str]) -> None:
    """Raise ``ValueError`` for methods the class-incremental scenario does not run."""
    bad = [m for m in methods if m not in CLASS_METHODS]
    if bad:
        raise ValueError(
            f"--scenario class does not run {', '.join(bad)} (packnet selects its masks by task "
            f"label; si/mas are not calibrated for it); valid: {', '.join(CLASS_METHODS)}"
        )


class SingleHeadNet(nn.Module):
    """``classifier(features(x))`` with one growing :class:`IncrementalClassifier`."""

    def __init__(self, features: nn.Module, in_features: int, initial_out_features: int) -> None:
        super().__init__()
        from avalanche.models import IncrementalClassifier

        self.features = features
        self.classifier = IncrementalClassifier(
            in_features, initial_out_features=initial_out_features
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits over every class seen so far (unseen ones masked)."""
        return self.classifier(self.features(x))


def make_class_backbone(
    protocol: str,
    benchmark: str,
    input_shape: Sequence[int],
    initial_classes: int,
    backbone: str = "auto",
) -> SingleHeadNet:
    """The task-incremental backbone's feature extractor with one incremental head
    (``backbone``: ``auto``, ``mlp`` or ``alexnet``)."""
    from benchmarks.protocols import make_backbone, resolve_backbone

    if resolve_backbone(backbone, protocol, input_shape) == "resnet":
        raise ValueError("the class scenario supports the mlp and alexnet backbones, not resnet")
    multi = make_backbone(protocol, benchmark, input_shape, initial_classes, backbone)
    features = cast(nn.Module, multi.features)
    fc = getattr(multi, "fc", None)
    if fc is not None:  # AlexNetLike: convolutions, then the fully connected layers
        features = nn.Sequential(features, cast(nn.Module, fc))
    with torch.no_grad():
        width = int(features(torch.zeros(1, *input_shape)).shape[1])
    return SingleHeadNet(features, width, initial_classes)


def to_class_incremental(stream: TaskStream) -> TaskStream:
    """The same tasks with global labels (``task.classes[local label]``)."""
    tasks = []
    for task in stream.tasks:
        table = torch.as_tensor(task.classes, dtype=torch.int64)
        tasks.append(
            replace(
                task,
                y_train=table[task.y_train],
                y_test=table[task.y_test],
                y_valid=None if task.y_valid is None else table[task.y_valid],
            )
        )
    description = {**stream.description, "scenario": "class", "labels": "global"}
    return TaskStream(stream.name, tasks, stream.input_shape, description)


def make_class_benchmark(stream: TaskStream) -> Any:
    """The Avalanche benchmark of ``stream`` with task label 0 for every experience."""
    from avalanche.benchmarks import tensors_benchmark

    return tensors_benchmark(
        train_tensors=[(t.x_train, t.y_train) for t in stream.tasks],
        test_tensors=[(t.x_test, t.y_test) for t in stream.tasks],
        task_labels=[0] * stream.n_tasks,
    )


class ClassTensorDataPlugin(TensorDataPlugin):
    """:class:`TensorDataPlugin` for streams whose experiences share task label 0.

    The tensors are keyed by *experience index*; the task label of every sample is 0. Joint
    training gets all experiences' training tensors; anything else that does not match the
    experience's size (replay) keeps Avalanche's loader.
    """

    def _exp_batches(
        self,
        parts: dict[int, tuple[Tensor, Tensor]],
        keys: list[int],
        size: int,
        shuffle: bool,
        shard: bool = False,
    ) -> TensorBatches:
        import torch.distributed as dist

        x = torch.cat([parts[k][0] for k in keys]) if len(keys) > 1 else parts[keys[0]][0]
        y = torch.cat([parts[k][1] for k in keys]) if len(keys) > 1 else parts[keys[0]][1]
        rank, world = 0, 1
        if shard and dist.is_available() and dist.is_initialized():
            # Data-parallel training: each rank takes its share of every global minibatch.
            rank, world = dist.get_rank(), dist.get_world_size()
        zeros = torch.zeros(len(y), dtype=torch.long)
        return TensorBatches(x, y, zeros, size, shuffle, rank, world)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Training batches of the experience (all experiences for joint training)."""
        if not self._train or not self._is_default_loader(strategy.dataloader):
            return
        n = len(strategy.adapted_dataset)
        index = getattr(strategy.experience, "current_experience", None)
        if index in self._train and len(self._train[index][1]) == n:
            keys = [index]
        elif sum(len(y) for _, y in self._train.values()) == n:
            keys = sorted(self._train)
        else:
            return
        strategy.dataloader = self._exp_batches(
            self._train, keys, strategy.train_mb_size, True, shard=True
        )

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Evaluation batches of the test experience, in dataset order."""
        if not self._test or not self._is_default_loader(strategy.dataloader):
            return
        index = getattr(strategy.experience, "current_experience", None)
        if index not in self._test or len(self._test[index][1]) != len(strategy.adapted_dataset):
            return
        strategy.dataloader = self._exp_batches(self._test, [index], strategy.eval_mb_size, False)
