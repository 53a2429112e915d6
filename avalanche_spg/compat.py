"""Which Avalanche strategies and plugins SPG can serve, checked before anything trains.

SPG (Konishi et al., ICML 2023) has two halves, and each needs something from the strategy:

* the importance pass (Section 3.1) back-propagates the **cross-entropy** of the current head on
  the experience's data (and the logit sums of older heads). That is the paper's "current task
  loss" only when the strategy trains the model as a classifier: its output must be class logits
  and its loss on the current data a cross-entropy of them (regularisers such as EWC or LwF on
  top are fine);
* the soft mask (Section 3.2) scales gradients in ``before_update``, so the strategy must train
  the model's parameters by gradient steps that fire ``before_update``, one SPG mask per step,
  and the parameters that earlier tasks trained must still be the ones being trained.

:func:`check_strategy` refuses, with :class:`SPGCompatibilityError`, every setup that breaks one
of these, naming the strategy or plugin and why. :class:`~avalanche_spg.SPGPlugin` calls it in
``before_training``, so the error comes before any step. The checks are, in order:

1. **SPG reachable, once.** Exactly one ``SPGPlugin`` in ``strategy.plugins``, at the top
   level. Two entries (the same plugin twice, or two plugins) would mask every gradient by
   ``(1 - A)^2``. A plugin inside a nested list is never called by Avalanche: the ``PackNet``
   strategy of Avalanche 0.6.0 builds ``plugins=[user_plugins, PackNetPlugin]``, so none of the
   user's plugins runs. SPG cannot see that from its own callbacks (none is ever called); call
   :func:`check_strategy` yourself after building a strategy to catch it.
2. **Gradient steps that fire ``before_update``.** Meta-learning templates (MER, LaMAML) step the
   optimizer themselves; a strategy without an optimizer (``StreamingLDA``) trains no parameter
   by gradient descent at all.
3. **The same parameters across experiences, trainable.** Plugins that re-initialise the model
   before every experience (``GDumbPlugin``, ``FromScratchTrainingPlugin``, so the ``GDumb`` and
   ``FromScratchTraining`` strategies) discard what SPG protects; ``PackNetPlugin`` hard-freezes
   each task's weights with gradient hooks when its experience ends, so SPG's importance pass
   sees zero gradients after it (and cannot run before it); ``ExpertGateStrategy`` trains a
   separate expert network per task under the same parameter names; ``JointTraining`` trains
   once, so there is no later experience to protect anything from.
4. **A classifier trained with cross-entropy.** Refused by criterion: ``VAE_loss`` (``VAETraining``,
   the generator of ``GenerativeReplay`` is trained by its own strategy and is not concerned),
   ``AE_loss`` (``AETraining``), ``SCRLoss`` (``SCR``: a projection trained contrastively),
   ``PPPloss`` and ``CoPEPlugin`` (``CoPE``: embeddings trained against class prototypes),
   ``ICaRLLossPlugin`` (``ICaRL``: per-class sigmoids with distillation targets, prediction by
   nearest mean of exemplars). Refused by strategy: ``ER_AML`` (its loss on the current data is a
   metric-learning loss on features once the buffer holds samples) and
   ``ObjectDetectionTemplate`` (detection losses). A criterion that is none of these and not a
   cross-entropy (``nn.CrossEntropyLoss``, ``nn.NLLLoss``, Avalanche's ``MaskedCrossEntropy``,
   ``torch.nn.functional.cross_entropy``/``nll_loss``) gets one :class:`SPGCompatibilityWarning`:
   importance still uses cross-entropy on the model output.
5. **Importance on the final weights.** A ``CWRStarPlugin`` placed after SPG would rewrite the
   classifier (CWR*'s consolidation) after SPG measured importance, so it must come before SPG.
   The ``CWRStar`` strategy appends its plugin after the user's, so use ``Naive`` with
   ``plugins=[CWRStarPlugin(...), SPGPlugin()]`` instead.

What composes, what is refused and why, strategy by strategy and plugin by plugin, is pinned by
``tests/test_composition_matrix.py`` and listed in the README.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SPGCompatibilityError", "SPGCompatibilityWarning", "check_strategy", "check_output"]


# Strategies already warned about their criterion: before_training runs at every train() call.
_WARNED_CRITERION: weakref.WeakSet[Any] = weakref.WeakSet()


class SPGCompatibilityError(RuntimeError):
    """The strategy, one of its plugins or its criterion is something SPG cannot serve."""


class SPGCompatibilityWarning(UserWarning):
    """The strategy's criterion is not a cross-entropy: importance uses cross-entropy anyway."""


