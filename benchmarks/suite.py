"""The run loop of ``python -m benchmarks``: every (seed, method) of a run directory that has no
result yet, one :func:`benchmarks.runner.run_one` each, then the report.

Under ``torchrun --nproc_per_node=N -m benchmarks ...`` every process trains every run
data-parallel (each takes ``batch_size / N`` samples of every minibatch) and only rank 0 writes
the run directory and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.catalog import BENCHMARKS, SOURCE_SHAPES
from benchmarks.methods import method_hparams
from benchmarks.protocols import Protocol, resolve_backbone
from benchmarks.rundir import (
    default_run_dir,
    pending_runs,
    prepare_run_dir,
    resolve_protocol,
    resolve_settings,
)

if TYPE_CHECKING:
    from avalanche_spg.distributed import DistributedSetup
    from benchmarks.data import TaskStream
    from benchmarks.runner import RunSpec

__all__ = ["run_suite"]


def _init_processes(device: str) -> DistributedSetup:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    import torch

    from avalanche_spg.distributed import init_distributed

    if device == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = device.startswith("cuda")
    return init_distributed(seed=0, use_cuda=use_cuda)


def _resolve_device(name: str) -> str:
    """``--device`` as a torch device name (``auto``: CUDA when available)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but CUDA is not available")
    return name


def _set_threads(args: argparse.Namespace, device: str) -> None:
    """``--threads``, or one thread for the small models of the quick protocol on the CPU."""
    import torch

    shape = SOURCE_SHAPES[BENCHMARKS[args.benchmark].source]
    small_model = resolve_backbone(args.backbone, args.protocol, shape) == "mlp"
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu" and (args.protocol == "quick" or small_model):
        torch.set_num_threads(1)


def _load_stream(
    args: argparse.Namespace, seed: int, protocol: Protocol, class_scenario: bool
) -> TaskStream:
    """Seed ``seed``'s stream of ``args.benchmark`` (rank 0 unpacks or downloads first)."""
    from avalanche_spg.distributed import main_process_first
    from benchmarks.data import build_stream

    with main_process_first():
        stream = build_stream(
            args.benchmark,
            seed,
            args.data_root,
            max_train_per_task=args.max_train_per_task,
            train_fraction=args.train_fraction,
            validation_fraction=protocol.validation_fraction,
            max_test_per_task=args.max_test_per_task,
            download=not args.no_download,
        )
    if class_scenario:
        from benchmarks._class_incremental import to_class_incremental

        stream = to_class_incremental(stream)
    return stream


def _run_spec(
    args: argparse.Namespace,
    settings: dict[str, Any],
    protocol: Protocol,
    seed: int,
    method: str,
    device: str,
    setup: DistributedSetup,
) -> RunSpec:
    """The :class:`~benchmarks.runner.RunSpec` of (``seed``, ``method``) under the command line's
    options (class scenario: SPG's class-incremental importance)."""
    from benchmarks.runner import RunSpec

    class_scenario = settings.get("scenario") == "class"
    hparams = method_hparams(
        method, args.benchmark, settings["hparam_overrides"], protocol=settings["protocol"]
    )
    if class_scenario and method.startswith("spg"):
        hparams["class_incremental"] = True
    return RunSpec(
        benchmark=args.benchmark,
        method=method,
        seed=seed,
        protocol=protocol,
        hparams=hparams,
        device=device,
        checkpoint=not args.no_checkpoint,
        progress=not (args.no_progress or args.quiet) and setup.is_main,
        tensor_data=not args.avalanche_loaders,
        scenario="class" if class_scenario else "task",
        world_size=setup.world_size,
        backbone=args.backbone,
        task_norm_stats=args.task_norm_stats,
        optimizer=args.optimizer,
    )


def _run_pending(
    args: argparse.Namespace,
    settings: dict[str, Any],
    setup: DistributedSetup,
    pending: list[tuple[int, str]],
    out: Path,
    command: str,
    log: Callable[[str], None],
) -> None:
    """Run the ``pending`` (seed, method) pairs in order, each into its folder of ``out``."""
    from benchmarks.runner import run_one

    device = str(setup.device) if setup.distributed else _resolve_device(args.device)
    if setup.distributed:
        log(f"{setup.world_size} processes ({setup.backend}); rank 0 on {device}")
    _set_threads(args, device)
    protocol = resolve_protocol(args)
    class_scenario = settings.get("scenario") == "class"
    streams: dict[int, TaskStream] = {}
    for number, (seed, method) in enumerate(pending, 1):
        if seed not in streams:
            streams.clear()  # one seed's stream in memory at a time
            streams[seed] = _load_stream(args, seed, protocol, class_scenario)
        log(f"--- run {number}/{len(pending)}: {method}, seed {seed}")
        spec = _run_spec(args, settings, protocol, seed, method, device, setup)
        result = run_one(spec, streams[seed], out, log=log, command=command)
        bwt = result["bwt"]
        log(
            f"--- {method}, seed {seed}: ACC {result['acc'] * 100:.2f}%"
            + (f", BWT {bwt * 100:+.2f}%" if bwt is not None else "")
            + f", {result['train_seconds']:.1f}s training"
        )


def run_suite(args: argparse.Namespace, command: str) -> int:
    """Run every (seed, method) of ``args`` that has no result in the run directory yet, then
    write and print the report; return the exit status (130 when interrupted).

    :param args: the parsed and checked options of ``python -m benchmarks``.
    :param command: the command line, recorded in ``config.json`` and every ``result.json``.
    :raise SystemExit: the run directory holds runs made with other settings, or the device
        is not available.
    """
    from avalanche_spg.distributed import broadcast_from_main, cleanup_distributed

    setup = _init_processes(args.device)
    settings = resolve_settings(args)
    out = args.out or default_run_dir(settings)
    error = None
    if setup.is_main:
        try:
            prepare_run_dir(out, settings, args.methods, args.seeds, command)
        except SystemExit as exit_:
            error = exit_.code
    error = broadcast_from_main(error)
    if error is not None:
        cleanup_distributed()
        raise SystemExit(error)

    def log(message: str) -> None:
        if not args.quiet and setup.is_main:
            print(message, flush=True)

    pending = broadcast_from_main(pending_runs(out, args.seeds, args.methods))  # rank 0 decides
    done = len(args.seeds) * len(args.methods) - len(pending)
    log(
        f"{args.benchmark} ({args.protocol}): {len(pending)} run(s) to do, {done} already "
        f"finished, in {out}"
    )
    if pending:
        try:
            _run_pending(args, settings, setup, pending, out, command, log)
        except KeyboardInterrupt:
            print(
                f"\ninterrupted; run the same command again to resume (results in {out})",
                file=sys.stderr,
            )
            return 130
    if setup.is_main:
        from benchmarks.report import write_report

        print(write_report(out, plots=not args.no_plots))
    cleanup_distributed()
    return 0
