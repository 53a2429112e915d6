"""Applying SPG's soft masks: fixed per-experience factors, fused in-place tensor ops.

Paper Section 3.2, Eq. 4-5 (``docs/algorithm.md``, Section 2): after ``backward()`` and before
``optimizer.step()``, every feature-extractor gradient is multiplied elementwise by ``1 - A`` and
every head gradient by the scalar ``1 - mean(A)``. The factors are computed once per experience
on the parameters' device, so a training step does no allocation and no host-device transfer:

* feature gradients: one fused ``_foreach_mul_`` with the precomputed factor tensors;
* head gradients: the reference's clipping to a total norm (``clip_grad_norm_`` semantics:
  ``coef = min(1, max_norm / (total_norm + 1e-6))``) and the head scale are folded into a single
  device scalar ``coef * head_scale``, computed into buffers allocated once per experience
  (``out=`` / in-place ops, no ``.item()``), then applied with one ``_foreach_mul_``. When the
  clip does not fire ``coef`` is exactly 1, so the result is bit for bit ``grad * head_scale``.

The *update* variant (``mask="update"``) masks the parameter change of an optimizer step
instead: ``theta <- theta_before + factor * (theta_after - theta_before)``, which holds under any
optimizer (momentum, weight decay, Adam).

:func:`build_masks` turns the accumulated importance into the :class:`MaskSet` of an experience,
and :class:`StepGuard` makes sure that no optimizer step runs without them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from avalanche_spg.importance import fit_to_shape, head_scale

__all__ = [
    "HeadRule",
    "MaskSet",
    "StepGuard",
    "align_importance",
    "build_mask_set",
    "build_masks",
    "rule_head_scale",
]

#: The head rule: ``"mean"`` scales head gradients by ``1 - mean(A)`` (the paper), ``"none"``
#: leaves them unscaled.
HeadRule = Literal["mean", "none"]


@dataclass
class MaskSet:
    """The masks of one experience: which tensors get which factor.

    :param feature_params: feature-extractor parameters that carry a mask.
    :param feature_factors: ``1 - A`` for each of them (same shape, dtype and device).
    :param head_params: head parameters (they get the scalar rule).
    :param head_scale: ``1 - mean(A)``.
    :param clip_head_grad_norm: clip the head gradients to this total norm before scaling
        (``None``: no clipping).
    """

    feature_params: list[nn.Parameter]
    feature_factors: list[Tensor]
    head_params: list[nn.Parameter]
    head_scale: float
    clip_head_grad_norm: float | None = 1e4
    _snapshots: list[Tensor] = field(default_factory=list, repr=False)
    # Per-experience scratch for head clipping: {(device, dtype): (norms, total, coef, max)}.
    _clip_buffers: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = field(
        default_factory=dict, repr=False
    )

    def mask_gradients(self) -> None:
        """``grad *= factor`` for features, clip then ``grad *= head_scale`` for heads."""
        grads: list[Tensor] = []
        factors: list[Tensor] = []
        for param, factor in zip(self.feature_params, self.feature_factors):
            if param.grad is not None:
                grads.append(param.grad)
                factors.append(factor)
        if grads:
            torch._foreach_mul_(grads, factors)
        self._mask_head_gradients(scale=True)

    def _mask_head_gradients(self, scale: bool) -> None:
        grads = [p.grad for p in self.head_params if p.grad is not None]
        if not grads:
            return
        factor = self.head_scale if scale else 1.0
        if self.clip_head_grad_norm is None:
            if factor != 1.0:
                torch._foreach_mul_(grads, factor)
            return
        first = grads[0]
        if any(g.device != first.device or g.dtype != first.dtype for g in grads):
            # Heads spread over devices or dtypes: the library routine groups them.
            torch.nn.utils.clip_grad_norm_(self.head_params, self.clip_head_grad_norm, foreach=True)
            if factor != 1.0:
                torch._foreach_mul_(grads, factor)
            return
        coef, max_norm = self._head_clip_buffers(first)
        total = _total_norm(grads)
        total.add_(1e-6)
        torch.div(max_norm, total, out=coef)
        coef.clamp_(max=1.0)
        if factor != 1.0:
            coef.mul_(factor)
        torch._foreach_mul_(grads, coef)

    def _head_clip_buffers(self, like: Tensor) -> tuple[Tensor, ...]:
        key = (like.device, like.dtype)
        buffers = self._clip_buffers.get(key)
        if buffers is None:
            assert self.clip_head_grad_norm is not None
            coef = torch.empty((), dtype=like.dtype, device=like.device)
            max_norm = torch.full(
                (), self.clip_head_grad_norm, dtype=like.dtype, device=like.device
            )
            buffers = self._clip_buffers[key] = (coef, max_norm)
        return buffers

    # --- update masking -----------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember the parameters before ``optimizer.step()`` (update-masking mode)."""
        params = self._update_params()
        if len(self._snapshots) != len(params) or any(
            s.shape != p.shape for s, p in zip(self._snapshots, params)
        ):
            self._snapshots = [torch.empty_like(p) for p in params]
        if params:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshots, [p.detach() for p in params])
        # Head gradients are still clipped in this mode (as the gradient mode does) so that both
        # modes give the same trajectory under plain SGD.
        self._mask_head_gradients(scale=False)

    def mask_updates(self) -> None:
        """``theta = before + factor * (theta - before)`` after ``optimizer.step()``."""
        params = self._update_params()
        if not params:
            return
        n_features = len(self.feature_params)
        with torch.no_grad():
            data = [p.detach() for p in params]
            # lerp is exact at both ends: factor 0 gives `before` bit for bit (a fully important
            # parameter does not move) and factor 1 gives the optimizer's result unchanged.
            if n_features:
                torch._foreach_lerp_(
                    self._snapshots[:n_features], data[:n_features], self.feature_factors
                )
            if len(data) > n_features:
                torch._foreach_lerp_(
                    self._snapshots[n_features:], data[n_features:], self.head_scale
                )
            torch._foreach_copy_(data, self._snapshots)

    def _update_params(self) -> list[nn.Parameter]:
        return [*self.feature_params, *self.head_params]


