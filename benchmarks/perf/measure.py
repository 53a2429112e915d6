"""The four measurements of ``python -m benchmarks.perf``; each returns rows of plain numbers.

(a) :func:`measure_iteration` — a training iteration of Naive with and without ``SPGPlugin``;
(b) :func:`measure_importance_pass` — the importance pass after task ``k``, per method;
(c) :func:`measure_memory` — the memory the plugin holds between experiences;
(d) :func:`measure_subset` — ``importance_max_samples`` against the whole experience.

Compared variants always run interleaved and repeated within one call, so that their ratios do
not depend on what else the machine does at the time.
"""

from __future__ import annotations

import copy
import functools
import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.perf.setup import (
    MODELS,
    PARTS,
    PerfSizes,
    TensorDataset,
    adapt_heads,
    bootstrap_median_interval,
    digits_stream,
    input_shape,
    log_progress,
    make_model,
    median,
    naive,
    now,
    preload_importance,
    probe_class,
    sync,
    synthetic_stream,
)

__all__ = [
    "measure_iteration",
    "measure_importance_pass",
    "held_memory",
    "measure_memory",
    "measure_subset",
    "collect",
]


# -------------------------------------------------------------------- (a) training iteration
def _iteration_variant(
    variant: str, name: str, sizes: PerfSizes, stream: Any, device: torch.device
) -> dict[str, Any]:
    """One strategy of the comparison with its probes: a time probe around every training
    iteration, and two ``before_update`` probes just before and after SPGPlugin (or nothing)."""
    from avalanche_spg import SPGPlugin

    probe_cls = probe_class()
    model = make_model(name, sizes, dropout=True)
    adapt_heads(model, stream, 1, device)
    probe = probe_cls(device, "before_training_iteration", "after_training_iteration")
    pre, post = probe_cls(device, "before_update"), probe_cls(device, "before_update")
    plugins: list[Any] = [probe, pre]
    if variant == "spg":
        # importance_max_samples=1 keeps the after-experience pass (not timed here) cheap.
        plugin = SPGPlugin(importance_max_samples=1)
        preload_importance(plugin, model, 1)
        plugins.append(plugin)
    plugins.append(post)
    return {
        "strategy": naive(model, plugins, sizes.batch, device),
        "probe": probe,
        "pre": pre,
        "post": post,
        "steady": [],
        "start": [],
        "faults_steady": [],
        "faults_start": [],
        "mask": [],
    }


def _train_round(info: dict[str, Any], experience: Any, warmup: int, record: bool) -> None:
    """Train one epoch and, if ``record``, append its per-iteration medians to ``info``."""
    for probe in (info["probe"], info["pre"], info["post"]):
        for stamps in probe.stamps.values():
            stamps.clear()
    info["probe"].faults = []
    info["strategy"].train(experience)
    if not record:
        return
    begin = info["probe"].stamps["before_training_iteration"]
    end = info["probe"].stamps["after_training_iteration"]
    times = [b - a for a, b in zip(begin, end)]
    faults = info["probe"].faults
    info["start"].append(median(times[:warmup]))
    info["steady"].append(median(times[warmup:]))
    info["faults_start"].append(median(faults[:warmup]))
    info["faults_steady"].append(median(faults[warmup:]))
    pre = info["pre"].stamps["before_update"]
    post = info["post"].stamps["before_update"]
    info["mask"].extend(b - a for a, b in zip(pre[warmup:], post[warmup:]))


