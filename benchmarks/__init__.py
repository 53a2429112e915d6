"""Benchmark suite of avalanche-spg: SPG against the usual continual-learning baselines.

Run ``python -m benchmarks --help``. The suite uses the library only through its public API
(:class:`avalanche_spg.SPGPlugin`, :mod:`avalanche_spg.models`, :mod:`avalanche_spg.checkpoint`),
as a user would. Modules:

* :mod:`benchmarks.cli` — the command line (parsers and sub-commands);
* :mod:`benchmarks.suite` — the run loop of a command: every pending (seed, method) run;
* :mod:`benchmarks.rundir` — the run directory: settings, their hash, ``config.json``;
* :mod:`benchmarks.data` — datasets and task-incremental streams;
* :mod:`benchmarks.methods` — the methods and their default hyperparameters;
* :mod:`benchmarks.protocols` — the ``quick`` and ``paper`` training protocols;
* :mod:`benchmarks.runner` — one (method, seed) run with checkpoint / resume;
* :mod:`benchmarks.metrics` — ACC, BWT, forgetting;
* :mod:`benchmarks.report` — JSON / CSV / Markdown / plots from a run directory;
* :mod:`benchmarks.perf` — what SPG costs against Naive (``python -m benchmarks.perf``).
"""
