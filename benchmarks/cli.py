"""Command line of the benchmark suite: its parsers and the dispatch of its sub-commands.

* ``python -m benchmarks [options]`` runs a comparison (:func:`benchmarks.suite.run_suite`,
  into a run directory: :mod:`benchmarks.rundir`);
* ``python -m benchmarks report RUN_DIR`` rebuilds the tables and plots of a run directory;
* ``python -m benchmarks compare RUN_DIR...`` puts several run directories side by side
  (both: :mod:`benchmarks.report`).

See ``python -m benchmarks --help``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks._args import fraction, name_list, positive_float, positive_int
from benchmarks.catalog import BENCHMARKS, default_data_root, describe_benchmarks
from benchmarks.methods import METHODS, describe_methods, method_hparams
from benchmarks.protocols import BACKBONES, PROTOCOLS, backbone_description
from benchmarks.rundir import resolve_settings, settings_hash

# resolve_settings and settings_hash (benchmarks.rundir), backbone_description
# (benchmarks.protocols): re-exported, the command line's settings as scripts and tests use them.
__all__ = ["main", "build_parser", "resolve_settings", "settings_hash", "backbone_description"]

DEFAULT_BENCHMARK = "split-digits"

_DESCRIPTION = """\
Continual-learning benchmark suite: SPG against the usual baselines on task-incremental
streams (one head per task, task label given), written as JSON + CSV + a Markdown table +
plots in a run directory that can be resumed.

