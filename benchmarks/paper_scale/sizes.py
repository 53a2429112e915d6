"""The paper protocol's C-10 / C-20 streams: their methods, sizes, synthetic images of
CIFAR-100's shape, and the fewest epochs its schedule can train a task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.catalog import BENCHMARKS
from benchmarks.methods import METHODS

#: The paper's CIFAR-100 sequences (Konishi et al., 2023, Section 4).
PAPER_BENCHMARKS = ("c10", "c20")

#: Every method of the suite that the paper protocol supports (PackNet prunes at a fixed epoch,
#: which early stopping may never reach, so the suite refuses it under ``--protocol paper``).
PAPER_METHODS = tuple(name for name in METHODS if name != "packnet")

#: CIFAR-100: training and test images per class, and the image shape.
CIFAR100_TRAIN_PER_CLASS = 500
CIFAR100_TEST_PER_CLASS = 100
CIFAR100_CLASSES = 100
CIFAR100_SHAPE = (3, 32, 32)

#: Epochs per task the projection assumes by default. The schedule cannot stop a task before
#: :func:`minimum_epochs` (36 with the paper's settings). When this default was chosen, the
#: suite's paper-protocol run of Naive on perm-fmnist (MLP, 9,000 training images per task,
#: seed 0) had trained its ten tasks 39 to 46 epochs (mean 42), stopping each 30 to 35 epochs
#: after its best validation epoch (epochs 4 to 16); 50 leaves room for the later best epochs
#: that a dropout-regularised CNN on CIFAR-100 may reach. The real number depends on the data
#: and the method: rerun with ``--assume-epochs``, or read ``epochs_per_task`` in a finished
#: run's ``result.json``.
DEFAULT_ASSUMED_EPOCHS = 50

#: Files of the python version of CIFAR-100 under ``--data-root`` (the layout the suite's
#: loader reads: the official ``cifar-100-python.tar.gz`` unpacked there).
CIFAR100_FILES = ("cifar-100-python/train", "cifar-100-python/test")


@dataclass(frozen=True)
class StreamSizes:
    """Images per task of a split CIFAR-100 stream under the paper protocol."""

    n_tasks: int
    classes_per_task: int
    train: int
    valid: int
    test: int


def stream_sizes(benchmark: str, per_class_train: int, per_class_test: int) -> StreamSizes:
    """The per-task sizes the suite's ``build_stream`` makes from ``per_class_train`` training
    and ``per_class_test`` test images per class, with 10 % held out for validation."""
    info = BENCHMARKS[benchmark]
    classes = CIFAR100_CLASSES // info.n_tasks
    n = per_class_train * classes
    valid = max(1, round(0.1 * n))  # as build_stream holds it out
    return StreamSizes(info.n_tasks, classes, n - valid, valid, per_class_test * classes)


#: The real sizes: C-10 4,500 / 500 / 1,000 images per task, C-20 2,250 / 250 / 500.
FULL_SIZES = {
    name: stream_sizes(name, CIFAR100_TRAIN_PER_CLASS, CIFAR100_TEST_PER_CLASS)
    for name in PAPER_BENCHMARKS
}


def per_class(full: int, fraction: float) -> int:
    return max(1, round(full * fraction))


def synthetic_cifar100(
    per_class_train: int, per_class_test: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian images with CIFAR-100's shape, ``per_class_*`` of every one of its 100 classes."""
    generator = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    for per_class in (per_class_train, per_class_test):
        n = per_class * CIFAR100_CLASSES
        out.append(torch.randn((n, *CIFAR100_SHAPE), generator=generator))
        out.append(torch.arange(n, dtype=torch.int64) % CIFAR100_CLASSES)
    return out[0], out[1], out[2], out[3]


def minimum_epochs(lr: float = 0.25) -> int:
    """The fewest epochs the paper protocol can train a task: its schedule plugin
    (:class:`benchmarks.plugins.PlateauEarlyStopping`, default settings) fed a validation loss
    that never improves after the first epoch, counted until it stops the task."""
    from types import SimpleNamespace

    from benchmarks.plugins import PlateauEarlyStopping

    class _NoImprovement(PlateauEarlyStopping):
        def validation_loss(self, strategy: Any) -> float:
            return 1.0

    parameter = torch.nn.Parameter(torch.zeros(1))
    stopped: list[bool] = []
    strategy = SimpleNamespace(
        model=torch.nn.Linear(1, 1),
        optimizer=torch.optim.SGD([parameter], lr=lr),
        stop_training=lambda: stopped.append(True),
    )
    schedule = _NoImprovement({0: (torch.zeros(1), torch.zeros(1))}, lr=lr)
    schedule.before_training_exp(strategy)
    for epoch in range(1, 10_000):
        schedule.before_training_epoch(strategy)
        schedule.after_training_epoch(strategy)
        if stopped:
            return epoch
    raise RuntimeError("the schedule never stopped")
