"""The ``report`` step: tables and plots of a run directory, made only from its files.

``python -m benchmarks report RUN_DIR`` (also run at the end of every benchmark invocation)
reads ``RUN_DIR/config.json`` and every ``RUN_DIR/runs/<method>/seed<k>/result.json`` and
writes:

* ``summary.json`` — per method: mean and std over seeds of ACC, BWT, forgetting, times, the
  mean accuracy matrix and ACC-after-each-task curve, and the seeds used;
* ``results.csv`` — one line per run (method, seed, ACC, BWT, forgetting, times);
* ``summary.csv`` — one line per method (means and standard deviations);
* ``matrices.csv`` — every run's accuracy matrix, one line per entry;
* ``table.md`` — the Markdown table (built from ``summary.csv``), with the exact command that
  produced the directory at its top;
* ``plots/acc_after_each_task.png`` and ``plots/matrix_<method>.png`` (one accuracy-matrix
  heatmap per method, mean over seeds), unless plotting is off or matplotlib is missing.

Accuracies are fractions in the files and percentages in the table; standard deviations are
sample standard deviations over seeds (``ddof=1``). A run that *diverged* (:func:`diverged`: it
ended with non-finite parameters, or one of its tasks never reached a finite validation loss)
stays in the mean, and its table cell says so, e.g. ``50.0 ± 0.0 (1 of 1 diverged)``: a method
at chance because it blew up is not the same result as a method that learned nothing.

``python -m benchmarks compare RUN_DIR... [--out FILE]`` puts the ACC and BWT of several run
directories side by side (:func:`compare_table`; the page with its command and links:
:func:`write_compare_page`).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._io import read_json, write_json
from benchmarks._markdown import table
from benchmarks.metrics import mean_std

__all__ = [
    "collect_results",
    "diverged",
    "summarize",
    "write_report",
    "markdown_table",
    "compare_table",
    "write_compare_page",
]

_CSV_FIELDS = (
    "method",
    "seed",
    "acc",
    "bwt",
    "forgetting",
    "train_seconds",
    "importance_seconds",
    "eval_seconds",
)
_METRICS = ("acc", "bwt", "forgetting", "train_seconds", "importance_seconds", "eval_seconds")


def collect_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's ``result.json`` under ``run_dir/runs`` (sorted by method, seed)."""
    results = [read_json(p) for p in sorted((run_dir / "runs").glob("*/seed*/result.json"))]
    return sorted(results, key=lambda r: (r["method"], int(r["seed"])))


def diverged(result: dict[str, Any]) -> bool:
    """Whether a run's training blew up: it ended with non-finite parameters
    (``non_finite_parameters``, recorded by the runner), or, under the paper protocol, some
    task never reached a finite validation loss (its ``schedule`` entry; that task kept the
    weights it started from, or, in runs older than that fallback, ended non-finite)."""
    never_finite = any(
        not math.isfinite(float(task.get("best_valid_loss", 0.0)))
        for task in result.get("schedule") or []
    )
    return bool(result.get("non_finite_parameters", False)) or never_finite


def _method_order(config: dict[str, Any], methods: Sequence[str]) -> list[str]:
    preferred = [m for m in config.get("methods", []) if m in methods]
    return preferred + sorted(m for m in methods if m not in preferred)


