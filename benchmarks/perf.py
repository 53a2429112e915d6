"""What SPG costs, measured against Naive in one run: ``python -m benchmarks.perf``.

Four measurements, written as Markdown (default ``benchmarks/results/perf.md``) together with the
command that produced them:

(a) **training iteration**: time per iteration of ``Naive`` with and without ``SPGPlugin``, batch
    64, for ``MultiHeadMLP`` and ``AlexNetLike``, on an experience after the first (masks active;
    importance preloaded through the plugin's ``load_state_dict``). Two figures: the end-to-end
    ratio (median over rounds of the ratio of the per-round medians; the two strategies alternate
    round by round, ABBA order), and the time of SPG's own ``before_update`` (the mask step,
    timed in place by probe plugins placed just before and after it) relative to a Naive
    iteration — the direct, low-noise figure of the overhead.
(b) **importance pass** after task ``k`` (k = 0, 4, 9 of a 10-task stream, ``k + 1`` heads):
    ``compute_gamma`` with the ``"reference"`` per-head loop and the ``"fast"`` method, each
    relative to one training epoch on that task (Naive + SPGPlugin, batch 64); the three are
    interleaved and repeated, medians reported; plus the largest difference in importance
    between the two methods on the same weights (no dropout).
(c) **memory held between experiences**: bytes of every tensor reachable from the plugin object
    after 1, 5 and 10 tasks (references to the model's own parameters are counted apart), vs the
    model's parameter bytes.
(d) **importance_max_samples**: importance estimated on a random subset vs the whole experience
    (digits, a trained MLP): pass time and how far the accumulated importance moves.

Inputs are synthetic (Gaussian images / vectors) except in (d): timings do not depend on the
values. Absolute times on a shared machine are noise; the ratios, measured within one run with
the variants interleaved, are the result. ``--tiny`` runs everything at toy sizes in seconds (CI).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PerfSizes", "SIZES", "collect", "render", "main", "build_parser", "held_memory"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "perf.md"


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


# ------------------------------------------------------------------------------ small helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The clock of every timing: wall time, or this process's CPU time (``--clock``). With one
#: torch thread on a CPU shared with other jobs, CPU time measures the work done whatever the
#: others take; wall time would count their share too.
_CLOCK: dict[str, Callable[[], float]] = {"now": time.perf_counter}


def _now() -> float:
    return _CLOCK["now"]()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _bootstrap_median_interval(
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


class _TensorDataset(torch.utils.data.Dataset):
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
        _TensorDataset(x, y),
        _TensorDataset(x_test, y_test),
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
    return (sizes.mlp_input,) if name == "mlp" else sizes.cnn_shape


def _probe_class() -> type:
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
                _sync(self.device)
                self.stamps[event].append(_now())

        def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._faults_at = _minor_faults()
            self._stamp("before_training_iteration")

        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_iteration")
            self.faults.append(_minor_faults() - self._faults_at)

        def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("before_update")

        def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("before_training_epoch")

        def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_epoch")

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._stamp("after_training_exp")

    return TimeProbe


def _naive(model: nn.Module, plugins: list[Any], batch: int, device: torch.device) -> Any:
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


def _preload_importance(plugin: Any, model: nn.Module, tasks: int, seed: int = 0) -> None:
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


def _adapt_heads(model: nn.Module, stream: Any, upto: int, device: torch.device) -> None:
    """Create the heads of tasks ``0..upto`` as Avalanche's training would."""
    from avalanche.models.utils import avalanche_model_adaptation

    model.train()
    for experience in stream[: upto + 1]:
        avalanche_model_adaptation(model, experience)
    model.to(device)