With no options: every method on split-digits (scikit-learn's bundled digits, no download),
one seed, the quick protocol; prints the table."""

_EPILOG = f"""\
benchmarks (--benchmark):
{describe_benchmarks()}

methods (--methods, comma separated, or 'all'):
{describe_methods()}

protocols (--protocol):
  quick   fixed --epochs (default 5; digits: 10 at batch 32), SGD lr 0.1 (no momentum),
          batch 64; MLP 64-64 (digits),
          MLP 784-256-256 (MNIST-likes), AlexNet-like with 512 hidden units, no dropout
          (32x32 colour datasets)
  paper   the SPG paper's protocol: AlexNet-like (MLP 256-256 for the 8x8 digits), SGD lr
          0.25, batch 64, fresh optimizer per task, 10% validation split per task,
          ReduceLROnPlateau(factor 1/3, patience 4, min lr 1e-3) on the validation loss, stop
          after 5 epochs without improvement at the lr floor (max --epochs, default 500),
          best-validation weights restored at the end of every task, the paper's dropout

data:
  split-fmnist / perm-fmnist read Fashion-MNIST from --data-root; when it is not there, the
  Debian package dataset-fashion-mnist's copy (/usr/share/datasets/fashion-mnist) is unzipped
  into <data-root>/FashionMNIST/raw/, otherwise torchvision downloads it. MNIST, CIFAR-10/100
  and TinyImageNet are read from (or downloaded to) --data-root as torchvision / Avalanche
  lay them out (TinyImageNet: <data-root>/tinyimagenet/tiny-imagenet-200/).

run directory (--out; default runs/<benchmark>-<protocol>-<hash of the settings>):
  config.json                      settings and the commands that filled the directory
  runs/<method>/seed<k>/result.json  one finished run: accuracy matrix R[i][j] (accuracy on
                                   task j after learning task i), ACC, BWT, forgetting, times
  summary.json, summary.csv, results.csv, matrices.csv, table.md, plots/*.png
  A run with a result.json is skipped when the command is run again; a run that was killed
  resumes after its last finished task (checkpoint.pkl, removed when the run ends). Runs with
  different settings (epochs, lr, subsampling, hyperparameters) cannot share a directory.

  python -m benchmarks report RUN_DIR   rebuilds summary/CSV/table/plots from the result files
  python -m benchmarks compare DIR...   one ACC/BWT table across run directories

examples:
  python -m benchmarks
  python -m benchmarks --benchmark split-fmnist --methods naive,ewc,spg --seeds 0 1 2 --epochs 5
  python -m benchmarks --benchmark perm-fmnist --max-train-per-task 10000 --methods all
  python -m benchmarks --benchmark c10 --protocol paper --data-root ~/data --device cuda

distributed (data-parallel, one node): launch the same command with torchrun, e.g.
  torchrun --nproc_per_node=2 -m benchmarks --benchmark split-fmnist --methods spg
  Every process trains every run on batch-size/N samples of each minibatch (gloo on CPU, nccl
  with one GPU per process); only rank 0 writes the run directory and prints. Same global
  batch and learning rate as one process (only the shuffling order differs).
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's layout and show defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _benchmark_name(text: str) -> str:
    name = text.strip().lower()
    if name not in BENCHMARKS:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {text!r}; valid: {', '.join(BENCHMARKS)}"
        )
    return name


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**32), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks`` (the run command)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--benchmark",
        type=_benchmark_name,
        default=DEFAULT_BENCHMARK,
        metavar="NAME",
        help=f"the stream to learn; one of: {', '.join(BENCHMARKS)}",
    )
    what.add_argument(
        "--methods",
        type=name_list(METHODS, "method"),
        default="all",
        metavar="LIST",
        help="comma-separated methods, or 'all'; see the list below",
    )
    what.add_argument(
        "--seeds",
        type=_seed,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="seeds (each seed reshuffles the class order / permutations and the initialisation)",
    )
    what.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="quick",
        help="training protocol (see below)",
    )
    what.add_argument(
        "--scenario",
        choices=("task", "class"),
        default="task",
        help="task: one head per task, task label given at test time; class: global labels, "
        "no task label, one growing IncrementalClassifier head, SPG with "
        "class_incremental=True (methods: naive, ewc, lwf, replay, spg, spg+replay, spg+lwf, "
        "joint)",
    )
    what.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="auto",
        help="network: auto (the protocol's choice, see below), mlp (two hidden layers: 256-256; "
        "64-64 on the digits under quick), alexnet (the paper's AlexNet-like CNN; images of at "
        "least 12x12), resnet (Avalanche's MTSlimResNet18, a BatchNorm ResNet; task scenario only)",
    )
    what.add_argument(
        "--task-norm-stats",
        action="store_true",
        help="every method keeps its normalisation layers' running statistics per task and "
        "evaluates each task with its own (avalanche_spg.norm_stats.TaskNormStatsPlugin; only "
        "matters for BatchNorm backbones such as --backbone resnet)",
    )
    what.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="override a method hyperparameter, e.g. ewc.ewc_lambda=1000 or "
        "spg.mask='update' (SPG's names are SPGPlugin's arguments; repeatable)",
    )
    train = parser.add_argument_group("training (defaults come from --protocol)")
    train.add_argument(
        "--epochs",
        type=positive_int,
        help="epochs per task (quick: exactly this many, default 5, 10 on digits; paper: the "
        "maximum, default 500)",
    )
    train.add_argument(
        "--lr",
        type=positive_float,
        help="learning rate (quick 0.1, paper 0.25; give one for adam)",
    )
    train.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd: plain SGD, no momentum or weight decay (the paper's); adam: torch's Adam, for "
        "the update-masking ablation (--hparam spg.mask=update). The paper protocol's lr floor "
        "stays 1e-3, so Adam at --lr 0.001 trains with early stopping alone",
    )
    train.add_argument(
        "--batch-size", type=positive_int, help="training minibatch (64; quick on digits: 32)"
    )
    train.add_argument("--eval-batch-size", type=positive_int, help="evaluation minibatch (1024)")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="dataset folder (default: $AVALANCHE_SPG_DATA or ~/.avalanche/data)",
    )
    data.add_argument(
        "--max-train-per-task",
        type=positive_int,
        metavar="N",
        help="keep at most N training samples per task (random, seeded; equal per class on "
        "split streams; each permuted task draws its own subset). Test sets are not cut (see "
        "--max-test-per-task)",
    )
    data.add_argument(
        "--max-test-per-task",
        type=positive_int,
        metavar="N",
        help="evaluate on at most N test samples per task (random, seeded). Off by default; for "
        "CPU measurements of slow backbones, and written in the tables",
    )
    data.add_argument(
        "--train-fraction",
        type=fraction,
        metavar="F",
        help="keep this fraction of every task's training samples (after --max-train-per-task)",
    )
    data.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading a missing dataset"
    )
    output = parser.add_argument_group("output and execution")
    output.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run directory (default: runs/<benchmark>-<protocol>-<settings hash>); "
        "rerunning a command resumes it",
    )
    output.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'"
    )
    output.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: 1 for the quick protocol on CPU, whose small models "
        "run fastest single-threaded, especially on a shared machine; else torch's default)",
    )
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument(
        "--avalanche-loaders",
        action="store_true",
        help="feed minibatches through Avalanche's per-sample data loaders instead of slicing "
        "the in-memory tensors (same batches, several times slower on CPU)",
    )
    output.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not checkpoint after every task (a killed run then restarts from task 1)",
    )
    output.add_argument(
        "--no-progress", action="store_true", help="no progress bars (one line per task only)"
    )
    output.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def build_report_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks report``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks report",
        description="Rebuild summary.json, the CSV files, table.md and the plots of a run "
        "directory from its runs/*/seed*/result.json files, and print the table.",
    )
    parser.add_argument("run_dir", type=Path, help="a directory written by python -m benchmarks")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks compare``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compare",
        description="Print one Markdown table of ACC and BWT (mean ± std over seeds, %) per "
        "method across several run directories (read from their summary.csv).",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="also write the table to FILE (Markdown, with the command and links to each "
        "directory's table.md)",
    )
    parser.add_argument(
        "--rows",
        action="store_true",
        help="one row per (directory, method) with the settings that tell the directories "
        "apart (hyperparameter overrides, optimizer, ...), ACC, BWT, the epochs per task and "
        "SPG's final mean importance and head scale: the layout of an ablation table",
    )
    return parser


