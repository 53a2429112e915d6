"""The command line of ``python -m benchmarks.paper_scale``: the parser, and the ``estimate``
sub-command (``run``: :mod:`benchmarks.paper_scale.run`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._args import add_clock_options, fraction, name_list, positive_int, resolve_clock
from benchmarks.paper_scale.measure import estimate
from benchmarks.paper_scale.projection import projections
from benchmarks.paper_scale.report import render
from benchmarks.paper_scale.run import run_main
from benchmarks.paper_scale.sizes import (
    CIFAR100_SHAPE,
    CIFAR100_TEST_PER_CLASS,
    CIFAR100_TRAIN_PER_CLASS,
    DEFAULT_ASSUMED_EPOCHS,
    PAPER_BENCHMARKS,
    PAPER_METHODS,
    minimum_epochs,
    per_class,
)

_QUICK_FRACTION = 0.01
_QUICK_KS = (1, 2)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """``--benchmarks`` and ``--methods`` of both sub-commands."""
    parser.add_argument(
        "--benchmarks",
        type=name_list(PAPER_BENCHMARKS, "benchmark"),
        default=list(PAPER_BENCHMARKS),
        help="comma-separated: c10,c20 (default both)",
    )
    parser.add_argument(
        "--methods",
        type=name_list(PAPER_METHODS, "method"),
        default=list(PAPER_METHODS),
        help=f"comma-separated, or 'all' (default: {','.join(PAPER_METHODS)})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.paper_scale``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper_scale",
        description="The SPG paper's C-10 / C-20 protocol (CIFAR-100, AlexNet-like backbone) "
        "at full scale: 'estimate' times it on synthetic tensors of the right shapes on this "
        "device, 'run' runs it on CIFAR-100 (a GPU expected).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser(
        "estimate",
        help="time every method's pieces on synthetic C-10 / C-20 tensors and project the runs",
        description="Time one training epoch, one validation pass, the end-of-task pass (SPG's "
        "importance pass), the evaluation and the checkpoint of every method after tasks k_lo "
        "and k_hi on synthetic tensors of C-10's / C-20's shapes, and project the wall time of "
        "a whole paper-protocol run (see the docstring of the package benchmarks.paper_scale).",
    )
    _add_selection(est)
    add_clock_options(est)
    est.add_argument(
        "--fraction",
        type=fraction,
        default=None,
        help="keep this fraction of CIFAR-100's images per class and scale the data passes "
        "to the full size (default 1; --quick: 0.01)",
    )
    est.add_argument(
        "--ks",
        type=positive_int,
        nargs=2,
        default=None,
        metavar=("K_LO", "K_HI"),
        help="the two tasks after which the pieces are timed (default 1 3; --quick: 1 2)",
    )
    est.add_argument(
        "--assume-epochs",
        type=positive_int,
        default=DEFAULT_ASSUMED_EPOCHS,
        help="epochs per task of the projection; the real number depends on the data "
        f"(default {DEFAULT_ASSUMED_EPOCHS}: see DEFAULT_ASSUMED_EPOCHS in the module)",
    )
    est.add_argument(
        "--n-seeds", type=positive_int, default=3, help="seeds of the projected run (default 3)"
    )
    est.add_argument(
        "--backbone",
        choices=("auto", "mlp", "alexnet"),
        default="auto",
        help="auto = the paper protocol's AlexNet-like; mlp only to test this command",
    )
    est.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (0.01 of the images, tasks 1 and 2) for tests; the projection is "
        "then rough",
    )
    est.add_argument("--out", type=Path, help="also write the Markdown report here")
    est.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    est.add_argument("--quiet", action="store_true", help="no progress lines")

    run = sub.add_parser(
        "run",
        help="run C-10 and C-20, paper protocol, every method, 3 seeds (needs CIFAR-100, a GPU)",
        description="Run python -m benchmarks on C-10 and C-20 with the paper protocol and the "
        "AlexNet-like backbone, every method the protocol supports, into "
        "benchmarks/results/paper-c10 and paper-c20. Rerunning resumes (finished runs are "
        "skipped, a killed run restarts after its last finished task). Expected time: "
        "benchmarks/results/paper-scale-estimate-*.md, or 'estimate' on the GPU.",
    )
    run.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder holding cifar-100-python/ (default: $AVALANCHE_SPG_DATA or ~/.avalanche/data)",
    )
    _add_selection(run)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    run.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    run.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on the CPU when no GPU is present (days: see the estimate)",
    )
    run.add_argument(
        "--results-dir",
        default="benchmarks/results",
        help="parent of the run directories paper-c10 / paper-c20, relative to the repository "
        "root (default benchmarks/results)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"error: --device {name!r} is not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name!r}: use cpu or cuda")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def _estimate_main(args: argparse.Namespace, command: str) -> int:
    from benchmarks.protocols import backbone_description

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    clock = resolve_clock(args.clock, device)
    fraction = (
        args.fraction if args.fraction is not None else (_QUICK_FRACTION if args.quick else 1.0)
    )
    ks = tuple(args.ks) if args.ks is not None else (_QUICK_KS if args.quick else (1, 3))
    if not ks[0] < ks[1]:
        raise SystemExit(f"error: --ks needs K_LO < K_HI, got {ks[0]} {ks[1]}")

    def log(message: str) -> None:
        if not args.quiet:
            print(
                f"[paper-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
            )

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="No loggers specified")
    results = estimate(
        args.benchmarks,
        args.methods,
        device=device,
        fraction=fraction,
        ks=(ks[0], ks[1]),
        backbone=args.backbone,
        clock=clock,
        log=log,
    )
    minimum = minimum_epochs()
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if clock == "cpu" else "wall time",
        "backbone_description": backbone_description(args.backbone, "paper", CIFAR100_SHAPE),
        "fraction": fraction,
        "per_class_train": per_class(CIFAR100_TRAIN_PER_CLASS, fraction),
        "per_class_test": per_class(CIFAR100_TEST_PER_CLASS, fraction),
        "ks": list(ks),
        "assume_epochs": args.assume_epochs,
        "minimum_epochs": minimum,
        "seeds": args.n_seeds,
    }
    text = render(results, meta, args.assume_epochs, args.n_seeds, minimum)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        payload = {
            "meta": meta,
            "results": results,
            "projections": projections(results, args.assume_epochs, args.n_seeds, minimum),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.paper_scale``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.paper_scale", *argv])
    if args.command == "estimate":
        return _estimate_main(args, command)
    return run_main(args)
