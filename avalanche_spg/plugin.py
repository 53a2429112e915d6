"""``SPGPlugin``: SPG (Konishi et al., ICML 2023) as an Avalanche ``SupervisedPlugin``.

Where things happen:

* importance after each experience: :meth:`SPGPlugin.after_training_exp`, which calls
  :func:`avalanche_spg.importance_pass.compute_gamma` and
  :func:`avalanche_spg.importance.max_accumulate`;
* gradient masking before ``optimizer.step()``: :meth:`SPGPlugin.before_update`, which calls
  :meth:`avalanche_spg.masking.MaskSet.mask_gradients`.
"""

from __future__ import annotations

import functools
import math
import operator
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from avalanche_spg.class_incremental import compute_gamma_class_incremental
from avalanche_spg.importance import head_scale, max_accumulate
from avalanche_spg.importance_pass import (
    ImportanceMethod,
    avalanche_convention,
    compute_gamma,
    find_multihead_classifier,
)
from avalanche_spg.masking import MaskSet, align_importance, build_mask_set

__all__ = ["SPGPlugin", "SPGOptimizerWarning", "HeadSelector", "unwrap_model"]

#: How heads are chosen: module-name prefixes, or a predicate on (parameter name, parameter).
HeadSelector = Sequence[str] | Callable[[str, nn.Parameter], bool]
MaskMode = Literal["grad", "update"]
HeadRule = Literal["mean", "none"]

_STATE_VERSION = 1


