"""Synaptic Intelligence that works on CPU (around Avalanche 0.6's ``SynapticIntelligencePlugin``).

Avalanche 0.6 snapshots the weights with ``param.detach().cpu().flatten()``. On a CPU model
``.cpu()`` and ``.flatten()`` return *views* of the live parameter, so the "old" weights move with
the optimizer step: the path integral (grad x weight change) is always 0, the anchor of the
penalty equals the current weights, and SI silently behaves exactly like Naive. (On CUDA
``.cpu()`` copies, so the bug does not show there.) :class:`CopyingSynapticIntelligence` runs
the upstream plugin unchanged except that these snapshots are copies; parameters without a
gradient in a step (heads of other tasks) contribute a zero gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from avalanche.training.plugins import SynapticIntelligencePlugin

__all__ = ["CopyingSynapticIntelligence"]


@torch.no_grad()
def _extract_weights(model: Any, target: Any, excluded_parameters: Any) -> None:
    for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
        target[name].data = param.detach().flatten().cpu().clone()


@torch.no_grad()
def _extract_grad(model: Any, target: Any, excluded_parameters: Any) -> None:
    for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
        if param.grad is None:
            target[name].data = torch.zeros(param.numel())
        else:
            target[name].data = param.grad.detach().flatten().cpu().clone()


@contextmanager
def _copying_snapshots() -> Iterator[None]:
    saved = (
        SynapticIntelligencePlugin.__dict__["extract_weights"],
        SynapticIntelligencePlugin.__dict__["extract_grad"],
    )
    setattr(SynapticIntelligencePlugin, "extract_weights", staticmethod(_extract_weights))  # noqa: B010
    setattr(SynapticIntelligencePlugin, "extract_grad", staticmethod(_extract_grad))  # noqa: B010
    try:
        yield
    finally:
        setattr(SynapticIntelligencePlugin, "extract_weights", saved[0])  # noqa: B010
        setattr(SynapticIntelligencePlugin, "extract_grad", saved[1])  # noqa: B010


class CopyingSynapticIntelligence(SynapticIntelligencePlugin):
    """Avalanche's ``SynapticIntelligencePlugin`` with weight/gradient snapshots that are
    copies (see the module docstring). Same arguments as the upstream plugin."""

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        with _copying_snapshots():
            super().before_training_exp(strategy, **kwargs)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        with _copying_snapshots():
            super().before_training_iteration(strategy, **kwargs)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        with _copying_snapshots():
            super().after_training_iteration(strategy, **kwargs)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        with _copying_snapshots():
            super().after_training_exp(strategy, **kwargs)