def check_strategy(strategy: Any) -> None:
    """Raise :class:`SPGCompatibilityError` if SPG cannot serve ``strategy`` (see the module doc).

    Called by :meth:`SPGPlugin.before_training <avalanche_spg.SPGPlugin.before_training>`;
    call it yourself right after building a strategy to also catch an ``SPGPlugin`` that
    Avalanche would never call (a plugin list nested inside ``strategy.plugins``).
    """
    from avalanche_spg.plugin import SPGPlugin

    name = type(strategy).__name__
    plugins = list(getattr(strategy, "plugins", []))
    _check_spg_plugins(name, plugins, SPGPlugin)
    _check_update_path(strategy, name)
    _check_persistent_parameters(strategy, name, plugins)
    _check_objective(strategy, name, plugins)
    _check_final_weights(name, plugins, SPGPlugin)


def check_output(strategy: Any) -> None:
    """Raise :class:`SPGCompatibilityError` unless the model's output on the current minibatch
    (``strategy.mb_output``) is class logits: a tensor of shape ``(batch, classes, ...)``.

    The importance pass takes the cross-entropy of this output (Section 3.1); a tuple, a dict
    or one number per sample would fail there, after the experience has trained.
    :class:`~avalanche_spg.SPGPlugin` calls it after the first forward of every experience,
    before any step.
    """
    output = getattr(strategy, "mb_output", None)
    if isinstance(output, Tensor) and output.dim() >= 2:
        return
    found = (
        f"a tensor of shape {tuple(output.shape)}"
        if isinstance(output, Tensor)
        else f"a {type(output).__name__}"
    )
    raise SPGCompatibilityError(
        f"SPGPlugin cannot work with {type(strategy).__name__}: its model returns {found}, not "
        "class logits of shape (batch, classes); SPG's importance pass takes the cross-entropy "
        "of the model's output (Section 3.1)."
    )


def _check_spg_plugins(name: str, plugins: list[Any], spg_class: type) -> None:
    positions = [i for i, p in enumerate(plugins) if isinstance(p, spg_class)]
    nested = [
        i
        for i, p in enumerate(plugins)
        if isinstance(p, (list, tuple)) and any(isinstance(q, spg_class) for q in p)
    ]
    if nested:
        raise SPGCompatibilityError(
            f"{name}.plugins[{nested[0]}] is a list that holds an SPGPlugin: Avalanche calls "
            "only the plugins at the top level of strategy.plugins, so SPG would never run "
            "(Avalanche 0.6.0's PackNet strategy nests the user's plugins this way; use "
            "PackNetPlugin with a PackNetModel on a Naive strategy instead)."
        )
    if not positions:
        raise SPGCompatibilityError(
            f"{name}.plugins holds no SPGPlugin at its top level, so SPG would never run."
        )
    if len(positions) > 1:
        same = len({id(plugins[i]) for i in positions}) == 1
        what = "the same SPGPlugin" if same else "SPGPlugin instances"
        raise SPGCompatibilityError(
            f"{name}.plugins holds {what} {len(positions)} times (positions {positions}): every "
            f"gradient would be masked {len(positions)} times, by (1 - A)^{len(positions)} "
            "instead of (1 - A). Give a strategy exactly one SPGPlugin (with the SPG strategy, "
            "pass it in plugins= and no spg_kwargs, or pass spg_kwargs and no SPGPlugin)."
        )


def _check_update_path(strategy: Any, name: str) -> None:
    from avalanche.training.templates import SupervisedMetaLearningTemplate

    if isinstance(strategy, SupervisedMetaLearningTemplate):
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: meta-learning strategies (MER, LaMAML) call "
            "optimizer.step() themselves and never fire before_update, so SPG's gradient masks "
            "would silently do nothing."
        )
    if getattr(strategy, "optimizer", None) is None:
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: it has no optimizer, so it trains no parameter "
            "by gradient steps (StreamingLDA, for instance, fits class statistics on a frozen "
            "feature extractor) and there is nothing for SPG's gradient masks to act on."
        )


def _check_persistent_parameters(strategy: Any, name: str, plugins: list[Any]) -> None:
    from avalanche.training.plugins import FromScratchTrainingPlugin, GDumbPlugin
    from avalanche.training.supervised import ExpertGateStrategy, JointTraining

    for plugin in plugins:
        if isinstance(plugin, (GDumbPlugin, FromScratchTrainingPlugin)):
            raise SPGCompatibilityError(
                f"SPGPlugin cannot work with {type(plugin).__name__} (in {name}.plugins): it "
                "re-initialises the model before every experience, so the parameters that SPG's "
                "importance protects are thrown away and the masks would act on a fresh network."
            )
    from avalanche.models.packnet import PackNetPlugin

    for plugin in plugins:
        if isinstance(plugin, PackNetPlugin):
            raise SPGCompatibilityError(
                f"SPGPlugin cannot work with PackNetPlugin (in {name}.plugins): PackNet freezes "
                "every weight a task keeps at the end of its experience, with gradient hooks, so "
                "SPG's importance pass sees zero gradients (importance stays 0, SPG does "
                "nothing) when it runs after PackNetPlugin, and PackNet refuses the pass's "
                "forward (still pruning) when it runs before. Use PackNet or SPG, not both."
            )
    if isinstance(strategy, ExpertGateStrategy):
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: it trains a separate expert network for each "
            "task under the same parameter names, so importance measured on one task's expert "
            "would mask another network's gradients."
        )
    if isinstance(strategy, JointTraining):
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: joint training fits all experiences at once, "
            "so there is no later experience whose gradients SPG could mask; train it without "
            "SPG."
        )


