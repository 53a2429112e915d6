"""``--scenario class``: global labels, task label 0 everywhere, one growing head, SPG in its
class-incremental mode; end to end on split-digits (8 epochs, naive and spg)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks._class_incremental import (
    SingleHeadNet,
    check_class_methods,
    make_class_backbone,
    make_class_benchmark,
    to_class_incremental,
)
from benchmarks.cli import main
from benchmarks.data import build_stream


def test_class_stream_keeps_global_labels_and_task_label_zero() -> None:
    stream = to_class_incremental(build_stream("split-digits", seed=0))
    for task in stream.tasks:
        assert sorted(set(task.y_train.tolist())) == sorted(task.classes)
        assert sorted(set(task.y_test.tolist())) == sorted(task.classes)
    all_classes = sorted(c for task in stream.tasks for c in task.classes)
    assert all_classes == list(range(10))
    benchmark = make_class_benchmark(stream)
    for exp in benchmark.train_stream:
        assert exp.task_labels == [0]
        assert sorted(exp.classes_in_this_experience) == sorted(
            stream.tasks[exp.current_experience].classes
        )


def test_class_backbone_is_single_incremental_head() -> None:
    from avalanche.models import IncrementalClassifier, MultiHeadClassifier

    model = make_class_backbone("quick", "split-digits", (1, 8, 8), 2)
    assert isinstance(model, SingleHeadNet)
    heads = [m for m in model.modules() if isinstance(m, IncrementalClassifier)]
    assert len(heads) == 1
    assert not any(isinstance(m, MultiHeadClassifier) for m in model.modules())
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 2)


def test_class_scenario_rejects_methods_that_need_task_labels() -> None:
    with pytest.raises(ValueError, match="packnet"):
        check_class_methods(["naive", "packnet"])
    check_class_methods(["naive", "ewc", "lwf", "replay", "spg", "spg+replay", "joint"])
    with pytest.raises(SystemExit):
        main(["--scenario", "class", "--methods", "packnet", "--out", "/nonexistent/x"])


def test_class_training_batches_are_sharded_under_data_parallel_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun each rank trains on its share of every global minibatch, as in the task
    scenario (not on the whole experience, which would double the steps)."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks._class_incremental import ClassTensorDataPlugin

    stream = to_class_incremental(build_stream("split-digits", seed=0))
    task = stream.tasks[1]
    plugin = ClassTensorDataPlugin({1: (task.x_train, task.y_train)}, {})
    dataset = TensorDataset(task.x_train, task.y_train)
    strategy = SimpleNamespace(
        dataloader=DataLoader(dataset),
        adapted_dataset=dataset,
        experience=SimpleNamespace(current_experience=1),
        train_mb_size=16,
    )
    plugin.before_training_exp(strategy)
    assert (strategy.dataloader.rank, strategy.dataloader.world_size) == (0, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    strategy.dataloader = DataLoader(dataset)
    plugin.before_training_exp(strategy)
    batches = strategy.dataloader
    assert (batches.rank, batches.world_size, batches.batch_size) == (1, 2, 16)
    assert len(batches) == -(-len(task.y_train) // 32)  # global minibatches of 2 x 16


@pytest.mark.slow
def test_class_scenario_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "--benchmark",
        "split-digits",
        "--scenario",
        "class",
        "--methods",
        "naive,spg",
        "--seeds",
        "0",
        "--epochs",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--no-plots",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["scenario"] == "class"
    assert "Class-incremental" in (out / "table.md").read_text()
    for method in ("naive", "spg"):
        result = json.loads((out / "runs" / method / "seed0" / "result.json").read_text())
        assert result["scenario"] == "class"
        # One head, grown from the first experience's 2 classes to all 10.
        assert result["head_units"] == 10
        # MLP 64-64-64 plus a single 64 -> 10 head (no per-task heads).
        assert result["n_parameters"] == (64 * 64 + 64) * 2 + 64 * 10 + 10
        matrix = result["matrix"]
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
        for i, row in enumerate(matrix):
            for j, (value, n_test) in enumerate(zip(row, result["stream"]["test_per_task"])):
                # A whole count of task j's test samples...
                assert value * n_test == pytest.approx(round(value * n_test), abs=1e-6)
                # ...and none before its classes were seen: their logits are masked.
                if j > i:
                    assert value == 0.0, (i, j)
            # The task just learned is far above guessing among the 2 (i + 1) classes seen.
            assert row[i] >= 0.75, matrix
    spg = json.loads((out / "runs" / "spg" / "seed0" / "result.json").read_text())
    naive = json.loads((out / "runs" / "naive" / "seed0" / "result.json").read_text())
    # On the first task SPG masks nothing and its pass leaves the model as it found it.
    assert spg["matrix"][0][0] == naive["matrix"][0][0]
    assert spg["hparams"].get("class_incremental") is True
    assert len(spg["spg_capacity_per_task"]) == 5
