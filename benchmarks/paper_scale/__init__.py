"""The SPG paper's C-10 / C-20 protocol at full scale: what it costs, and the command that runs it.

``python -m benchmarks.paper_scale estimate``
    Times the pieces of a paper-protocol run on the device at hand, on synthetic tensors of
    C-10's and C-20's exact shapes and sizes (CIFAR-100: 500 training and 100 test images per
    class, 3x32x32; C-10 = 10 tasks x 10 classes, C-20 = 20 tasks x 5 classes; 10 % of every
    task's training images held out for validation), cut into tasks by the suite's own
    :func:`benchmarks.data.build_stream`, with the suite's own backbone
    (:func:`benchmarks.protocols.make_backbone`, the paper's AlexNet-like with its tuned
    dropout), strategies (:func:`benchmarks.methods.build_strategy` with
    :func:`benchmarks.methods.method_hparams`) and schedule plugin
    (:class:`benchmarks.plugins.PlateauEarlyStopping`), at the paper protocol's batch size and
    learning rate. It prints a Markdown table: seconds per training epoch, per validation pass,
    per end-of-task pass (SPG's importance pass, EWC's Fisher, MAS's importance), per
    evaluation of the test stream and per checkpoint, and the projected wall time of a whole
    run per method for an assumed number of epochs per task.

``python -m benchmarks.paper_scale run --data-root DIR``
    Runs ``python -m benchmarks`` on C-10 and C-20 with the paper protocol, the AlexNet-like
    backbone, every method the protocol supports and 3 seeds, into
    ``benchmarks/results/paper-c10`` and ``paper-c20``; refuses when CIFAR-100 is not in
    ``DIR`` or no GPU is present (``--allow-cpu`` overrides the latter). ``--dry-run`` prints
    the commands only.

How the projection is made
--------------------------
Every method (``joint`` aside) trains tasks ``0, 1, ..., k_hi`` for one epoch each, so that
regularisers, distillation targets and replay buffers are active, and the pieces of the calls
that train tasks ``k_lo`` and ``k_hi`` (default 1 and 3) are timed by probe plugins placed
around the others: the training epoch, the validation pass (the schedule plugin's), the
end-of-task pass (every plugin's ``after_training_exp``; inside it, SPG's importance pass
separately), and the rest of the call (experience set-up: ``overhead``). After task ``k_hi``
the whole test stream is evaluated once (the suite evaluates it after every task) and a
checkpoint is written after tasks ``k_lo`` and ``k_hi`` as the runner writes one after every
task but the last. A piece that may grow with the task index (SPG's importance pass costs about
one forward and ``k + 1`` backward passes after task ``k``; EWC's penalty has one term per
earlier task; the checkpoint carries per-task state) is extended to every ``k`` by the line
through its two measurements, its slope clipped at 0 and its value at 0::

    v(k) = max(0, v(k_lo) + max(0, (v(k_hi) - v(k_lo)) / (k_hi - k_lo)) * (k - k_lo))

Then, for ``T`` tasks and ``E`` epochs per task, one seed of a method takes::

    sum over k = 0 .. T-1 of  overhead + E * (epoch(k) + validation) + end(k) + evaluation
    + sum over k = 0 .. T-2 of  checkpoint(k)

and ``joint`` (one experience made of all tasks) ``overhead + E * (epoch + validation) + end +
evaluation``. ``overhead`` is the mean of its two measurements; ``validation`` and
``evaluation`` do not depend on ``k``.

``--fraction F`` keeps ``F`` of every class's images (at least one) to measure on a slow
machine; the epoch, validation, end-of-task and evaluation times are then multiplied by the
ratio of the full size to the measured size (they are passes over the data), the overhead and
the checkpoint are not (a replay checkpoint also pickles the images of the earlier experiences
its buffer draws from, so it is under-estimated). The number of epochs each task trains depends
on the data; the schedule cannot stop a task before epoch :func:`minimum_epochs` (36: the
first epoch the best, six plateaus of five epochs down to the lr floor, five more at the floor),
so the table also shows the projection at that minimum. The synthetic images are Gaussian
noise: the time of an epoch does not depend on what the images show, the number of epochs does.

Modules: :mod:`~benchmarks.paper_scale.sizes` (the streams' sizes, synthetic images, the
schedule's minimum), :mod:`~benchmarks.paper_scale.measure` (the timed pieces:
:func:`estimate`), :mod:`~benchmarks.paper_scale.projection` (the formula above),
:mod:`~benchmarks.paper_scale.report` (the Markdown), :mod:`~benchmarks.paper_scale.run` (the
``run`` sub-command), :mod:`~benchmarks.paper_scale.cli` (the command line).
"""

from benchmarks.paper_scale.cli import build_parser, main
from benchmarks.paper_scale.measure import estimate
from benchmarks.paper_scale.projection import (
    MethodTiming,
    linear_in_k,
    projections,
    seconds_per_seed,
)
from benchmarks.paper_scale.report import render
from benchmarks.paper_scale.run import cifar100_problem, run_commands
from benchmarks.paper_scale.sizes import (
    DEFAULT_ASSUMED_EPOCHS,
    FULL_SIZES,
    PAPER_BENCHMARKS,
    PAPER_METHODS,
    StreamSizes,
    minimum_epochs,
    stream_sizes,
)

__all__ = [
    "PAPER_BENCHMARKS",
    "PAPER_METHODS",
    "DEFAULT_ASSUMED_EPOCHS",
    "FULL_SIZES",
    "MethodTiming",
    "StreamSizes",
    "build_parser",
    "cifar100_problem",
    "estimate",
    "linear_in_k",
    "main",
    "minimum_epochs",
    "projections",
    "render",
    "run_commands",
    "seconds_per_seed",
    "stream_sizes",
]