def align_importance(
    importance: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]
) -> dict[str, Tensor]:
    """``importance`` fitted to the parameters it masks, as a new dict (the input is unchanged).

    The entry of every parameter in ``params`` moves to the parameter's device and, if the
    parameter grew since the importance was computed (a layer that gained units, a grown
    ``IncrementalClassifier``), is zero-padded to its shape: the new part is fully plastic.
    Entries of names not in ``params`` are kept as they are.

    :raises ValueError: naming every parameter and both shapes, before anything is computed,
        if an entry does not fit its parameter: a parameter that is smaller than its importance
        in some dimension (cropping would silently drop what earlier tasks needed) or whose
        number of dimensions changed.
    """
    misfits = [
        f"{name!r}: importance {tuple(importance[name].shape)}, parameter {tuple(param.shape)}"
        for name, param in params.items()
        if name in importance
        and (
            importance[name].dim() != param.dim()
            or any(a > b for a, b in zip(importance[name].shape, param.shape))
        )
    ]
    if misfits:
        raise ValueError(
            "SPG importance does not fit the model's parameters (it can follow a parameter "
            "that grows, not one that shrinks or changes its number of dimensions): "
            + "; ".join(misfits)
        )
    aligned = dict(importance)
    for name, param in params.items():
        value = importance.get(name)
        if value is not None:
            aligned[name] = fit_to_shape(value, param.shape).to(param.device)
    return aligned


def build_mask_set(
    importance: Mapping[str, Tensor],
    feature_params: Mapping[str, nn.Parameter],
    head_params: Mapping[str, nn.Parameter],
    head_scale: float,
    clip_head_grad_norm: float | None,
) -> MaskSet:
    """The masks of one experience from importance aligned by :func:`align_importance`.

    Every feature parameter with an importance entry gets the factor ``1 - A`` in its dtype; one
    without (it appeared after the last importance pass) has importance 0 and is not masked.
    """
    masked: list[nn.Parameter] = []
    factors: list[Tensor] = []
    for name, param in feature_params.items():
        value = importance.get(name)
        if value is None:
            continue
        masked.append(param)
        factors.append((1.0 - value).to(param.dtype))
    return MaskSet(
        feature_params=masked,
        feature_factors=factors,
        head_params=list(head_params.values()),
        head_scale=head_scale,
        clip_head_grad_norm=clip_head_grad_norm,
    )


