"""One run = one (method, seed) on one benchmark: train task by task, evaluate the whole test
stream after every task, record the accuracy matrix, checkpoint, resume.

Files of a run (``<run dir>/runs/<method>/seed<k>/``):

* ``result.json`` — written (atomically) when the run has finished; a run with this file is
  skipped by the next invocation;
* ``progress.json`` — what every finished task recorded (:class:`TaskRecord`: its row of the
  accuracy matrix, its timings, SPG's capacity), one list per field, rewritten after every task;
* ``checkpoint.pkl`` — the whole strategy after the last finished task
  (:func:`avalanche_spg.checkpoint.save_checkpoint`); a killed run resumes from it
  (``maybe_load_checkpoint``) and deletes it when it finishes. An interrupted task restarts
  from its beginning.
"""

from __future__ import annotations

import platform
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

from avalanche_spg.norm_stats import TaskNormStatsPlugin
from benchmarks._io import read_json, run_paths, write_json
from benchmarks.data import TaskStream, make_benchmark
from benchmarks.methods import StrategyContext, build_strategy
from benchmarks.metrics import summarize_matrix
from benchmarks.plugins import PlateauEarlyStopping, ProgressPlugin, TensorDataPlugin
from benchmarks.protocols import Protocol, backbone_description, make_backbone

__all__ = ["RunSpec", "TaskRecord", "run_one", "seed_everything"]

_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task(\d+)/Exp(\d+)$")


@dataclass(frozen=True)
class RunSpec:
    """What one run needs to know (besides the data)."""

    benchmark: str
    method: str
    seed: int
    protocol: Protocol
    hparams: dict[str, Any]
    device: str
    checkpoint: bool = True
    progress: bool = True
    #: Slice minibatches from the tensors (fast) instead of Avalanche's per-sample loaders.
    tensor_data: bool = True
    #: ``"task"`` (task label given) or ``"class"`` (see :mod:`benchmarks._class_incremental`).
    scenario: str = "task"
    #: Processes training this run data-parallel (``torchrun``); each takes an equal share of
    #: every minibatch.
    world_size: int = 1
    #: ``auto``, ``mlp``, ``alexnet`` or ``resnet`` (:func:`benchmarks.protocols.make_backbone`).
    backbone: str = "auto"
    #: Evaluate every task with its own normalisation statistics (``TaskNormStatsPlugin``).
    task_norm_stats: bool = False
    #: ``sgd`` (plain SGD, every protocol's default) or ``adam``.
    optimizer: str = "sgd"


