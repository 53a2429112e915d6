"""End to end: ``python -m benchmarks`` on split-digits (8 epochs, 2 methods, 1 seed) in a
temporary run directory; the output files exist and are consistent, and the Markdown table is
produced from them (``python -m benchmarks report`` after editing a result file)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8  # enough for every task to be learned (a fraction of a second per task)


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("smoke") / "run"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--benchmark",
        "split-digits",
        "--methods",
        "naive,spg",
        "--seeds",
        "0",
        "--epochs",
        str(EPOCHS),
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.mark.slow
def test_cli_writes_every_output_file(
    run_dir: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = run_dir
    for name in (
        "config.json",
        "summary.json",
        "summary.csv",
        "results.csv",
        "matrices.csv",
        "table.md",
        "plots/acc_after_each_task.png",
        "plots/matrix_naive.png",
        "plots/matrix_spg.png",
        "runs/naive/seed0/result.json",
        "runs/spg/seed0/result.json",
    ):
        assert (out / name).is_file(), name
    # A finished run leaves no checkpoint behind.
    assert not list(out.glob("runs/*/seed0/checkpoint.pkl"))
    # The table is printed and written.
    table = (out / "table.md").read_text()
    assert "| naive | 1 |" in table and "| spg | 1 |" in table
    assert table.strip() in proc.stdout


@pytest.mark.slow
def test_result_files_hold_a_consistent_accuracy_matrix(
    run_dir: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = run_dir
    for method in ("naive", "spg"):
        result = json.loads((out / "runs" / method / "seed0" / "result.json").read_text())
        matrix = result["matrix"]
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
        # R[i][j]: the share of task j's test samples classified correctly, a whole count.
        for row in matrix:
            for value, n_test in zip(row, result["stream"]["test_per_task"], strict=True):
                assert value * n_test == pytest.approx(round(value * n_test), abs=1e-6)
        # Every task is learned: far above the 50 % of guessing between its two classes.
        assert all(matrix[t][t] >= 0.75 for t in range(5)), matrix
        assert result["acc"] == pytest.approx(sum(matrix[-1]) / 5)
        assert result["bwt"] == pytest.approx(
            sum(matrix[4][t] - matrix[t][t] for t in range(4)) / 4
        )
        assert result["protocol"]["epochs"] == EPOCHS
    spg = json.loads((out / "runs/spg/seed0/result.json").read_text())
    naive = json.loads((out / "runs/naive/seed0/result.json").read_text())
    # On the first task SPG masks nothing (A = 0, head scale 1) and its importance pass leaves
    # the model as it found it: the same seed gives Naive's model, hence its accuracy.
    assert spg["matrix"][0][0] == naive["matrix"][0][0]
    # Per-task timings add up to the totals; SPG's importance pass runs inside training (at the
    # end of each task), so it takes part of each task's training time; Naive has no pass.
    for result in (spg, naive):
        for kind in ("train", "importance"):
            per_task = result[f"{kind}_seconds_per_task"]
            assert len(per_task) == 5
            assert sum(per_task) == pytest.approx(result[f"{kind}_seconds"])
    assert all(
        0 < t_pass < t_train
        for t_pass, t_train in zip(
            spg["importance_seconds_per_task"], spg["train_seconds_per_task"], strict=True
        )
    )
    assert naive["importance_seconds_per_task"] == [0.0] * 5
    # SPG's protected share is recorded after every task; importance only ever grows.
    means = [c["mean"] for c in spg["spg_capacity_per_task"]]
    assert len(means) == 5 and all(0 < m < 1 for m in means)
    assert means == sorted(means)
    assert spg["spg_capacity_per_task"][-1]["head_scale"] == pytest.approx(1 - means[-1], abs=1e-4)
    assert "spg_capacity_per_task" not in naive
    with open(out / "results.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["spg"]["acc"]) == pytest.approx(spg["acc"])
    with open(out / "matrices.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 25


@pytest.mark.slow
def test_the_table_starts_with_the_exact_command(
    run_dir: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = run_dir
    table = (out / "table.md").read_text()
    command = json.loads((out / "config.json").read_text())["commands"][0]
    assert command.startswith("python -m benchmarks --benchmark split-digits --methods naive,spg")
    assert table.index(command) < table.index("| method |")


@pytest.mark.slow
def test_report_rebuilds_the_table_from_the_files(
    run_dir: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run_dir
    path = out / "runs" / "naive" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["acc"] = 0.1234
    path.write_text(json.dumps(result))
    assert main(["report", str(out), "--no-plots"]) == 0
    table = (out / "table.md").read_text()
    assert "| naive | 1 | 12.34 ± 0.00 |" in table
    assert table.strip() in capsys.readouterr().out
    with open(out / "summary.csv", newline="") as fh:
        naive = next(r for r in csv.DictReader(fh) if r["method"] == "naive")
    assert float(naive["acc_mean"]) == pytest.approx(0.1234)


@pytest.mark.slow
def test_compare_puts_run_directories_side_by_side(
    run_dir: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = run_dir
    target = tmp_path / "results.md"
    assert main(["compare", str(out), str(out), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    with open(out / "summary.csv", newline="") as fh:
        spg = next(r for r in csv.DictReader(fh) if r["method"] == "spg")
    cell = f"{float(spg['acc_mean']) * 100:.1f} ± 0.0"
    assert printed.count(cell) == 2  # the same run directory, twice
    written = target.read_text()
    assert printed in written and "python -m benchmarks compare" in written


def test_a_run_that_blows_up_is_recorded_and_flagged(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["--benchmark", "split-digits", "--methods", "naive", "--epochs", "1", "--no-plots"]
    assert main([*base, "--lr", "1e12", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "runs" / "naive" / "seed0" / "result.json").read_text())
    assert result["non_finite_parameters"] is True
    assert "(1 of 1 diverged)" in (out / "table.md").read_text()
    sane = tmp_path / "sane"
    assert main([*base, "--quiet", "--out", str(sane)]) == 0
    result = json.loads((sane / "runs" / "naive" / "seed0" / "result.json").read_text())
    assert result["non_finite_parameters"] is False
    assert "diverged)" not in (sane / "table.md").read_text().split("|---|")[1]