class SPGOptimizerWarning(UserWarning):
    """The optimizer makes gradient masking only an approximate soft freeze."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _default_head_names(model: nn.Module) -> set[str]:
    from avalanche.models import IncrementalClassifier, MultiHeadClassifier

    prefixes = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (MultiHeadClassifier, IncrementalClassifier))
    ]
    return {
        name
        for name, _ in model.named_parameters()
        if any(name == p or name.startswith(p + ".") for p in prefixes if p) or "" in prefixes
    }


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
        if heads is not None and not callable(heads):
            if (
                isinstance(heads, (str, bytes))
                or not isinstance(heads, Sequence)
                or not all(isinstance(h, str) for h in heads)
            ):
                raise ValueError(
                    "heads must be None, a sequence of module names or a callable "
                    f"(name, param) -> bool; got {heads!r}"
                )
        if clip_head_grad_norm is not None and (
            isinstance(clip_head_grad_norm, bool)
            or not isinstance(clip_head_grad_norm, (int, float))
            or not math.isfinite(clip_head_grad_norm)
            or clip_head_grad_norm <= 0
        ):
            raise ValueError(
                "clip_head_grad_norm must be a positive finite number or None, got "
                f"{clip_head_grad_norm!r}"
            )
        for flag_name, flag in (
            ("reset_optimizer_state", reset_optimizer_state),
            ("warn_optimizer", warn_optimizer),
            ("class_incremental", class_incremental),
            ("previous_heads", previous_heads),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{flag_name} must be True or False, got {flag!r}")
        if importance_method not in ("fast", "reference"):
            raise ValueError(
                f"importance_method must be 'fast' or 'reference', got {importance_method!r}"
            )
        for arg_name, value in (
            ("importance_batch_size", importance_batch_size),
            ("importance_pass_batch_size", importance_pass_batch_size),
            ("importance_max_samples", importance_max_samples),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{arg_name} must be a positive int or None, got {value!r}")
        if head_rule not in ("mean", "none"):
            raise ValueError(f"head_rule must be 'mean' or 'none', got {head_rule!r}")
        if mask not in ("grad", "update"):
            raise ValueError(f"mask must be 'grad' or 'update', got {mask!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")

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
        self.class_incremental = bool(class_incremental)
        self.head_rule: HeadRule = head_rule
        self.previous_heads = previous_heads

        # State that survives a checkpoint (plain data).
        self._importance: dict[str, Tensor] = {}
        self._seen_tasks: list[int] = []
        self._class_groups: list[list[int]] = []
        self._experiences_seen = 0
        #: Seconds spent in the last importance pass (for benchmarks).
        self.last_importance_seconds = 0.0

        # Per-experience working state, rebuilt at every experience.
        self._masks: MaskSet | None = None
        self._head_scale = 1.0
        self._warned_optimizer = False
        self._warned_unknown = False
        self._iterations_this_exp = 0
        self._updates_this_exp = 0
        # The step guard: an optimizer step pre-hook that refuses a step not preceded by
        # before_update, registered for the duration of each experience.
        self._update_pending = False
        self._step_guard: RemovableHandle | None = None
        self._guarded_optimizer: Any = None
        self._masks_stale = False  # state loaded during an experience: rebuild the masks

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
            "version": _STATE_VERSION,
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
        importance, seen_tasks, class_groups, experiences_seen = _checked_state(state)
        self._importance = importance
        self._seen_tasks = seen_tasks
        self._class_groups = class_groups
        self._experiences_seen = experiences_seen
        self._head_scale = self._applied_head_scale()
        self._masks = None
        self._masks_stale = True  # loaded during an experience: the next update rebuilds them

    # ------------------------------------------------------------------ partition
    def split_parameters(
        self, model: nn.Module
    ) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """``(feature_params, head_params)`` of ``model`` by name (trainable parameters only)."""
        model = unwrap_model(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.heads is None:
            head_names = _default_head_names(model)
            is_head = [n in head_names for n, _ in named]
        elif callable(self.heads):
            is_head = [bool(self.heads(n, p)) for n, p in named]
        else:
            module_names = dict(model.named_modules())
            missing = [h for h in self.heads if h not in module_names]
            if missing:
                raise ValueError(
                    f"heads names modules that the model does not have: {missing}; "
                    f"modules are e.g. {list(module_names)[1:8]}"
                )
            prefixes = list(self.heads)
            is_head = [any(n.startswith(h + ".") for h in prefixes) for n, _ in named]
        features = {n: p for (n, p), head in zip(named, is_head) if not head}
        heads = {n: p for (n, p), head in zip(named, is_head) if head}
        return features, heads

    # ------------------------------------------------------------------ callbacks
    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Refuse strategies that never call ``before_update`` (masking would be a no-op)."""
        from avalanche.training.templates import SupervisedMetaLearningTemplate

        if isinstance(strategy, SupervisedMetaLearningTemplate):
            raise RuntimeError(
                f"SPGPlugin cannot work with {type(strategy).__name__}: meta-learning strategies "
                "(MER, LaMAML) call optimizer.step() themselves and never fire before_update, "
                "so SPG's gradient masks would silently do nothing."
            )
        # Validate the head selection now rather than after the first experience has trained.
        self.split_parameters(strategy.model)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Check that the model fits the plugin's state, fix ``1 - A`` and the head scale for
        this experience on the parameters' device, and guard the optimizer's steps."""
        self._iterations_this_exp = 0
        self._updates_this_exp = 0
        self._update_pending = False
        self._unguard_steps()
        # Everything that could fail runs before anything changes: the model's heads, then
        # the masks (which check that the importance fits the parameters).
        self._check_previous_heads(strategy)
        self._masks = self._build_masks(strategy.model)
        self._masks_stale = False
        optimizer = strategy.optimizer  # None for strategies without one (StreamingLDA)
        if self.reset_optimizer_state and optimizer is not None:
            optimizer.state.clear()
        if (
            self.warn_optimizer
            and not self._warned_optimizer
            and self.mask == "grad"
            and optimizer is not None
        ):
            reason = _approximate_masking_reason(optimizer)
            if reason is not None:
                self._warned_optimizer = True
                warnings.warn(
                    f"SPGPlugin: the optimizer {reason}, so masking gradients is only an "
                    "approximate soft freeze (a parameter with importance 1 still moves). Use "
                    "SPGPlugin(mask='update') to mask the parameter change itself, and/or "
                    "reset_optimizer_state=True; plain SGD matches the paper.",
                    SPGOptimizerWarning,
                    stacklevel=2,
                )
        self._guard_steps(strategy)

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Scale the gradients (``mask='grad'``) or remember the parameters (``'update'``)."""
        self._updates_this_exp += 1
        self._update_pending = True
        if strategy.optimizer is not self._guarded_optimizer:
            self._guard_steps(strategy)  # a plugin replaced the optimizer during the experience
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
        self._unguard_steps()
        self._masks = None  # frees the factor buffers between experiences
        experience = strategy.experience
        current = [int(t) for t in getattr(experience, "task_labels", [0])]
        started = time.perf_counter()
        gamma = self._compute_gamma(strategy, current)
        max_accumulate(self._importance, gamma)
        for task in current:
            if task not in self._seen_tasks:
                self._seen_tasks.append(task)
        classes = sorted(int(c) for c in getattr(experience, "classes_in_this_experience", []))
        self._class_groups.append(classes)
        self._experiences_seen += 1
        self._head_scale = self._applied_head_scale()
        self.last_importance_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ internals
    def _applied_head_scale(self) -> float:
        """The head rule's scalar: ``1 - mean(A)`` (paper) or 1 (``head_rule="none"``)."""
        return head_scale(self._importance) if self.head_rule == "mean" else 1.0

    def _compute_gamma(self, strategy: Any, current: list[int]) -> dict[str, Tensor]:
        # The pass leaves the model as it found it (flags, normalisation statistics, every
        # buffer and plain attribute): compute_gamma restores them itself.
        return self._run_importance_pass(strategy, unwrap_model(strategy.model), current)

    def _run_importance_pass(
        self, strategy: Any, model: nn.Module, current: list[int]
    ) -> dict[str, Tensor]:
        features, heads = self.split_parameters(model)
        # The experience's own training data (not strategy.dataloader, which replay plugins
        # extend), with the training transforms, in a fixed order.
        dataset = strategy.experience.dataset
        dataset = dataset.train() if hasattr(dataset, "train") else dataset
        if self.importance_max_samples is not None and self.importance_max_samples < len(dataset):
            generator = torch.Generator().manual_seed(self._experiences_seen)
            chosen = torch.randperm(len(dataset), generator=generator)
            dataset = _SubsetWithCollate(
                dataset, sorted(chosen[: self.importance_max_samples].tolist())
            )
        # Under DDP each optimizer step averages train_mb_size samples from every process.
        reference_batch = self.importance_batch_size or strategy.train_mb_size * _world_size()
        # The model is called as Avalanche's training calls it (avalanche_forward).
        forward, task_aware = avalanche_convention(model)
        if self.class_incremental:
            return compute_gamma_class_incremental(
                model,
                dataset,
                features,
                heads,
                strategy.experience.classes_in_this_experience,
                self._class_groups if self.previous_heads else [],
                device=strategy.device,
                batch_size=reference_batch,
                num_workers=self.num_workers,
                forward=forward,
            )
        total = len(dataset)
        indices: list[int] | None = None
        reducer = None
        shard = _distributed_shard(total)
        if shard is not None:
            indices, reducer = shard
        return compute_gamma(
            model,
            dataset,
            features,
            current,
            # A model without task heads has no older heads to protect.
            self._seen_tasks if self.previous_heads and task_aware else [],
            device=strategy.device,
            reference_batch_size=reference_batch,
            method=self.importance_method,
            pass_batch_size=self.importance_pass_batch_size,
            indices=indices,
            total_samples=total,
            grad_reducer=reducer,
            num_workers=self.num_workers,
            forward=forward,
            classifier=find_multihead_classifier(model),
        )

    def _guard_steps(self, strategy: Any) -> None:
        """Refuse every step of ``strategy.optimizer`` not preceded by ``before_update``.

        A step pre-hook checks a flag that ``before_update`` sets and each step consumes: one
        Python comparison per step, no tensor work, so an unmasked step is refused before it
        changes any parameter, on every iteration. Removed when the experience ends.
        """
        self._unguard_steps()
        optimizer = strategy.optimizer
        self._guarded_optimizer = optimizer
        register = getattr(optimizer, "register_step_pre_hook", None)
        if register is not None:
            self._step_guard = register(
                functools.partial(self._check_step, type(strategy).__name__)
            )

    def _unguard_steps(self) -> None:
        if self._step_guard is not None:
            self._step_guard.remove()
        self._step_guard = None
        self._guarded_optimizer = None

    def _check_step(self, strategy_name: str, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._update_pending:
            raise RuntimeError(
                f"SPGPlugin: {strategy_name} called optimizer.step() without calling "
                "before_update first; the step was refused, since it would have moved the "
                "parameters without SPG's masks. Use a strategy based on Avalanche's SGDUpdate "
                "(Naive, Replay, EWC, ...)."
            )
        self._update_pending = False

    def _check_previous_heads(self, strategy: Any) -> None:
        """Refuse, before training, a model that lacks the head of a task trained earlier.

        The importance pass after this experience back-propagates every earlier head's logits
        (Section 3.1); without the head it could only fail once the experience has trained.
        Checked on Avalanche's ``MultiHeadClassifier`` (the heads other models keep are not
        known).
        """
        from avalanche.models import MultiHeadClassifier, MultiTaskModule

        model = unwrap_model(strategy.model)
        if self.class_incremental or not self.previous_heads:
            return
        if not isinstance(model, MultiTaskModule):
            return
        experience = getattr(strategy, "experience", None)
        current = {int(t) for t in getattr(experience, "task_labels", [0])}
        needed = [t for t in self._seen_tasks if t not in current]
        for name, module in model.named_modules():
            if not isinstance(module, MultiHeadClassifier):
                continue
            missing = [t for t in needed if str(t) not in module.classifiers]
            if missing:
                raise ValueError(
                    f"SPGPlugin: tasks {missing} were trained earlier (seen_tasks "
                    f"{self._seen_tasks}) but the model's MultiHeadClassifier {name!r} has no "
                    f"head for them (it has heads {sorted(module.classifiers, key=int)}); SPG's "
                    "importance needs every earlier head. Restore the model together with "
                    "the plugin's state."
                )

    def _build_masks(self, model: nn.Module) -> MaskSet | None:
        features, heads = self.split_parameters(model)
        if not features and not self.class_incremental:
            raise ValueError(
                "SPGPlugin: the model has no trainable feature parameter (the head selection "
                f"heads={_shown(self.heads)} takes every trainable parameter), so SPG would "
                "protect nothing. Select only the task heads as heads."
            )
        if not self._importance:
            # First experience: nothing is masked (A = 0, s = 1); the reference still clips
            # head gradients on every task, so the clip alone stays active.
            self._head_scale = 1.0
            if self.clip_head_grad_norm is None or self.class_incremental or not heads:
                return None
            return MaskSet([], [], list(heads.values()), 1.0, self.clip_head_grad_norm)
        unknown = sorted(set(self._importance) - set(features) - set(heads))
        if unknown and not self._warned_unknown:
            self._warned_unknown = True
            warnings.warn(
                "SPGPlugin: importance holds entries for parameters that are not trainable "
                f"feature parameters of this model ({len(unknown)}, e.g. {unknown[:5]}); they "
                "are kept (and count in the head scale) but mask nothing.",
                stacklevel=2,
            )
        if self.class_incremental:
            # Classifier rows carry their own importance: masked elementwise like features.
            features, heads = {**features, **heads}, {}
        # Fitted to the parameters (grown ones padded with 0) and kept on their device from
        # now on; refused, with nothing changed, if some importance is larger than its tensor.
        self._importance = align_importance(self._importance, features)
        self._head_scale = self._applied_head_scale()
        return build_mask_set(
            self._importance, features, heads, self._head_scale, self.clip_head_grad_norm
        )


_REQUIRED_STATE_KEYS = ("version", "importance", "seen_tasks", "experiences_seen")
_OPTIONAL_STATE_KEYS = ("class_groups",)


def _shown(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _label(value: Any) -> int | None:
    """``value`` as an int if it is an integer (not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _labels(key: str, value: Any) -> list[int]:
    """A list of integer labels (``seen_tasks``, one class group) from a state entry."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"SPGPlugin state: {key} must be a list of ints, got {_shown(value)}")
    labels = [_label(v) for v in value]
    bad = [v for v, label in zip(value, labels) if label is None]
    if bad:
        raise ValueError(
            f"SPGPlugin state: {key} must be a list of ints, got {_shown(bad[0])} in "
            f"{_shown(value)}"
        )
    return [label for label in labels if label is not None]


def _checked_state(state: Any) -> tuple[dict[str, Tensor], list[int], list[list[int]], int]:
    """The entries of an ``SPGPlugin`` state, checked and converted, or ``ValueError``."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"SPGPlugin state must be a mapping from state_dict(), got {type(state).__name__}"
        )
    version = state.get("version")
    if isinstance(version, bool) or version != _STATE_VERSION:
        raise ValueError(f"unsupported SPGPlugin state version {version!r}")
    missing = [key for key in _REQUIRED_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"SPGPlugin state lacks the entries {missing}")
    unknown = [key for key in state if key not in _REQUIRED_STATE_KEYS + _OPTIONAL_STATE_KEYS]
    if unknown:
        raise ValueError(f"SPGPlugin state has unknown entries {unknown}")

    entries = state["importance"]
    if not isinstance(entries, Mapping):
        raise ValueError(
            f"SPGPlugin state: importance must map parameter names to tensors, got "
            f"{_shown(entries)}"
        )
    importance: dict[str, Tensor] = {}
    for name, value in entries.items():
        if not isinstance(name, str):
            raise ValueError(
                f"SPGPlugin state: importance must be keyed by parameter names, got {name!r}"
            )
        try:
            tensor = torch.as_tensor(value).detach().float().clone()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"SPGPlugin state: importance of {name!r} is not a tensor: {_shown(value)}"
            ) from error
        if (
            not bool(torch.isfinite(tensor).all())
            or bool((tensor < 0).any())
            or bool((tensor > 1).any())
        ):
            raise ValueError(f"importance of {name!r} must be finite and in [0, 1]")
        importance[name] = tensor

    seen_tasks = _labels("seen_tasks", state["seen_tasks"])
    groups = state.get("class_groups", [])
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(
            f"SPGPlugin state: class_groups must be a list of lists of ints, got {_shown(groups)}"
        )
    class_groups = [_labels("class_groups", group) for group in groups]
    experiences_seen = _label(state["experiences_seen"])
    if experiences_seen is None or experiences_seen < 0:
        raise ValueError(
            "SPGPlugin state: experiences_seen must be an int >= 0, got "
            f"{_shown(state['experiences_seen'])}"
        )
    return importance, seen_tasks, class_groups, experiences_seen


class _SubsetWithCollate(torch.utils.data.Dataset):
    """A subset that keeps the parent dataset's ``collate_fn``."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def _approximate_masking_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why gradient masking is not an exact soft freeze under ``optimizer`` (or ``None``)."""
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("momentum", 0) > 0:
                return f"uses momentum ({group['momentum']})"
            if group.get("weight_decay", 0) > 0:
                return f"uses weight decay ({group['weight_decay']})"
        return None
    return f"is {type(optimizer).__name__} (adaptive or stateful, not plain SGD)"


def _world_size() -> int:
    """Processes in the torch.distributed process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed_shard(total: int) -> tuple[list[int], Callable[[list[Tensor]], None]] | None:
    """This rank's positions and a summing all-reduce, when running under torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(tensors: list[Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    return list(range(rank, total, world)), all_reduce_sum