def _check_objective(strategy: Any, name: str, plugins: list[Any]) -> None:
    from avalanche.models.expert_gate import AE_loss
    from avalanche.models.generator import VAE_loss
    from avalanche.training.losses import ICaRLLossPlugin, MaskedCrossEntropy, SCRLoss
    from avalanche.training.plugins import CoPEPlugin, PPPloss
    from avalanche.training.supervised import ER_AML

    why = (
        "SPG's importance is the gradient of the cross-entropy of the model's output (Section "
        "3.1), which measures nothing meaningful unless the strategy trains the model as a "
        "classifier with a cross-entropy loss."
    )
    for plugin in plugins:
        if isinstance(plugin, CoPEPlugin):
            raise SPGCompatibilityError(
                f"SPGPlugin cannot work with CoPEPlugin (in {name}.plugins): it replaces the "
                "criterion with CoPE's prototype loss (PPPloss) on an embedding, not class "
                f"logits. {why}"
            )
    if isinstance(strategy, ER_AML):
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: once its buffer holds samples, its loss on the "
            f"current data is a metric-learning loss on features (AML), not cross-entropy. {why}"
        )
    try:
        from avalanche.training.supervised.naive_object_detection import (
            ObjectDetectionTemplate,
        )
    except ImportError:  # pragma: no cover - optional detection dependencies
        ObjectDetectionTemplate = None  # noqa: N806
    if ObjectDetectionTemplate is not None and isinstance(strategy, ObjectDetectionTemplate):
        raise SPGCompatibilityError(
            f"SPGPlugin cannot work with {name}: object detection models return their own "
            f"losses, not class logits. {why}"
        )
    criterion = getattr(strategy, "_criterion", None)
    refused: list[tuple[Callable[[Any], bool], str]] = [
        (lambda c: c is VAE_loss, "VAE_loss (a variational autoencoder's reconstruction + KL)"),
        (lambda c: c is AE_loss, "AE_loss (an autoencoder's reconstruction)"),
        (lambda c: isinstance(c, SCRLoss), "SCRLoss (supervised contrastive, on projections)"),
        (lambda c: isinstance(c, PPPloss), "PPPloss (CoPE's prototype loss, on embeddings)"),
        (
            lambda c: isinstance(c, ICaRLLossPlugin),
            "ICaRLLossPlugin (per-class sigmoids with distillation targets; iCaRL predicts by "
            "the nearest mean of exemplars)",
        ),
    ]
    for matches, description in refused:
        if matches(criterion):
            raise SPGCompatibilityError(
                f"SPGPlugin cannot work with {name}: its criterion is {description}. {why}"
            )
    cross_entropies = (nn.CrossEntropyLoss, nn.NLLLoss, MaskedCrossEntropy)
    if not (
        isinstance(criterion, cross_entropies)
        or any(criterion is f for f in (F.cross_entropy, F.nll_loss))
    ):
        if strategy in _WARNED_CRITERION:
            return
        _WARNED_CRITERION.add(strategy)
        warnings.warn(
            f"SPGPlugin: {name}'s criterion {criterion!r} is not a cross-entropy SPG "
            "recognises; the importance pass uses cross-entropy on the model output whatever "
            "the training loss is (Section 3.1), so it is meaningful only if the output is "
            "class logits.",
            SPGCompatibilityWarning,
            stacklevel=3,
        )


def _check_final_weights(name: str, plugins: list[Any], spg_class: type) -> None:
    from avalanche.training.plugins import CWRStarPlugin

    spg_position = next(i for i, p in enumerate(plugins) if isinstance(p, spg_class))
    for position, plugin in enumerate(plugins):
        if isinstance(plugin, CWRStarPlugin) and position > spg_position:
            raise SPGCompatibilityError(
                f"{name}.plugins has CWRStarPlugin (position {position}) after SPGPlugin "
                f"(position {spg_position}): CWR* rewrites the classifier at the end of each "
                "experience (consolidation), after SPG would have measured importance on the "
                "weights it replaces. Put CWRStarPlugin before SPGPlugin; the CWRStar strategy "
                "always appends it after your plugins, so use Naive with "
                "plugins=[CWRStarPlugin(...), SPGPlugin()] instead."
            )