def summarize(results: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std over seeds per method, and the mean matrices and curves."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    methods: dict[str, Any] = {}
    for method in _method_order(config, list(by_method)):
        runs = by_method[method]
        entry: dict[str, Any] = {
            "seeds": [int(r["seed"]) for r in runs],
            "n_runs": len(runs),
            "n_diverged": sum(diverged(r) for r in runs),
        }
        for metric in _METRICS:
            mean, std = mean_std(r.get(metric) for r in runs)
            entry[metric] = {"mean": mean, "std": std}
        matrices = [r["matrix"] for r in runs]
        shape = (len(matrices[0]), len(matrices[0][0]))
        if all((len(m), len(m[0])) == shape for m in matrices):
            entry["matrix_mean"] = [
                [statistics.fmean(m[i][j] for m in matrices) for j in range(shape[1])]
                for i in range(shape[0])
            ]
        curves = [r["acc_curve"] for r in runs]
        if len({len(c) for c in curves}) == 1:
            entry["acc_curve_mean"] = [statistics.fmean(vals) for vals in zip(*curves)]
        for key, values in _per_task_series(runs).items():
            entry[key] = values
        entry["hparams"] = runs[0].get("hparams", {})
        methods[method] = entry
    return {
        "benchmark": config.get("benchmark"),
        "protocol": config.get("protocol"),
        "settings": config.get("settings", {}),
        "commands": config.get("commands", []),
        "methods": methods,
    }


def _per_task_series(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-task means over seeds of what the runs recorded per task: the epochs each task
    trained (paper protocol), SPG's mean importance and head scale after each task."""
    series: dict[str, list[list[float]]] = {}
    for run in runs:
        if run.get("epochs_per_task"):
            series.setdefault("epochs_per_task_mean", []).append(run["epochs_per_task"])
        capacity = run.get("spg_capacity_per_task")
        if capacity:
            series.setdefault("importance_mean_per_task", []).append([c["mean"] for c in capacity])
            series.setdefault("head_scale_per_task", []).append([c["head_scale"] for c in capacity])
    return {
        key: [statistics.fmean(values) for values in zip(*lists)]
        for key, lists in series.items()
        if len(lists) == len(runs) and len({len(v) for v in lists}) == 1
    }


def _fmt(stat: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text


def _read_summary_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cell(row: dict[str, str], metric: str, scale: float, digits: int) -> str:
    mean, std = row.get(f"{metric}_mean", ""), row.get(f"{metric}_std", "")
    if mean == "":
        return "—"
    text = f"{float(mean) * scale:.{digits}f}"
    if std != "":
        text += f" ± {float(std) * scale:.{digits}f}"
    n_diverged = int(row.get("n_diverged") or 0)
    if metric == "acc" and n_diverged:
        text += f" ({n_diverged} of {row['n_runs']} diverged)"
    return text


def markdown_table(run_dir: Path) -> str:
    """The Markdown table of ``run_dir``, from its ``summary.csv`` and ``config.json``."""
    config = read_json(run_dir / "config.json")
    rows = _read_summary_csv(run_dir / "summary.csv")
    settings = config.get("settings", {})
    commands = config.get("commands", [])
    lines = [f"# {config.get('benchmark')} — {config.get('protocol')} protocol", ""]
    lines.append("Produced by" + (":" if len(commands) < 2 else " (in this order):"))
    lines.append("")
    lines.append("```bash")
    lines.extend(commands or ["(unknown command)"])
    lines.append("```")
    lines.append("")
    details = [
        f"{settings.get('n_tasks', '?')} tasks",
        f"{settings.get('epochs')} epochs per task"
        if config.get("protocol") == "quick"
        else f"at most {settings.get('epochs')} epochs per task (early stopping)",
        f"{'Adam' if settings.get('optimizer') == 'adam' else 'SGD'} lr {settings.get('lr')}",
        f"batch {settings.get('batch_size')}",
        f"backbone {settings.get('backbone', '?')}",
    ]
    if settings.get("max_train_per_task"):
        details.append(f"at most {settings['max_train_per_task']} training samples per task")
    if settings.get("max_test_per_task"):
        details.append(f"at most {settings['max_test_per_task']} test samples per task")
    if settings.get("train_fraction"):
        details.append(f"{settings['train_fraction']:g} of each task's training data")
    scenario = (
        "Class-incremental (no task label at test time; global labels, one growing head)"
        if settings.get("scenario") == "class"
        else "Task-incremental (task label given at test time)"
    )
    lines.append(
        scenario
        + "; "
        + ", ".join(details)
        + ". Mean ± std over seeds (sample std); accuracies in %. ACC: mean final accuracy "
        "over tasks; BWT: mean change of a task's accuracy from right after learning it to the "
        "end; forgetting: mean drop from a task's best to its final accuracy; (k of n diverged): "
        "k runs blew up to non-finite values (parameters at the end, or a task whose "
        "validation loss was never finite; kept in the mean). Times in seconds "
        "per run (training includes the end-of-task passes such as SPG's importance)."
    )
    lines.append("")
    lines += table(
        (
            "method",
            "seeds",
            "ACC (%)",
            "BWT (%)",
            "forgetting (%)",
            "train time (s)",
            "importance time (s)",
        ),
        (
            (
                row["method"],
                row["n_runs"],
                _cell(row, "acc", 100, 2),
                _cell(row, "bwt", 100, 2),
                _cell(row, "forgetting", 100, 2),
                _cell(row, "train_seconds", 1, 1),
                _cell(row, "importance_seconds", 1, 1),
            )
            for row in rows
        ),
    )
    lines.append("")
    plots = run_dir / "plots"
    if (plots / "acc_after_each_task.png").is_file():
        lines.append("![ACC after each task](plots/acc_after_each_task.png)")
        lines.append("")
        for name, caption in (
            ("epochs_per_task.png", "Epochs each task trained"),
            ("spg_capacity.png", "SPG's mean importance and head scale after each task"),
        ):
            if (plots / name).is_file():
                lines.append(f"![{caption}](plots/{name})")
                lines.append("")
        heatmaps = sorted(plots.glob("matrix_*.png"))
        if heatmaps:
            lines.append(
                "Accuracy matrices (mean over seeds): "
                + ", ".join(f"[{p.stem[len('matrix_') :]}](plots/{p.name})" for p in heatmaps)
            )
            lines.append("")
    lines.append("Per-run numbers: `results.csv`, `matrices.csv`; per method: `summary.csv`,")
    lines.append("`summary.json`; raw runs: `runs/<method>/seed<k>/result.json`.")
    lines.append("")
    return "\n".join(lines)


def _write_csvs(run_dir: Path, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    def blank(v: Any) -> Any:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v

    with open(run_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_CSV_FIELDS)
        for r in results:
            writer.writerow([blank(r.get(f)) for f in _CSV_FIELDS])
    with open(run_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["method", "n_runs", "seeds", "n_diverged"]
        for metric in _METRICS:
            header += [f"{metric}_mean", f"{metric}_std"]
        writer.writerow(header)
        for method, entry in summary["methods"].items():
            line: list[Any] = [
                method,
                entry["n_runs"],
                " ".join(map(str, entry["seeds"])),
                entry["n_diverged"],
            ]
            for metric in _METRICS:
                line += [blank(entry[metric]["mean"]), blank(entry[metric]["std"])]
            writer.writerow(line)
    with open(run_dir / "matrices.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "seed", "after_task", "task", "accuracy"])
        for r in results:
            matrix = r["matrix"]
            n_tasks = len(matrix[0])
            for i, row in enumerate(matrix):
                after = i if len(matrix) == n_tasks else n_tasks - 1
                for j, value in enumerate(row):
                    writer.writerow([r["method"], r["seed"], after, j, value])


def _plot(run_dir: Path, summary: dict[str, Any]) -> list[Path]:
    try:
        # A Figure of its own with the Agg canvas: no pyplot state, and the process-wide
        # backend (a notebook's, a GUI's) is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # plots are optional
        return []

    def new_figure(size: tuple[float, float]) -> tuple[Any, Any]:
        fig = Figure(figsize=size, dpi=110)
        FigureCanvasAgg(fig)
        return fig, fig.subplots()

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for old in plots.glob("matrix_*.png"):
        old.unlink()
    written = []
    methods = summary["methods"]
    title = f"{summary['benchmark']} ({summary['protocol']})"

    fig, ax = new_figure((6.4, 4.2))
    for method, entry in methods.items():
        curve = entry.get("acc_curve_mean")
        if not curve:
            continue
        n_tasks = len(entry.get("matrix_mean", [[0]])[0])
        if len(curve) == 1:  # joint: only the final accuracy
            ax.axhline(curve[0] * 100, linestyle="--", color="0.4", linewidth=1)
            ax.annotate(f"{method}", (n_tasks, curve[0] * 100), fontsize=7, va="bottom")
            continue
        ax.plot(range(1, len(curve) + 1), [c * 100 for c in curve], marker="o", ms=3, label=method)
    ax.set_xlabel("tasks learned")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean accuracy on tasks seen so far (%)")
    ax.set_title(f"ACC after each task — {title}")
    written.append(_save_line_plot(fig, ax, plots / "acc_after_each_task.png", legend_columns=2))

    written += _per_task_plots(plots, methods, title, new_figure)

    for method, entry in methods.items():
        matrix = entry.get("matrix_mean")
        if not matrix:
            continue
        n_rows, n_cols = len(matrix), len(matrix[0])
        fig, ax = new_figure((1.2 + 0.45 * n_cols, 1.0 + 0.45 * n_rows))
        image = ax.imshow(
            [[v * 100 for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis"
        )
        if n_cols <= 12:
            for i in range(n_rows):
                for j in range(n_cols):
                    ax.text(
                        j,
                        i,
                        f"{matrix[i][j] * 100:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if matrix[i][j] < 0.6 else "black",
                    )
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after learning task i" if n_rows > 1 else "after joint training")
        ax.set_xticks(range(n_cols))
        ax.set_yticks(range(n_rows))
        if n_rows == 1:
            ax.set_yticklabels(["all"])
        ax.set_title(f"{method}: R[i][j] (%)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = plots / f"matrix_{method.replace('+', '_')}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _save_line_plot(fig: Any, ax: Any, path: Path, legend_columns: int) -> Path:
    """The common finish of the suite's line plots: grid, legend, tight layout, written to
    ``path`` (returned)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _per_task_plots(
    plots: Path, methods: dict[str, Any], title: str, new_figure: Any
) -> list[Path]:
    """``epochs_per_task.png`` (when tasks trained to convergence) and ``spg_capacity.png``
    (when an SPG method ran): one line per method, mean over seeds."""
    from matplotlib.ticker import MaxNLocator

    written = []
    for old in ("epochs_per_task.png", "spg_capacity.png"):
        if (plots / old).is_file():
            (plots / old).unlink()
    with_epochs = {
        m: e["epochs_per_task_mean"] for m, e in methods.items() if e.get("epochs_per_task_mean")
    }
    if with_epochs and any(len(v) > 1 for v in with_epochs.values()):
        fig, ax = new_figure((6.4, 4.0))
        for method, epochs in with_epochs.items():
            if len(epochs) > 1:  # joint trains once
                ax.plot(range(1, len(epochs) + 1), epochs, marker="o", ms=3, label=method)
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("epochs until early stopping")
        ax.set_title(f"Epochs per task — {title}", fontsize=9)
        written.append(_save_line_plot(fig, ax, plots / "epochs_per_task.png", legend_columns=2))
    spg = {m: e for m, e in methods.items() if e.get("importance_mean_per_task")}
    if spg:
        fig, ax = new_figure((6.4, 4.0))
        for index, (method, entry) in enumerate(spg.items()):
            color = f"C{index}"
            tasks = range(1, len(entry["importance_mean_per_task"]) + 1)
            ax.plot(
                tasks,
                entry["importance_mean_per_task"],
                marker="o",
                ms=3,
                color=color,
                label=f"{method}: mean importance",
            )
            ax.plot(
                tasks,
                entry["head_scale_per_task"],
                marker="s",
                ms=3,
                linestyle="--",
                color=color,
                label=f"{method}: head scale",
            )
        ax.set_xlabel("tasks learned")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean importance A / head-gradient scale")
        ax.set_title(f"How full the network gets — {title}", fontsize=9)
        written.append(_save_line_plot(fig, ax, plots / "spg_capacity.png", legend_columns=1))
    return written


def write_report(run_dir: Path, plots: bool = True) -> str:
    """(Re)write every report file of ``run_dir`` from its results; return the Markdown table."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a benchmark run directory (no config.json)")
    config = read_json(config_path)
    results = collect_results(run_dir)
    if not results:
        raise FileNotFoundError(f"{run_dir} has no finished runs (runs/*/seed*/result.json)")
    summary = summarize(results, config)
    write_json(run_dir / "summary.json", summary)
    _write_csvs(run_dir, results, summary)
    if plots:
        _plot(run_dir, summary)
    table = markdown_table(run_dir)
    (run_dir / "table.md").write_text(table)
    return table


def compare_table(run_dirs: Sequence[Path]) -> str:
    """One Markdown table of ACC and BWT (mean ± std, %) per method across run directories,
    read from their ``summary.csv`` and ``config.json`` (run ``report`` on them first)."""
    columns: list[tuple[str, dict[str, dict[str, str]], int]] = []
    methods: list[str] = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        config = read_json(run_dir / "config.json")
        rows = {row["method"]: row for row in _read_summary_csv(run_dir / "summary.csv")}
        settings = config.get("settings", {})
        label = f"{config.get('benchmark')}"
        if config.get("protocol") != "quick":
            label += f" ({config.get('protocol')})"
        seeds = sorted({int(s) for row in rows.values() for s in row["seeds"].split()})
        label += f", {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
        if settings.get("epochs") and config.get("protocol") == "quick":
            label += f", {settings['epochs']} ep."
        if settings.get("max_train_per_task"):
            label += f", ≤{settings['max_train_per_task']} train/task"
        columns.append((label, rows, len(seeds)))
        methods += [m for m in rows if m not in methods]
    header = ["method"]
    for label, _, _ in columns:
        header += [f"{label}: ACC", "BWT"]
    body = []
    for method in methods:
        cells = [method]
        for _, rows, n_seeds in columns:
            row = rows.get(method)
            if row is None:
                cells += ["", ""]
            else:
                acc = _cell(row, "acc", 100, 1)
                n_runs = int(row["n_runs"])
                if n_runs != n_seeds:
                    # The column's seed count is the union over methods: say when a row has fewer.
                    acc += f" [{n_runs} seed{'s' if n_runs != 1 else ''}]"
                cells += [acc, _cell(row, "bwt", 100, 1)]
        body.append(cells)
    return "\n".join(table(header, body)) + "\n"


def _variant(settings: dict[str, Any]) -> str:
    """What sets a directory apart from the protocol's defaults, in words."""
    parts = []
    for method, values in sorted(settings.get("hparam_overrides", {}).items()):
        parts += [f"{method}.{name}={value}" for name, value in sorted(values.items())]
    if settings.get("optimizer"):
        parts.append(f"optimizer {settings['optimizer']} (lr {settings.get('lr')})")
    if settings.get("max_train_per_task"):
        parts.append(f"≤{settings['max_train_per_task']} train/task")
    if settings.get("max_test_per_task"):
        parts.append(f"≤{settings['max_test_per_task']} test/task")
    if settings.get("task_norm_stats"):
        parts.append("per-task normalisation statistics")
    return ", ".join(parts) or "defaults"


def compare_rows(run_dirs: Sequence[Path]) -> str:
    """One Markdown row per (run directory, method): benchmark, backbone, variant (the settings that
    differ from the defaults), seeds, ACC, BWT (mean ± std, %), the mean number of epochs per
    task, and SPG's mean importance and head scale after the last task (means over seeds)."""
    body = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        config = read_json(run_dir / "config.json")
        settings = config.get("settings", {})
        summary = read_json(run_dir / "summary.json")["methods"]
        rows = {row["method"]: row for row in _read_summary_csv(run_dir / "summary.csv")}
        for method, row in rows.items():
            entry = summary.get(method, {})
            epochs = entry.get("epochs_per_task_mean")
            importance = entry.get("importance_mean_per_task")
            scale = entry.get("head_scale_per_task")
            body.append(
                (
                    f"{config.get('benchmark')} ({config.get('protocol')})",
                    settings.get("backbone", "?"),
                    method,
                    _variant(settings),
                    row["n_runs"],
                    _cell(row, "acc", 100, 1),
                    _cell(row, "bwt", 100, 1),
                    f"{statistics.fmean(epochs):.0f}" if epochs else "—",
                    f"{importance[-1]:.3f}" if importance else "—",
                    f"{scale[-1]:.3f}" if scale else "—",
                )
            )
    header = (
        "benchmark",
        "backbone",
        "method",
        "variant",
        "seeds",
        "ACC (%)",
        "BWT (%)",
        "epochs/task",
        "final mean A",
        "final head scale",
    )
    return "\n".join(table(header, body)) + "\n"


def write_compare_page(path: Path, table: str, run_dirs: Sequence[Path], command: str) -> None:
    """Write ``table`` (from :func:`compare_table`) to ``path`` as a Markdown page: the
    ``command`` that made it, then the table, then a link to each run directory's ``table.md``
    (relative to ``path``)."""
    links = ", ".join(
        f"[{d.name}]({Path(os.path.relpath(d, path.parent)).as_posix()}/table.md)" for d in run_dirs
    )
    path.write_text(
        "# Benchmark results\n\n"
        "ACC and BWT in % (mean ± std over seeds), task-incremental. Produced by:\n\n"
        f"```bash\n{command}\n```\n\n"
        f"{table}\n"
        f"Each column's exact run command, settings, times and plots: {links}.\n"
    )