def measure_iteration(name: str, sizes: PerfSizes, device: torch.device) -> dict[str, Any]:
    """Per-iteration time of Naive vs Naive + SPGPlugin on the second experience.

    Every round trains one epoch of ``iters_per_round`` iterations with each strategy (ABBA
    order). Its first ``warmup`` iterations are reported apart ("experience start"): at the
    start of an experience SPG has just run the importance pass and built its factors, and on
    CPU the C allocator then returns and re-faults memory for some iterations (counted as
    minor page faults) before it settles; the rest is the steady state.
    """
    stream = synthetic_stream(
        input_shape(name, sizes), 2, sizes.batch * sizes.iters_per_round
    ).train_stream
    variants = {v: _iteration_variant(v, name, sizes, stream, device) for v in ("naive", "spg")}
    order = ["naive", "spg"]
    for round_index in range(sizes.rounds + 1):  # round 0 warms up and is dropped
        for variant in order if round_index % 2 == 0 else order[::-1]:
            _train_round(variants[variant], stream[1], sizes.warmup, record=round_index > 0)
    naive_run, spg = variants["naive"], variants["spg"]
    ratios = [s / n for s, n in zip(spg["steady"], naive_run["steady"])]
    start_ratios = [s / n for s, n in zip(spg["start"], naive_run["start"])]
    low, high = bootstrap_median_interval(ratios)
    naive_iter = median(naive_run["steady"])
    spg_mask = median(spg["mask"])
    naive_probe_gap = median(naive_run["mask"])
    model = naive_run["strategy"].model
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "naive_ms": naive_iter * 1e3,
        "spg_ms": median(spg["steady"]) * 1e3,
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_ci_low": low,
        "ratio_ci_high": high,
        "start_ratio": median(start_ratios),
        "naive_faults": median(naive_run["faults_steady"]),
        "spg_faults": median(spg["faults_steady"]),
        "naive_faults_start": median(naive_run["faults_start"]),
        "spg_faults_start": median(spg["faults_start"]),
        "mask_ms": spg_mask * 1e3,
        "probe_ms": naive_probe_gap * 1e3,
        "mask_fraction": (spg_mask - naive_probe_gap) / naive_iter,
        "rounds": len(ratios),
        "iterations": sizes.iters_per_round - sizes.warmup,
        "warmup": sizes.warmup,
    }


# ------------------------------------------------------------------------ (b) importance pass
def _pass_variants(
    model: nn.Module,
    dataset: Any,
    features: dict[str, nn.Parameter],
    k: int,
    sizes: PerfSizes,
    device: torch.device,
    vectorized: bool,
) -> dict[str, Callable[[], dict[str, Tensor]]]:
    """The importance passes compared after task ``k``, each as a call without arguments."""
    from avalanche_spg.importance_pass import compute_gamma

    def run_pass(
        method: str, vectorize: bool = False, pass_batch_size: int | None = None
    ) -> dict[str, Tensor]:
        return compute_gamma(
            model,
            dataset,
            features,
            [k],
            list(range(k)),
            device=device,
            reference_batch_size=sizes.batch,
            method=method,  # type: ignore[arg-type]
            vectorize_heads=vectorize,
            pass_batch_size=pass_batch_size,
        )

    variants: dict[str, Callable[[], dict[str, Tensor]]] = {
        "reference": functools.partial(run_pass, "reference"),
        "fast": functools.partial(run_pass, "fast"),
    }
    if k == max(sizes.pass_ks) and k > 0:
        # at the largest k only, two alternatives to the default fast pass: the fast pass at
        # the reference batch size (bit for bit the loop on CPU), and the vectorised heads
        variants[f"fast_batch_{sizes.batch}"] = functools.partial(
            run_pass, "fast", pass_batch_size=sizes.batch
        )
        if vectorized:
            variants["fast_vectorized"] = functools.partial(run_pass, "fast", True)
    return variants


def _max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