def _make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum, no weight decay, as in the paper) or Adam (torch's defaults)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (Avalanche's RNG manager covers all three)."""
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tensor_parts(
    stream: TaskStream,
) -> tuple[dict[int, tuple[Any, Any]], dict[int, tuple[Any, Any]]]:
    train = {t: (task.x_train, task.y_train) for t, task in enumerate(stream.tasks)}
    test = {t: (task.x_test, task.y_test) for t, task in enumerate(stream.tasks)}
    return train, test


def _accuracy_row(evaluator: Any, n_tasks: int) -> list[float]:
    """Top1_Acc_Exp of every test experience from the last evaluation."""
    row: list[float | None] = [None] * n_tasks
    for key, value in evaluator.get_last_metrics().items():
        match = _ACC_KEY.match(key)
        if match:
            row[int(match.group(2))] = float(value)
    if any(v is None for v in row):
        raise RuntimeError(f"the evaluation did not report every task's accuracy: {row}")
    return [float(v) for v in row]  # type: ignore[arg-type]


def _tensor_plugin(stream: TaskStream, class_incremental: bool) -> TensorDataPlugin:
    if class_incremental:
        from benchmarks._class_incremental import ClassTensorDataPlugin

        return ClassTensorDataPlugin(*_tensor_parts(stream))
    return TensorDataPlugin(*_tensor_parts(stream))


def _find_spg(strategy: Any) -> Any:
    from avalanche_spg import SPGPlugin

    for plugin in strategy.plugins:
        if isinstance(plugin, SPGPlugin):
            return plugin
    return None


class PassMark(SupervisedPlugin):
    """Notes the time of ``after_training_exp``. A pair of them around the SPG plugin times its
    importance pass, which the plugin runs in that callback (plugins run in list order)."""

    def __init__(self) -> None:
        super().__init__()
        self.at = 0.0

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.at = time.perf_counter()


def _time_importance_pass(strategy: Any) -> tuple[PassMark, PassMark] | None:
    """The marks just before and just after the strategy's SPG plugin, inserted on the first
    call (a strategy resumed from a checkpoint has them already); ``None`` without SPG."""
    spg = _find_spg(strategy)
    if spg is None:
        return None
    plugins = strategy.plugins
    index = next(i for i, plugin in enumerate(plugins) if plugin is spg)
    if 0 < index < len(plugins) - 1:
        before, after = plugins[index - 1], plugins[index + 1]
        if isinstance(before, PassMark) and isinstance(after, PassMark):
            return before, after
    before, after = PassMark(), PassMark()
    plugins.insert(index + 1, after)
    plugins.insert(index, before)
    return before, after


def _capacity(spg: Any) -> dict[str, float]:
    """How much of the feature extractor SPG protects: mean importance, the share of
    parameters above 0.5 and 0.9, and the head-gradient scale ``1 - mean(A)``."""
    importance = [v.cpu() for v in spg.importance.values()]  # float64 sums on any device
    total = sum(v.numel() for v in importance)
    if total == 0:
        return {"mean": 0.0, "above_0.5": 0.0, "above_0.9": 0.0, "head_scale": 1.0}
    return {
        "mean": float(sum(float(v.double().sum()) for v in importance) / total),
        "above_0.5": float(sum(int((v > 0.5).sum()) for v in importance) / total),
        "above_0.9": float(sum(int((v > 0.9).sum()) for v in importance) / total),
        "head_scale": float(spg.head_scale),
    }


def _environment() -> dict[str, Any]:
    import avalanche
    import torch.distributed as dist

    import avalanche_spg

    distributed = dist.is_available() and dist.is_initialized()
    return {
        "world_size": dist.get_world_size() if distributed else 1,
        "backend": dist.get_backend() if distributed else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", "?"),
        "avalanche_spg": avalanche_spg.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


@dataclass
class TaskRecord:
    """What the runner records after each task it trains (joint training: one record)."""

    #: Row of the accuracy matrix: the accuracy on every task's test set after this task.
    accuracy: list[float]
    #: Seconds of ``strategy.train`` on the task, end-of-task passes included.
    train_seconds: float
    #: Seconds of SPG's importance pass at the end of the task (0 without SPG).
    importance_seconds: float
    #: Seconds of the evaluation on the whole test stream.
    eval_seconds: float
    #: How much of the network SPG protects after the task (:func:`_capacity`); ``None``
    #: without SPG.
    spg_capacity: dict[str, float] | None = None


def _progress_content(records: list[TaskRecord]) -> dict[str, Any]:
    """The content of ``progress.json``: one list per field, one entry per finished task
    (``spg_capacity`` only for the tasks that recorded one)."""
    return {
        "rows": [r.accuracy for r in records],
        "train_seconds": [r.train_seconds for r in records],
        "importance_seconds": [r.importance_seconds for r in records],
        "spg_capacity": [r.spg_capacity for r in records if r.spg_capacity is not None],
        "eval_seconds": [r.eval_seconds for r in records],
    }


def _records_from_progress(saved: dict[str, Any], n_records: int) -> list[TaskRecord]:
    """The first ``n_records`` records of a ``progress.json`` content."""
    capacity = saved.get("spg_capacity", [])
    return [
        TaskRecord(
            accuracy=saved["rows"][k],
            train_seconds=saved["train_seconds"][k],
            importance_seconds=saved["importance_seconds"][k],
            eval_seconds=saved["eval_seconds"][k],
            spg_capacity=capacity[k] if k < len(capacity) else None,
        )
        for k in range(n_records)
    ]


def _build_model(spec: RunSpec, stream: TaskStream) -> torch.nn.Module:
    """The run's backbone: one head per task, or one growing head (class scenario)."""
    name = spec.protocol.name
    if spec.scenario == "class":
        from benchmarks._class_incremental import make_class_backbone

        return make_class_backbone(
            name, spec.benchmark, stream.input_shape, stream.max_classes, spec.backbone
        )
    return make_backbone(
        name, spec.benchmark, stream.input_shape, stream.max_classes, spec.backbone
    )


