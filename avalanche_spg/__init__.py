"""avalanche-spg: SPG (Parameter-Level Soft-Masking for Continual Learning, ICML 2023).

The Avalanche plugin and strategy, the importance math, checkpoints and backbones:

* :class:`SPGPlugin` — the plugin (importance after each experience, masking before each
  optimizer step);
* :class:`SPG` — the convenience strategy (Naive + SPGPlugin);
* :mod:`avalanche_spg.importance` — the math as pure tensor functions;
* :mod:`avalanche_spg.checkpoint` — pause/resume that works with current torch and dill;
* :mod:`avalanche_spg.models` — the paper's AlexNet-like backbone and small multi-head models;
* :mod:`avalanche_spg.metrics` — capacity metrics (how full the network is) for any logger;
* :mod:`avalanche_spg.distributed` — helpers for DistributedDataParallel runs.
"""

from avalanche_spg.metrics import spg_capacity_metrics
from avalanche_spg.plugin import SPGOptimizerWarning, SPGPlugin
from avalanche_spg.strategy import SPG

__all__ = ["SPGPlugin", "SPG", "SPGOptimizerWarning", "spg_capacity_metrics", "__version__"]
__version__ = "0.1.0"
