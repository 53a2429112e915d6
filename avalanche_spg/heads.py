"""Which parameters are task heads, and which belong to the feature extractor.

SPG treats the two differently (Section 3.2 of the paper): every feature-extractor parameter gets
its own importance and an elementwise mask ``1 - A``; the task heads get no importance, only the
scalar head rule. :class:`~avalanche_spg.SPGPlugin` takes the selection as its ``heads`` argument
(a :data:`HeadSelector`) and splits the model with :func:`split_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from torch import nn

from avalanche_spg.process_group import unwrap_model

__all__ = [
    "HeadSelector",
    "check_head_selector",
    "default_head_names",
    "split_parameters",
    "check_head_selection",
    "missing_task_heads",
    "check_earlier_heads",
]

#: How heads are chosen: module-name prefixes, or a predicate on (parameter name, parameter).
HeadSelector = Sequence[str] | Callable[[str, nn.Parameter], bool]


def check_head_selector(heads: object) -> None:
    """``ValueError`` naming ``heads`` unless it is ``None``, a callable or a sequence of names."""
    if heads is None or callable(heads):
        return
    if (
        isinstance(heads, (str, bytes))
        or not isinstance(heads, Sequence)
        or not all(isinstance(h, str) for h in heads)
    ):
        raise ValueError(
            "heads must be None, a sequence of module names or a callable "
            f"(name, param) -> bool; got {heads!r}"
        )


def default_head_names(model: nn.Module) -> set[str]:
    """Names of the parameters inside Avalanche's ``MultiHeadClassifier`` and
    ``IncrementalClassifier`` modules of ``model`` (every parameter if ``model`` is one)."""
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


def split_parameters(
    model: nn.Module, heads: HeadSelector | None
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """``(feature_params, head_params)`` of ``model`` by name (trainable parameters only).

    :param model: the model, or a data-parallel wrapper around it (names are the inner model's).
    :param heads: ``None`` for :func:`default_head_names`, module names whose parameters are
        heads, or a predicate ``(name, param) -> bool``.
    :raises ValueError: if ``heads`` names a module the model does not have.
    """
    model = unwrap_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if heads is None:
        head_names = default_head_names(model)
        is_head = [n in head_names for n, _ in named]
    elif callable(heads):
        is_head = [bool(heads(n, p)) for n, p in named]
    else:
        module_names = dict(model.named_modules())
        missing = [h for h in heads if h not in module_names]
        if missing:
            raise ValueError(
                f"heads names modules that the model does not have: {missing}; "
                f"modules are e.g. {list(module_names)[1:8]}"
            )
        prefixes = list(heads)
        is_head = [any(n.startswith(h + ".") for h in prefixes) for n, _ in named]
    features = {n: p for (n, p), head in zip(named, is_head) if not head}
    head_params = {n: p for (n, p), head in zip(named, is_head) if head}
    return features, head_params


def check_head_selection(model: nn.Module, heads: HeadSelector | None) -> None:
    """``ValueError`` if ``heads`` names a module the model does not have, or one without a
    trainable parameter: it would select nothing, and the parameters the user meant as a head
    would silently be treated as feature parameters (importance instead of the head rule)."""
    split_parameters(model, heads)
    if heads is None or callable(heads):
        return
    named = [n for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    empty = [h for h in heads if not any(n.startswith(h + ".") for n in named)]
    if empty:
        raise ValueError(
            f"heads names modules without a trainable parameter: {empty}; they select no "
            "head (name the modules that hold the task heads' weights)"
        )


def missing_task_heads(model: nn.Module, tasks: Collection[int]) -> dict[str, list[int]]:
    """The ``tasks`` each ``MultiHeadClassifier`` of ``model`` has no head for, by module name
    (only modules that miss some). Heads that other modules keep are not known here."""
    from avalanche.models import MultiHeadClassifier

    missing: dict[str, list[int]] = {}
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, MultiHeadClassifier):
            absent = [t for t in tasks if str(t) not in module.classifiers]
            if absent:
                missing[name] = absent
    return missing


def check_earlier_heads(
    model: nn.Module, seen_tasks: Sequence[int], current: Collection[int]
) -> None:
    """Refuse, before training, a model that lacks the head of a task trained earlier.

    The importance pass after this experience back-propagates every earlier head's logits
    (Section 3.1); without the head it could only fail once the experience has trained. Checked
    on a ``MultiTaskModule`` with Avalanche's ``MultiHeadClassifier`` (the heads other models
    keep are not known); ``current`` are the task labels of the experience about to train.

    :raises ValueError: naming the classifier and the tasks it has no head for.
    """
    from avalanche.models import MultiTaskModule

    if not isinstance(unwrap_model(model), MultiTaskModule):
        return
    needed = [t for t in seen_tasks if t not in current]
    for name, missing in missing_task_heads(model, needed).items():
        raise ValueError(
            f"SPGPlugin: tasks {missing} were trained earlier (seen_tasks "
            f"{list(seen_tasks)}) but the model's MultiHeadClassifier {name!r} has no head "
            "for them; SPG's importance needs every earlier head. Restore the model "
            "together with the plugin's state."
        )
