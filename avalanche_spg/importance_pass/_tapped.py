"""The fast pass: one forward of the feature extractor per minibatch, shared by all heads.

The classifier's input ``h`` is captured with a forward pre-hook (:class:`_Tap`); each head's
cotangent ``dL_j/dh`` comes from a detached copy of ``h`` (only the small head runs again), and
one backward per head from ``h`` reaches the feature parameters only
(:func:`_feature_backward`). The safety nets (:class:`_TapMismatch`: a model whose output is
not its classifier's on the captured features, a feature extractor that depends on the task
label) fall back to :func:`avalanche_spg.importance_pass._per_head._shared_batch_loop`. The
equivalence with the reference loop: the package docstring and ``docs/algorithm.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avalanche_spg.importance_pass._batches import _Pass
from avalanche_spg.importance_pass._per_head import _add_grads, _shared_batch_loop

#: With ``vectorize_heads``, at most this many cotangent rows (heads x samples) per batched
#: backward call, which bounds the memory of the batched activation gradients.
_MAX_BATCHED_ROWS = 4096
#: Samples on which the fast pass checks that all heads see the same features.
_PROBE_SAMPLES = 8


class _TapMismatch(Exception):
    """The model's output is not its classifier's output on the captured features."""


def _fast_loop(
    run: _Pass,
    classifier: nn.Module | None,
    heads: list[int | None],
    sums: list[list[Tensor]],
    vectorize_heads: bool,
    exact_batches: bool,
) -> nn.Module | None:
    """Fill ``sums`` (one list per head); returns the classifier if tapping it worked (so the
    next group of heads tries it again), ``None`` if the shared-batch loop was needed."""
    if classifier is not None:
        try:
            _tapped_loop(run, classifier, heads, sums, vectorize_heads, exact_batches)
            return classifier
        except _TapMismatch:
            for head_sums in sums:
                torch._foreach_zero_(head_sums)
            run.model.zero_grad(set_to_none=True)
            classifier = None
    _shared_batch_loop(run, heads, sums)
    return classifier


class _Tap:
    """Captures the classifier's input during the model's forward and runs single heads."""

    def __init__(self, classifier: nn.Module) -> None:
        self.classifier = classifier
        self.captured: list[Tensor] = []
        self.capturing = True

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.capturing:
            self.captured.append(args[0])

    def head(self, features: Tensor, task: int) -> Tensor:
        """Head ``task``'s logits on ``features`` (not captured)."""
        self.capturing = False
        try:
            return self.classifier(features, task)
        finally:
            self.capturing = True

    def forward(
        self, run: _Pass, x: Tensor, labels: Tensor, task: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(h, detached h, model output as a function of the detached h)`` for a minibatch
        whose samples all have label ``task``."""
        self.captured.clear()
        out = run.call(x, labels)
        if len(self.captured) != 1:
            raise _TapMismatch
        h = self.captured.pop()
        head_input = h.detach().requires_grad_(True)
        return h, head_input, _as_model_output(self.head(head_input, task), out)


def _as_model_output(own: Tensor, out: Tensor) -> Tensor:
    """``own`` (a head's logits) as the model returned them: the same values, possibly padded
    with zero columns to a common width (Avalanche's multi-task forward does so), in the
    output's dtype. Anything else: :class:`_TapMismatch`."""
    if (
        not isinstance(out, Tensor)
        or own.dim() != 2
        or out.dim() != 2
        or own.shape[0] != out.shape[0]
        or own.shape[1] > out.shape[1]
    ):
        raise _TapMismatch
    width = own.shape[1]
    logits = own if own.dtype == out.dtype else own.to(out.dtype)
    if not torch.allclose(logits.detach(), out[:, :width].detach(), rtol=1e-5, atol=1e-6):
        raise _TapMismatch
    if width < out.shape[1]:
        if bool(out[:, width:].detach().any()):
            raise _TapMismatch
        logits = F.pad(logits, (0, out.shape[1] - width))
    return logits


def _tapped_loop(
    run: _Pass,
    classifier: nn.Module,
    heads: list[int | None],
    sums: list[list[Tensor]],
    vectorize_heads: bool,
    exact_batches: bool,
) -> None:
    tap = _Tap(classifier)
    vectorize = [vectorize_heads and len(heads) > 1]
    old = [(index, head) for index, head in enumerate(heads) if head is not None]
    handle = classifier.register_forward_pre_hook(tap)
    try:
        for x, y, t, w, tasks in run.batches:
            if not run.probed:
                _probe_shared_features(run, tap, x, t, tasks[0], run.old_heads)
                run.probed = True
            if exact_batches and len(tasks) > 1:
                _mixed_minibatch(run, tap, heads, sums, old, (x, y, t, w), vectorize)
                continue
            features: list[Tensor] = []  # one graph per task group of the minibatch
            cotangents: list[list[Tensor]] = [[] for _ in heads]
            for task in tasks:
                if len(tasks) == 1:
                    xg, yg, tg, wg = x, y, t, w
                else:  # no batch statistics: a group's samples do not see each other
                    rows = (t == task).nonzero().squeeze(1)
                    xg, yg, tg, wg = x[rows], y[rows], t[rows], w[rows]
                h, head_input, logits = tap.forward(run, xg, tg, task)
                for index, head in enumerate(heads):
                    if head is None:
                        # The current head's loss, on the logits just checked to be the model's.
                        ce = F.cross_entropy(logits, yg, reduction="none")
                        loss = (ce.to(wg.dtype) * wg).sum()
                    else:
                        loss = tap.head(head_input, head).sum()
                    cotangents[index].append(_cotangent(loss, head_input))
                features.append(h)
            _feature_backward(features, cotangents, run.params, sums, vectorize)
    finally:
        handle.remove()


def _probe_shared_features(
    run: _Pass, tap: _Tap, x: Tensor, t: Tensor, task: int, old_heads: list[int]
) -> None:
    """Check that the classifier's input does not depend on the task label, on a few samples
    labelled ``task`` and then each old head: the tap hands head ``j`` the features computed
    for another head, which is only right if the feature extractor is shared (a progressive
    network's column per task is not). Every call sees the same random numbers (dropout),
    which are rewound afterwards, so the pass draws the same ones as without the probe.
    Different: :class:`_TapMismatch`."""
    if not old_heads:
        return
    xs, ts = x[:_PROBE_SAMPLES], t[:_PROBE_SAMPLES]
    with _rewound_randomness(x.device) as rewind, torch.no_grad():
        shared = None
        for label in [task, *old_heads]:
            rewind()
            tap.captured.clear()
            run.call(xs, torch.full_like(ts, label))
            if len(tap.captured) != 1:
                raise _TapMismatch
            features = tap.captured.pop()
            if shared is None:
                shared = features
            elif features.shape != shared.shape or not torch.allclose(
                features, shared, rtol=1e-5, atol=1e-6
            ):
                raise _TapMismatch


@contextmanager
def _rewound_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a function that puts the random number generators (CPU, and the CUDA device's)
    back to their state on entry; they are put back on exit too."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    try:
        yield rewind
    finally:
        rewind()


def _mixed_minibatch(
    run: _Pass,
    tap: _Tap,
    heads: list[int | None],
    sums: list[list[Tensor]],
    old: list[tuple[int, int]],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    vectorize: list[bool],
) -> None:
    """A minibatch mixing task labels on a model with batch statistics, seen as in the
    reference: the current head through one call with the per-sample labels (grouped by the
    model as in training), the old heads through one shared call with the whole minibatch."""
    x, y, t, w = batch
    if None in heads:
        loss = run.current_loss(x, y, t, w)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, run.params, allow_unused=True)
            _add_grads(sums[heads.index(None)], list(grads))
    if not old:
        return
    first = old[0][1]
    h, head_input, _ = tap.forward(run, x, torch.full_like(t, first), first)
    cotangents = [[_cotangent(tap.head(head_input, head).sum(), head_input)] for _, head in old]
    _feature_backward([h], cotangents, run.params, [sums[i] for i, _ in old], vectorize)


def _cotangent(loss: Tensor, head_input: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss, head_input, allow_unused=True)
    return torch.zeros_like(head_input) if grad is None else grad


def _feature_backward(
    features: list[Tensor],
    cotangents: list[list[Tensor]],
    params: list[nn.Parameter],
    sums: list[list[Tensor]],
    vectorize: list[bool],
) -> None:
    """Add every head's ``J^T cotangent`` (feature parameters only) to its sums."""
    n_heads = len(cotangents)
    done = 0
    if vectorize[0]:
        rows = sum(len(h) for h in features)
        chunk = max(1, min(n_heads, _MAX_BATCHED_ROWS // max(1, rows)))
        try:
            while done < n_heads:
                stop = min(n_heads, done + chunk)
                stacked = [
                    torch.stack([cotangents[i][g] for i in range(done, stop)])
                    for g in range(len(features))
                ]
                grads = torch.autograd.grad(
                    features,
                    params,
                    grad_outputs=stacked,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                for offset, head_sums in enumerate(sums[done:stop]):
                    _add_grads(head_sums, [None if g is None else g[offset] for g in grads])
                done = stop
            return
        except RuntimeError:
            # An operation without a batching rule: the loop below gives the same result.
            vectorize[0] = False
    for index in range(done, n_heads):
        grads = torch.autograd.grad(
            features,
            params,
            grad_outputs=cotangents[index],
            retain_graph=index < n_heads - 1,
            allow_unused=True,
        )
        _add_grads(sums[index], list(grads))
