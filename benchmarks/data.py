"""Task-incremental streams: reading the datasets and cutting them into tasks.

Every benchmark is built the same way, so that all of them behave alike and can be tested on
tiny local files:

1. a *source* reads a whole dataset into memory as tensors (``x`` float32 normalised, ``y``
   int64): scikit-learn's bundled digits, or MNIST / Fashion-MNIST / CIFAR-10 / CIFAR-100 /
   TinyImageNet from ``--data-root`` through torchvision / Avalanche (downloaded there when
   absent and downloading is possible);
2. a *split* (disjoint groups of classes per task, class order shuffled by the seed) or a
   *permutation* (the same classes in every task, pixels shuffled by a seeded permutation per
   task) cuts it into tasks; labels start from 0 in every task;
3. optional subsampling of each task's training data (``--max-train-per-task``,
   ``--train-fraction``) and a held-out validation part (the ``paper`` protocol);
4. :func:`make_benchmark` hands the per-task tensors to Avalanche's classic
   ``tensors_benchmark`` with task label ``t`` for task ``t``.

Keeping the data as in-memory tensors (no per-sample PIL transform) keeps the CPU runs fast;
nothing is augmented, as in the SPG paper.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.catalog import BENCHMARKS, BenchmarkInfo, default_data_root

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "load_source",
    "prepare_fashion_mnist",
    "TaskStream",
    "TaskTensors",
    "build_stream",
    "make_benchmark",
    "SYSTEM_FASHION_MNIST",
    "default_data_root",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the original IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Per-channel normalisation constants (the usual published training-set statistics).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


@dataclass
class TaskTensors:
    """One task's data: inputs, labels from 0, and the original class of each label."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[int]
    x_valid: Tensor | None = None
    y_valid: Tensor | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes of this task (its head's width)."""
        return len(self.classes)


@dataclass
class TaskStream:
    """A whole task-incremental stream as tensors, plus how it was made."""

    name: str
    tasks: list[TaskTensors]
    input_shape: tuple[int, ...]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    @property
    def max_classes(self) -> int:
        """Widest head needed."""
        return max(t.n_classes for t in self.tasks)


# ---------------------------------------------------------------------------- sources
def _normalise(x: Tensor, source: str) -> Tensor:
    """uint8 images ``(N, C, H, W)`` -> float32, scaled to [0, 1] then standardised."""
    mean, std = _STATS[source]
    x = x.float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    # One fixed, stratified train/test split for every seed (the seed shuffles the tasks).
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def prepare_fashion_mnist(root: Path, system_copy: Path | None = None) -> bool:
    """Put a system copy of Fashion-MNIST where torchvision looks, if it is not there yet.

    torchvision's ``FashionMNIST(root)`` accepts the four *unzipped* IDX files in
    ``<root>/FashionMNIST/raw/`` as already present. The Debian package
    ``dataset-fashion-mnist`` ships the same files gzipped (recompressed, so torchvision's md5
    check would reject them as a download cache); unzipping them is enough.

    :param system_copy: folder with the ``.gz`` files (default :data:`SYSTEM_FASHION_MNIST`).
    :return: ``True`` if the four files are (now) in place.
    """
    system_copy = SYSTEM_FASHION_MNIST if system_copy is None else system_copy
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _IDX_FILES):
        return True
    if not all((system_copy / f"{name}.gz").is_file() for name in _IDX_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name in _IDX_FILES:
        target = raw / name
        if target.is_file():
            continue
        tmp = raw / f".{name}.partial"
        with gzip.open(system_copy / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return True


def _load_mnist_like(source: str, root: Path, download: bool) -> tuple[Tensor, ...]:
    from torchvision import datasets

    if source == "fmnist":
        prepare_fashion_mnist(root)
        cls: Any = datasets.FashionMNIST
    else:
        cls = datasets.MNIST
    out = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        out += [_normalise(ds.data.unsqueeze(1), source), ds.targets.long().clone()]
    return tuple(out)


_CIFAR_LAYOUT = {
    # source: (folder, train files, test files, label key, torchvision class name)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
}


def _read_cifar_files(files: Sequence[Path], label_key: str) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for path in files:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_cifar(source: str, root: Path, download: bool) -> tuple[Tensor, ...]:
    folder, train_files, test_files, label_key, tv_name = _CIFAR_LAYOUT[source]
    base = root / folder
    wanted = [base / f for f in train_files + test_files]
    if not all(p.is_file() for p in wanted):
        if not download:
            raise FileNotFoundError(f"{source}: no {base} (and downloading is off)")
        from torchvision import datasets

        getattr(datasets, tv_name)(str(root), train=True, download=True)
    # The files are read directly (the python-pickle layout of the official archives), so a
    # partial or re-packed copy is accepted without torchvision's md5 check.
    x_train, y_train = _read_cifar_files([base / f for f in train_files], label_key)
    x_test, y_test = _read_cifar_files([base / f for f in test_files], label_key)
    return _normalise(x_train, source), y_train, _normalise(x_test, source), y_test


def _tinyimagenet_root(root: Path) -> Path:
    """The folder that holds (or will hold) ``tiny-imagenet-200``."""
    if (root / "tiny-imagenet-200").is_dir():
        return root
    return root / "tinyimagenet"


def _load_tinyimagenet(root: Path, download: bool, size: int = 32) -> tuple[Tensor, ...]:
    """TinyImageNet through Avalanche's dataset class, resized to ``size`` x ``size``."""
    from avalanche.benchmarks.datasets import TinyImagenet
    from PIL import Image

    base = _tinyimagenet_root(root)
    out: list[Tensor] = []
    for train in (True, False):
        ds = TinyImagenet(root=base, train=train, download=download)
        images = np.empty((len(ds.data), size, size, 3), dtype=np.uint8)
        for i, path in enumerate(ds.data):
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            images[i] = np.asarray(rgb)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        out += [_normalise(x, "tinyimagenet"), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return tuple(out)


@lru_cache(maxsize=4)
def load_source(source: str, root: str, download: bool = True) -> tuple[Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` of a whole dataset (cached per process)."""
    path = Path(root).expanduser()
    if source == "digits":
        return _load_digits()
    if source in ("mnist", "fmnist"):
        return _load_mnist_like(source, path, download)
    if source in _CIFAR_LAYOUT:
        return _load_cifar(source, path, download)
    if source == "tinyimagenet":
        return _load_tinyimagenet(path, download)
    raise ValueError(f"unknown data source {source!r}")


# ---------------------------------------------------------------------------- streams
def _subsample(n: int, keep: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)[:keep].sort().values


def _split_tasks(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_tasks: int, seed: int
) -> tuple[list[TaskTensors], list[int]]:
    classes = sorted(set(y_train.tolist()))
    if len(classes) % n_tasks:
        raise ValueError(f"{len(classes)} classes cannot be split evenly into {n_tasks} tasks")
    generator = torch.Generator().manual_seed(seed)
    order = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    per_task = len(classes) // n_tasks
    tasks = []
    for t in range(n_tasks):
        chunk = order[t * per_task : (t + 1) * per_task]
        remap = torch.full((max(classes) + 1,), -1, dtype=torch.int64)
        remap[torch.tensor(chunk)] = torch.arange(per_task)
        in_train = remap[y_train] >= 0
        in_test = remap[y_test] >= 0
        tasks.append(
            TaskTensors(
                x_train=x_train[in_train],
                y_train=remap[y_train[in_train]],
                x_test=x_test[in_test],
                y_test=remap[y_test[in_test]],
                classes=chunk,
            )
        )
    return tasks, order


def _permuted_tasks(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    n_tasks: int,
    seed: int,
    max_train_per_task: int | None,
) -> list[TaskTensors]:
    generator = torch.Generator().manual_seed(seed)
    n_pixels = x_train[0].numel()
    classes = sorted(set(y_train.tolist()))
    tasks = []
    for _ in range(n_tasks):
        perm = torch.randperm(n_pixels, generator=generator)
        if max_train_per_task is not None and max_train_per_task < len(y_train):
            # Each task draws its own subset, so the tasks see different images.
            keep = _subsample(len(y_train), max_train_per_task, generator)
            xt, yt = x_train[keep], y_train[keep]
        else:
            xt, yt = x_train, y_train
        tasks.append(
            TaskTensors(
                x_train=xt.flatten(1)[:, perm].view_as(xt),
                y_train=yt.clone(),
                x_test=x_test.flatten(1)[:, perm].view_as(x_test),
                y_test=y_test.clone(),
                classes=classes,
            )
        )
    return tasks


def build_stream(
    name: str,
    seed: int,
    data_root: str | os.PathLike[str] | None = None,
    *,
    max_train_per_task: int | None = None,
    train_fraction: float | None = None,
    validation_fraction: float = 0.0,
    max_test_per_task: int | None = None,
    download: bool = True,
    loader: Callable[[str, str, bool], tuple[Tensor, ...]] | None = None,
) -> TaskStream:
    """Build benchmark ``name`` for ``seed`` as per-task tensors.

    :param name: a key of :data:`BENCHMARKS`.
    :param seed: shuffles the class order (split benchmarks), draws the permutations (permuted
        ones) and the subsamples.
    :param data_root: folder with the datasets (``None``: :func:`default_data_root`).
    :param max_train_per_task: keep at most this many training samples per task (a random
        subset; split benchmarks keep the same number from every class). The test sets are
        never subsampled.
    :param train_fraction: keep this fraction of each task's training samples (after
        ``max_train_per_task``).
    :param validation_fraction: hold out this fraction of each task's (kept) training samples
        as its validation set (the ``paper`` protocol uses 0.1).
    :param max_test_per_task: evaluate on at most this many test samples per task (a random
        subset drawn with its own generator, so the training data do not change). Off by
        default: a cut test set is for CPU measurements of slow backbones, and says so in the
        tables.
    :param download: allow torchvision / Avalanche to download a missing dataset.
    :param loader: replaces :func:`load_source` (tests).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    if max_train_per_task is not None and max_train_per_task < 1:
        raise ValueError(f"max_train_per_task must be >= 1, got {max_train_per_task}")
    if train_fraction is not None and not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if max_test_per_task is not None and max_test_per_task < 1:
        raise ValueError(f"max_test_per_task must be >= 1, got {max_test_per_task}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    info = BENCHMARKS[name]
    root = str(Path(data_root).expanduser()) if data_root is not None else str(default_data_root())
    x_train, y_train, x_test, y_test = (loader or load_source)(info.source, root, download)

    generator = torch.Generator().manual_seed(10_000 + seed)
    class_order: list[int] | None = None
    if info.kind == "split":
        tasks, class_order = _split_tasks(x_train, y_train, x_test, y_test, info.n_tasks, seed)
        if max_train_per_task is not None:
            for task in tasks:
                per_class = max(1, max_train_per_task // task.n_classes)
                keep = []
                for c in range(task.n_classes):
                    idx = torch.nonzero(task.y_train == c).flatten()
                    keep.append(idx[_subsample(len(idx), min(per_class, len(idx)), generator)])
                chosen = torch.cat(keep).sort().values
                task.x_train, task.y_train = task.x_train[chosen], task.y_train[chosen]
    else:
        tasks = _permuted_tasks(
            x_train, y_train, x_test, y_test, info.n_tasks, seed, max_train_per_task
        )
    for task in tasks:
        if train_fraction is not None and train_fraction < 1.0:
            keep_n = max(1, round(train_fraction * len(task.y_train)))
            chosen = _subsample(len(task.y_train), keep_n, generator)
            task.x_train, task.y_train = task.x_train[chosen], task.y_train[chosen]
        if validation_fraction > 0:
            n = len(task.y_train)
            n_valid = max(1, round(validation_fraction * n))
            perm = torch.randperm(n, generator=generator)
            valid, train = perm[:n_valid].sort().values, perm[n_valid:].sort().values
            task.x_valid, task.y_valid = task.x_train[valid], task.y_train[valid]
            task.x_train, task.y_train = task.x_train[train], task.y_train[train]

    if max_test_per_task is not None:
        test_generator = torch.Generator().manual_seed(20_000 + seed)
        for task in tasks:
            if max_test_per_task < len(task.y_test):
                chosen = _subsample(len(task.y_test), max_test_per_task, test_generator)
                task.x_test, task.y_test = task.x_test[chosen], task.y_test[chosen]

    description: dict[str, Any] = {
        "benchmark": name,
        "source": info.source,
        "kind": info.kind,
        "seed": seed,
        "n_tasks": len(tasks),
        "train_per_task": [len(t.y_train) for t in tasks],
        "test_per_task": [len(t.y_test) for t in tasks],
        "classes_per_task": [t.classes for t in tasks],
    }
    if class_order is not None:
        description["class_order"] = class_order
    if validation_fraction > 0:
        description["valid_per_task"] = [len(t.y_valid) for t in tasks if t.y_valid is not None]
    return TaskStream(
        name=name,
        tasks=tasks,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        description=description,
    )


def make_benchmark(stream: TaskStream) -> Any:
    """The Avalanche benchmark of ``stream``: experience ``t`` carries task label ``t``."""
    from avalanche.benchmarks import tensors_benchmark

    return tensors_benchmark(
        train_tensors=[(t.x_train, t.y_train) for t in stream.tasks],
        test_tensors=[(t.x_test, t.y_test) for t in stream.tasks],
        task_labels=list(range(stream.n_tasks)),
    )
