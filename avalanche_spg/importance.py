"""The SPG importance math, as small pure functions on tensors.

Nothing here knows about Avalanche. The plugin (:mod:`avalanche_spg.plugin`) maps Avalanche
callbacks onto these functions; the importance *pass* over an experience's data lives in
:mod:`avalanche_spg.importance_pass`.

Paper: Konishi et al., "Parameter-Level Soft-Masking for Continual Learning", ICML 2023,
Section 3.1 (Eq. 1-3: standardise the accumulated gradient of each parameter tensor, squash it
with ``tanh``, take the absolute value, max over the heads and over the tasks) and Section 3.2
(Eq. 4-5: scale feature-extractor gradients by ``1 - A`` and head gradients by ``1 - mean(A)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "is_usable_gradient",
    "standardized_importance",
    "max_accumulate",
    "accumulate_importance",
    "check_importance",
    "head_scale",
    "fit_to_shape",
    "float64_device",
    "has_float64",
]

#: Device types without float64 support.
_NO_FLOAT64 = frozenset({"mps"})


def is_usable_gradient(grad: Tensor | None) -> bool:
    """Whether ``grad`` can be standardised without producing NaN or infinity.

    Usable means: not ``None``, at least two elements, every element finite, not all zero, and a
    standard deviation that is finite and strictly positive. Anything else contributes importance
    0 (the reference code skips all-zero gradients; the other cases would give NaN there).
    """
    if grad is None or grad.numel() < 2:
        return False
    g = grad.detach()
    if not bool(torch.isfinite(g).all()):
        return False
    if not bool(g.any()):
        return False
    std = g.float().std()
    return bool(torch.isfinite(std)) and float(std) > 0.0


def standardized_importance(grad: Tensor | None, like: Tensor | None = None) -> Tensor:
    """``|tanh((G - mean(G)) / std(G))|`` of one parameter tensor's summed gradient ``G``.

    Mean and (unbiased, as :func:`torch.std`) standard deviation are taken over all elements of
    this one tensor. The result is computed in float32 whatever the gradient's dtype, lies in
    ``[0, 1)`` and has the gradient's shape. An unusable gradient (see
    :func:`is_usable_gradient`) gives zeros shaped like ``like`` (or like ``grad``).

    :param grad: the gradient of one parameter tensor, summed over an experience's minibatches.
    :param like: the tensor whose shape and device the zeros take when ``grad`` is ``None``.
    """
    if not is_usable_gradient(grad):
        ref = grad if grad is not None else like
        if ref is None:
            raise ValueError("standardized_importance needs `grad` or `like` to shape its result")
        return torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
    assert grad is not None
    g = grad.detach().float()
    z = (g - g.mean()) / g.std()
    # tanh(z) rounds to exactly 1.0 in float32 for |z| > ~9; keep A strictly below 1 so that
    # 1 - A never becomes exactly 0 by rounding alone (A lies in [0, 1), ``docs/algorithm.md`` §4).
    below_one = torch.nextafter(
        torch.ones((), dtype=torch.float32, device=g.device),
        torch.zeros((), dtype=torch.float32, device=g.device),
    )
    return torch.tanh(z).abs_().clamp_(max=below_one)


def fit_to_shape(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """Return ``tensor`` zero-padded (or cropped) to ``shape``.

    Used when a parameter grew between experiences (an ``IncrementalClassifier`` or a layer that
    gained units): the old part keeps its importance, the new part gets importance 0.
    """
    shape = torch.Size(shape)
    if tensor.shape == shape:
        return tensor
    if tensor.dim() != len(shape):
        raise ValueError(
            f"cannot fit importance of shape {tuple(tensor.shape)} to a parameter of shape "
            f"{tuple(shape)}: the number of dimensions changed"
        )
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    common = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, shape))
    out[common] = tensor[common]
    return out


def check_importance(name: str, value: Tensor) -> None:
    """``ValueError`` naming ``name`` unless every element of ``value`` is a number in
    ``[0, 1]`` (``NaN`` is not; importance is ``|tanh|`` of a standardised gradient)."""
    outside = ~((value >= 0) & (value <= 1))
    if bool(outside.any()):
        example = value[outside].flatten()[0].item()
        raise ValueError(
            f"importance of {name!r} must be finite and in [0, 1]; it holds {example!r}"
        )


def max_accumulate(into: dict[str, Tensor], new: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Elementwise ``into[name] = max(into[name], new[name])`` for every name of ``new``.

    Names missing from ``into`` are added; a shape mismatch (a grown parameter) is resolved by
    zero-padding the smaller side to the larger shape. Returns ``into``, whose tensors keep
    their device and dtype.

    :raises ValueError: naming the entry, with ``into`` unchanged, if a value of ``new`` is not
        in ``[0, 1]`` (or ``NaN``), or has another number of dimensions than ``into``'s.
    """
    for name, value in new.items():
        check_importance(name, value)
        old = into.get(name)
        if old is not None and old.dim() != value.dim():
            raise ValueError(
                f"cannot accumulate importance of {name!r}: shape {tuple(value.shape)} "
                f"against the accumulated {tuple(old.shape)} (the number of dimensions changed)"
            )
    for name, value in new.items():
        old = into.get(name)
        if old is None:
            into[name] = value.detach().clone()
            continue
        if old.shape != value.shape:
            shape = tuple(max(a, b) for a, b in zip(old.shape, value.shape))
            old = fit_to_shape(old, shape)
            value = fit_to_shape(value, shape)
        into[name] = torch.maximum(old, value.to(old.device, old.dtype))
    return into


def accumulate_importance(
    accumulated: dict[str, Tensor], per_head: Iterable[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """Fold the per-head importances of one experience into the accumulated importance.

    ``gamma = max over heads``, then ``A = max(A, gamma)`` (both elementwise) — the same as a
    single max over ``A`` and all heads. Returns ``accumulated``. Each head is checked as
    :func:`max_accumulate` checks it, before it is folded in.
    """
    for gamma in per_head:
        max_accumulate(accumulated, gamma)
    return accumulated


def has_float64(device: torch.device) -> bool:
    """Whether ``device`` can hold float64 tensors (Apple's MPS cannot)."""
    return device.type not in _NO_FLOAT64


def float64_device(device: torch.device) -> torch.device:
    """``device`` if it computes in float64, else the CPU (Apple's MPS has no float64)."""
    return device if has_float64(device) else torch.device("cpu")


def head_scale(importance: Mapping[str, Tensor]) -> float:
    """The scalar applied to head gradients: ``1 - mean(all elements of all A tensors)``.

    The mean is over the concatenation of every tensor (each element counts once, so large
    tensors weigh more), as in the reference implementation. Empty importance gives 1.0.

    :raises ValueError: naming the entry if some importance is not in ``[0, 1]`` (or ``NaN``):
        the scale would leave ``[0, 1]`` and flip or amplify the heads' gradients.
    """
    total = 0.0
    count = 0
    for name, value in importance.items():
        check_importance(name, value)
        # Summed in float64 for an exact mean over millions of elements; a device without
        # float64 (Apple's MPS) hands its tensor to the CPU for this once-per-experience sum.
        value = value.detach().to(float64_device(value.device))
        total += float(value.double().sum())
        count += value.numel()
    if count == 0:
        return 1.0
    return 1.0 - total / count
