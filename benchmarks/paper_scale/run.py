"""``python -m benchmarks.paper_scale run``: the commands of the paper-scale runs, and
running them."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.catalog import default_data_root
from benchmarks.paper_scale.sizes import CIFAR100_FILES, PAPER_BENCHMARKS, PAPER_METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]


def cifar100_problem(data_root: Path) -> str | None:
    """Why CIFAR-100 cannot be read from ``data_root`` (``None``: it can)."""
    missing = [name for name in CIFAR100_FILES if not (data_root / name).is_file()]
    if not missing:
        return None
    return (
        f"CIFAR-100 is not in --data-root {data_root}: missing "
        + ", ".join(str(data_root / name) for name in missing)
        + " (unpack the python version of the official archive, cifar-100-python.tar.gz, "
        "there; the runs never download)"
    )


def run_commands(
    data_root: Path | str,
    device: str,
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    methods: Sequence[str] = PAPER_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    results_dir: str = "benchmarks/results",
) -> list[list[str]]:
    """The arguments of ``python -m benchmarks`` for every benchmark (one command each)."""
    return [
        [
            "--benchmark",
            benchmark,
            "--protocol",
            "paper",
            "--backbone",
            "alexnet",
            "--methods",
            ",".join(methods),
            "--seeds",
            *[str(s) for s in seeds],
            "--data-root",
            str(data_root),
            "--no-download",
            "--device",
            device,
            "--out",
            f"{results_dir}/paper-{benchmark}",
        ]
        for benchmark in benchmarks
    ]


def run_main(args: argparse.Namespace) -> int:
    """``python -m benchmarks.paper_scale run``: check the data and the device, then run (or
    print, ``--dry-run``) one ``python -m benchmarks`` command per benchmark."""
    # Absolute: the commands run from the repository root.
    data_root = (args.data_root or default_data_root()).expanduser().resolve()
    problem = cifar100_problem(data_root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print(
                "error: no GPU (CUDA is not available here). The paper-scale runs take days "
                "on a CPU (benchmarks/results/paper-scale-estimate-cpu.md); pass --allow-cpu "
                "to run them on the CPU anyway.",
                file=sys.stderr,
            )
            return 2
        device = "cpu"
    elif not device.startswith("cuda"):
        print(f"error: --device {device!r}: the paper-scale runs use cuda", file=sys.stderr)
        return 2
    commands = run_commands(
        data_root, device, args.benchmarks, args.methods, args.seeds, args.results_dir
    )
    for argv in commands:
        print("python -m benchmarks " + shlex.join(argv), flush=True)
        if args.dry_run:
            continue
        done = subprocess.run([sys.executable, "-m", "benchmarks", *argv], cwd=REPO_ROOT)
        if done.returncode != 0:
            return done.returncode
    return 0