def _build_strategy(spec: RunSpec, stream: TaskStream, model: torch.nn.Module) -> Any:
    """The method's strategy around ``model``, with the suite's plugins: the paper protocol's
    schedule first; per-task normalisation statistics, tensor minibatches, progress and
    distributed support last."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_spg.distributed import DistributedSupportPlugin, per_rank_batch_size

    protocol = spec.protocol
    first_plugins: list[Any] = []
    if protocol.plateau:
        validation = {
            t: (task.x_valid, task.y_valid)
            for t, task in enumerate(stream.tasks)
            if task.x_valid is not None and task.y_valid is not None
        }
        first_plugins.append(
            PlateauEarlyStopping(
                validation,
                lr=protocol.lr,
                batch_size=protocol.eval_batch_size,
                joint=spec.method == "joint",
            )
        )
    with warnings.catch_warnings():
        # The suite reads the metrics itself and logs one line per task.
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    ctx = StrategyContext(
        model=model,
        make_optimizer=lambda m: _make_optimizer(spec.optimizer, m, protocol.lr),
        train_mb_size=per_rank_batch_size(protocol.batch_size, spec.world_size),
        train_epochs=protocol.epochs,
        eval_mb_size=protocol.eval_batch_size,
        device=spec.device,
        evaluator=evaluator,
        n_tasks=stream.n_tasks,
        source=stream.description["source"],
        first_plugins=first_plugins,
        last_plugins=[
            *([TaskNormStatsPlugin()] if spec.task_norm_stats else []),
            *([_tensor_plugin(stream, spec.scenario == "class")] if spec.tensor_data else []),
            ProgressPlugin(f"{spec.method} seed {spec.seed}", stream.n_tasks, spec.progress),
            # DDP wrap / re-wrap and whole-stream evaluation under torchrun; a no-op in one
            # process (kept so that every checkpoint carries it).
            DistributedSupportPlugin(),
        ],
    )
    strategy = build_strategy(spec.method, ctx, spec.hparams)
    _time_importance_pass(strategy)
    return strategy


def _resume(
    strategy: Any, spec: RunSpec, stream: TaskStream, paths: dict[str, Path]
) -> tuple[Any, list[TaskRecord], torch.nn.Module]:
    """Load the run's checkpoint into ``strategy`` and the records of its finished tasks from
    ``progress.json``; reattach what a checkpoint does not carry (tensors, hooks, timers).

    :return: the strategy, the records, and the loaded backbone (what :func:`_build_model` had
        built, trained up to the checkpoint).
    """
    from avalanche_spg.checkpoint import maybe_load_checkpoint
    from avalanche_spg.distributed import add_distributed_support

    strategy, start = maybe_load_checkpoint(strategy, paths["checkpoint"], map_location=spec.device)
    model = strategy.model  # saved without the DDP wrapper
    add_distributed_support(strategy)
    _time_importance_pass(strategy)
    saved = read_json(paths["progress"]) if paths["progress"].is_file() else {}
    if len(saved.get("rows", [])) < start:
        raise RuntimeError(
            f"{paths['progress']} has fewer rows than the checkpoint has tasks ({start}); "
            f"delete {paths['dir']} to restart this run"
        )
    for plugin in strategy.plugins:
        if isinstance(plugin, TensorDataPlugin):
            plugin.attach(*_tensor_parts(stream))
    if spec.method == "packnet":
        from benchmarks._packnet import restore_packnet_hooks

        restore_packnet_hooks(strategy.model)
        model = model.wrappee  # the backbone inside TaskLabelPackNetModel
    return strategy, _records_from_progress(saved, start), model


def _train_task(strategy: Any, train_data: Any, test_stream: Any, n_tasks: int) -> TaskRecord:
    """Train on ``train_data`` (one experience, or the whole stream for joint training), then
    evaluate on every task's test set."""
    started = time.perf_counter()
    strategy.train(train_data, eval_streams=[])
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    strategy.eval(test_stream)
    accuracy = _accuracy_row(strategy.evaluator, n_tasks)
    eval_seconds = time.perf_counter() - started
    marks = _time_importance_pass(strategy)
    spg = _find_spg(strategy)
    return TaskRecord(
        accuracy=accuracy,
        train_seconds=train_seconds,
        importance_seconds=marks[1].at - marks[0].at if marks else 0.0,
        eval_seconds=eval_seconds,
        spg_capacity=_capacity(spg) if spg is not None else None,
    )


