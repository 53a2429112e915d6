"""Timing the pieces of a paper-protocol run on synthetic C-10 / C-20 streams: :func:`estimate`."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.catalog import BENCHMARKS
from benchmarks.paper_scale.projection import MethodTiming
from benchmarks.paper_scale.sizes import (
    CIFAR100_TEST_PER_CLASS,
    CIFAR100_TRAIN_PER_CLASS,
    FULL_SIZES,
    PAPER_BENCHMARKS,
    PAPER_METHODS,
    per_class,
    stream_sizes,
    synthetic_cifar100,
)


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
    hparams = method_hparams(method, benchmark, protocol=protocol.name)
    strategy = build_strategy(method, ctx, hparams)
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
    per_class_train = per_class(CIFAR100_TRAIN_PER_CLASS, fraction)
    per_class_test = per_class(CIFAR100_TEST_PER_CLASS, fraction)
    images = synthetic_cifar100(per_class_train, per_class_test)
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