def measure_importance_pass(
    name: str, sizes: PerfSizes, device: torch.device, *, vectorized: bool = True
) -> list[dict[str, Any]]:
    """Importance-pass time after task k, reference vs fast, vs one training epoch."""
    from avalanche_spg import SPGPlugin

    probe_cls = probe_class()
    per_task = sizes.pass_samples[name]
    stream = digits_stream(input_shape(name, sizes), sizes.n_tasks, per_task).train_stream
    rows = []
    for k in sizes.pass_ks:
        model = make_model(name, sizes, dropout=False)  # no dropout: the methods must agree
        adapt_heads(model, stream, k, device)
        plugin = SPGPlugin(importance_max_samples=1)
        preload_importance(plugin, model, k)
        probe = probe_cls(device, "before_training_epoch", "after_training_epoch")
        strategy = naive(model, [plugin, probe], sizes.batch, device)
        features, _ = plugin.split_parameters(model)
        dataset = stream[k].dataset.train()
        variants = _pass_variants(model, dataset, features, k, sizes, device, vectorized)
        times: dict[str, list[float]] = {v: [] for v in ["epoch", *variants]}
        max_diff = {v: 0.0 for v in variants if v != "reference"}
        for repeat in range(sizes.pass_repeats):
            for stamps in probe.stamps.values():
                stamps.clear()
            strategy.train(stream[k])  # changes the weights: passes below share the new ones
            begin, end = probe.stamps["before_training_epoch"], probe.stamps["after_training_epoch"]
            times["epoch"].append(end[0] - begin[0])
            names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
            results = {}
            for variant in names:
                sync(device)
                started = now()
                results[variant] = variants[variant]()
                sync(device)
                times[variant].append(now() - started)
            for variant in max_diff:
                diff = _max_abs_diff(results[variant], results["reference"])
                max_diff[variant] = max(max_diff[variant], diff)
        epoch = median(times["epoch"])
        row: dict[str, Any] = {
            "model": name,
            "k": k,
            "heads": k + 1,
            "samples": per_task,
            "epoch_s": epoch,
        }
        for variant in variants:
            row[f"{variant}_s"] = median(times[variant])
            row[f"{variant}_per_epoch"] = median(times[variant]) / epoch
        for variant, diff in max_diff.items():
            # paired: each repeat runs the reference and the variant back to back
            speedups = [r / v for r, v in zip(times["reference"], times[variant])]
            low, high = bootstrap_median_interval(speedups)
            row[f"{variant}_speedup"] = median(speedups)
            row[f"{variant}_speedup_low"] = low
            row[f"{variant}_speedup_high"] = high
            row[f"{variant}_max_diff"] = diff
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- (c) memory
def held_memory(root: Any, model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors reachable from ``root``'s attributes (each storage counted once).

    Storages of ``model``'s own parameters and buffers are counted apart (``param_refs``: they
    are not extra memory); modules, optimizers, strategies and callables are not followed.
    ``python_objects`` counts the other Python objects reached (lists, ints, ...), to show
    that nothing grows with the number of tasks.
    """
    from avalanche.training.templates import BaseTemplate

    model_storages = {
        t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
    }
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    param_refs = 0
    python_objects = 0
    python_bytes = 0
    stack: list[Any] = [vars(root)]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in model_storages:
                param_refs += 1
            else:
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            continue
        if isinstance(obj, (nn.Module, torch.optim.Optimizer, BaseTemplate, type)) or callable(obj):
            continue
        python_objects += 1
        python_bytes += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return {
        "tensor_bytes": sum(storages.values()),
        "tensors": len(storages),
        "param_refs": param_refs,
        "python_objects": python_objects,
        "python_bytes": python_bytes,
    }


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(name: str, sizes: PerfSizes, device: torch.device) -> list[dict[str, Any]]:
    """Memory the plugin holds between experiences along a stream."""
    from avalanche_spg import SPGPlugin

    n_tasks = max(sizes.memory_after)
    stream = synthetic_stream(input_shape(name, sizes), n_tasks, sizes.memory_samples).train_stream
    model = make_model(name, sizes, dropout=True)
    plugin = SPGPlugin()
    strategy = naive(model, [plugin], sizes.batch, device)
    rows = []
    for index, experience in enumerate(stream):
        strategy.train(experience)
        if index + 1 not in sizes.memory_after:
            continue
        gc.collect()
        held = held_memory(plugin, model)
        features, _ = plugin.split_parameters(model)
        rows.append(
            {
                "model": name,
                "tasks": index + 1,
                "param_bytes": _nbytes(model.parameters()),
                "feature_bytes": _nbytes(features.values()),
                "importance_bytes": _nbytes(plugin.importance.values()),
                **held,
            }
        )
    return rows


# ------------------------------------------------------------------ (d) importance_max_samples
def _digits_stream_for_subsets(n_tasks: int) -> Any:
    """The first ``n_tasks`` experiences of 5 two-class tasks of scikit-learn's digits."""
    from avalanche.benchmarks import nc_benchmark
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return nc_benchmark(
        TensorDataset(x[:1400], y[:1400]),
        TensorDataset(x[1400:], y[1400:]),
        n_experiences=5,
        task_labels=True,
        class_ids_from_zero_in_each_exp=True,
        seed=0,
    ).train_stream[:n_tasks]


