"""Checks of what users hand :class:`~avalanche_spg.SPGPlugin`: its constructor arguments, a
saved state, the model a state meets and the optimizer. Each check raises ``ValueError`` naming
the argument or entry and the bad value, before anything of the plugin is set or replaced; the
optimizer only gets a reason for the plugin's warning."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from avalanche_spg.heads import check_head_selector

if TYPE_CHECKING:
    from avalanche_spg.plugin import SPGPlugin

__all__ = [
    "STATE_VERSION",
    "approximate_masking_reason",
    "check_importance_names",
    "check_plugin_arguments",
    "checked_state",
]

#: Version of the plugin's ``state_dict()`` layout.
STATE_VERSION = 1

_REQUIRED_STATE_KEYS = ("version", "importance", "seen_tasks", "experiences_seen")
_OPTIONAL_STATE_KEYS = ("class_groups",)


def check_plugin_arguments(plugin: SPGPlugin) -> None:
    """Check the constructor arguments of ``plugin``, as stored on it (documented there)."""
    check_head_selector(plugin.heads)
    clip = plugin.clip_head_grad_norm
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, (int, float))
        or not math.isfinite(clip)
        or clip <= 0
    ):
        raise ValueError(
            f"clip_head_grad_norm must be a positive finite number or None, got {clip!r}"
        )
    for name in ("reset_optimizer_state", "warn_optimizer", "class_incremental", "previous_heads"):
        flag = getattr(plugin, name)
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if plugin.importance_method not in ("fast", "reference"):
        raise ValueError(
            f"importance_method must be 'fast' or 'reference', got {plugin.importance_method!r}"
        )
    for name in ("importance_batch_size", "importance_pass_batch_size", "importance_max_samples"):
        value = getattr(plugin, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if plugin.head_rule not in ("mean", "none"):
        raise ValueError(f"head_rule must be 'mean' or 'none', got {plugin.head_rule!r}")
    if plugin.mask not in ("grad", "update"):
        raise ValueError(f"mask must be 'grad' or 'update', got {plugin.mask!r}")
    workers = plugin.num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {workers!r}")


def checked_state(state: Any) -> tuple[dict[str, Tensor], list[int], list[list[int]], int]:
    """``(importance, seen_tasks, class_groups, experiences_seen)`` of a plugin state, checked
    and converted (importance as float32 tensors in ``[0, 1]``, labels as ints).

    :raises ValueError: naming the first entry that is missing, unknown or malformed.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"SPGPlugin state must be a mapping from state_dict(), got {type(state).__name__}"
        )
    version = state.get("version")
    if isinstance(version, bool) or version != STATE_VERSION:
        raise ValueError(f"unsupported SPGPlugin state version {version!r}")
    missing = [key for key in _REQUIRED_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"SPGPlugin state lacks the entries {missing}")
    unknown = [key for key in state if key not in _REQUIRED_STATE_KEYS + _OPTIONAL_STATE_KEYS]
    if unknown:
        raise ValueError(f"SPGPlugin state has unknown entries {unknown}")

    importance = _checked_importance(state["importance"])
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


def check_importance_names(
    importance: Mapping[str, Tensor],
    model: nn.Module,
    features: Mapping[str, Tensor],
    heads: Mapping[str, Tensor],
    *,
    head_selection: object,
    class_incremental: bool,
) -> list[str]:
    """Check that ``importance`` (the plugin's ``A``) names parameters ``model`` splits into
    ``features`` and ``heads`` as SPG needs them; return the names of importance entries that
    are neither (frozen parameters: kept, but they mask nothing).

    ``model`` is the unwrapped model; ``head_selection`` the plugin's ``heads`` argument, for the
    messages.

    :raises ValueError: when no feature parameter is left to protect (except with
        ``class_incremental``, whose classifier rows get importance), when the importance names
        a parameter the model does not have, or when it covers heads (Section 3.2: heads get
        the scalar rule, never importance) outside ``class_incremental``.
    """
    if not features and not class_incremental:
        raise ValueError(
            "SPGPlugin: the model has no trainable feature parameter (the head selection "
            f"heads={head_selection!r} takes every trainable parameter), so SPG would protect "
            "nothing. Select only the task heads as heads."
        )
    # Importance of a parameter the model does not have at all was measured on another
    # model (or under other names): it would protect nothing here, silently.
    names = {name for name, _ in model.named_parameters()}
    absent = sorted(set(importance) - names)
    if absent:
        raise ValueError(
            f"SPGPlugin: the importance names {len(absent)} parameters the model does not "
            f"have (e.g. {absent[:5]}; the model's are e.g. {sorted(names)[:5]}), so SPG "
            "would not protect them. Load the plugin's state with the model it was saved "
            "with."
        )
    # Importance on heads would only skew the head scale.
    on_heads = sorted(set(importance) & set(heads))
    if on_heads and not class_incremental:
        raise ValueError(
            f"SPGPlugin: the importance covers parameters that are heads here ({on_heads[:5]}"
            f"; heads={head_selection!r}); heads get no importance, only the head rule. The "
            "state was saved with class_incremental=True or another head selection."
        )
    return sorted(set(importance) - set(features) - set(heads))


def approximate_masking_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why masking gradients is not an exact soft freeze under ``optimizer`` (``None``: it is,
    plain SGD without momentum or weight decay, as in the paper, Section 3.2)."""
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("momentum", 0) > 0:
                return f"uses momentum ({group['momentum']})"
            if group.get("weight_decay", 0) > 0:
                return f"uses weight decay ({group['weight_decay']})"
        return None
    return f"is {type(optimizer).__name__} (adaptive or stateful, not plain SGD)"


def _checked_importance(entries: Any) -> dict[str, Tensor]:
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
    return importance


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
