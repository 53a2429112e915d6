"""The importance pass: per-head summed gradients over an experience, turned into ``gamma``.

Paper, Section 3.1: after training experience ``k``, for every head ``j`` seen so far (the
current one last), sum over all minibatches of ``k``'s training data the gradient of

* the ordinary cross-entropy (batch mean) of head ``k`` when ``j`` is the current head, or
* the sum of all logits of head ``j`` when ``j`` is an older head,

standardise each feature tensor's summed gradient, squash with ``|tanh|`` and take the max over
heads (see ``docs/algorithm.md`` for the algorithm and its guards).

How the model is called
    Exactly as the training loop calls it (the *calling convention*, ``forward``): Avalanche
    calls a multi-task model ``model(x, task_labels)``, positionally, with one task label per
    sample, and takes a minibatch's task labels from its last element (``[x, y, t]``,
    ``[x, y, sample_id, t]``; ``[x, y]`` means the current task). The current head sees every
    sample with its own label, so a model that groups a minibatch by task does so as in
    training; old head ``j`` sees a label tensor filled with ``j``.

The model's state
    The pass runs on the model as it is when training ends and leaves it exactly so:
    parameters, buffers (batch-norm statistics), plain tensor and number attributes of modules
    (Avalanche's ``BatchRenorm2D`` keeps its statistics there) and every module's train/eval
    flag are restored afterwards, and every forward of the pass sees them as they were at the
    start (:class:`ModelState`). The pass runs in train mode (dropout active, as in the paper)
    with the flags the strategy trained with: a strategy that keeps some modules in eval mode
    (AR1 freezes its lower layers and their batch renormalisation so) gets the importance of
    the function it trained. Only a model found *entirely* in eval mode is switched to train
    mode for the pass.

Two implementations give the same result:

``"reference"``
    The straightforward loop: for every head, one forward and one ``backward()`` per minibatch
    at the reference minibatch size. After task ``k`` that is ``k + 1`` full forward/backward
    passes over the task's data.
``"fast"``
    One forward of the feature extractor per minibatch, shared by all heads. The classifier's
    input ``h`` is captured with a forward pre-hook on the model's multi-head classifier; each
    head's cotangent ``dL_j/dh`` is computed on a detached copy of ``h`` (only the small head
    runs again), and one backward per head from ``h`` reaches the feature parameters only. So
    the pass costs ``1`` forward plus ``k + 1`` feature-extractor backward passes instead of
    ``k + 1`` of each. Minibatches may be larger than the reference's: its *sum of per-minibatch
    means* is reproduced exactly at any batch size by weighting every sample by ``1 / size`` of
    the reference minibatch it would have been in (:func:`reference_sample_weights`).
    Optionally (``vectorize_heads=True``) the per-head backward passes run as one batched call
    (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the stacked
    cotangents), falling back to the loop if an operation has no batching rule.

    When a module uses the statistics of its minibatch in train mode (batch normalisation,
    batch renormalisation, any module that keeps statistics in plain tensor attributes), the
    importance depends on which samples share a minibatch. The fast pass then runs at the
    reference minibatch size whatever ``pass_batch_size`` says, and a minibatch that mixes
    task labels is not split: its current-head loss comes from one call with the per-sample
    labels (the model groups it as in training) and the old heads share one call with the
    whole minibatch, as in the reference.

    The summed gradients of all heads are held at once (``k + 1`` copies of the feature
    parameters after task ``k``). When they would exceed ``sum_memory_budget`` bytes, the heads
    are processed in groups that fit, one more forward per minibatch and group; each head's
    sum is computed by the same operations, so the result is the same bit for bit (without
    dropout: with it, each group's forward draws its own dropout masks).

With no dropout the two methods agree up to float rounding, and bit for bit (on CPU) when the
fast pass uses the reference batch size and the loop of per-head backward passes. Rounding
differences come from summing the gradients in another order; standardisation amplifies them
where a gradient sum cancels almost entirely (an untrained network's first layer fed zero-mean
noise, say), since such a sum is mostly rounding error. With dropout the two methods differ
in which random masks each head sees (here all heads share one).

Safety nets of the fast path: if there is no classifier to tap, if a feature parameter lives
inside it, or if the model's output is not the classifier's output on the captured features
(possibly padded with zero columns, as Avalanche's multi-task forward pads heads to a common
width; a model that post-processes its logits is not), the fast pass runs one shared-batch
forward per head instead (still feature-only gradients). That is also what it does with a
single head (the first task), where there is no forward to share. Sharing the features needs a
feature extractor that does not depend on the task label (a progressive network's column per
task does): before the first minibatch the fast pass checks that every head's call gives the
classifier the same input on a few samples (same random numbers for each call), and falls back
otherwise.

Summed gradients are accumulated in float32 (float64 for a float64 model), whatever the model's
dtype; ``gamma`` is float32. The per-sample weighted losses are summed in float64, except on a
device without float64 (Apple's MPS: float32 there, :func:`loss_dtype`).

The code: :func:`compute_gamma` here (arguments, the heads in groups, the running maximum of
``|z|``); the model's state in :mod:`._model_state`; calling convention, sample weights,
minibatches and argument checks in :mod:`._batches`; the reference loop and the shared-batch
loop in :mod:`._per_head`; the tapped fast pass in :mod:`._tapped`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from avalanche_spg.heads import missing_task_heads
from avalanche_spg.importance import standardized_importance
from avalanche_spg.importance_pass._batches import (
    GradReducer,
    ImportanceMethod,
    ModelForward,
    _check_count,
    _Pass,
    _pass_batches,
    _sum_dtype,
    avalanche_convention,
    check_pass_parameters,
    checked_positions,
    default_pass_batch_size,
    find_multihead_classifier,
    loss_dtype,
    reference_sample_weights,
    split_minibatch,
)
from avalanche_spg.importance_pass._model_state import (
    ModelState,
    enter_pass_mode,
    preserve_train_flags,
    preserved_model_state,
    uses_batch_statistics,
)
from avalanche_spg.importance_pass._per_head import _reference_loop
from avalanche_spg.importance_pass._tapped import _fast_loop

__all__ = [
    "ImportanceMethod",
    "GradReducer",
    "ModelForward",
    "ModelState",
    "compute_gamma",
    "avalanche_convention",
    "default_pass_batch_size",
    "reference_sample_weights",
    "loss_dtype",
    "find_multihead_classifier",
    "preserve_train_flags",
    "preserved_model_state",
    "enter_pass_mode",
    "split_minibatch",
    "uses_batch_statistics",
    "checked_positions",
    "check_pass_parameters",
]

#: Default bound on the bytes of the fast pass's per-head summed gradients held at once.
DEFAULT_SUM_MEMORY_BUDGET = 2 * 1024**3


def compute_gamma(
    model: nn.Module,
    dataset: Dataset,
    feature_params: Mapping[str, nn.Parameter],
    current_tasks: Sequence[int],
    previous_tasks: Sequence[int],
    *,
    device: torch.device | str,
    reference_batch_size: int,
    method: ImportanceMethod = "fast",
    pass_batch_size: int | None = None,
    indices: Sequence[int] | None = None,
    total_samples: int | None = None,
    grad_reducer: GradReducer | None = None,
    num_workers: int = 0,
    vectorize_heads: bool = False,
    forward: ModelForward | None = None,
    classifier: nn.Module | None | Literal["auto"] = "auto",
    sum_memory_budget: int | None = DEFAULT_SUM_MEMORY_BUDGET,
) -> dict[str, Tensor]:
    """Compute ``gamma`` (max over heads of ``|tanh(standardise(G))|``) for one experience.

    :param model: the model as it is at the end of the experience. It is left exactly as it was
        found (flags, buffers, plain attributes; see :class:`ModelState`); its ``.grad`` are
        zeroed (set to ``None``) before and after.
    :param dataset: the experience's training data, yielding ``[x, y]`` or
        ``[x, y, ..., task_labels]``.
    :param feature_params: the feature-extractor parameters, by name; importance is computed for
        these only.
    :param current_tasks: the task label(s) of the experience just trained: their samples use
        their own head with cross-entropy.
    :param previous_tasks: the task labels of earlier experiences (excluding current ones): each
        contributes the sum of its head's logits over the current data. Pass none for a model
        without task heads.
    :param device: where the forward/backward passes run.
    :param reference_batch_size: the minibatch size whose per-minibatch means are summed (the
        training minibatch size in the reference).
    :param method: ``"fast"`` (shared forward, feature-only gradients, larger batches) or
        ``"reference"`` (the straightforward per-head loop). See the module docstring.
    :param pass_batch_size: minibatch size of the fast pass (default:
        :func:`default_pass_batch_size`). The result does not depend on it (up to float
        rounding); ignored when a module uses batch statistics (see the module docstring).
    :param indices: positions in ``dataset`` this process handles (default: all). Weights are
        taken from the *global* position, so per-rank sums add up to the single-process sum.
    :param total_samples: size of the whole experience when ``indices`` is a shard.
    :param grad_reducer: called on each head's list of summed gradients before standardisation
        (e.g. an all-reduce across ranks).
    :param num_workers: DataLoader workers for the pass.
    :param vectorize_heads: fast pass only: run the per-head backward passes as one batched
        (``vmap``) call per minibatch instead of a loop. Same result up to rounding; off by
        default because whether it is faster depends on the model and the device (see
        ``benchmarks/results/perf.md``). Falls back to the loop if the model uses an
        operation without a batching rule.
    :param forward: the calling convention, ``forward(model, x, task_labels)`` with one label
        per sample. ``None``: Avalanche's (:func:`avalanche_convention`); older heads are then
        ignored for a model that takes no task labels.
    :param classifier: fast pass only: the multi-head classifier the model calls on the
        features shared by all heads, as ``classifier(features, task_labels)``; head ``j``'s
        logits are ``classifier(features, j)``. ``None``: no shared forward. ``"auto"``:
        Avalanche's single ``MultiHeadClassifier`` inside the model, if there is one.
    :param sum_memory_budget: fast pass only: the most bytes of per-head summed gradients held
        at once; heads are processed in groups that fit (at least one head per group). ``None``:
        all heads at once. Same result bit for bit (without dropout).
    :return: ``{name: gamma}`` for every feature parameter, float32, shaped like the parameter.
    :raises ValueError: naming the argument and the value, before the model is run: sizes that
        are not positive ints, ``feature_params`` that are not trainable parameters of
        ``model``, ``indices`` outside ``total_samples`` or repeated, ``previous_tasks``
        without a head in the model's ``MultiHeadClassifier``.
    """
    _check_count("reference_batch_size", reference_batch_size)
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
    if pass_batch_size is not None:
        _check_count("pass_batch_size", pass_batch_size)
    if sum_memory_budget is not None:
        _check_count("sum_memory_budget", sum_memory_budget)
    check_pass_parameters(model, feature_params)
    n_total, positions = checked_positions(dataset, indices, total_samples)
    current = [int(t) for t in current_tasks]
    previous = [int(t) for t in previous_tasks if int(t) not in current]
    if forward is None:
        forward, task_aware = avalanche_convention(model)
        previous = previous if task_aware else []
    for name, missing in missing_task_heads(model, previous).items():
        raise ValueError(
            f"previous_tasks {missing} have no head in the model's MultiHeadClassifier "
            f"{name!r}; the importance pass back-propagates every earlier head's logits"
        )
    if isinstance(classifier, str):
        if classifier != "auto":
            raise ValueError(f"classifier must be a module, None or 'auto', got {classifier!r}")
        classifier = find_multihead_classifier(model)
    device = torch.device(device)
    names = list(feature_params)
    params = [feature_params[n] for n in names]
    heads: list[int | None] = [*previous, None]  # None: "each sample's own (current) head"
    default_task = current[0] if current else 0

    max_abs_z: list[Tensor | None] = [None] * len(params)
    with preserved_model_state(model) as state, torch.enable_grad():
        enter_pass_mode(model)
        exact_batches = method == "reference" or uses_batch_statistics(model, state)
        if exact_batches:
            batch_size = reference_batch_size
        else:
            batch_size = pass_batch_size or default_pass_batch_size(reference_batch_size, device)
        batches = _pass_batches(
            dataset,
            positions,
            n_total,
            batch_size=batch_size,
            reference_batch_size=reference_batch_size,
            device=device,
            default_task=default_task,
            num_workers=num_workers,
        )
        run = _Pass(model, forward, state, batches, params, previous)

        def fold(head_sums: list[Tensor]) -> None:
            if grad_reducer is not None:
                grad_reducer(head_sums)
            for index, summed in enumerate(head_sums):
                max_abs_z[index] = _fold_abs_z(max_abs_z[index], summed)
            head_sums.clear()  # each head's sums are consumed (and freed) as soon as folded

        model.zero_grad(set_to_none=True)
        try:
            if method == "reference":
                for head in heads:  # one head's sums at a time
                    head_sums = _zero_sums(params)
                    _reference_loop(run, head, head_sums)
                    fold(head_sums)
            else:
                tap = classifier if len(heads) > 1 else None
                if tap is not None:
                    inside = {id(p) for p in tap.parameters()}
                    if any(id(p) in inside for p in params):
                        tap = None  # a "feature" parameter behind the tap: h would not reach it
                for group in _head_groups(len(heads), params, sum_memory_budget):
                    group_heads = [heads[i] for i in group]
                    sums = [_zero_sums(params) for _ in group_heads]
                    tap = _fast_loop(run, tap, group_heads, sums, vectorize_heads, exact_batches)
                    for head_sums in sums:
                        fold(head_sums)
        finally:
            model.zero_grad(set_to_none=True)

    gamma: dict[str, Tensor] = {}
    for name, param, value in zip(names, params, max_abs_z):
        if value is None:
            gamma[name] = standardized_importance(None, like=param)  # zeros
        else:
            gamma[name] = value.tanh_().clamp_(max=_below_one(value.device))
    return gamma


def _zero_sums(params: list[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros(p.shape, dtype=_sum_dtype(p), device=p.device) for p in params]


def _head_groups(n_heads: int, params: list[nn.Parameter], budget: int | None) -> list[list[int]]:
    """Consecutive groups of head indices whose summed gradients fit in ``budget`` bytes."""
    per_head = sum(p.numel() * _sum_dtype(p).itemsize for p in params)
    size = n_heads if budget is None or per_head == 0 else max(1, budget // per_head)
    return [list(range(i, min(n_heads, i + size))) for i in range(0, n_heads, size)]


def _below_one(device: torch.device) -> Tensor:
    one = torch.ones((), dtype=torch.float32, device=device)
    return torch.nextafter(one, torch.zeros_like(one))


def _fold_abs_z(running: Tensor | None, summed: Tensor) -> Tensor | None:
    """``max(running, |standardise(summed)|)``, in place in ``summed`` (which it consumes).

    :func:`avalanche_spg.importance.standardized_importance` computes, per head,
    ``|tanh((G - mean) / std)|`` clamped below 1, with all its guards, and the pass then takes
    the elementwise max over heads: about a dozen passes over every parameter per head, as
    many as the head's backward pass on a small experience makes. Here each head
    only contributes ``|z|`` to a running maximum and ``tanh``/clamp run once at the end:
    ``max_j |tanh(z_j)| = tanh(max_j |z_j|)`` since ``tanh`` is odd and increasing (and its
    float implementation is odd and monotone, so the values are the same). The operations on
    ``z`` are the same as there (``G.float()``, ``G.mean()``, ``G.std()``, subtract, divide).

    Usability as in ``docs/algorithm.md``: at least 2 elements, all finite, not all zero, std
    finite and > 0. A finite, positive std implies the other two (an infinite or NaN element
    makes the std NaN; all zeros make it 0), so only the std is checked. Unusable:
    ``running`` unchanged.
    """
    if summed.numel() < 2:
        return running
    z = summed.detach().float()
    std = z.std()
    if not (bool(torch.isfinite(std)) and float(std) > 0.0):
        return running
    z.sub_(z.mean()).div_(std).abs_()
    if running is None:
        return z
    return torch.maximum(running, z, out=running)