def _subset_size(fraction: float, total: int) -> int | None:
    return None if fraction == 1.0 else max(1, round(fraction * total))


def measure_subset(sizes: PerfSizes, device: torch.device) -> list[dict[str, Any]]:
    """Importance after the last task of a digits stream: whole experience vs random subsets."""
    from avalanche_spg import SPGPlugin
    from avalanche_spg.models import MultiHeadMLP

    probe_cls = probe_class()
    stream = _digits_stream_for_subsets(sizes.subset_tasks)
    torch.manual_seed(0)
    base = MultiHeadMLP(64, (64, 64))
    plugin = SPGPlugin()
    strategy = naive(base, [plugin], 16, device)
    strategy.optimizer.param_groups[0]["lr"] = 0.1
    for experience in stream[:-1]:
        strategy.train(experience)
    state = plugin.state_dict()
    last = stream[-1]
    total = len(last.dataset)
    results: dict[float, tuple[dict[str, Tensor], float]] = {}
    for fraction in (1.0, *sizes.subset_fractions):
        model = copy.deepcopy(base)
        run_plugin = SPGPlugin(importance_max_samples=_subset_size(fraction, total))
        run_plugin.load_state_dict(state)
        pre, post = probe_cls(device, "after_training_exp"), probe_cls(device, "after_training_exp")
        run = naive(model, [pre, run_plugin, post], 16, device)
        run.optimizer.param_groups[0]["lr"] = 0.1
        torch.manual_seed(1)  # the same training of the last task in every run
        run.train(last)
        seconds = post.stamps["after_training_exp"][0] - pre.stamps["after_training_exp"][0]
        results[fraction] = (run_plugin.importance, seconds)
    full, full_seconds = results[1.0]
    flat_full = torch.cat([v.flatten().cpu() for v in full.values()])
    rows = []
    for fraction, (importance, seconds) in results.items():
        flat = torch.cat([importance[n].flatten().cpu() for n in full])
        diff = (flat - flat_full).abs()
        rows.append(
            {
                "fraction": fraction,
                "samples": _subset_size(fraction, total) or total,
                "pass_s": seconds,
                "time_ratio": seconds / full_seconds,
                "mean_abs_diff": float(diff.mean()),
                "max_abs_diff": float(diff.max()),
                "frac_diff_gt_0_1": float((diff > 0.1).float().mean()),
                "head_scale": 1.0 - float(flat.double().mean()),
                "head_scale_full": 1.0 - float(flat_full.double().mean()),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------- all
def collect(
    sizes: PerfSizes,
    device: torch.device,
    parts: Sequence[str] = PARTS,
    models: Sequence[str] = MODELS,
    *,
    vectorized: bool = True,
    log: Callable[[str], None] = log_progress,
) -> dict[str, Any]:
    """Run the chosen measurements; ``{part: rows}`` as :func:`benchmarks.perf.report.render`
    takes them."""
    results: dict[str, Any] = {}
    if "iteration" in parts:
        results["iteration"] = []
        for model in models:
            log(f"(a) training iteration, {model}")
            results["iteration"].append(measure_iteration(model, sizes, device))
    if "importance" in parts:
        results["importance"] = []
        for model in models:
            log(f"(b) importance pass, {model}")
            results["importance"] += measure_importance_pass(
                model, sizes, device, vectorized=vectorized
            )
    if "memory" in parts:
        results["memory"] = []
        for model in models:
            log(f"(c) memory, {model}")
            results["memory"] += measure_memory(model, sizes, device)
    if "subset" in parts:
        log("(d) importance_max_samples")
        results["subset"] = measure_subset(sizes, device)
    return results
