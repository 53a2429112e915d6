"""avalanche-spg: SPG (Parameter-Level Soft-Masking for Continual Learning, ICML 2023).

The Avalanche plugin and strategy, the importance math, checkpoints and backbones:

* :class:`SPGPlugin` — the plugin (importance after each experience, masking before each
  optimizer step);
* :class:`SPG` — the convenience strategy (Naive + SPGPlugin);
* :mod:`avalanche_spg.importance` — the math as pure tensor functions;
* :mod:`avalanche_spg.checkpoint` — pause/resume that works with current torch and dill;
* :mod:`avalanche_spg.models` — the paper's AlexNet-like backbone and small multi-head models;
* :mod:`avalanche_spg.metrics` — capacity metrics (how full the network is) for any logger;
* :mod:`avalanche_spg.distributed` — helpers for DistributedDataParallel runs;
* :mod:`avalanche_spg.compat` — which strategies and plugins SPG serves (:func:`check_strategy`);
* :mod:`avalanche_spg.norm_stats` — :class:`TaskNormStatsPlugin`, per-task normalisation
  statistics for BatchNorm backbones (optional, not part of the paper).
"""

from avalanche_spg.compat import SPGCompatibilityError, SPGCompatibilityWarning, check_strategy
from avalanche_spg.metrics import spg_capacity_metrics
from avalanche_spg.norm_stats import TaskNormStatsPlugin
from avalanche_spg.plugin import SPGOptimizerWarning, SPGPlugin
from avalanche_spg.strategy import SPG

__all__ = [
    "SPGPlugin",
    "SPG",
    "SPGOptimizerWarning",
    "SPGCompatibilityError",
    "SPGCompatibilityWarning",
    "TaskNormStatsPlugin",
    "check_strategy",
    "spg_capacity_metrics",
    "__version__",
]
__version__ = "0.1.0"
