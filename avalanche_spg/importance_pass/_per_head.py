"""The per-head loops of the importance pass: one forward per head and minibatch.

:func:`_reference_loop` is the paper's straightforward pass (Section 3.1): for one head, a
forward and ``backward()`` per reference minibatch, the gradients summed.
:func:`_shared_batch_loop` is the fast pass's fallback when there is no classifier to tap: one
forward per head on the (possibly larger) minibatch, gradients of the feature parameters only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avalanche_spg.importance_pass._batches import _Pass


def _reference_loop(run: _Pass, head: int | None, head_sums: list[Tensor]) -> None:
    """One head: one forward and ``backward()`` per minibatch, gradients summed."""
    run.model.zero_grad(set_to_none=True)
    for x, y, t, w, _ in run.batches:
        loss = run.head_loss(x, y, t, w, head)
        loss.backward()
        for param, acc in zip(run.params, head_sums):
            if param.grad is not None:
                acc.add_(param.grad)
                param.grad = None
    run.model.zero_grad(set_to_none=True)


def _add_grads(head_sums: list[Tensor], grads: list[Tensor | None]) -> None:
    pairs = [(acc, g) for acc, g in zip(head_sums, grads) if g is not None]
    if not pairs:
        return
    accs = [acc for acc, _ in pairs]
    values = [g if g.dtype == acc.dtype else g.to(acc.dtype) for acc, g in pairs]
    torch._foreach_add_(accs, values)


def _shared_batch_loop(run: _Pass, heads: list[int | None], sums: list[list[Tensor]]) -> None:
    """Without a classifier to tap: one forward per head on the (possibly larger) minibatch,
    gradients of the feature parameters only."""
    for x, y, t, w, _ in run.batches:
        for index, head in enumerate(heads):
            loss = run.head_loss(x, y, t, w, head)
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, run.params, allow_unused=True)
            _add_grads(sums[index], list(grads))