def _device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot be used here (``None``: it can)."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:1', ...)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name} but CUDA is not available"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name} but there are {torch.cuda.device_count()} CUDA device(s)"
    elif device.type != "cpu":
        return f"--device {name!r}: the suite runs on 'cpu' or 'cuda' devices"
    return None


def _check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``) the option combinations the suite cannot run, before any
    run starts."""
    try:
        settings = resolve_settings(args)
    except ValueError as err:
        parser.error(str(err))
    device_problem = _device_problem(args.device)
    if device_problem:
        parser.error(device_problem)
    if args.optimizer == "adam" and args.lr is None:
        parser.error("--optimizer adam needs an explicit --lr (the protocols' rates are SGD's)")
    if args.scenario == "class" and args.task_norm_stats:
        parser.error("--task-norm-stats needs task labels at test time: use --scenario task")
    if args.scenario == "class" and args.backbone == "resnet":
        parser.error("--backbone resnet is for the task scenario (use mlp or alexnet with class)")
    if args.scenario == "class":
        from benchmarks._class_incremental import check_class_methods

        try:
            check_class_methods(args.methods)
        except ValueError as err:
            parser.error(str(err))
    if "packnet" in args.methods:
        if args.protocol == "paper":
            parser.error(
                "packnet prunes at a fixed epoch, which early stopping may never reach: use it "
                "with --protocol quick"
            )
        overrides = settings["hparam_overrides"]
        post = method_hparams("packnet", args.benchmark, overrides)["post_prune_epochs"]
        if settings["epochs"] <= post:
            parser.error(
                f"packnet fine-tunes for {post} epoch(s) after pruning, so it needs --epochs >= "
                f"{post + 1} (got {settings['epochs']})"
            )


def _compare(argv: list[str]) -> int:
    """``python -m benchmarks compare RUN_DIR... [--out FILE]``."""
    args = build_compare_parser().parse_args(argv[1:])
    from benchmarks.report import compare_rows, compare_table, write_compare_page

    try:
        table = compare_rows(args.run_dirs) if args.rows else compare_table(args.run_dirs)
    except FileNotFoundError as err:
        print(f"error: {err} (run 'python -m benchmarks report' on it first?)", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out is not None:
        write_compare_page(
            args.out, table, args.run_dirs, "python -m benchmarks " + shlex.join(argv)
        )
    return 0


def _report(argv: list[str]) -> int:
    """``python -m benchmarks report RUN_DIR [--no-plots]``."""
    args = build_report_parser().parse_args(argv[1:])
    from benchmarks.report import write_report

    try:
        print(write_report(args.run_dir, plots=not args.no_plots))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv)
    if argv and argv[0] == "report":
        return _report(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    _check_run_args(parser, args)
    if args.data_root is None:
        args.data_root = default_data_root()
    command = "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv))
    from benchmarks.suite import run_suite

    return run_suite(args, command)
