"""The run directory of ``python -m benchmarks``: the settings that determine the results, their
hash (which names the default directory), ``config.json``, and which runs are left to do.

A directory holds the runs of one set of settings: a command with other settings is refused
once a run has started there, so that every result in it is comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._io import read_json, run_paths, write_json
from benchmarks.catalog import BENCHMARKS, SOURCE_SHAPES
from benchmarks.methods import parse_hparams
from benchmarks.protocols import Protocol, backbone_description, protocol_settings

__all__ = [
    "resolve_protocol",
    "resolve_settings",
    "settings_hash",
    "default_run_dir",
    "prepare_run_dir",
    "pending_runs",
]


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """The protocol of ``args.protocol`` with the command line's overrides applied."""
    return protocol_settings(
        args.protocol,
        source=BENCHMARKS[args.benchmark].source,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
    )


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that determine the results (stored in config.json, hashed for --out)."""
    protocol = resolve_protocol(args)
    info = BENCHMARKS[args.benchmark]
    hparam_overrides = parse_hparams(args.hparam)
    settings = {
        "benchmark": args.benchmark,
        "protocol": args.protocol,
        "n_tasks": info.n_tasks,
        "epochs": protocol.epochs,
        "lr": protocol.lr,
        "batch_size": protocol.batch_size,
        "validation_fraction": protocol.validation_fraction,
        "max_train_per_task": args.max_train_per_task,
        "train_fraction": args.train_fraction,
        "hparam_overrides": hparam_overrides,
        "backbone": backbone_description(
            getattr(args, "backbone", "auto"), args.protocol, SOURCE_SHAPES[info.source]
        ),
    }
    if getattr(args, "max_test_per_task", None) is not None:
        # Only present when set, so the other directories' hashes are unchanged.
        settings["max_test_per_task"] = args.max_test_per_task
    if getattr(args, "optimizer", "sgd") != "sgd":
        # Only present when not the default, so SGD settings (and their hashes) are unchanged.
        settings["optimizer"] = args.optimizer
    if getattr(args, "task_norm_stats", False):
        # Only present when set, so other settings (and their directories' hashes) are unchanged.
        settings["task_norm_stats"] = True
    if getattr(args, "scenario", "task") == "class":
        # Only present for the class scenario, so task-incremental settings (and their run
        # directories' hashes) are unchanged.
        settings["scenario"] = "class"
        settings["backbone"] += ", one IncrementalClassifier head"
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings (names the default run directory)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def default_run_dir(settings: dict[str, Any]) -> Path:
    """``runs/<benchmark>-<protocol>-<hash of the settings>``."""
    return Path("runs") / (
        f"{settings['benchmark']}-{settings['protocol']}-{settings_hash(settings)}"
    )


def prepare_run_dir(
    out: Path, settings: dict[str, Any], methods: list[str], seeds: list[int], command: str
) -> dict[str, Any]:
    """Create or reuse ``out`` and record ``methods``, ``seeds`` and ``command`` in its
    ``config.json``; return that config.

    :raise SystemExit: ``out`` holds runs made with other settings (the message names the
        settings that differ).
    """
    config_path = out / "config.json"
    # A directory with no run started yet (e.g. left by a command that failed early) takes the
    # new settings instead of refusing them.
    started = any((out / "runs").glob("*/seed*/*.json")) or any(
        (out / "runs").glob("*/seed*/checkpoint.pkl")
    )
    if config_path.is_file() and started:
        config = read_json(config_path)
        if config.get("settings") != json.loads(json.dumps(settings)):
            old = config.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(
                f"error: {out} holds runs made with other settings (differ in: "
                f"{', '.join(diff)}). Use another --out, or delete the directory."
            )
    else:
        config = {
            "benchmark": settings["benchmark"],
            "protocol": settings["protocol"],
            "settings": settings,
            "methods": [],
            "seeds": [],
            "commands": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    config["methods"] = list(dict.fromkeys([*config["methods"], *methods]))
    config["seeds"] = sorted(set(config["seeds"]) | set(seeds))
    if command not in config["commands"]:
        config["commands"].append(command)
    write_json(config_path, config)
    return config


def pending_runs(out: Path, seeds: Sequence[int], methods: Sequence[str]) -> list[tuple[int, str]]:
    """The (seed, method) runs of ``out`` without a ``result.json``, seed by seed (so that one
    seed's stream serves all its methods)."""
    return [
        (seed, method)
        for seed in seeds
        for method in methods
        if not run_paths(out, method, seed)["result"].is_file()
    ]
