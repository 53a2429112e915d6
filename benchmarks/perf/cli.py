"""The command line of ``python -m benchmarks.perf``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._args import add_clock_options, resolve_clock
from benchmarks.perf.measure import collect
from benchmarks.perf.report import render
from benchmarks.perf.setup import (
    MODELS,
    PARTS,
    SIZES,
    log_progress,
    steady_c_allocator,
    use_clock,
)

__all__ = ["DEFAULT_OUT", "build_parser", "main"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "perf.md"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.perf``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf",
        description="Measure SPGPlugin's cost against Naive: training iteration, importance "
        "pass, memory held between experiences, importance_max_samples.",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes, seconds (CI)")
    add_clock_options(parser)
    parser.add_argument(
        "--parts",
        default="iteration,importance,memory,subset",
        help="comma-separated subset of: iteration, importance, memory, subset",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,alexnet")
    parser.add_argument(
        "--out",
        default=None,
        help=f"Markdown file to write (default: {DEFAULT_OUT} for the full profile, "
        "nothing for --tiny); '-' prints only",
    )
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    parser.add_argument(
        "--malloc",
        choices=("steady", "default"),
        default="steady",
        help="steady: fix glibc's malloc thresholds for the run (see steady_c_allocator); "
        "default: leave the C allocator as it is",
    )
    parser.add_argument(
        "--no-vectorized", action="store_true", help="skip the vectorised-heads variant in (b)"
    )
    return parser


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.perf``; returns the exit status."""
    args = build_parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "benchmarks.perf", *argv_list])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    clock = resolve_clock(args.clock, device)
    use_clock(clock)
    profile = "tiny" if args.tiny else "full"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = (set(parts) - set(PARTS)) | (set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown parts/models: {sorted(unknown)}")

    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    allocator = "default"
    if args.malloc == "steady":
        allocator = "steady" if steady_c_allocator() else "default (no glibc mallopt here)"
    results = collect(SIZES[profile], device, parts, models, vectorized=not args.no_vectorized)
    results["meta"] = {
        "command": command,
        "device": str(device),
        "profile": profile,
        "clock": clock,
        "allocator": allocator,
    }
    text = render(results, command, device, profile, clock, allocator)
    print(text)
    out = args.out if args.out is not None else (None if args.tiny else str(DEFAULT_OUT))
    if out and out != "-":
        _write(Path(out), text + "\n")
        log_progress(f"written to {out}")
    if args.json:
        _write(Path(args.json), json.dumps(results, indent=1) + "\n")
    return 0
