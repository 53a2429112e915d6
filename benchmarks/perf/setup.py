"""What the performance measurements run on: problem sizes, streams, models, strategies, the
clock and the C allocator.

Everything that touches Avalanche imports it lazily (importing Avalanche is slow).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PerfSizes",
    "SIZES",
    "MODELS",
    "PARTS",
    "now",
    "use_clock",
    "sync",
    "median",
    "bootstrap_median_interval",
    "synthetic_stream",
    "digits_stream",
    "make_model",
    "input_shape",
    "probe_class",
    "minor_faults",
    "naive",
    "preload_importance",
    "adapt_heads",
    "steady_c_allocator",
    "log_progress",
]


@dataclass(frozen=True)
class PerfSizes:
    """Problem sizes of one profile (``full`` or ``tiny``)."""

    batch: int
    mlp_input: int
    mlp_hidden: tuple[int, ...]
    cnn_shape: tuple[int, int, int]
    cnn_hidden: int
    iters_per_round: int
    warmup: int
    rounds: int
    n_tasks: int
    pass_ks: tuple[int, ...]
    pass_samples: dict[str, int]
    pass_repeats: int
    memory_after: tuple[int, ...]
    memory_samples: int
    subset_fractions: tuple[float, ...]
    subset_tasks: int


SIZES = {
    "full": PerfSizes(
        batch=64,
        mlp_input=784,
        mlp_hidden=(256, 256),
        cnn_shape=(3, 32, 32),
        cnn_hidden=2048,
        iters_per_round=6,
        warmup=2,
        rounds=16,
        n_tasks=10,
        pass_ks=(0, 4, 9),
        pass_samples={"mlp": 1024, "alexnet": 256},
        pass_repeats=5,
        memory_after=(1, 5, 10),
        memory_samples=64,
        subset_fractions=(0.5, 0.25, 0.1),
        subset_tasks=5,
    ),
    "tiny": PerfSizes(
        batch=8,
        mlp_input=64,
        mlp_hidden=(16,),
        cnn_shape=(3, 12, 12),
        cnn_hidden=32,
        iters_per_round=3,
        warmup=1,
        rounds=2,
        n_tasks=3,
        pass_ks=(0, 2),
        pass_samples={"mlp": 20, "alexnet": 20},
        pass_repeats=1,
        memory_after=(1, 3),
        memory_samples=16,
        subset_fractions=(0.5,),
        subset_tasks=2,
    ),
}

MODELS = ("mlp", "alexnet")
PARTS = ("iteration", "importance", "memory", "subset")


def log_progress(message: str) -> None:
    """Print a progress line with the time of day."""
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- clock and stats
#: The clock of every timing: wall time, or this process's CPU time (``--clock``). With one
#: torch thread on a CPU shared with other jobs, CPU time measures the work done whatever the
#: others take; wall time would count their share too.
_CLOCK: dict[str, Callable[[], float]] = {"now": time.perf_counter}


def now() -> float:
    """The current reading of the benchmark clock, in seconds."""
    return _CLOCK["now"]()


def use_clock(clock: str) -> None:
    """Time with this process's CPU time (``"cpu"``) or wall time (``"wall"``) from now on."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    _CLOCK["now"] = time.process_time if clock == "cpu" else time.perf_counter


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


def bootstrap_median_interval(
    values: Sequence[float], resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median (fixed seed)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(data), (resamples, len(data)), generator=generator)
    medians = data[picks].median(dim=1).values
    tail = (1.0 - level) / 2
    return float(medians.quantile(tail)), float(medians.quantile(1.0 - tail))