# -------------------------------------------------------------------- (a) training iteration
def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def measure_iteration(name: str, sizes: PerfSizes, device: torch.device) -> dict[str, Any]:
    """Per-iteration time of Naive vs Naive + SPGPlugin on the second experience.

    Every round trains one epoch of ``iters_per_round`` iterations with each strategy (ABBA
    order). Its first ``warmup`` iterations are reported apart ("experience start"): at the
    start of an experience SPG has just run the importance pass and built its factors, and on
    CPU the C allocator then returns and re-faults memory for some iterations (counted as
    minor page faults) before it settles; the rest is the steady state.
    """
    from avalanche_spg import SPGPlugin

    probe_cls = _probe_class()
    events = ("before_training_iteration", "after_training_iteration")
    stream = synthetic_stream(
        input_shape(name, sizes), 2, sizes.batch * sizes.iters_per_round
    ).train_stream
    variants: dict[str, dict[str, Any]] = {}
    for variant in ("naive", "spg"):
        model = make_model(name, sizes, dropout=True)
        _adapt_heads(model, stream, 1, device)
        probe = probe_cls(device, *events)
        pre, post = probe_cls(device, "before_update"), probe_cls(device, "before_update")
        plugins: list[Any] = [probe, pre]
        if variant == "spg":
            # importance_max_samples=1 keeps the after-experience pass (not timed here) cheap.
            plugin = SPGPlugin(importance_max_samples=1)
            _preload_importance(plugin, model, 1)
            plugins.append(plugin)
        plugins.append(post)
        variants[variant] = {
            "strategy": _naive(model, plugins, sizes.batch, device),
            "probe": probe,
            "pre": pre,
            "post": post,
            "steady": [],
            "start": [],
            "faults_steady": [],
            "faults_start": [],
            "mask": [],
        }
    warmup = sizes.warmup
    order = ["naive", "spg"]
    for round_index in range(sizes.rounds + 1):  # round 0 warms up and is dropped
        for variant in order if round_index % 2 == 0 else order[::-1]:
            info = variants[variant]
            for probe in (info["probe"], info["pre"], info["post"]):
                for stamps in probe.stamps.values():
                    stamps.clear()
            info["probe"].faults = []
            info["strategy"].train(stream[1])
            if round_index == 0:
                continue
            begin = info["probe"].stamps["before_training_iteration"]
            end = info["probe"].stamps["after_training_iteration"]
            times = [b - a for a, b in zip(begin, end)]
            faults = info["probe"].faults
            info["start"].append(_median(times[:warmup]))
            info["steady"].append(_median(times[warmup:]))
            info["faults_start"].append(_median(faults[:warmup]))
            info["faults_steady"].append(_median(faults[warmup:]))
            pre = info["pre"].stamps["before_update"]
            post = info["post"].stamps["before_update"]
            info["mask"].extend(b - a for a, b in zip(pre[warmup:], post[warmup:]))
    naive, spg = variants["naive"], variants["spg"]
    ratios = [s / n for s, n in zip(spg["steady"], naive["steady"])]
    start_ratios = [s / n for s, n in zip(spg["start"], naive["start"])]
    low, high = _bootstrap_median_interval(ratios)
    naive_iter = _median(naive["steady"])
    spg_mask = _median(spg["mask"])
    naive_probe_gap = _median(naive["mask"])
    model = naive["strategy"].model
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "naive_ms": naive_iter * 1e3,
        "spg_ms": _median(spg["steady"]) * 1e3,
        "ratio": _median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_ci_low": low,
        "ratio_ci_high": high,
        "start_ratio": _median(start_ratios),
        "naive_faults": _median(naive["faults_steady"]),
        "spg_faults": _median(spg["faults_steady"]),
        "naive_faults_start": _median(naive["faults_start"]),
        "spg_faults_start": _median(spg["faults_start"]),
        "mask_ms": spg_mask * 1e3,
        "probe_ms": naive_probe_gap * 1e3,
        "mask_fraction": (spg_mask - naive_probe_gap) / naive_iter,
        "rounds": len(ratios),
        "iterations": sizes.iters_per_round - warmup,
        "warmup": warmup,
    }


