"""``SPGPlugin``: SPG (Konishi et al., ICML 2023) as an Avalanche ``SupervisedPlugin``.

Where things happen:

* importance after each experience: :meth:`SPGPlugin.after_training_exp`, which calls
  :func:`avalanche_spg.experience_pass.experience_gamma` (the experience's data and the pass's
  settings; the pass itself is :func:`avalanche_spg.importance_pass.compute_gamma`) and
  :func:`avalanche_spg.importance.max_accumulate`;
* gradient masking before ``optimizer.step()``: :meth:`SPGPlugin.before_update`, which calls
  :meth:`avalanche_spg.masking.MaskSet.mask_gradients` on the masks that
  :func:`avalanche_spg.masking.build_masks` fixed when the experience started.

Which parameters are heads, and whether the model still has every earlier task's head:
:mod:`avalanche_spg.heads`; checks of the constructor arguments, of a loaded state against the
model, and of the optimizer: :mod:`avalanche_spg.validation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from avalanche_spg.experience_pass import experience_gamma
from avalanche_spg.heads import (
    HeadSelector,
    check_earlier_heads,
    check_head_selection,
    split_parameters,
)
from avalanche_spg.importance import max_accumulate
from avalanche_spg.importance_pass import ImportanceMethod
from avalanche_spg.masking import HeadRule, MaskSet, StepGuard, build_masks, rule_head_scale
from avalanche_spg.process_group import unwrap_model
from avalanche_spg.validation import (
    STATE_VERSION,
    approximate_masking_reason,
    check_importance_names,
    check_plugin_arguments,
    checked_state,
)

__all__ = ["SPGPlugin", "SPGOptimizerWarning", "HeadSelector", "unwrap_model"]

MaskMode = Literal["grad", "update"]


class SPGOptimizerWarning(UserWarning):
    """The optimizer makes gradient masking only an approximate soft freeze."""


class SPGPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Parameter-level soft-masking (SPG), Konishi et al., ICML 2023 (arXiv 2306.14775).

    After each experience SPG measures how important every feature-extractor parameter is to the
    tasks seen so far (standardised, ``|tanh|``-squashed gradients of the current head's loss and
    of every older head's logit sum, Section 3.1) and keeps the elementwise maximum over tasks.
    While training later experiences it multiplies each feature gradient by ``1 - importance``
    and each head gradient by ``1 - mean(importance)`` (Section 3.2), so what earlier tasks need
    barely moves while unimportant parameters stay fully plastic.

    Task-incremental by design: use a ``MultiTaskModule`` with a ``MultiHeadClassifier`` and a
    benchmark with task labels. A model without task heads gets single-head behaviour: every
    trainable parameter is a feature parameter and importance comes from the current loss only.

    Exact soft freezing needs plain SGD (no momentum, no weight decay), as in the paper. Other
    optimizers trigger one :class:`SPGOptimizerWarning`; use ``mask="update"`` and/or
    ``reset_optimizer_state=True`` for them.

    :param heads: which parameters are task heads (the scalar head rule applies to them; they get
        no importance). ``None`` (default): every parameter inside an Avalanche
        ``MultiHeadClassifier`` or ``IncrementalClassifier``. A sequence of module names selects
        the parameters inside those modules; a callable ``(name, param) -> bool`` decides per
        parameter. Every other trainable parameter is a feature parameter; a selection that
        leaves none is refused when training starts (SPG would protect nothing).
    :param clip_head_grad_norm: clip the head gradients' total norm to this value before scaling
        them, as the reference code does (``1e4``; a safety net that rarely fires). ``None``
        disables it.
    :param importance_method: ``"fast"`` (default; one forward per minibatch shared by all heads,
        gradients of the feature extractor only, larger minibatches; same result as the loop up to
        float rounding when the model has no dropout) or ``"reference"`` (the straightforward
        per-head loop of the paper).
    :param importance_batch_size: the reference minibatch size whose per-batch mean losses are
        summed (Section 3.1 sums over the task's minibatches). ``None``: the training minibatch,
        i.e. the strategy's ``train_mb_size`` times the number of processes under DDP (each
        optimizer step averages ``train_mb_size`` samples from every rank).
    :param importance_pass_batch_size: minibatch size used by the fast pass (``None``: a
        size from ``importance_pass.default_pass_batch_size``: about 128 samples on CPU,
        512 on GPU). Does not change the result.
    :param importance_max_samples: estimate importance on the first N samples of a random
        permutation (fixed seed) of the experience instead of on all of it. ``None`` (default)
        follows the paper: the whole experience.
    :param mask: ``"grad"`` (default, the paper): scale gradients in ``before_update``.
        ``"update"``: scale the parameter change of each optimizer step instead, which is an exact
        soft freeze under any optimizer (momentum, weight decay, Adam).
    :param reset_optimizer_state: clear the optimizer's state (momentum buffers, Adam moments) at
        the start of every experience, as the reference's fresh optimizer per task does.
    :param warn_optimizer: warn once if the optimizer makes gradient masking approximate.
    :param num_workers: DataLoader workers for the importance pass.
    :param head_rule: how head gradients are scaled once importance exists (Section 3.2,
        Eq. 5). ``"mean"`` (default, the paper): by ``1 - mean(A)``, one scalar over every
        element of every importance tensor. ``"none"``: left unscaled (a variant, not the
        paper: new heads learn at the full learning rate however full the network is; the clip
        of ``clip_head_grad_norm`` still applies).
    :param previous_heads: ``True`` (default, the paper, Section 3.1): the importance pass also
        back-propagates the sum of every older head's logits over the current data, so that
        parameters the old heads' outputs depend on are protected. ``False`` (a variant): only
        the current head's loss contributes.
    :param class_incremental: beyond the paper — for a single shared (growing) classifier and no
        task labels. Class groups (the classes of each experience) play the role of task heads
        in the importance pass, and each classifier row gets its own importance from the
        experience that introduced its class instead of the scalar head rule. Exactly what it
        does: :mod:`avalanche_spg.class_incremental`.
    """

    def __init__(
        self,
        heads: HeadSelector | None = None,
        clip_head_grad_norm: float | None = 1e4,
        importance_method: ImportanceMethod = "fast",
        importance_batch_size: int | None = None,
        importance_pass_batch_size: int | None = None,
        importance_max_samples: int | None = None,
        mask: MaskMode = "grad",
        reset_optimizer_state: bool = False,
        warn_optimizer: bool = True,
        num_workers: int = 0,
        class_incremental: bool = False,
        head_rule: HeadRule = "mean",
        previous_heads: bool = True,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.clip_head_grad_norm = clip_head_grad_norm
        self.importance_method: ImportanceMethod = importance_method
        self.importance_batch_size = importance_batch_size
        self.importance_pass_batch_size = importance_pass_batch_size
        self.importance_max_samples = importance_max_samples
        self.mask: MaskMode = mask
        self.reset_optimizer_state = reset_optimizer_state
        self.warn_optimizer = warn_optimizer
        self.num_workers = num_workers
        self.class_incremental = class_incremental
        self.head_rule: HeadRule = head_rule
        self.previous_heads = previous_heads
        check_plugin_arguments(self)

        # State that survives a checkpoint (plain data).
        self._importance: dict[str, Tensor] = {}
        self._seen_tasks: list[int] = []
        self._class_groups: list[list[int]] = []
        self._experiences_seen = 0

        # Per-experience working state, rebuilt at every experience.
        self._masks: MaskSet | None = None
        self._masks_stale = False  # state loaded during an experience: rebuild the masks
        self._head_scale = 1.0
        self._step_guard = StepGuard()  # no optimizer step without the masks
        self._iterations_this_exp = 0
        self._updates_this_exp = 0
        self._warned_optimizer = False
        self._warned_unknown = False

    # ------------------------------------------------------------------ public state
    @property
    def importance(self) -> dict[str, Tensor]:
        """Accumulated importance ``A``: ``{parameter name: tensor in [0, 1)}``.

        Keys are the names of ``model.named_parameters()`` (of the unwrapped model under
        DDP) for the feature parameters only (with ``class_incremental=True`` also the
        classifier's, row by row); shapes equal the parameters' shapes.
        """
        return {name: value.detach().clone() for name, value in self._importance.items()}

    @property
    def head_scale(self) -> float:
        """The scalar ``1 - mean(A)`` applied to head gradients (1.0 before any importance)."""
        return self._head_scale

    @property
    def seen_tasks(self) -> list[int]:
        """Task labels trained so far, in order of first appearance."""
        return list(self._seen_tasks)

    def state_dict(self) -> dict[str, Any]:
        """The plugin's persistent state as plain data (tensors on CPU)."""
        return {
            "version": STATE_VERSION,
            "importance": {k: v.detach().cpu().clone() for k, v in self._importance.items()},
            "seen_tasks": list(self._seen_tasks),
            "class_groups": [list(g) for g in self._class_groups],
            "experiences_seen": self._experiences_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, all or nothing.

        Every entry is checked before anything is replaced: a missing, unknown or malformed
        entry, or importance outside ``[0, 1]``, raises ``ValueError`` naming it and leaves the
        plugin as it was. Whether the importance fits the model's parameters (it may be smaller
        than a parameter that grew, never larger) is checked when the next experience starts,
        before its first step.
        """
        importance, seen_tasks, class_groups, experiences_seen = checked_state(state)
        self._importance = importance
        self._seen_tasks = seen_tasks
        self._class_groups = class_groups
        self._experiences_seen = experiences_seen
        self._head_scale = rule_head_scale(self._importance, self.head_rule)
        self._masks = None
        self._masks_stale = True  # loaded during an experience: the next update rebuilds them

    def split_parameters(
        self, model: nn.Module
    ) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """``(feature_params, head_params)`` of ``model`` by name (trainable parameters only),
        as the ``heads`` argument selects them (:func:`avalanche_spg.heads.split_parameters`)."""
        return split_parameters(model, self.heads)

    # ------------------------------------------------------------------ callbacks
    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Refuse, before any step, what SPG cannot serve: a second SPGPlugin, a strategy that
        never fires ``before_update``, one that does not train a classifier with cross-entropy,
        ... (:func:`avalanche_spg.compat.check_strategy`)."""
        from avalanche_spg.compat import check_strategy

        check_strategy(strategy)
        # Validate the head selection now rather than after the first experience has trained.
        check_head_selection(strategy.model, self.heads)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Check that the model fits the plugin's state, fix ``1 - A`` and the head scale for
        this experience on the parameters' device, and guard the optimizer's steps."""
        self._iterations_this_exp = 0
        self._updates_this_exp = 0
        self._step_guard.detach()
        # Everything that could fail runs before anything changes: the model's heads, then
        # the masks (which check that the importance fits the parameters).
        if self.previous_heads and not self.class_incremental:
            labels = getattr(getattr(strategy, "experience", None), "task_labels", [0])
            check_earlier_heads(strategy.model, self._seen_tasks, {int(t) for t in labels})
        self._masks = self._build_masks(strategy.model)
        self._masks_stale = False
        optimizer = strategy.optimizer  # None for strategies without one (StreamingLDA)
        if optimizer is not None:
            if self.reset_optimizer_state:
                optimizer.state.clear()
            self._warn_about(optimizer)
        self._step_guard.attach(optimizer, type(strategy).__name__)

    def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Refuse, before the experience's first step, an output that is not class logits
        (:func:`avalanche_spg.compat.check_output`): the importance pass would fail on it
        once the experience has trained."""
        if self._iterations_this_exp == 0:
            from avalanche_spg.compat import check_output

            check_output(strategy)

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Scale the gradients (``mask='grad'``) or remember the parameters (``'update'``)."""
        self._updates_this_exp += 1
        if strategy.optimizer is not self._step_guard.optimizer:
            # A plugin replaced the optimizer during the experience.
            self._step_guard.attach(strategy.optimizer, type(strategy).__name__)
        self._step_guard.allow()
        if self._masks_stale:
            self._masks = self._build_masks(strategy.model)
            self._masks_stale = False
        masks = self._masks
        if masks is None:
            return
        if self.mask == "grad":
            masks.mask_gradients()
        else:
            masks.snapshot()

    def after_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """In ``mask='update'`` mode, scale the change the optimizer just made."""
        if self.mask == "update" and self._masks is not None:
            self._masks.mask_updates()

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Check that every iteration called ``before_update``.

        The step guard already refuses an unmasked step of the optimizer; this catches a
        strategy that updates the model some other way (an optimizer without step hooks).
        """
        self._iterations_this_exp += 1
        if self._updates_this_exp < self._iterations_this_exp:
            raise RuntimeError(
                f"SPGPlugin: {type(strategy).__name__} finished training iteration "
                f"{self._iterations_this_exp - 1} of this experience without calling "
                "before_update; SPG's masks would silently do nothing. Use a strategy based on "
                "Avalanche's SGDUpdate (Naive, Replay, EWC, ...)."
            )

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Compute this experience's importance and fold it into ``A`` (Section 3.1)."""
        self._step_guard.detach()
        self._masks = None  # frees the factor buffers between experiences
        experience = strategy.experience
        current = [int(t) for t in getattr(experience, "task_labels", [0])]
        gamma = self._compute_gamma(strategy, current)
        max_accumulate(self._importance, gamma)
        for task in current:
            if task not in self._seen_tasks:
                self._seen_tasks.append(task)
        classes = sorted(int(c) for c in getattr(experience, "classes_in_this_experience", []))
        self._class_groups.append(classes)
        self._experiences_seen += 1
        self._head_scale = rule_head_scale(self._importance, self.head_rule)

    # ------------------------------------------------------------------ internals
    def _compute_gamma(self, strategy: Any, current: list[int]) -> dict[str, Tensor]:
        """``gamma`` of the experience just trained (:mod:`avalanche_spg.experience_pass`); the
        pass leaves the model as it found it (flags, normalisation statistics, buffers)."""
        model = unwrap_model(strategy.model)
        features, heads = self.split_parameters(model)
        return experience_gamma(
            model,
            strategy.experience,
            features,
            heads,
            current,
            device=strategy.device,
            train_mb_size=strategy.train_mb_size,
            seen_tasks=self._seen_tasks,
            class_groups=self._class_groups,
            seed=self._experiences_seen,
            method=self.importance_method,
            batch_size=self.importance_batch_size,
            pass_batch_size=self.importance_pass_batch_size,
            max_samples=self.importance_max_samples,
            num_workers=self.num_workers,
            class_incremental=self.class_incremental,
            previous_heads=self.previous_heads,
        )

    def _build_masks(self, model: nn.Module) -> MaskSet | None:
        features, heads = self.split_parameters(model)
        unknown = check_importance_names(
            self._importance,
            unwrap_model(model),
            features,
            heads,
            head_selection=self.heads,
            class_incremental=self.class_incremental,
        )
        # Frozen parameters (not trainable now) keep their importance but need no mask.
        if unknown and not self._warned_unknown:
            self._warned_unknown = True
            warnings.warn(
                "SPGPlugin: importance holds entries for parameters that are not trainable "
                f"feature parameters of this model ({len(unknown)}, e.g. {unknown[:5]}); they "
                "are kept (and count in the head scale) but mask nothing.",
                stacklevel=2,
            )
        # Fitted to the parameters (grown ones padded with 0) and kept on their device from
        # now on; refused, with nothing changed, if some importance is larger than its tensor.
        masks, self._importance, self._head_scale = build_masks(
            self._importance,
            features,
            heads,
            head_rule=self.head_rule,
            clip_head_grad_norm=self.clip_head_grad_norm,
            rows_as_features=self.class_incremental,
        )
        return masks

    def _warn_about(self, optimizer: torch.optim.Optimizer) -> None:
        """One :class:`SPGOptimizerWarning` if ``optimizer`` makes gradient masking inexact."""
        if not self.warn_optimizer or self._warned_optimizer or self.mask != "grad":
            return
        reason = approximate_masking_reason(optimizer)
        if reason is not None:
            self._warned_optimizer = True
            warnings.warn(
                f"SPGPlugin: the optimizer {reason}, so masking gradients is only an "
                "approximate soft freeze (a parameter with importance 1 still moves). Use "
                "SPGPlugin(mask='update') to mask the parameter change itself, and/or "
                "reset_optimizer_state=True; plain SGD matches the paper.",
                SPGOptimizerWarning,
                stacklevel=3,
            )