# ------------------------------------------------------------------------------------ streams
class TensorDataset(torch.utils.data.Dataset):
    """In-memory ``(x, y)`` with the ``targets`` list ``nc_benchmark`` needs."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self.targets = x, y, y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], int(self.y[index])


def synthetic_stream(
    shape: Sequence[int], n_tasks: int, per_task: int, classes_per_task: int = 2, seed: int = 0
) -> Any:
    """A task-incremental stream of Gaussian inputs: ``n_tasks`` experiences of ``per_task``
    training samples, ``classes_per_task`` classes each, labels from 0 in every task."""
    from avalanche.benchmarks import nc_benchmark

    generator = torch.Generator().manual_seed(seed)
    n_classes = n_tasks * classes_per_task
    y = torch.arange(per_task * n_tasks) % n_classes
    x = torch.randn(len(y), *shape, generator=generator)
    y_test = torch.arange(n_classes)
    x_test = torch.randn(n_classes, *shape, generator=generator)
    return nc_benchmark(
        TensorDataset(x, y),
        TensorDataset(x_test, y_test),
        n_experiences=n_tasks,
        task_labels=True,
        class_ids_from_zero_in_each_exp=True,
        seed=seed,
    )


def digits_stream(shape: Sequence[int], n_tasks: int, per_task: int) -> Any:
    """A task-incremental stream of real images: scikit-learn's 8x8 digits, upsampled
    (bilinear) to ``shape`` (``(C, H, W)``, or ``(D,)`` for a flattened square image), task
    ``t`` = the digits of classes ``2t mod 10`` and ``2t + 1 mod 10`` (labels 0/1), its first
    ``per_task`` samples (cycled if there are fewer). Real image statistics matter for the
    fast-vs-reference difference: gradient sums of zero-mean noise cancel far more."""
    from avalanche.benchmarks import tensors_benchmark
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        channels, size = 1, (side, side)
    else:
        channels, size = shape[0], (shape[1], shape[2])
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = images.repeat(1, channels, 1, 1).reshape(len(images), *shape)
    train, test = [], []
    for task in range(n_tasks):
        pair = ((2 * task) % 10, (2 * task + 1) % 10)
        rows = torch.nonzero((labels == pair[0]) | (labels == pair[1])).squeeze(1)
        chosen = rows[torch.arange(per_task) % len(rows)]
        y = (labels[chosen] == pair[1]).long()
        train.append((images[chosen], y))
        test.append((images[rows[:4]], (labels[rows[:4]] == pair[1]).long()))
    return tensors_benchmark(train, test, task_labels=list(range(n_tasks)))


# ------------------------------------------------------------------------ models, strategies
def make_model(name: str, sizes: PerfSizes, *, dropout: bool) -> nn.Module:
    """``MultiHeadMLP`` (``"mlp"``) or ``AlexNetLike`` (``"alexnet"``) at the profile's size;
    with ``dropout`` the paper-like rates (AlexNet 0.2/0.5), else none."""
    from avalanche_spg.models import AlexNetLike, MultiHeadMLP

    torch.manual_seed(0)
    if name == "mlp":
        return MultiHeadMLP(sizes.mlp_input, sizes.mlp_hidden, dropout=0.2 if dropout else 0.0)
    if name == "alexnet":
        drop1, drop2 = (0.2, 0.5) if dropout else (0.0, 0.0)
        return AlexNetLike(sizes.cnn_shape, drop1=drop1, drop2=drop2, hidden=sizes.cnn_hidden)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def input_shape(name: str, sizes: PerfSizes) -> tuple[int, ...]:
    """The input shape of model ``name`` at the profile's size."""
    return (sizes.mlp_input,) if name == "mlp" else sizes.cnn_shape


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def probe_class() -> type:
    """A plugin recording timestamps at callbacks (built lazily: importing Avalanche is slow)."""
    from avalanche.core import SupervisedPlugin

    class TimeProbe(SupervisedPlugin):
        """Appends the benchmark clock (after a device sync) at the chosen callbacks."""

        def __init__(self, device: torch.device, *events: str) -> None:
            super().__init__()
            self.device = device
            self.events = set(events)
            self.stamps: dict[str, list[float]] = {e: [] for e in events}
            self.faults: list[int] = []  # minor page faults per training iteration
            self._faults_at = 0

        def _stamp(self, event: str) -> None:
            if event in self.events:
                sync(self.device)
                self.stamps[event].append(now())

        def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._faults_at = minor_faults()
            self._stamp("before_training_iteration")

        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_iteration")
            self.faults.append(minor_faults() - self._faults_at)

        def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("before_update")

        def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("before_training_epoch")

        def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_epoch")

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_exp")

    return TimeProbe


def naive(model: nn.Module, plugins: list[Any], batch: int, device: torch.device) -> Any:
    """Avalanche's ``Naive`` with plain SGD (lr 0.01), one epoch, no loggers."""
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=batch,
        train_epochs=1,
        eval_mb_size=256,
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
        device=device,
    )


def preload_importance(plugin: Any, model: nn.Module, tasks: int, seed: int = 0) -> None:
    """Give ``plugin`` the state it would have after ``tasks`` experiences, with random
    importance in [0, 0.99) (only its shape matters for timing), through its public API."""
    if tasks == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    features, _ = plugin.split_parameters(model)
    state = plugin.state_dict()
    state["importance"] = {
        name: torch.rand(p.shape, generator=generator) * 0.99 for name, p in features.items()
    }
    state["seen_tasks"] = list(range(tasks))
    state["class_groups"] = [[0, 1] for _ in range(tasks)]
    state["experiences_seen"] = tasks
    plugin.load_state_dict(state)


def adapt_heads(model: nn.Module, stream: Any, upto: int, device: torch.device) -> None:
    """Create the heads of tasks ``0..upto`` as Avalanche's training would."""
    from avalanche.models.utils import avalanche_model_adaptation

    model.train()
    for experience in stream[: upto + 1]:
        avalanche_model_adaptation(model, experience)
    model.to(device)


# ---------------------------------------------------------------------------------- allocator
def steady_c_allocator() -> bool:
    """Fix glibc's malloc thresholds for this process (Linux/glibc only; ``False`` elsewhere).

    glibc adapts its mmap and trim thresholds to the allocation history, so after a burst of
    large allocations (SPG's importance pass and mask build, a DataLoader start) it may return
    memory to the system and fault it back in (zeroed pages) on every training iteration for
    a while. Timings of short runs then measure the allocator's history, not the work. With
    the thresholds fixed (mmap above 32 MiB, trim above 1 GiB) every variant runs with the
    steady state a long run reaches anyway.
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(
        mallopt(m_trim_threshold, 1 << 30)
    )
