"""The report step on a hand-made run directory: the Markdown tables (one table helper for every
report) and the plots, drawn without touching matplotlib's process-wide backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks._markdown import table
from benchmarks.report import compare_table, write_report

# Two tasks, two seeds: ACC = mean of the last row, BWT = R[1][0] - R[0][0].
MATRICES = {0: [[0.9, 0.5], [0.7, 0.8]], 1: [[0.8, 0.5], [0.8, 0.6]]}


def _run_dir(root: Path) -> Path:
    config = {
        "benchmark": "toy",
        "protocol": "quick",
        "methods": ["naive"],
        "commands": ["python -m benchmarks --benchmark toy"],
        "settings": {"n_tasks": 2, "epochs": 1, "lr": 0.1, "batch_size": 8},
    }
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    for seed, matrix in MATRICES.items():
        folder = root / "runs" / "naive" / f"seed{seed}"
        folder.mkdir(parents=True)
        result = {
            "method": "naive",
            "seed": seed,
            "matrix": matrix,
            "acc": sum(matrix[-1]) / 2,
            "bwt": matrix[1][0] - matrix[0][0],
            "forgetting": matrix[0][0] - matrix[1][0],
            "acc_curve": [matrix[0][0], sum(matrix[1]) / 2],
            "train_seconds": 1.0 + seed,
            "importance_seconds": 0.0,
            "eval_seconds": 0.5,
        }
        (folder / "result.json").write_text(json.dumps(result))
    return root


def test_markdown_table_lines_and_alignment() -> None:
    assert table(("a", "b"), [(1, "x"), ("", 2.5)], align="lr") == [
        "| a | b |",
        "|---|---:|",
        "| 1 | x |",
        "|  | 2.5 |",
    ]
    assert table(("a",), [])[1] == "|---|"
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        table(("a", "b"), [(1, 2, 3)])
    with pytest.raises(ValueError, match="'lc'"):
        table(("a", "b"), [], align="lc")


def test_report_tables_hold_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run")
    text = write_report(run_dir, plots=False)
    # ACC per seed: 0.75 and 0.7 -> 72.50 ± 3.54 (sample std 0.05 / sqrt(2)); BWT -0.2 and 0.0.
    row = "| naive | 2 | 72.50 ± 3.54 | -10.00 ± 14.14 | 10.00 ± 14.14 | 1.5 ± 0.7 | 0.0 ± 0.0 |"
    lines = text.splitlines()
    header = lines.index(
        "| method | seeds | ACC (%) | BWT (%) | forgetting (%) | train time (s) "
        "| importance time (s) |"
    )
    assert lines[header + 1 : header + 3] == ["|---|---|---|---|---|---|---|", row]
    assert (run_dir / "table.md").read_text() == text
    summary = json.loads((run_dir / "summary.json").read_text())["methods"]["naive"]
    for got, expected in zip(summary["matrix_mean"], [[0.85, 0.5], [0.75, 0.7]], strict=True):
        assert got == pytest.approx(expected)
    assert compare_table([run_dir]).splitlines() == [
        "| method | toy, 2 seeds, 1 ep.: ACC | BWT |",
        "|---|---|---|",
        "| naive | 72.5 ± 3.5 | -10.0 ± 14.1 |",
    ]


def test_plots_leave_the_process_wide_backend_alone(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a user's choice, which is not Agg
    try:
        run_dir = _run_dir(tmp_path / "run")
        write_report(run_dir, plots=True)
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    for name in ("acc_after_each_task.png", "matrix_naive.png"):
        assert (run_dir / "plots" / name).read_bytes().startswith(b"\x89PNG"), name
    assert (
        "![ACC after each task](plots/acc_after_each_task.png)"
        in (run_dir / "table.md").read_text()
    )


def test_per_task_series_are_seed_means_and_get_their_plots(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run")
    epochs = {0: [30, 50], 1: [40, 70]}
    capacity = {0: [0.2, 0.5], 1: [0.4, 0.7]}
    for seed in MATRICES:
        path = run_dir / "runs" / "naive" / f"seed{seed}" / "result.json"
        result = json.loads(path.read_text())
        result["epochs_per_task"] = epochs[seed]
        result["spg_capacity_per_task"] = [
            {"mean": m, "above_0.5": 0.0, "above_0.9": 0.0, "head_scale": 1 - m}
            for m in capacity[seed]
        ]
        path.write_text(json.dumps(result))
    text = write_report(run_dir)
    entry = json.loads((run_dir / "summary.json").read_text())["methods"]["naive"]
    assert entry["epochs_per_task_mean"] == [35, 60]
    assert entry["importance_mean_per_task"] == pytest.approx([0.3, 0.6])
    assert entry["head_scale_per_task"] == pytest.approx([0.7, 0.4])
    for name in ("epochs_per_task.png", "spg_capacity.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
        assert f"(plots/{name})" in text


def test_compare_rows_names_each_directorys_variant(tmp_path: Path) -> None:
    from benchmarks.report import compare_rows

    plain = _run_dir(tmp_path / "plain")
    variant = _run_dir(tmp_path / "variant")
    config = json.loads((variant / "config.json").read_text())
    config["settings"].update(
        hparam_overrides={"spg": {"head_rule": "none"}}, optimizer="adam", lr=0.001
    )
    (variant / "config.json").write_text(json.dumps(config))
    for run_dir in (plain, variant):
        write_report(run_dir, plots=False)
    lines = compare_rows([plain, variant]).splitlines()
    assert len(lines) == 4  # header, rule, one row per directory
    assert "| toy (quick) | ? | naive | defaults | 2 |" in lines[2]
    assert "spg.head_rule=none, optimizer adam (lr 0.001)" in lines[3]
    # ACC 0.75 and 0.7 (mean 72.5, std 3.5); BWT -0.2 and 0.0 (mean -10.0, std 14.1)
    assert "| 72.5 ± 3.5 | -10.0 ± 14.1 | — | — | — |" in lines[2]


def test_a_diverged_run_is_flagged_in_every_table(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run")
    seed1 = run_dir / "runs" / "naive" / "seed1" / "result.json"
    result = json.loads(seed1.read_text())
    result["non_finite_parameters"] = True
    seed1.write_text(json.dumps(result))
    write_report(run_dir, plots=False)
    # The run stays in the mean (ACC of the two seeds: 0.75 and 0.7), and the cell says so.
    assert "| naive | 2 | 72.50 ± 3.54 (1 of 2 diverged) |" in (run_dir / "table.md").read_text()
    assert "72.5 ± 3.5 (1 of 2 diverged)" in compare_table([run_dir])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["methods"]["naive"]["n_diverged"] == 1
    result["non_finite_parameters"] = False
    seed1.write_text(json.dumps(result))
    write_report(run_dir, plots=False)
    assert "| naive | 2 | 72.50 ± 3.54 |" in (run_dir / "table.md").read_text()


def test_run_diverged_if_its_parameters_or_a_tasks_validation_loss_went_non_finite() -> None:
    from benchmarks.report import diverged

    finite = {"epochs": 44, "best_epoch": 9, "best_valid_loss": 0.009}
    never_finite = {"epochs": 35, "best_epoch": -1, "best_valid_loss": float("inf")}
    assert diverged({"schedule": [finite, never_finite]})
    assert not diverged({"schedule": [finite, finite]})
    assert not diverged({})  # quick protocol, no record: not flagged
    # JSON keeps inf as Infinity.
    assert diverged(json.loads(json.dumps({"schedule": [never_finite]})))
    # Since the fallback to the task's starting weights a blown-up task leaves finite
    # parameters behind: the schedule still says the run diverged.
    assert diverged({"schedule": [finite, never_finite], "non_finite_parameters": False})
    assert diverged({"schedule": [finite, finite], "non_finite_parameters": True})
    assert not diverged({"schedule": [finite, finite], "non_finite_parameters": False})


def test_compare_says_when_a_row_has_fewer_seeds_than_its_column(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run")
    folder = run_dir / "runs" / "spg" / "seed0"
    folder.mkdir(parents=True)
    seed0 = json.loads((run_dir / "runs" / "naive" / "seed0" / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps(dict(seed0, method="spg")))
    write_report(run_dir, plots=False)
    text = compare_table([run_dir])
    assert "toy, 2 seeds, 1 ep.: ACC" in text
    assert "| naive | 72.5 ± 3.5 |" in text  # both seeds: no note
    assert "| spg | 75.0 ± 0.0 [1 seed] |" in text
    # Each column is judged by its own seeds: a 1-seed column next to it marks nothing.
    single = _run_dir(tmp_path / "single")
    for path in (single / "runs" / "naive" / "seed1").iterdir():
        path.unlink()
    (single / "runs" / "naive" / "seed1").rmdir()
    write_report(single, plots=False)
    text = compare_table([single, run_dir])
    assert "| naive | 75.0 ± 0.0 | -20.0 ± 0.0 | 72.5 ± 3.5 |" in text
    assert "| spg |  |  | 75.0 ± 0.0 [1 seed] |" in text