def rule_head_scale(importance: Mapping[str, Tensor], rule: HeadRule) -> float:
    """The scalar of the head rule: ``1 - mean(A)`` for ``"mean"`` (Eq. 5), 1 for ``"none"``."""
    return head_scale(importance) if rule == "mean" else 1.0


def build_masks(
    importance: Mapping[str, Tensor],
    feature_params: Mapping[str, nn.Parameter],
    head_params: Mapping[str, nn.Parameter],
    *,
    head_rule: HeadRule,
    clip_head_grad_norm: float | None,
    rows_as_features: bool = False,
) -> tuple[MaskSet | None, dict[str, Tensor], float]:
    """The masks of one experience, with the importance they were built from and the head scale.

    Returns ``(masks, aligned importance, head scale)`` and changes nothing it is given: the
    caller keeps the aligned importance (on the parameters' devices, grown parameters padded,
    see :func:`align_importance`) as its new state. Without importance (the first experience)
    nothing is masked and the head scale is 1; the head clip alone stays active, as in the
    reference, so masks exist only if it is on and there are heads.

    :param rows_as_features: the heads carry their own importance, row by row, and are masked
        elementwise like feature parameters (``class_incremental=True``); no head rule applies.
    :raises ValueError: if some importance does not fit its parameter (see
        :func:`align_importance`).
    """
    if not importance:
        if clip_head_grad_norm is None or rows_as_features or not head_params:
            return None, {}, 1.0
        return MaskSet([], [], list(head_params.values()), 1.0, clip_head_grad_norm), {}, 1.0
    if rows_as_features:
        feature_params, head_params = {**feature_params, **head_params}, {}
    aligned = align_importance(importance, feature_params)
    scale = rule_head_scale(aligned, head_rule)
    masks = build_mask_set(aligned, feature_params, head_params, scale, clip_head_grad_norm)
    return masks, aligned, scale


class StepGuard:
    """Refuses every ``optimizer.step()`` that no masking preceded.

    :meth:`attach` registers a step pre-hook on an optimizer; :meth:`allow` (called where the
    masks are applied) lets exactly one step through. The hook compares one flag: no tensor
    work, no device sync, no allocation per step. An unmasked step raises ``RuntimeError``
    before the optimizer changes any parameter.
    """

    def __init__(self) -> None:
        self.optimizer: Any = None
        self._handle: RemovableHandle | None = None
        self._allowed = False

    def attach(self, optimizer: Any, caller: str) -> None:
        """Guard ``optimizer`` (any object; one without step hooks is left unguarded) on behalf
        of ``caller`` (named in the error), replacing any previous one."""
        self.detach()
        self.optimizer = optimizer
        register = getattr(optimizer, "register_step_pre_hook", None)
        if register is not None:
            self._handle = register(functools.partial(self._check, caller))

    def detach(self) -> None:
        """Stop guarding (the optimizer keeps no trace of the guard)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.optimizer = None
        self._allowed = False

    def allow(self) -> None:
        """Let the next step through."""
        self._allowed = True

    def _check(self, caller: str, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._allowed:
            raise RuntimeError(
                f"SPGPlugin: {caller} called optimizer.step() without calling before_update "
                "first; the step was refused, since it would have moved the parameters without "
                "SPG's masks. Use a strategy based on Avalanche's SGDUpdate (Naive, Replay, "
                "EWC, ...)."
            )
        self._allowed = False


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all of ``grads`` together, as a 0-dim tensor on their device (no host sync).

    torch's fused ``get_total_norm`` (torch 2.6 and newer: one ``_foreach_norm`` call), else the
    same computation written out for older releases.
    """
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, norm_type=2.0, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
