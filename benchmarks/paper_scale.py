"""The SPG paper's C-10 / C-20 protocol at full scale: what it costs, and the command that runs it.

``python -m benchmarks.paper_scale estimate``
    Times the pieces of a paper-protocol run on the device at hand, on synthetic tensors of
    C-10's and C-20's exact shapes and sizes (CIFAR-100: 500 training and 100 test images per
    class, 3x32x32; C-10 = 10 tasks x 10 classes, C-20 = 20 tasks x 5 classes; 10 % of every
    task's training images held out for validation), cut into tasks by the suite's own
    :func:`benchmarks.data.build_stream`, with the suite's own backbone
    (:func:`benchmarks.protocols.make_backbone`, the paper's AlexNet-like with its tuned
    dropout), strategies (:func:`benchmarks.methods.build_strategy` with
    :func:`benchmarks.methods.method_hparams`) and schedule plugin
    (:class:`benchmarks.plugins.PlateauEarlyStopping`), at the paper protocol's batch size and
    learning rate. It prints a Markdown table: seconds per training epoch, per validation pass,
    per end-of-task pass (SPG's importance pass, EWC's Fisher, MAS's importance), per
    evaluation of the test stream and per checkpoint, and the projected wall time of a whole
    run per method for an assumed number of epochs per task.

``python -m benchmarks.paper_scale run --data-root DIR``
    Runs ``python -m benchmarks`` on C-10 and C-20 with the paper protocol, the AlexNet-like
    backbone, every method the protocol supports and 3 seeds, into
    ``benchmarks/results/paper-c10`` and ``paper-c20``; refuses when CIFAR-100 is not in
    ``DIR`` or no GPU is present (``--allow-cpu`` overrides the latter). ``--dry-run`` prints
    the commands only.

How the projection is made
--------------------------
Every method (``joint`` aside) trains tasks ``0, 1, ..., k_hi`` for one epoch each, so that
regularisers, distillation targets and replay buffers are active, and the pieces of the calls
that train tasks ``k_lo`` and ``k_hi`` (default 1 and 3) are timed by probe plugins placed
around the others: the training epoch, the validation pass (the schedule plugin's), the
end-of-task pass (every plugin's ``after_training_exp``; inside it, SPG's importance pass
separately), and the rest of the call (experience set-up: ``overhead``). After task ``k_hi``
the whole test stream is evaluated once (the suite evaluates it after every task) and a
checkpoint is written after tasks ``k_lo`` and ``k_hi`` as the runner writes one after every
task but the last. A piece that may grow with the task index (SPG's importance pass costs about
one forward and ``k + 1`` backward passes after task ``k``; EWC's penalty has one term per
earlier task; the checkpoint carries per-task state) is extended to every ``k`` by the line
through its two measurements, its slope clipped at 0 and its value at 0::

    v(k) = max(0, v(k_lo) + max(0, (v(k_hi) - v(k_lo)) / (k_hi - k_lo)) * (k - k_lo))

Then, for ``T`` tasks and ``E`` epochs per task, one seed of a method takes::

    sum over k = 0 .. T-1 of  overhead + E * (epoch(k) + validation) + end(k) + evaluation
    + sum over k = 0 .. T-2 of  checkpoint(k)

and ``joint`` (one experience made of all tasks) ``overhead + E * (epoch + validation) + end +
evaluation``. ``overhead`` is the mean of its two measurements; ``validation`` and
``evaluation`` do not depend on ``k``.

``--fraction F`` keeps ``F`` of every class's images (at least one) to measure on a slow
machine; the epoch, validation, end-of-task and evaluation times are then multiplied by the
ratio of the full size to the measured size (they are passes over the data), the overhead and
the checkpoint are not (a replay checkpoint also pickles the images of the earlier experiences
its buffer draws from, so it is under-estimated). The number of epochs each task trains depends
on the data; the schedule cannot stop a task before epoch :func:`minimum_epochs` (36: the
first epoch the best, six plateaus of five epochs down to the lr floor, five more at the floor),
so the table also shows the projection at that minimum. The synthetic images are Gaussian
noise: the time of an epoch does not depend on what the images show, the number of epochs does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks._markdown import table
from benchmarks.catalog import BENCHMARKS, default_data_root
from benchmarks.methods import METHODS

__all__ = [
    "PAPER_BENCHMARKS",
    "PAPER_METHODS",
    "DEFAULT_ASSUMED_EPOCHS",
    "FULL_SIZES",
    "MethodTiming",
    "StreamSizes",
    "build_parser",
    "cifar100_problem",
    "estimate",
    "linear_in_k",
    "main",
    "minimum_epochs",
    "projections",
    "render",
    "run_commands",
    "seconds_per_seed",
    "stream_sizes",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

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


# ---------------------------------------------------------------------------- sizes
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


def _per_class(full: int, fraction: float) -> int:
    return max(1, round(full * fraction))


def _synthetic_cifar100(
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


# ---------------------------------------------------------------------------- schedule
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


# ---------------------------------------------------------------------------- projection
def linear_in_k(k_lo: int, v_lo: float, k_hi: int, v_hi: float, k: int) -> float:
    """The value at task ``k`` of the line through ``(k_lo, v_lo)`` and ``(k_hi, v_hi)``, with
    its slope clipped at 0 (a cost that measured lower at the later task is noise) and the
    value at 0."""
    if k_hi <= k_lo:
        raise ValueError(f"k_hi must be above k_lo, got k_lo={k_lo}, k_hi={k_hi}")
    slope = max(0.0, (v_hi - v_lo) / (k_hi - k_lo))
    return max(0.0, v_lo + slope * (k - k_lo))


@dataclass
class MethodTiming:
    """The timed pieces of one method, in seconds at the full size (already scaled).

    Pairs are the values after tasks ``ks = (k_lo, k_hi)``; ``joint`` has one value per pair
    (both entries equal) and ``ks = (0, 0)``.
    """

    method: str
    ks: tuple[int, int]
    epoch: tuple[float, float]
    validation: float
    end_of_task: tuple[float, float]
    importance_pass: tuple[float, float] | None
    evaluation: float
    checkpoint: tuple[float, float]
    overhead: float
    checkpoint_bytes: tuple[int, int] = (0, 0)
    #: The same pieces as measured, before scaling to the full size.
    raw: dict[str, Any] = field(default_factory=dict)

    def at(self, name: str, k: int) -> float:
        """Piece ``name`` (``epoch``, ``end_of_task``, ``checkpoint``) after task ``k``."""
        values: tuple[float, float] = getattr(self, name)
        if self.method == "joint":
            return values[0]
        return linear_in_k(self.ks[0], values[0], self.ks[1], values[1], k)


def seconds_per_seed(timing: MethodTiming, n_tasks: int, epochs: int) -> float:
    """Projected seconds of one seed of ``timing.method`` on ``n_tasks`` tasks, ``epochs``
    epochs each (see the module docstring for the formula)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if timing.method == "joint":
        return (
            timing.overhead
            + epochs * (timing.epoch[0] + timing.validation)
            + timing.end_of_task[0]
            + timing.evaluation
        )
    total = 0.0
    for k in range(n_tasks):
        total += timing.overhead + epochs * (timing.at("epoch", k) + timing.validation)
        total += timing.at("end_of_task", k) + timing.evaluation
        if k < n_tasks - 1:
            total += timing.at("checkpoint", k)
    return total


