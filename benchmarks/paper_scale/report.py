"""The Markdown report of :func:`benchmarks.paper_scale.estimate`'s results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks._markdown import table
from benchmarks.catalog import BENCHMARKS
from benchmarks.paper_scale.projection import projections


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
        "`benchmarks/paper_scale/__init__.py`; `benchmarks/README.md`, section Paper scale (GPU).",
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