def _result(
    spec: RunSpec,
    stream: TaskStream,
    strategy: Any,
    model: torch.nn.Module,
    records: list[TaskRecord],
    start: int,
    command: str,
) -> dict[str, Any]:
    """The content of the run's ``result.json``."""
    rows = [r.accuracy for r in records]
    train_seconds = [r.train_seconds for r in records]
    importance_seconds = [r.importance_seconds for r in records]
    capacity = [r.spg_capacity for r in records if r.spg_capacity is not None]
    protocol = spec.protocol
    result: dict[str, Any] = {
        "benchmark": spec.benchmark,
        "method": spec.method,
        "seed": spec.seed,
        "protocol": asdict(protocol),
        "hparams": spec.hparams,
        "n_tasks": stream.n_tasks,
        "matrix": rows,
        **summarize_matrix(rows),
        "train_seconds": float(sum(train_seconds)),
        "importance_seconds": float(sum(importance_seconds)),
        "eval_seconds": float(sum(r.eval_seconds for r in records)),
        "train_seconds_per_task": train_seconds,
        "importance_seconds_per_task": importance_seconds,
        "resumed_from_task": start,
        "stream": stream.description,
        "model": type(model).__name__,
        "backbone": backbone_description(spec.backbone, protocol.name, stream.input_shape),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        # The run blew up (NaN or infinite weights at the end): the report flags it.
        "non_finite_parameters": not all(bool(p.isfinite().all()) for p in model.parameters()),
        "device": str(spec.device),
        "environment": _environment(),
        "command": command,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if capacity:
        result["spg_capacity_per_task"] = capacity
    if spec.scenario == "class":
        result["scenario"] = "class"
        result["head_units"] = int(model.classifier.classifier.out_features)  # type: ignore[union-attr,arg-type]
    plateau = next((p for p in strategy.plugins if isinstance(p, PlateauEarlyStopping)), None)
    if plateau is not None:
        result["epochs_per_task"] = [h["epochs"] for h in plateau.history]
        result["schedule"] = plateau.history
    return result


def run_one(
    spec: RunSpec,
    stream: TaskStream,
    out: Path,
    log: Callable[[str], None] = print,
    command: str = "",
) -> dict[str, Any]:
    """Run ``spec`` on ``stream``, resuming from a checkpoint in ``out`` if there is one.

    :return: the content of the run's ``result.json``.
    """
    from avalanche_spg.checkpoint import save_checkpoint
    from avalanche_spg.distributed import broadcast_from_main, is_main_process, unwrapped_model

    main = is_main_process()  # only rank 0 writes files
    paths = run_paths(out, spec.method, spec.seed)
    if main:
        paths["dir"].mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    n_tasks = stream.n_tasks
    label = f"{spec.method} seed {spec.seed}"
    model = _build_model(spec, stream)
    strategy = _build_strategy(spec, stream, model)
    if spec.scenario == "class":
        from benchmarks._class_incremental import make_class_benchmark

        benchmark = make_class_benchmark(stream)
    else:
        benchmark = make_benchmark(stream)

    records: list[TaskRecord] = []
    joint = spec.method == "joint"
    resume = broadcast_from_main(spec.checkpoint and not joint and paths["checkpoint"].is_file())
    if resume:
        # The loaded backbone replaces the fresh one: its heads (added task by task) and its
        # size are those the result reports.
        strategy, records, model = _resume(strategy, spec, stream, paths)
        log(f"[{label}] resumed after task {len(records)}/{n_tasks} from {paths['checkpoint']}")
    elif main and paths["progress"].is_file():
        paths["progress"].unlink()  # stale progress without a checkpoint: start over
    start = len(records)

    if joint:
        record = _train_task(strategy, benchmark.train_stream, benchmark.test_stream, n_tasks)
        records.append(record)
        log(
            f"[{label}] joint training done: ACC {np.mean(record.accuracy):.4f} "
            f"({record.train_seconds:.1f}s)"
        )
    else:
        for index in range(start, n_tasks):
            record = _train_task(
                strategy, benchmark.train_stream[index], benchmark.test_stream, n_tasks
            )
            records.append(record)
            log(
                f"[{label}] task {index + 1}/{n_tasks}: acc on this task "
                f"{record.accuracy[index]:.4f}, mean on seen tasks "
                f"{np.mean(record.accuracy[: index + 1]):.4f} "
                f"(train {record.train_seconds:.1f}s, eval {record.eval_seconds:.1f}s)"
            )
            if spec.checkpoint and index + 1 < n_tasks and main:
                write_json(paths["progress"], _progress_content(records))
                # Without the DDP wrapper: the checkpoint resumes in one process or in N.
                with unwrapped_model(strategy):
                    save_checkpoint(strategy, paths["checkpoint"])

    result = _result(spec, stream, strategy, model, records, start, command)
    if main:
        write_json(paths["result"], result)
        for name in ("checkpoint", "progress"):
            if paths[name].is_file():
                paths[name].unlink()
    return result