# ---------------------------------------------------------------------------- measuring
class _Clock:
    """Seconds on the chosen clock, after the device's queued work is done."""

    def __init__(self, device: torch.device, clock: str) -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
        self.device = device
        self.read = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.read()


def _probe(clock: _Clock) -> Any:
    """A plugin that notes the time of its training callbacks (the last call of each)."""
    from avalanche.core import SupervisedPlugin

    class Probe(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.at: dict[str, float] = {}

        def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self.at["before_training_epoch"] = clock()

        def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self.at["after_training_epoch"] = clock()

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self.at["after_training_exp"] = clock()

    return Probe()


@dataclass
class _Probes:
    start: Any  # first plugin
    after_schedule: Any  # right after PlateauEarlyStopping
    end: Any  # last plugin
    spg: tuple[Any, Any] | None  # around SPGPlugin


def _build(
    method: str,
    benchmark: str,
    stream: Any,
    device: torch.device,
    backbone: str,
    clock: _Clock,
) -> tuple[Any, _Probes]:
    """The strategy the suite's runner builds for a paper-protocol run (one epoch per call),
    with probes."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_spg import SPGPlugin
    from benchmarks.methods import StrategyContext, build_strategy, method_hparams
    from benchmarks.plugins import PlateauEarlyStopping, TensorDataPlugin
    from benchmarks.protocols import make_backbone, protocol_settings

    protocol = protocol_settings("paper", source="cifar100")
    model = make_backbone(
        protocol.name, benchmark, stream.input_shape, stream.max_classes, backbone
    )
    validation = {t: (task.x_valid, task.y_valid) for t, task in enumerate(stream.tasks)}
    schedule = PlateauEarlyStopping(
        validation,
        lr=protocol.lr,
        batch_size=protocol.eval_batch_size,
        joint=method == "joint",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    probes = _Probes(_probe(clock), _probe(clock), _probe(clock), None)
    train = {t: (task.x_train, task.y_train) for t, task in enumerate(stream.tasks)}
    test = {t: (task.x_test, task.y_test) for t, task in enumerate(stream.tasks)}
    lr = protocol.lr
    ctx = StrategyContext(
        model=model,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr),
        train_mb_size=protocol.batch_size,
        train_epochs=1,
        eval_mb_size=protocol.eval_batch_size,
        device=device,
        evaluator=evaluator,
        n_tasks=stream.n_tasks,
        source="cifar100",
        first_plugins=[probes.start, schedule, probes.after_schedule],
        last_plugins=[TensorDataPlugin(train, test), probes.end],
    )
    strategy = build_strategy(method, ctx, method_hparams(method, benchmark))
    plugins = strategy.plugins
    spg = next((i for i, p in enumerate(plugins) if isinstance(p, SPGPlugin)), None)
    if spg is not None:
        before, after = _probe(clock), _probe(clock)
        plugins.insert(spg + 1, after)
        plugins.insert(spg, before)
        probes.spg = (before, after)
    return strategy, probes


def _pieces(call: float, probes: _Probes) -> dict[str, float]:
    """Split one timed ``strategy.train`` call (one epoch) into its pieces."""
    start, after_schedule, end = probes.start.at, probes.after_schedule.at, probes.end.at
    validation = after_schedule["after_training_epoch"] - start["after_training_epoch"]
    epoch = end["after_training_epoch"] - start["before_training_epoch"] - validation
    end_of_task = end["after_training_exp"] - start["after_training_exp"]
    pieces = {
        "call": call,
        "epoch": epoch,
        "validation": validation,
        "end_of_task": end_of_task,
        "overhead": max(0.0, call - epoch - validation - end_of_task),
    }
    if probes.spg is not None:
        before, after = probes.spg
        pieces["importance_pass"] = after.at["after_training_exp"] - before.at["after_training_exp"]
    return pieces


def _checkpoint(strategy: Any, clock: _Clock, folder: Path) -> tuple[float, int]:
    from avalanche_spg.checkpoint import save_checkpoint

    path = folder / "checkpoint.pkl"
    started = clock()
    save_checkpoint(strategy, path)
    seconds = clock() - started
    size = path.stat().st_size
    path.unlink()
    return seconds, size


def _warm_up(stream: Any, benchmark: str, backbone: str, device: torch.device) -> None:
    """One forward and backward pass of the backbone, so that the first timed method does not
    pay for the device's start (CUDA context, kernel selection)."""
    from benchmarks.protocols import make_backbone

    model: Any = make_backbone(
        "paper", benchmark, stream.input_shape, stream.max_classes, backbone
    ).to(device)
    x = stream.tasks[0].x_train[:64].to(device)
    model.forward_single_task(x, 0).sum().backward()


def _measure_method(
    method: str,
    benchmark: str,
    stream: Any,
    device: torch.device,
    backbone: str,
    clock: _Clock,
    ks: tuple[int, int],
    folder: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The raw (unscaled) pieces of ``method``: per measured task, and the evaluation."""
    from benchmarks.data import make_benchmark
    from benchmarks.runner import seed_everything

    seed_everything(0)
    strategy, probes = _build(method, benchmark, stream, device, backbone, clock)
    avalanche_benchmark = make_benchmark(stream)
    per_task: dict[int, dict[str, float]] = {}
    if method == "joint":
        started = clock()
        strategy.train(avalanche_benchmark.train_stream, eval_streams=[])
        per_task[0] = _pieces(clock() - started, probes)
    else:
        for k in range(ks[1] + 1):
            started = clock()
            strategy.train(avalanche_benchmark.train_stream[k], eval_streams=[])
            call = clock() - started
            if k in ks:
                per_task[k] = _pieces(call, probes)
                per_task[k]["checkpoint"], size = _checkpoint(strategy, clock, folder)
                per_task[k]["checkpoint_bytes"] = size
    started = clock()
    strategy.eval(avalanche_benchmark.test_stream)
    evaluation = clock() - started
    log(
        f"{benchmark} {method}: epoch "
        + " / ".join(f"{p['epoch']:.2f}" for p in per_task.values())
        + f" s measured, evaluation {evaluation:.2f} s"
    )
    return {"per_task": per_task, "evaluation": evaluation}


def _timing(
    method: str, raw: dict[str, Any], ks: tuple[int, int], ratio: dict[str, float]
) -> MethodTiming:
    """Scale the raw pieces of one method to the full size."""
    per_task = raw["per_task"]
    keys = (0, 0) if method == "joint" else ks
    lo, hi = per_task[keys[0]], per_task[keys[1]]

    def pair(name: str, scale: float) -> tuple[float, float]:
        return (lo.get(name, 0.0) * scale, hi.get(name, 0.0) * scale)

    return MethodTiming(
        method=method,
        ks=keys,
        epoch=pair("epoch", ratio["train"]),
        validation=(lo["validation"] + hi["validation"]) / 2 * ratio["valid"],
        end_of_task=pair("end_of_task", ratio["train"]),
        importance_pass=pair("importance_pass", ratio["train"])
        if "importance_pass" in lo
        else None,
        evaluation=raw["evaluation"] * ratio["test"],
        checkpoint=pair("checkpoint", 1.0),
        overhead=(lo["overhead"] + hi["overhead"]) / 2,
        checkpoint_bytes=(int(lo.get("checkpoint_bytes", 0)), int(hi.get("checkpoint_bytes", 0))),
        raw={"per_task": {str(k): v for k, v in per_task.items()}, "evaluation": raw["evaluation"]},
    )


def estimate(
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    methods: Sequence[str] = PAPER_METHODS,
    *,
    device: torch.device | str = "cpu",
    fraction: float = 1.0,
    ks: tuple[int, int] = (1, 3),
    backbone: str = "auto",
    clock: str = "wall",
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Measure every method on synthetic C-10 / C-20 streams; see the module docstring.

    :return: per benchmark: the measured and full sizes, the scale ratios and one
        :class:`MethodTiming` per method (as a dict, ``asdict``), plus the settings.
    """
    from benchmarks.data import build_stream

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 1 <= ks[0] < ks[1]:
        raise ValueError(f"ks must be two task indices 1 <= k_lo < k_hi, got {ks}")
    unknown = [b for b in benchmarks if b not in PAPER_BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; valid: {', '.join(PAPER_BENCHMARKS)}")
    bad = [m for m in methods if m not in PAPER_METHODS]
    if bad:
        raise ValueError(f"method(s) {bad} not run by the paper protocol; valid: {PAPER_METHODS}")
    device = torch.device(device)
    timer = _Clock(device, clock)
    per_class_train = _per_class(CIFAR100_TRAIN_PER_CLASS, fraction)
    per_class_test = _per_class(CIFAR100_TEST_PER_CLASS, fraction)
    images = _synthetic_cifar100(per_class_train, per_class_test)
    out: dict[str, Any] = {}
    for benchmark in benchmarks:
        if ks[1] >= BENCHMARKS[benchmark].n_tasks:
            raise ValueError(f"k_hi={ks[1]} is not a task of {benchmark}")
        stream = build_stream(
            benchmark, 0, "unused", validation_fraction=0.1, loader=lambda *_: images
        )
        measured = stream_sizes(benchmark, per_class_train, per_class_test)
        task = stream.tasks[0]
        n_valid = 0 if task.y_valid is None else len(task.y_valid)
        if (len(task.y_train), n_valid, len(task.y_test)) != (
            measured.train,
            measured.valid,
            measured.test,
        ):
            raise RuntimeError(f"build_stream made other sizes than {measured}")
        full = FULL_SIZES[benchmark]
        ratio = {
            "train": full.train / measured.train,
            "valid": full.valid / measured.valid,
            "test": full.test / measured.test,
        }
        _warm_up(stream, benchmark, backbone, device)
        timings = []
        with tempfile.TemporaryDirectory(prefix="paper-scale-") as folder:
            for method in methods:
                raw = _measure_method(
                    method, benchmark, stream, device, backbone, timer, ks, Path(folder), log
                )
                timings.append(asdict(_timing(method, raw, ks, ratio)))
        out[benchmark] = {
            "measured_sizes": asdict(measured),
            "full_sizes": asdict(full),
            "ratio": ratio,
            "methods": timings,
        }
    return out


# ---------------------------------------------------------------------------- report
def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pair(values: Sequence[float] | None, digits: int = 2) -> str:
    if values is None:
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in values)


def projections(
    results: dict[str, Any], epochs: int, seeds: int, minimum: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Per benchmark and method: seconds of one seed at ``epochs`` and ``minimum`` epochs per
    task, and of ``seeds`` seeds at both."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for benchmark, entry in results.items():
        n_tasks = entry["full_sizes"]["n_tasks"]
        out[benchmark] = {}
        for fields in entry["methods"]:
            timing = MethodTiming(
                **{
                    **fields,
                    "ks": tuple(fields["ks"]),
                    "epoch": tuple(fields["epoch"]),
                    "end_of_task": tuple(fields["end_of_task"]),
                    "checkpoint": tuple(fields["checkpoint"]),
                }
            )
            one = seconds_per_seed(timing, n_tasks, epochs)
            low = seconds_per_seed(timing, n_tasks, minimum)
            out[benchmark][timing.method] = {
                "seed_seconds": one,
                "seeds_seconds": seeds * one,
                "seed_seconds_minimum": low,
                "seeds_seconds_minimum": seeds * low,
            }
    return out


def render(
    results: dict[str, Any],
    meta: dict[str, Any],
    epochs: int,
    seeds: int,
    minimum: int,
) -> str:
    """The Markdown report of :func:`estimate`'s results."""
    projected = projections(results, epochs, seeds, minimum)
    ks = meta["ks"]
    device_kind = "GPU" if meta["device"].startswith("cuda") else "CPU"
    lines = [
        f"# Paper scale: expected run time of C-10 / C-20 (paper protocol), {device_kind}",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}.",
        f"Device: {meta['device_name']} (`{meta['device']}`), torch {meta['torch']}, "
        f"torch threads {meta['threads']}, clock: {meta['clock']}. Backbone: "
        f"{meta['backbone_description']}.",
        "",
        f"Synthetic tensors of the benchmarks' shapes, {meta['fraction']:g} of CIFAR-100's "
        f"images per class ({meta['per_class_train']} training, {meta['per_class_test']} test "
        "per class); the data passes are scaled to the full size (C-10: 4,500 training, 500 "
        "validation, 1,000 test images per task; C-20: 2,250 / 250 / 500). Batch 64, SGD lr 0.25, "
        "evaluation batch 1024. How the pieces are measured and projected: the docstring of "
        "`benchmarks/paper_scale.py`; `benchmarks/README.md`, section Paper scale (GPU).",
        "",
        f"Seconds at the full size; `a / b` = after task {ks[0]} / task {ks[1]}. Epoch: one "
        "training epoch. Validation: the schedule's validation pass (once per epoch). End of "
        "task: every plugin's `after_training_exp` (SPG's importance pass, EWC's Fisher, MAS's "
        "importance, replay's buffer update, the best weights restored). Evaluation: the whole "
        "test stream (after every task). Checkpoint: the runner's, after every task but the "
        f"last. Projected: {epochs} epochs per task (assumed), and the protocol's minimum "
        f"({minimum}); {seeds} seeds.",
    ]
    if device_kind == "CPU":
        lines += [
            "",
            "These are CPU figures. GPU figures are not measured here: on a GPU, run "
            "`python -m benchmarks.paper_scale estimate --device cuda --out "
            "benchmarks/results/paper-scale-estimate-gpu.md`.",
        ]
    if meta["clock"] == "process CPU time":
        lines += [
            "",
            "Process CPU time is what a dedicated core would take for the computation (other "
            "jobs on a shared machine do not count); it leaves out waiting for the disk, so "
            "the checkpoint figures err low.",
        ]
    if meta["fraction"] < 1:
        lines += [
            "",
            f"Measured on {meta['fraction']:g} of the images and scaled: costs that do not "
            "grow with the images of a pass (starting an epoch, an evaluation experience) are "
            "scaled too, which errs high; a replay checkpoint pickles fewer images of earlier "
            "tasks, which errs low.",
        ]
    for benchmark, entry in results.items():
        n_tasks = entry["full_sizes"]["n_tasks"]
        rows = []
        total = {"seeds_seconds": 0.0, "seeds_seconds_minimum": 0.0}
        for fields in entry["methods"]:
            method = fields["method"]
            p = projected[benchmark][method]
            total["seeds_seconds"] += p["seeds_seconds"]
            total["seeds_seconds_minimum"] += p["seeds_seconds_minimum"]
            joint = method == "joint"
            rows.append(
                [
                    method,
                    f"{fields['epoch'][0]:.2f}" if joint else _pair(fields["epoch"]),
                    f"{fields['validation']:.2f}",
                    f"{fields['end_of_task'][0]:.2f}" if joint else _pair(fields["end_of_task"]),
                    _pair(fields["importance_pass"]),
                    f"{fields['evaluation']:.2f}",
                    "-" if joint else _pair(fields["checkpoint"]),
                    f"{fields['overhead']:.2f}",
                    _duration(p["seed_seconds"]),
                    _duration(p["seeds_seconds_minimum"]),
                    _duration(p["seeds_seconds"]),
                ]
            )
        rows.append(
            [
                "all methods",
                *[""] * 8,
                _duration(total["seeds_seconds_minimum"]),
                _duration(total["seeds_seconds"]),
            ]
        )
        title = BENCHMARKS[benchmark].description
        lines += [
            "",
            f"## {benchmark}: {title} ({n_tasks} tasks)",
            "",
            *table(
                [
                    "method",
                    "epoch s",
                    "validation s",
                    "end of task s",
                    "SPG importance pass s",
                    "evaluation s",
                    "checkpoint s",
                    "overhead s",
                    f"1 seed, {epochs} epochs/task",
                    f"{seeds} seeds, {minimum} epochs/task",
                    f"{seeds} seeds, {epochs} epochs/task",
                ],
                rows,
                "l" + "r" * 10,
            ),
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- run
def cifar100_problem(data_root: Path) -> str | None:
    """Why CIFAR-100 cannot be read from ``data_root`` (``None``: it can)."""
    missing = [name for name in CIFAR100_FILES if not (data_root / name).is_file()]
    if not missing:
        return None
    return (
        f"CIFAR-100 is not in --data-root {data_root}: missing "
        + ", ".join(str(data_root / name) for name in missing)
        + " (unpack the python version of the official archive, cifar-100-python.tar.gz, "
        "there; the runs never download)"
    )


def run_commands(
    data_root: Path | str,
    device: str,
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    methods: Sequence[str] = PAPER_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    results_dir: str = "benchmarks/results",
) -> list[list[str]]:
    """The arguments of ``python -m benchmarks`` for every benchmark (one command each)."""
    return [
        [
            "--benchmark",
            benchmark,
            "--protocol",
            "paper",
            "--backbone",
            "alexnet",
            "--methods",
            ",".join(methods),
            "--seeds",
            *[str(s) for s in seeds],
            "--data-root",
            str(data_root),
            "--no-download",
            "--device",
            device,
            "--out",
            f"{results_dir}/paper-{benchmark}",
        ]
        for benchmark in benchmarks
    ]


# ---------------------------------------------------------------------------- CLI
def _list(valid: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(valid)
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or repr(text)}; valid: {', '.join(valid)}"
            )
        return list(dict.fromkeys(names))

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


_QUICK_FRACTION = 0.01
_QUICK_KS = (1, 2)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.paper_scale``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper_scale",
        description="The SPG paper's C-10 / C-20 protocol (CIFAR-100, AlexNet-like backbone) "
        "at full scale: 'estimate' times it on synthetic tensors of the right shapes on this "
        "device, 'run' runs it on CIFAR-100 (a GPU expected).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser(
        "estimate",
        help="time every method's pieces on synthetic C-10 / C-20 tensors and project the runs",
        description="Time one training epoch, one validation pass, the end-of-task pass (SPG's "
        "importance pass), the evaluation and the checkpoint of every method after tasks k_lo "
        "and k_hi on synthetic tensors of C-10's / C-20's shapes, and project the wall time of "
        "a whole paper-protocol run (see the docstring of benchmarks/paper_scale.py).",
    )
    est.add_argument(
        "--benchmarks",
        type=_list(PAPER_BENCHMARKS, "benchmark"),
        default=list(PAPER_BENCHMARKS),
        help="comma-separated: c10,c20 (default both)",
    )
    est.add_argument(
        "--methods",
        type=_list(PAPER_METHODS, "method"),
        default=list(PAPER_METHODS),
        help=f"comma-separated, or 'all' (default: {','.join(PAPER_METHODS)})",
    )
    est.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N"
    )
    est.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    est.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="wall time, or this process's CPU time (what a dedicated CPU would take, on a "
        "shared machine with one thread); auto: CPU time on CPU with one torch thread",
    )
    est.add_argument(
        "--fraction",
        type=_fraction,
        default=None,
        help="keep this fraction of CIFAR-100's images per class and scale the data passes "
        "to the full size (default 1; --quick: 0.01)",
    )
    est.add_argument(
        "--ks",
        type=_positive_int,
        nargs=2,
        default=None,
        metavar=("K_LO", "K_HI"),
        help="the two tasks after which the pieces are timed (default 1 3; --quick: 1 2)",
    )
    est.add_argument(
        "--assume-epochs",
        type=_positive_int,
        default=DEFAULT_ASSUMED_EPOCHS,
        help="epochs per task of the projection; the real number depends on the data "
        f"(default {DEFAULT_ASSUMED_EPOCHS}: see DEFAULT_ASSUMED_EPOCHS in the module)",
    )
    est.add_argument(
        "--n-seeds", type=_positive_int, default=3, help="seeds of the projected run (default 3)"
    )
    est.add_argument(
        "--backbone",
        choices=("auto", "mlp", "alexnet"),
        default="auto",
        help="auto = the paper protocol's AlexNet-like; mlp only to test this command",
    )
    est.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (0.01 of the images, tasks 1 and 2) for tests; the projection is "
        "then rough",
    )
    est.add_argument("--out", type=Path, help="also write the Markdown report here")
    est.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    est.add_argument("--quiet", action="store_true", help="no progress lines")

    run = sub.add_parser(
        "run",
        help="run C-10 and C-20, paper protocol, every method, 3 seeds (needs CIFAR-100, a GPU)",
        description="Run python -m benchmarks on C-10 and C-20 with the paper protocol and the "
        "AlexNet-like backbone, every method the protocol supports, into "
        "benchmarks/results/paper-c10 and paper-c20. Rerunning resumes (finished runs are "
        "skipped, a killed run restarts after its last finished task). Expected time: "
        "benchmarks/results/paper-scale-estimate-*.md, or 'estimate' on the GPU.",
    )
    run.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder holding cifar-100-python/ (default: $AVALANCHE_SPG_DATA or ~/.avalanche/data)",
    )
    run.add_argument(
        "--benchmarks",
        type=_list(PAPER_BENCHMARKS, "benchmark"),
        default=list(PAPER_BENCHMARKS),
        help="comma-separated: c10,c20 (default both)",
    )
    run.add_argument(
        "--methods",
        type=_list(PAPER_METHODS, "method"),
        default=list(PAPER_METHODS),
        help="comma-separated, or 'all' (default: every method of the paper protocol)",
    )
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    run.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    run.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on the CPU when no GPU is present (days: see the estimate)",
    )
    run.add_argument(
        "--results-dir",
        default="benchmarks/results",
        help="parent of the run directories paper-c10 / paper-c20, relative to the repository "
        "root (default benchmarks/results)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"error: --device {name!r} is not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name!r}: use cpu or cuda")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def _estimate_main(args: argparse.Namespace, command: str) -> int:
    from benchmarks.protocols import backbone_description

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    fraction = (
        args.fraction if args.fraction is not None else (_QUICK_FRACTION if args.quick else 1.0)
    )
    ks = tuple(args.ks) if args.ks is not None else (_QUICK_KS if args.quick else (1, 3))
    if not ks[0] < ks[1]:
        raise SystemExit(f"error: --ks needs K_LO < K_HI, got {ks[0]} {ks[1]}")

    def log(message: str) -> None:
        if not args.quiet:
            print(
                f"[paper-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
            )

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="No loggers specified")
    results = estimate(
        args.benchmarks,
        args.methods,
        device=device,
        fraction=fraction,
        ks=(ks[0], ks[1]),
        backbone=args.backbone,
        clock=clock,
        log=log,
    )
    minimum = minimum_epochs()
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if clock == "cpu" else "wall time",
        "backbone_description": backbone_description(args.backbone, "paper", CIFAR100_SHAPE),
        "fraction": fraction,
        "per_class_train": _per_class(CIFAR100_TRAIN_PER_CLASS, fraction),
        "per_class_test": _per_class(CIFAR100_TEST_PER_CLASS, fraction),
        "ks": list(ks),
        "assume_epochs": args.assume_epochs,
        "minimum_epochs": minimum,
        "seeds": args.n_seeds,
    }
    text = render(results, meta, args.assume_epochs, args.n_seeds, minimum)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        payload = {
            "meta": meta,
            "results": results,
            "projections": projections(results, args.assume_epochs, args.n_seeds, minimum),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


def _run_main(args: argparse.Namespace) -> int:
    # Absolute: the commands run from the repository root.
    data_root = (args.data_root or default_data_root()).expanduser().resolve()
    problem = cifar100_problem(data_root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print(
                "error: no GPU (CUDA is not available here). The paper-scale runs take days "
                "on a CPU (benchmarks/results/paper-scale-estimate-cpu.md); pass --allow-cpu "
                "to run them on the CPU anyway.",
                file=sys.stderr,
            )
            return 2
        device = "cpu"
    elif not device.startswith("cuda"):
        print(f"error: --device {device!r}: the paper-scale runs use cuda", file=sys.stderr)
        return 2
    commands = run_commands(
        data_root, device, args.benchmarks, args.methods, args.seeds, args.results_dir
    )
    for argv in commands:
        print("python -m benchmarks " + shlex.join(argv), flush=True)
        if args.dry_run:
            continue
        done = subprocess.run([sys.executable, "-m", "benchmarks", *argv], cwd=REPO_ROOT)
        if done.returncode != 0:
            return done.returncode
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.paper_scale``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.paper_scale", *argv])
    if args.command == "estimate":
        return _estimate_main(args, command)
    return _run_main(args)


if __name__ == "__main__":
    sys.exit(main())
