"""``SPG``: the convenience strategy (Naive training plus an :class:`SPGPlugin`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.optim import Optimizer

from avalanche_spg.plugin import SPGPlugin

__all__ = ["SPG"]


class SPG(SupervisedTemplate):
    """SPG strategy (Konishi et al., ICML 2023): Avalanche's SGD template plus :class:`SPGPlugin`.

    Mirrors Avalanche's ``EWC`` strategy: every argument of ``SupervisedTemplate`` is accepted
    and an ``SPGPlugin`` built from ``spg_kwargs`` is appended to ``plugins`` (after the user's
    plugins, so a plugin that restores weights at the end of an experience runs first).

    :param model: the model (a ``MultiTaskModule`` with a ``MultiHeadClassifier`` for the paper's
        task-incremental setting).
    :param optimizer: the optimizer; plain SGD makes the soft mask exact (see :class:`SPGPlugin`).
    :param criterion: the training loss (default cross-entropy).
    :param spg_kwargs: keyword arguments of :class:`SPGPlugin` (e.g. ``{"mask": "update"}``).
    :param plugins: further plugins.
    :param kwargs: any other ``SupervisedTemplate`` argument (``train_mb_size``,
        ``train_epochs``, ``eval_mb_size``, ``device``, ``evaluator``, ``eval_every``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        criterion: Any = None,
        *,
        spg_kwargs: dict[str, Any] | None = None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        **kwargs: Any,
    ) -> None:
        self.spg_plugin = SPGPlugin(**(spg_kwargs or {}))
        all_plugins = [*(plugins or []), self.spg_plugin]
        if criterion is None:
            criterion = nn.CrossEntropyLoss()
        super().__init__(
            model=model, optimizer=optimizer, criterion=criterion, plugins=all_plugins, **kwargs
        )
