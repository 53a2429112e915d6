"""``SPG``: the convenience strategy (Naive training plus an :class:`SPGPlugin`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

    An ``SPGPlugin`` already in ``plugins`` is used as the strategy's plugin instead, at the
    position it was given (so ``SPG(..., plugins=[SPGPlugin(mask="update")])`` masks once, not
    twice); it cannot be combined with ``spg_kwargs``, and ``plugins`` may hold at most one.

    :param model: the model (a ``MultiTaskModule`` with a ``MultiHeadClassifier`` for the paper's
        task-incremental setting).
    :param optimizer: the optimizer; plain SGD makes the soft mask exact (see :class:`SPGPlugin`).
    :param criterion: the training loss (default cross-entropy).
    :param spg_kwargs: keyword arguments of :class:`SPGPlugin` (e.g. ``{"mask": "update"}``).
    :param plugins: further plugins; may include the ``SPGPlugin`` to use (then no
        ``spg_kwargs``).
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
        if spg_kwargs is not None and not isinstance(spg_kwargs, Mapping):
            raise ValueError(
                f"spg_kwargs must be a dict of SPGPlugin arguments, got {spg_kwargs!r}"
            )
        if isinstance(plugins, SupervisedPlugin):
            raise ValueError(f"plugins must be a list of plugins, got the plugin {plugins!r}")
        given = list(plugins or [])
        supplied = [p for p in given if isinstance(p, SPGPlugin)]
        if len(supplied) > 1:
            raise ValueError(
                f"plugins holds {len(supplied)} SPGPlugin entries; SPG needs exactly one "
                "(each entry would mask every gradient once more)"
            )
        if supplied and spg_kwargs is not None:
            raise ValueError(
                f"got both spg_kwargs={spg_kwargs!r} and an SPGPlugin in plugins; configure "
                "SPG in one place: pass the plugin in plugins, or spg_kwargs without one"
            )
        if supplied:
            self.spg_plugin = supplied[0]
            all_plugins = given
        else:
            self.spg_plugin = SPGPlugin(**(spg_kwargs or {}))
            all_plugins = [*given, self.spg_plugin]
        if criterion is None:
            criterion = nn.CrossEntropyLoss()
        super().__init__(
            model=model, optimizer=optimizer, criterion=criterion, plugins=all_plugins, **kwargs
        )