# ------------------------------------------------------------------------ (b) importance pass
def measure_importance_pass(
    name: str, sizes: PerfSizes, device: torch.device, *, vectorized: bool = True
) -> list[dict[str, Any]]:
    """Importance-pass time after task k, reference vs fast, vs one training epoch."""
    from avalanche_spg import SPGPlugin
    from avalanche_spg.importance_pass import compute_gamma

    probe_cls = _probe_class()
    per_task = sizes.pass_samples[name]
    stream = digits_stream(input_shape(name, sizes), sizes.n_tasks, per_task).train_stream
    rows = []
    for k in sizes.pass_ks:
        model = make_model(name, sizes, dropout=False)  # no dropout: the methods must agree
        _adapt_heads(model, stream, k, device)
        plugin = SPGPlugin(importance_max_samples=1)
        _preload_importance(plugin, model, k)
        probe = probe_cls(device, "before_training_epoch", "after_training_epoch")
        strategy = _naive(model, [plugin, probe], sizes.batch, device)
        features, _ = plugin.split_parameters(model)
        dataset = stream[k].dataset.train()

        def run_pass(
            method: str,
            vectorize: bool = False,
            pass_batch_size: int | None = None,
            model: nn.Module = model,
            dataset: Any = dataset,
            features: dict[str, nn.Parameter] = features,
            k: int = k,
        ) -> dict[str, Tensor]:
            return compute_gamma(
                model,
                dataset,
                features,
                [k],
                list(range(k)),
                device=device,
                reference_batch_size=sizes.batch,
                method=method,  # type: ignore[arg-type]
                vectorize_heads=vectorize,
                pass_batch_size=pass_batch_size,
            )

        variants: dict[str, Callable[[], Any]] = {
            "reference": lambda: run_pass("reference"),
            "fast": lambda: run_pass("fast"),
        }
        if k == max(sizes.pass_ks) and k > 0:
            # at the largest k only: two alternatives to the default fast pass
            # the fast pass at the reference batch size (bit for bit the loop on CPU)
            other = sizes.batch
            variants[f"fast_batch_{other}"] = functools.partial(
                run_pass, "fast", pass_batch_size=other
            )
            if vectorized:
                variants["fast_vectorized"] = lambda: run_pass("fast", True)
        times: dict[str, list[float]] = {v: [] for v in ["epoch", *variants]}
        max_diff = {v: 0.0 for v in variants if v != "reference"}
        for repeat in range(sizes.pass_repeats):
            for stamps in probe.stamps.values():
                stamps.clear()
            strategy.train(stream[k])  # changes the weights: passes below share the new ones
            begin, end = probe.stamps["before_training_epoch"], probe.stamps["after_training_epoch"]
            times["epoch"].append(end[0] - begin[0])
            names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
            results = {}
            for variant in names:
                _sync(device)
                started = _now()
                results[variant] = variants[variant]()
                _sync(device)
                times[variant].append(_now() - started)
            for variant in max_diff:
                diff = max(
                    float((results[variant][n] - results["reference"][n]).abs().max())
                    for n in results["reference"]
                )
                max_diff[variant] = max(max_diff[variant], diff)
        epoch = _median(times["epoch"])
        row: dict[str, Any] = {
            "model": name,
            "k": k,
            "heads": k + 1,
            "samples": per_task,
            "epoch_s": epoch,
        }
        for variant in variants:
            row[f"{variant}_s"] = _median(times[variant])
            row[f"{variant}_per_epoch"] = _median(times[variant]) / epoch
        for variant, diff in max_diff.items():
            # paired: each repeat runs the reference and the variant back to back
            speedups = [r / v for r, v in zip(times["reference"], times[variant])]
            low, high = _bootstrap_median_interval(speedups)
            row[f"{variant}_speedup"] = _median(speedups)
            row[f"{variant}_speedup_low"] = low
            row[f"{variant}_speedup_high"] = high
            row[f"{variant}_max_diff"] = diff
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- (c) memory
def held_memory(root: Any, model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors reachable from ``root``'s attributes (each storage counted once).

    Storages of ``model``'s own parameters and buffers are counted apart (``param_refs``: they
    are not extra memory); modules, optimizers, strategies and callables are not followed.
    ``python_objects`` counts the other Python objects reached (lists, ints, ...), to show
    that nothing grows with the number of tasks.
    """
    from avalanche.training.templates import BaseTemplate

    model_storages = {
        t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
    }
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    param_refs = 0
    python_objects = 0
    python_bytes = 0
    stack: list[Any] = [vars(root)]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in model_storages:
                param_refs += 1
            else:
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            continue
        if isinstance(obj, (nn.Module, torch.optim.Optimizer, BaseTemplate, type)) or callable(obj):
            continue
        python_objects += 1
        python_bytes += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return {
        "tensor_bytes": sum(storages.values()),
        "tensors": len(storages),
        "param_refs": param_refs,
        "python_objects": python_objects,
        "python_bytes": python_bytes,
    }


def measure_memory(name: str, sizes: PerfSizes, device: torch.device) -> list[dict[str, Any]]:
    """Memory the plugin holds between experiences along a stream."""
    from avalanche_spg import SPGPlugin

    n_tasks = max(sizes.memory_after)
    stream = synthetic_stream(input_shape(name, sizes), n_tasks, sizes.memory_samples).train_stream
    model = make_model(name, sizes, dropout=True)
    plugin = SPGPlugin()
    strategy = _naive(model, [plugin], sizes.batch, device)
    rows = []
    for index, experience in enumerate(stream):
        strategy.train(experience)
        if index + 1 not in sizes.memory_after:
            continue
        gc.collect()
        held = held_memory(plugin, model)
        features, heads = plugin.split_parameters(model)
        rows.append(
            {
                "model": name,
                "tasks": index + 1,
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "feature_bytes": sum(p.numel() * p.element_size() for p in features.values()),
                "importance_bytes": sum(
                    v.numel() * v.element_size() for v in plugin.importance.values()
                ),
                **held,
            }
        )
    return rows


# ------------------------------------------------------------------ (d) importance_max_samples
def measure_subset(sizes: PerfSizes, device: torch.device) -> list[dict[str, Any]]:
    """Importance after the last task of a digits stream: whole experience vs random subsets."""
    from avalanche.benchmarks import nc_benchmark
    from sklearn.datasets import load_digits

    from avalanche_spg import SPGPlugin
    from avalanche_spg.models import MultiHeadMLP

    probe_cls = _probe_class()
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    stream = nc_benchmark(
        _TensorDataset(x[:1400], y[:1400]),
        _TensorDataset(x[1400:], y[1400:]),
        n_experiences=5,
        task_labels=True,
        class_ids_from_zero_in_each_exp=True,
        seed=0,
    ).train_stream[: sizes.subset_tasks]
    torch.manual_seed(0)
    base = MultiHeadMLP(64, (64, 64))
    plugin = SPGPlugin()
    strategy = _naive(base, [plugin], 16, device)
    strategy.optimizer.param_groups[0]["lr"] = 0.1
    for experience in stream[:-1]:
        strategy.train(experience)
    state = plugin.state_dict()
    last = stream[-1]
    results: dict[float, tuple[dict[str, Tensor], float]] = {}
    for fraction in (1.0, *sizes.subset_fractions):
        model = copy.deepcopy(base)
        samples = None if fraction == 1.0 else max(1, round(fraction * len(last.dataset)))
        run_plugin = SPGPlugin(importance_max_samples=samples)
        run_plugin.load_state_dict(state)
        pre, post = probe_cls(device, "after_training_exp"), probe_cls(device, "after_training_exp")
        run = _naive(model, [pre, run_plugin, post], 16, device)
        run.optimizer.param_groups[0]["lr"] = 0.1
        torch.manual_seed(1)  # the same training of the last task in every run
        run.train(last)
        seconds = post.stamps["after_training_exp"][0] - pre.stamps["after_training_exp"][0]
        results[fraction] = (run_plugin.importance, seconds)
    full, full_seconds = results[1.0]
    flat_full = torch.cat([v.flatten().cpu() for v in full.values()])
    rows = []
    for fraction, (importance, seconds) in results.items():
        flat = torch.cat([importance[n].flatten().cpu() for n in full])
        diff = (flat - flat_full).abs()
        rows.append(
            {
                "fraction": fraction,
                "samples": len(last.dataset)
                if fraction == 1.0
                else max(1, round(fraction * len(last.dataset))),
                "pass_s": seconds,
                "time_ratio": seconds / full_seconds,
                "mean_abs_diff": float(diff.mean()),
                "max_abs_diff": float(diff.max()),
                "frac_diff_gt_0_1": float((diff > 0.1).float().mean()),
                "head_scale": 1.0 - float(flat.double().mean()),
                "head_scale_full": 1.0 - float(flat_full.double().mean()),
            }
        )
    return rows


# ------------------------------------------------------------------------------------- output
def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (
        f"CPU {cpu} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def _targets(results: dict[str, Any], device: torch.device) -> list[str]:
    """The issue's targets, each as measured in this run."""
    gpu = device.type == "cuda"
    rows: list[tuple[str, str, str, bool]] = []
    for r in results.get("iteration", []):
        if r["model"] != "alexnet":
            continue
        limit = 0.03 if gpu else 0.05
        rows.append(
            (
                "mask step, AlexNet-like (in place, `before_update`)",
                f"<= {100 * limit:g} % of a Naive iteration",
                f"{100 * r['mask_fraction']:.2f} %",
                r["mask_fraction"] <= limit,
            )
        )
        rows.append(
            (
                "whole SPG iteration, AlexNet-like (end to end)",
                f"<= {100 * limit:g} % over Naive",
                f"{100 * (r['ratio'] - 1):+.1f} % (95 % interval "
                f"{100 * (r['ratio_ci_low'] - 1):+.1f} to {100 * (r['ratio_ci_high'] - 1):+.1f} %)",
                r["ratio"] - 1 <= limit,
            )
        )
    importance = results.get("importance", [])
    if importance:
        last = max(r["k"] for r in importance)
        need = 3.0 if gpu else 1.5
        for r in importance:
            if r["k"] == last and last > 0:
                rows.append(
                    (
                        f"fast importance pass after task {last}, {r['model']}",
                        f">= {need:g}x faster than the per-head loop",
                        f"{r['fast_speedup']:.2f}x (95 % interval "
                        f"{r['fast_speedup_low']:.2f}-{r['fast_speedup_high']:.2f})",
                        r["fast_speedup"] >= need,
                    )
                )
        worst = max(r["fast_max_diff"] for r in importance)
        rows.append(
            (
                "fast = reference importance (no dropout)",
                "max abs diff <= 1e-5",
                f"{worst:.1e}",
                worst <= 1e-5,
            )
        )
    memory = results.get("memory", [])
    for model in dict.fromkeys(r["model"] for r in memory):
        mine = [r for r in memory if r["model"] == model]
        constant = len({r["tensor_bytes"] for r in mine}) == 1
        only_importance = all(r["tensor_bytes"] == r["importance_bytes"] for r in mine)
        rows.append(
            (
                f"memory held between experiences, {model}",
                "one importance buffer, not growing with tasks",
                f"{mine[-1]['tensor_bytes']:,} B after {mine[-1]['tasks']} tasks "
                f"({mine[-1]['tensor_bytes'] / mine[-1]['param_bytes']:.2f}x the parameters)",
                constant and only_importance,
            )
        )
    if not rows:
        return []
    lines = [
        "## Targets (issue 4)" + (" on GPU" if gpu else " on CPU"),
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    for name, wanted, measured, met in rows:
        lines.append(f"| {name} | {wanted} | {measured} | {'yes' if met else '**no**'} |")
    return [*lines, ""]


def render(
    results: dict[str, Any],
    command: str,
    device: torch.device,
    profile: str,
    clock: str,
    allocator: str = "default",
) -> str:
    """The Markdown report."""
    lines = [
        "# SPG performance vs Naive",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}, device `{device}`,"
        f" profile `{profile}`.",
        f"Machine: {_machine(device)}.",
        f"Clock: {'process CPU time' if clock == 'cpu' else 'wall time'}. C allocator: "
        + (
            "glibc thresholds fixed for every variant (`--malloc steady`: mmap above 32 MiB, "
            "trim above 1 GiB; see below)."
            if allocator == "steady"
            else f"{allocator}."
        ),
        "",
        "Absolute times come from a shared machine and are noise; the ratios are measured within",
        "one run with the compared variants interleaved and repeated (medians). With one torch",
        "thread on a CPU shared with other jobs the clock is this process's CPU time, which counts",
        "the work done rather than the other jobs' share of the cores (it still feels their cache",
        "and memory-bandwidth pressure).",
        "",
        *_targets(results, device),
    ]
    if "iteration" in results:
        lines += [
            "## (a) Training iteration, Naive vs Naive + SPGPlugin (masks active)",
            "",
            "| model | parameters | Naive ms/iter | SPG ms/iter | SPG / Naive "
            "| 95 % interval | rounds range | SPG `before_update` ms "
            "| mask step / Naive iteration |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["iteration"]:
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['naive_ms']:.2f} | {r['spg_ms']:.2f} "
                f"| {r['ratio']:.3f} | {r['ratio_ci_low']:.3f}-{r['ratio_ci_high']:.3f} "
                f"| {r['ratio_min']:.3f}-{r['ratio_max']:.3f} "
                f"| {r['mask_ms']:.3f} | {100 * r['mask_fraction']:.2f} % |"
            )
        r0 = results["iteration"][0]
        lines += [
            "",
            f"Steady state: iterations {r0['warmup'] + 1}-{r0['warmup'] + r0['iterations']} "
            f"of an epoch, {r0['rounds']} rounds per strategy, alternating (ABBA); SPG / Naive "
            "is the median over rounds of the ratio of the per-round medians, with a bootstrap "
            "95 % interval of that median and the range over rounds (on a shared CPU this "
            "end-to-end figure is noisy). The mask step is timed in place between probe "
            "plugins placed just before and after SPGPlugin in `before_update` (minus the same "
            "probes' gap in the Naive run), relative to the median Naive iteration: the precise "
            "figure of what SPG adds to an iteration (its other per-iteration callbacks only "
            "count iterations).",
            "",
            f"Start of an experience (its first {r0['warmup']} iterations) and minor page "
            "faults per iteration (median):",
            "",
            "| model | SPG / Naive, first iterations | faults Naive / SPG, first iterations "
            "| faults Naive / SPG, steady state |",
            "|---|---:|---:|---:|",
        ]
        for r in results["iteration"]:
            lines.append(
                f"| {r['model']} | {r['start_ratio']:.3f} "
                f"| {r['naive_faults_start']:,.0f} / {r['spg_faults_start']:,.0f} "
                f"| {r['naive_faults']:,.0f} / {r['spg_faults']:,.0f} |"
            )
        transient = any(
            r["spg_faults_start"] > 2 * r["naive_faults_start"] + 100
            or r["spg_faults"] > 2 * r["naive_faults"] + 100
            for r in results["iteration"]
        )
        lines += [
            "",
            "With glibc's default, adaptive malloc thresholds, SPG's importance pass and mask "
            "build at the start of an experience (tens of MB allocated and freed) leave the "
            "allocator returning memory to the system and faulting it back in, zeroed, on "
            "every iteration for a while (tens of MB per iteration for the AlexNet-like CNN, "
            "see `benchmarks/results/perf-malloc-default.md`): a transient of the experience "
            "start in a long run, which settles, but it dominates short interleaved rounds "
            "like these. "
            + (
                "This run fixed the thresholds for every variant (`--malloc steady`), so the "
                "table measures the steady state; `--malloc default` shows the transient."
                if allocator == "steady"
                else (
                    "This run kept the default allocator"
                    + (", and the fault counts above show the transient." if transient else ".")
                )
            ),
        ]
        lines.append("")
    if "importance" in results:
        lines += [
            "## (b) Importance pass after task k, vs one training epoch on task k",
            "",
            "| model | k | heads | samples | epoch s | reference s | fast s "
            "| reference / epoch | fast / epoch | speed-up (ref / fast) | 95 % interval "
            "| max abs diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["importance"]:
            lines.append(
                f"| {r['model']} | {r['k']} | {r['heads']} | {r['samples']} "
                f"| {r['epoch_s']:.3f} | {r['reference_s']:.3f} | {r['fast_s']:.3f} "
                f"| {r['reference_per_epoch']:.2f} | {r['fast_per_epoch']:.2f} "
                f"| {r['fast_speedup']:.2f} "
                f"| {r['fast_speedup_low']:.2f}-{r['fast_speedup_high']:.2f} "
                f"| {r['fast_max_diff']:.1e} |"
            )
        extra = [
            (r, key[: -len("_speedup")])
            for r in results["importance"]
            for key in r
            if key.endswith("_speedup") and key != "fast_speedup"
        ]
        if extra:
            lines += [
                "",
                "Alternatives to the default fast pass, measured in the same runs (interleaved "
                "with the rows above): the fast pass at the reference batch size, `fast_batch_N` "
                "(`compute_gamma(..., pass_batch_size=N)`), and the vectorised head backward "
                "(`vectorize_heads=True`: `is_grads_batched`, one `vmap`-ed backward for all "
                "heads).",
                "",
                "| model | k | variant | s | / epoch | speed-up (ref / variant) "
                "| 95 % interval | max abs diff |",
                "|---|---:|---|---:|---:|---:|---:|---:|",
            ]
            for r, variant in extra:
                lines.append(
                    f"| {r['model']} | {r['k']} | {variant} | {r[variant + '_s']:.3f} "
                    f"| {r[variant + '_per_epoch']:.2f} | {r[variant + '_speedup']:.2f} "
                    f"| {r[variant + '_speedup_low']:.2f}-{r[variant + '_speedup_high']:.2f} "
                    f"| {r[variant + '_max_diff']:.1e} |"
                )
        lines += [
            "",
            "Speed-up: median over repeats of the paired ratio (reference and variant run back "
            "to back in each repeat), with a bootstrap 95 % interval. "
            "Reference: the per-head loop at the reference batch size (64). Fast: the plugin's "
            'default (`importance_method="fast"`, default pass batch size for the device). '
            "An epoch is one Naive + SPGPlugin training epoch on the same data (batch 64). "
            "Max abs diff: largest |importance(fast) - importance(reference)| on the same "
            "weights, no dropout.",
            "",
        ]
    if "memory" in results:
        lines += [
            "## (c) Memory held by SPGPlugin between experiences",
            "",
            "| model | tasks | plugin tensor bytes | model parameter bytes | ratio "
            "| importance bytes | feature-parameter bytes | refs to model tensors "
            "| other Python objects (bytes) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["memory"]:
            lines.append(
                f"| {r['model']} | {r['tasks']} | {r['tensor_bytes']:,} | {r['param_bytes']:,} "
                f"| {r['tensor_bytes'] / r['param_bytes']:.3f} | {r['importance_bytes']:,} "
                f"| {r['feature_bytes']:,} | {r['param_refs']} "
                f"| {r['python_objects']} ({r['python_bytes']:,}) |"
            )
        lines += [
            "",
            "Every tensor reachable from the plugin's attributes, each storage once; the "
            "model's parameter bytes grow with the tasks (one head each), the plugin's do not.",
            "",
        ]
    if "subset" in results:
        lines += [
            "## (d) `importance_max_samples`: a random subset of the experience",
            "",
            "| fraction | samples | pass s | time vs whole | mean abs diff of A "
            "| max abs diff of A | elements with diff > 0.1 | head scale (whole) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["subset"]:
            lines.append(
                f"| {r['fraction']:g} | {r['samples']} | {r['pass_s']:.3f} "
                f"| {r['time_ratio']:.2f} | {r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.3f} "
                f"| {100 * r['frac_diff_gt_0_1']:.1f} % "
                f"| {r['head_scale']:.4f} ({r['head_scale_full']:.4f}) |"
            )
        lines += [
            "",
            "Accumulated importance A after the last task of a digits stream (MLP 64-64, "
            "trained with SPG), whole experience vs `SPGPlugin(importance_max_samples=N)` on "
            "the same weights and training.",
            "",
            *_subset_notes(results["subset"]),
        ]
    return "\n".join(lines)


def _subset_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the subset rows say, in words (numbers from this run)."""
    subsets = [r for r in rows if r["fraction"] < 1.0]
    if not subsets:
        return []
    smallest = min(subsets, key=lambda r: r["fraction"])
    return [
        "Trade-off. `importance_max_samples=N` (off by default: the spec and the paper use the "
        "whole experience) draws N samples of the experience at random, with a seed fixed per "
        "experience (the same subset on every run), and runs the ordinary pass on them. The "
        "pass costs in proportion to the samples (here "
        f"{smallest['time_ratio']:.2f}x the time at {smallest['fraction']:g} of the data), "
        "which matters when it dominates: after task k it is k + 1 passes over the task's data. "
        "The price is an estimate instead of the exact importance: the summed gradients over a "
        "subset, standardised, approximate the whole-set ones (standardisation removes the "
        "scale, so only the sampling noise remains); here A moved by "
        f"{smallest['mean_abs_diff']:.4f} on average and at most "
        f"{smallest['max_abs_diff']:.2f} at {smallest['fraction']:g} of the data, "
        f"{100 * smallest['frac_diff_gt_0_1']:.1f} % of the elements by more than 0.1. Since A "
        "is a running maximum, such noise persists for the rest of the stream. Use it for very "
        "large experiences, with N in the thousands rather than a small fraction of a small "
        "task.",
        "",
    ]


def steady_c_allocator() -> bool:
    """Fix glibc's malloc thresholds for this process (Linux/glibc only; ``False`` elsewhere).

    glibc adapts its mmap and trim thresholds to the allocation history, so after a burst of
    large allocations (SPG's importance pass and mask build, a DataLoader start) it may return
    memory to the system and fault it back in (zeroed pages) on every training iteration for
    a while. Timings of short runs then measure the allocator's history, not the work. With
    the thresholds fixed (mmap above 32 MiB, trim above 1 GiB) every variant runs with the
    steady state a long run reaches anyway.
    """
    import ctypes
    import ctypes.util

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


def _log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def collect(
    sizes: PerfSizes,
    device: torch.device,
    parts: Sequence[str] = PARTS,
    models: Sequence[str] = MODELS,
    *,
    vectorized: bool = True,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Run the chosen measurements; ``{part: rows}`` as :func:`render` takes them."""
    results: dict[str, Any] = {}
    if "iteration" in parts:
        results["iteration"] = []
        for model in models:
            log(f"(a) training iteration, {model}")
            results["iteration"].append(measure_iteration(model, sizes, device))
    if "importance" in parts:
        results["importance"] = []
        for model in models:
            log(f"(b) importance pass, {model}")
            results["importance"] += measure_importance_pass(
                model, sizes, device, vectorized=vectorized
            )
    if "memory" in parts:
        results["memory"] = []
        for model in models:
            log(f"(c) memory, {model}")
            results["memory"] += measure_memory(model, sizes, device)
    if "subset" in parts:
        log("(d) importance_max_samples")
        results["subset"] = measure_subset(sizes, device)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf",
        description="Measure SPGPlugin's cost against Naive: training iteration, importance "
        "pass, memory held between experiences, importance_max_samples.",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes, seconds (CI)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="wall time, or this process's CPU time (robust on a shared CPU with one thread); "
        "auto: CPU time on CPU with one torch thread, else wall time",
    )
    parser.add_argument(
        "--parts",
        default="iteration,importance,memory,subset",
        help="comma-separated subset of: iteration, importance, memory, subset",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,alexnet")
    parser.add_argument(
        "--out",
        default=None,
        help=f"Markdown file to write (default: {DEFAULT_OUT} for the full profile, "
        "nothing for --tiny); '-' prints only",
    )
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    parser.add_argument(
        "--malloc",
        choices=("steady", "default"),
        default="steady",
        help="steady: fix glibc's malloc thresholds for the run (see steady_c_allocator); "
        "default: leave the C allocator as it is",
    )
    parser.add_argument(
        "--no-vectorized", action="store_true", help="skip the vectorised-heads variant in (b)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "benchmarks.perf", *argv_list])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    _CLOCK["now"] = time.process_time if clock == "cpu" else time.perf_counter
    profile = "tiny" if args.tiny else "full"
    sizes = SIZES[profile]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(parts) - set(PARTS)
    unknown |= set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown parts/models: {sorted(unknown)}")

    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    allocator = "default"
    if args.malloc == "steady":
        allocator = "steady" if steady_c_allocator() else "default (no glibc mallopt here)"
    results = collect(sizes, device, parts, models, vectorized=not args.no_vectorized)
    results["meta"] = {
        "command": command,
        "device": str(device),
        "profile": profile,
        "clock": clock,
    }
    results["meta"]["allocator"] = allocator
    text = render(results, command, device, profile, clock, allocator)
    print(text)
    out = args.out if args.out is not None else (None if args.tiny else str(DEFAULT_OUT))
    if out and out != "-":
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        _log(f"written to {path}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
