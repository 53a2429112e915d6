"""What SPG costs, measured against Naive in one run: ``python -m benchmarks.perf``.

Four measurements, written as Markdown (default ``benchmarks/results/perf.md``) together with the
command that produced them:

(a) **training iteration**: time per iteration of ``Naive`` with and without ``SPGPlugin``, batch
    64, for ``MultiHeadMLP`` and ``AlexNetLike``, on an experience after the first (masks active;
    importance preloaded through the plugin's ``load_state_dict``): the end-to-end ratio, and the
    time of SPG's own ``before_update`` (the mask step, timed in place by probe plugins placed
    just before and after it) relative to a Naive iteration.
(b) **importance pass** after task ``k`` (``k + 1`` heads): ``compute_gamma`` with the
    ``"reference"`` per-head loop and the ``"fast"`` method, each relative to one training epoch
    on that task, plus the largest difference in importance between the two on the same weights.
(c) **memory held between experiences**: bytes of every tensor reachable from the plugin object
    along a stream, vs the model's parameter bytes.
(d) **importance_max_samples**: importance estimated on a random subset vs the whole experience.

Modules: :mod:`~benchmarks.perf.setup` (sizes, streams, models, clock, allocator),
:mod:`~benchmarks.perf.measure` (the four measurements), :mod:`~benchmarks.perf.report` (the
Markdown), :mod:`~benchmarks.perf.cli` (the command line). ``--tiny`` runs everything at toy
sizes in seconds.
"""

from benchmarks.perf.cli import build_parser, main
from benchmarks.perf.measure import (
    collect,
    held_memory,
    measure_importance_pass,
    measure_iteration,
    measure_memory,
    measure_subset,
)
from benchmarks.perf.report import render
from benchmarks.perf.setup import MODELS, PARTS, SIZES, PerfSizes, steady_c_allocator

__all__ = [
    "PerfSizes",
    "SIZES",
    "MODELS",
    "PARTS",
    "collect",
    "render",
    "main",
    "build_parser",
    "held_memory",
    "measure_iteration",
    "measure_importance_pass",
    "measure_memory",
    "measure_subset",
    "steady_c_allocator",
]
