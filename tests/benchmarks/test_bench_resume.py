"""Resumable run directories: a second invocation skips the finished (method, seed) runs, and a
run killed after a task resumes from its checkpoint and ends with exactly the accuracy matrix of
an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks._io import run_paths
from benchmarks.cli import main
from benchmarks.data import build_stream
from benchmarks.protocols import protocol_settings
from benchmarks.runner import RunSpec, run_one

SMALL = ["--benchmark", "split-digits", "--epochs", "2", "--max-train-per-task", "60"]


class _Killed(Exception):
    """Stands for the process being killed."""


def _kill_after(task: int):  # noqa: ANN202 - a log callback
    def log(message: str) -> None:
        if f"task {task}/" in message:
            raise _Killed(message)

    return log


def test_a_second_invocation_skips_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = [*SMALL, "--no-progress", "--no-plots", "--out", str(out), "--seeds", "0"]
    assert main([*args, "--methods", "naive"]) == 0
    first = run_paths(out, "naive", 0)["result"]
    before = first.read_bytes()
    capsys.readouterr()

    assert main([*args, "--methods", "naive,spg"]) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) to do, 1 already finished" in printed
    assert "run 1/1: spg, seed 0" in printed and "naive, seed 0:" not in printed
    assert first.read_bytes() == before  # untouched
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == ["naive", "spg"]
    assert len(config["commands"]) == 2
    assert "| naive |" in printed and "| spg |" in printed  # the table covers both

    capsys.readouterr()
    assert main([*args, "--methods", "naive,spg"]) == 0
    assert "0 run(s) to do, 2 already finished" in capsys.readouterr().out


def test_a_directory_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*SMALL, "--no-progress", "--no-plots", "--out", str(out), "--methods", "naive"]
    assert main(args) == 0
    with pytest.raises(SystemExit, match="differ in: epochs"):
        main([*args[:2], "--epochs", "3", *args[4:]])


@pytest.mark.parametrize("method", ["naive", "spg", "packnet"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, method: str) -> None:
    stream = build_stream("split-digits", seed=0, max_train_per_task=60)
    spec = RunSpec(
        benchmark="split-digits",
        method=method,
        seed=0,
        protocol=protocol_settings("quick", source="digits", epochs=2),
        hparams={"post_prune_epochs": 1} if method == "packnet" else {},
        device="cpu",
        progress=False,
    )
    reference = run_one(spec, stream, tmp_path / "straight", log=lambda _: None)

    out = tmp_path / "killed"
    with pytest.raises(_Killed):
        run_one(spec, stream, out, log=_kill_after(3))
    paths = run_paths(out, method, 0)
    assert paths["checkpoint"].is_file() and not paths["result"].is_file()
    progress = json.loads(paths["progress"].read_text())
    # One list per field, one entry per finished task (SPG's capacity only where SPG ran).
    assert list(progress) == [
        "rows",
        "train_seconds",
        "importance_seconds",
        "spg_capacity",
        "eval_seconds",
    ]
    assert progress["rows"] == reference["matrix"][:2]
    assert len(progress["spg_capacity"]) == (2 if method == "spg" else 0)
    assert all(len(progress[k]) == 2 for k in ("train_seconds", "importance_seconds"))
    assert len(progress["eval_seconds"]) == 2

    messages: list[str] = []
    resumed = run_one(spec, stream, out, log=messages.append)
    assert any("resumed after task 2/5" in m for m in messages)
    assert resumed["resumed_from_task"] == 2
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["acc"] == reference["acc"] and resumed["bwt"] == reference["bwt"]
    # The result describes the trained model (loaded from the checkpoint, with every task's
    # head), not the fresh one built before loading it.
    assert resumed["n_parameters"] == reference["n_parameters"]
    assert resumed.get("spg_capacity_per_task") == reference.get("spg_capacity_per_task")
    assert len(resumed["train_seconds_per_task"]) == 5
    assert not paths["checkpoint"].exists() and not paths["progress"].exists()


def test_a_progress_file_without_checkpoint_starts_over(tmp_path: Path) -> None:
    stream = build_stream("split-digits", seed=0, max_train_per_task=60)
    spec = RunSpec(
        "split-digits", "naive", 0, protocol_settings("quick", epochs=1), {}, "cpu", progress=False
    )
    paths = run_paths(tmp_path, "naive", 0)
    paths["dir"].mkdir(parents=True)
    paths["progress"].write_text(json.dumps({"rows": [[0.0] * 5]}))
    result = run_one(spec, stream, tmp_path, log=lambda _: None)
    assert result["resumed_from_task"] == 0 and len(result["matrix"]) == 5
