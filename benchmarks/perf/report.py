"""The Markdown report of ``python -m benchmarks.perf``, made from the measured rows only.

Column legends and this run's findings are written here; what the figures mean in general
(how they are measured, the C allocator's transient, the ``importance_max_samples`` trade-off)
is commentary in ``benchmarks/README.md`` (section Performance).
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from benchmarks._markdown import table

__all__ = ["render", "targets"]

#: Where the report sends a reader for what its figures mean.
COMMENTARY = "`benchmarks/README.md`, section Performance"


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


# ------------------------------------------------------------------------------------ targets
def _iteration_targets(rows: list[dict[str, Any]], gpu: bool) -> list[tuple[str, str, str, bool]]:
    limit = 0.03 if gpu else 0.05
    out = []
    for r in rows:
        if r["model"] != "alexnet":
            continue
        out.append(
            (
                "mask step, AlexNet-like (in place, `before_update`)",
                f"<= {100 * limit:g} % of a Naive iteration",
                f"{100 * r['mask_fraction']:.2f} %",
                r["mask_fraction"] <= limit,
            )
        )
        out.append(
            (
                "whole SPG iteration, AlexNet-like (end to end)",
                f"<= {100 * limit:g} % over Naive",
                f"{100 * (r['ratio'] - 1):+.1f} % (95 % interval "
                f"{100 * (r['ratio_ci_low'] - 1):+.1f} to {100 * (r['ratio_ci_high'] - 1):+.1f} %)",
                r["ratio"] - 1 <= limit,
            )
        )
    return out


def _importance_targets(rows: list[dict[str, Any]], gpu: bool) -> list[tuple[str, str, str, bool]]:
    if not rows:
        return []
    last = max(r["k"] for r in rows)
    need = 3.0 if gpu else 1.5
    out = [
        (
            f"fast importance pass after task {last}, {r['model']}",
            f">= {need:g}x faster than the per-head loop",
            f"{r['fast_speedup']:.2f}x (95 % interval "
            f"{r['fast_speedup_low']:.2f}-{r['fast_speedup_high']:.2f})",
            r["fast_speedup"] >= need,
        )
        for r in rows
        if r["k"] == last and last > 0
    ]
    worst = max(r["fast_max_diff"] for r in rows)
    out.append(
        (
            "fast = reference importance (no dropout)",
            "max abs diff <= 1e-5",
            f"{worst:.1e}",
            worst <= 1e-5,
        )
    )
    return out


def _memory_targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        constant = len({r["tensor_bytes"] for r in mine}) == 1
        only_importance = all(r["tensor_bytes"] == r["importance_bytes"] for r in mine)
        out.append(
            (
                f"memory held between experiences, {model}",
                "one importance buffer, not growing with tasks",
                f"{mine[-1]['tensor_bytes']:,} B after {mine[-1]['tasks']} tasks "
                f"({mine[-1]['tensor_bytes'] / mine[-1]['param_bytes']:.2f}x the parameters)",
                constant and only_importance,
            )
        )
    return out


def targets(results: dict[str, Any], device: torch.device) -> list[str]:
    """The performance targets, each as measured in this run (no lines when none applies)."""
    gpu = device.type == "cuda"
    rows = [
        *_iteration_targets(results.get("iteration", []), gpu),
        *_importance_targets(results.get("importance", []), gpu),
        *_memory_targets(results.get("memory", [])),
    ]
    if not rows:
        return []
    return [
        "## Targets" + (" on GPU" if gpu else " on CPU"),
        "",
        *table(
            ("target", "wanted", "measured", "met"),
            ((name, wanted, got, "yes" if met else "**no**") for name, wanted, got, met in rows),
        ),
        "",
    ]


# ------------------------------------------------------------------------------------ sections
#: A column: title, cell (``str.format`` of the row's fields), alignment (``l`` or ``r``).
Column = tuple[str, str, str]


def _table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> list[str]:
    return table(
        [title for title, _, _ in columns],
        ([cell.format(**row) for _, cell, _ in columns] for row in rows),
        align="".join(align for _, _, align in columns),
    )


_ITERATION = (
    ("model", "{model}", "l"),
    ("parameters", "{params:,}", "r"),
    ("Naive ms/iter", "{naive_ms:.2f}", "r"),
    ("SPG ms/iter", "{spg_ms:.2f}", "r"),
    ("SPG / Naive", "{ratio:.3f}", "r"),
    ("95 % interval", "{ratio_ci_low:.3f}-{ratio_ci_high:.3f}", "r"),
    ("rounds range", "{ratio_min:.3f}-{ratio_max:.3f}", "r"),
    ("SPG `before_update` ms", "{mask_ms:.3f}", "r"),
    ("mask step / Naive iteration", "{mask_percent:.2f} %", "r"),
)
_ITERATION_START = (
    ("model", "{model}", "l"),
    ("SPG / Naive, first iterations", "{start_ratio:.3f}", "r"),
    (
        "faults Naive / SPG, first iterations",
        "{naive_faults_start:,.0f} / {spg_faults_start:,.0f}",
        "r",
    ),
    ("faults Naive / SPG, steady state", "{naive_faults:,.0f} / {spg_faults:,.0f}", "r"),
)
_IMPORTANCE = (
    ("model", "{model}", "l"),
    ("k", "{k}", "r"),
    ("heads", "{heads}", "r"),
    ("samples", "{samples}", "r"),
    ("epoch s", "{epoch_s:.3f}", "r"),
    ("reference s", "{reference_s:.3f}", "r"),
    ("fast s", "{fast_s:.3f}", "r"),
    ("reference / epoch", "{reference_per_epoch:.2f}", "r"),
    ("fast / epoch", "{fast_per_epoch:.2f}", "r"),
    ("speed-up (ref / fast)", "{fast_speedup:.2f}", "r"),
    ("95 % interval", "{fast_speedup_low:.2f}-{fast_speedup_high:.2f}", "r"),
    ("max abs diff", "{fast_max_diff:.1e}", "r"),
)
#: The alternatives to the default fast pass, one row per variant (``v_*``: its fields).
_IMPORTANCE_VARIANTS = (
    ("model", "{model}", "l"),
    ("k", "{k}", "r"),
    ("variant", "{variant}", "l"),
    ("s", "{v_s:.3f}", "r"),
    ("/ epoch", "{v_per_epoch:.2f}", "r"),
    ("speed-up (ref / variant)", "{v_speedup:.2f}", "r"),
    ("95 % interval", "{v_speedup_low:.2f}-{v_speedup_high:.2f}", "r"),
    ("max abs diff", "{v_max_diff:.1e}", "r"),
)
_MEMORY = (
    ("model", "{model}", "l"),
    ("tasks", "{tasks}", "r"),
    ("plugin tensor bytes", "{tensor_bytes:,}", "r"),
    ("model parameter bytes", "{param_bytes:,}", "r"),
    ("ratio", "{ratio:.3f}", "r"),
    ("importance bytes", "{importance_bytes:,}", "r"),
    ("feature-parameter bytes", "{feature_bytes:,}", "r"),
    ("refs to model tensors", "{param_refs}", "r"),
    ("other Python objects (bytes)", "{python_objects} ({python_bytes:,})", "r"),
)
_SUBSET = (
    ("fraction", "{fraction:g}", "r"),
    ("samples", "{samples}", "r"),
    ("pass s", "{pass_s:.3f}", "r"),
    ("time vs whole", "{time_ratio:.2f}", "r"),
    ("mean abs diff of A", "{mean_abs_diff:.4f}", "r"),
    ("max abs diff of A", "{max_abs_diff:.3f}", "r"),
    ("elements with diff > 0.1", "{diff_percent:.1f} %", "r"),
    ("head scale (whole)", "{head_scale:.4f} ({head_scale_full:.4f})", "r"),
)


def _iteration_section(rows: list[dict[str, Any]], allocator: str) -> list[str]:
    r0 = rows[0]
    transient = any(
        r["spg_faults_start"] > 2 * r["naive_faults_start"] + 100
        or r["spg_faults"] > 2 * r["naive_faults"] + 100
        for r in rows
    )
    if allocator == "steady":
        allocator_note = (
            "This run fixed glibc's malloc thresholds for every variant (`--malloc steady`), so "
            "the table measures the steady state; `--malloc default` shows the transient at the "
            f"start of an experience (see {COMMENTARY})."
        )
    elif transient:
        allocator_note = (
            "This run kept the default allocator, and the fault counts above show the transient "
            f"at the start of an experience (see {COMMENTARY})."
        )
    else:
        allocator_note = "This run kept the default allocator."
    return [
        "## (a) Training iteration, Naive vs Naive + SPGPlugin (masks active)",
        "",
        *_table(_ITERATION, ({**r, "mask_percent": 100 * r["mask_fraction"]} for r in rows)),
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
        *_table(_ITERATION_START, rows),
        "",
        allocator_note,
        "",
    ]


def _importance_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## (b) Importance pass after task k, vs one training epoch on task k",
        "",
        *_table(_IMPORTANCE, rows),
    ]
    variants = [
        {
            "model": r["model"],
            "k": r["k"],
            "variant": variant,
            **{
                "v" + key[len(variant) :]: value
                for key, value in r.items()
                if key.startswith(variant + "_")
            },
        }
        for r in rows
        for variant in (key[: -len("_speedup")] for key in r if key.endswith("_speedup"))
        if variant != "fast"
    ]
    if variants:
        lines += [
            "",
            "Alternatives to the default fast pass, measured in the same runs (interleaved "
            "with the rows above): the fast pass at the reference batch size, `fast_batch_N` "
            "(`compute_gamma(..., pass_batch_size=N)`), and the vectorised head backward "
            "(`vectorize_heads=True`: `is_grads_batched`, one `vmap`-ed backward for all "
            "heads).",
            "",
            *_table(_IMPORTANCE_VARIANTS, variants),
        ]
    return [
        *lines,
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


def _memory_section(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "## (c) Memory held by SPGPlugin between experiences",
        "",
        *_table(_MEMORY, ({**r, "ratio": r["tensor_bytes"] / r["param_bytes"]} for r in rows)),
        "",
        "Every tensor reachable from the plugin's attributes, each storage once; the "
        "model's parameter bytes grow with the tasks (one head each), the plugin's do not.",
        "",
    ]


def _subset_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## (d) `importance_max_samples`: a random subset of the experience",
        "",
        *_table(_SUBSET, ({**r, "diff_percent": 100 * r["frac_diff_gt_0_1"]} for r in rows)),
        "",
        "Accumulated importance A after the last task of a digits stream (MLP 64-64, "
        "trained with SPG), whole experience vs `SPGPlugin(importance_max_samples=N)` on "
        "the same weights and training.",
        "",
    ]
    subsets = [r for r in rows if r["fraction"] < 1.0]
    if subsets:
        smallest = min(subsets, key=lambda r: r["fraction"])
        lines += [
            f"At {smallest['fraction']:g} of the data the pass took "
            f"{smallest['time_ratio']:.2f}x the time of the whole experience, and A moved by "
            f"{smallest['mean_abs_diff']:.4f} on average and at most "
            f"{smallest['max_abs_diff']:.2f}, {100 * smallest['frac_diff_gt_0_1']:.1f} % of "
            f"its elements by more than 0.1 (what the trade-off means: {COMMENTARY}).",
            "",
        ]
    return lines


def render(
    results: dict[str, Any],
    command: str,
    device: torch.device,
    profile: str,
    clock: str,
    allocator: str = "default",
) -> str:
    """The Markdown report of ``results`` (as :func:`benchmarks.perf.measure.collect` returns
    them), with the command that produced them."""
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
        f"How these figures are measured and how to read them: {COMMENTARY}.",
        "",
        *targets(results, device),
    ]
    if "iteration" in results:
        lines += _iteration_section(results["iteration"], allocator)
    if "importance" in results:
        lines += _importance_section(results["importance"])
    if "memory" in results:
        lines += _memory_section(results["memory"])
    if "subset" in results:
        lines += _subset_section(results["subset"])
    return "\n".join(lines)
