"""SPG beyond the paper: one shared, growing classifier and no task labels (class-incremental).

The paper is task-incremental: one head per task, the task label known at test time. In a
class-incremental stream there is a single head whose rows are the classes seen so far.
``SPGPlugin(class_incremental=True)`` maps SPG onto it as follows, with *class groups* (the
classes of each experience) playing the role of task heads:

Feature extractor (every trainable parameter outside the classifier)
    As in the paper, with the logits of class group ``j`` in place of head ``j``: the current
    experience contributes the gradient of its ordinary loss (cross-entropy over the whole output,
    batch mean), and every earlier group contributes the gradient of the sum of *its classes'*
    logits over the current data. Each tensor is standardised, squashed with ``|tanh|`` and
    max-accumulated, exactly as in section 1 of ``docs/algorithm.md``.

Classifier rows (the parameters that :meth:`SPGPlugin.split_parameters` calls heads)
    The scalar head rule of the paper makes no sense for a head shared by all classes, so each
    class's row gets its own importance instead: after experience ``k`` the summed gradient of the
    current loss, restricted to the rows of ``k``'s classes, is standardised over those rows and
    squashed (``|tanh|``); rows of other classes get 0 from this experience. The accumulated
    maximum therefore protects the rows of old classes by *their own* importance (computed when
    they were learned), while rows of classes not seen yet (added when the classifier grows)
    start at importance 0 and are fully plastic. Rows are masked elementwise by ``1 - A`` like
    any feature tensor; no scalar head rule applies.

Everything is computed by the machinery of :mod:`avalanche_spg.importance_pass` (the model called
as training calls it, its state left as found) with the straightforward loop: one forward and
backward per group and reference minibatch, in float32, on the experience's own training data
(``docs/algorithm.md``, section 6).

Under ``torch.distributed`` each process takes the positions ``rank, rank + world, ...`` and the
summed gradients are added across processes before they are standardised, as in the
task-incremental pass (``docs/algorithm.md``, section 5, "Several processes"): a sample's
cross-entropy is weighted by ``1 / len(its reference minibatch)``, so the sum is the
single-process one. Modules that normalise with the statistics of their minibatch see other
minibatches on a shard than in one process, so only models without them get exactly the
single-process importance (up to rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from avalanche_spg.importance import standardized_importance
from avalanche_spg.importance_pass import (
    GradReducer,
    ModelForward,
    avalanche_convention,
    check_pass_parameters,
    checked_positions,
    enter_pass_mode,
    preserved_model_state,
)
from avalanche_spg.importance_pass._batches import _check_count, _Pass, _pass_batches
from avalanche_spg.importance_pass._per_head import _shared_batch_loop

__all__ = ["compute_gamma_class_incremental", "row_importance"]


def row_importance(grad: Tensor, rows: Sequence[int]) -> Tensor:
    """Importance of a classifier tensor whose first dimension indexes classes.

    ``|tanh(standardise(grad[rows]))|`` written into ``rows`` (standardised over the elements of
    those rows only); every other row is 0. Unusable gradients give 0, as everywhere.
    """
    out = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
    rows = [r for r in rows if 0 <= r < grad.shape[0]]
    if rows:
        index = torch.as_tensor(rows, device=grad.device)
        out[index] = standardized_importance(grad[index])
    return out


@dataclass(eq=False)
class _ClassGroups(_Pass):
    """The importance pass with class groups as heads: the current loss is the training loss
    (cross-entropy over the whole output, minibatch mean), an earlier group's loss the sum of
    its classes' logits (``head`` indexes ``groups``).

    On the reference minibatches (``reference_batches``) the current loss is the minibatch
    mean itself; on any other grouping of the samples (a shard of them) it is the same sum in
    per-sample form, each sample weighted by ``1 / len(its reference minibatch)``."""

    groups: list[list[int]]
    reference_batches: bool

    def current_loss(self, x: Tensor, y: Tensor, t: Tensor, w: Tensor) -> Tensor:
        if not self.reference_batches:
            return super().current_loss(x, y, t, w)
        return F.cross_entropy(self.call(x, t), y)

    def old_head_loss(self, x: Tensor, t: Tensor, head: int) -> Tensor:
        out = self.call(x, t)
        columns = [c for c in self.groups[head] if c < out.shape[1]]
        # No logit of the group yet: nothing to differentiate (skipped by the loop).
        return out[:, columns].sum() if columns else out.new_zeros(()).detach()


def compute_gamma_class_incremental(
    model: nn.Module,
    dataset: Dataset,
    feature_params: Mapping[str, nn.Parameter],
    row_params: Mapping[str, nn.Parameter],
    current_classes: Sequence[int],
    previous_groups: Sequence[Sequence[int]],
    *,
    device: torch.device | str,
    batch_size: int,
    num_workers: int = 0,
    forward: ModelForward | None = None,
    indices: Sequence[int] | None = None,
    total_samples: int | None = None,
    grad_reducer: GradReducer | None = None,
) -> dict[str, Tensor]:
    """``gamma`` of one class-incremental experience (see the module docstring).

    :param model: the model at the end of the experience (single head). Left exactly as it
        was found, and run in train mode as the importance pass does
        (:mod:`avalanche_spg.importance_pass`).
    :param dataset: the experience's training data, yielding ``[x, y]`` or
        ``[x, y, ..., task_labels]``.
    :param feature_params: parameters outside the classifier, by name.
    :param row_params: classifier parameters whose first dimension indexes classes, by name.
    :param current_classes: classes of the experience just trained.
    :param previous_groups: the classes of each earlier experience.
    :param device: where the passes run.
    :param batch_size: the reference minibatch size (per-minibatch mean losses are summed).
    :param num_workers: DataLoader workers.
    :param forward: the calling convention, ``forward(model, x, task_labels)`` with one label
        per sample (``None``: Avalanche's).
    :param indices: positions in ``dataset`` this process handles (default: all), as for
        :func:`avalanche_spg.importance_pass.compute_gamma`: each sample's cross-entropy is then
        weighted by its *global* reference minibatch, so per-process sums add up to the
        single-process sum.
    :param total_samples: size of the whole experience when ``indices`` is a shard.
    :param grad_reducer: called on every term's summed gradients (feature and row parameters)
        before they are standardised, e.g. a summing all-reduce across processes.
    :return: ``{name: gamma}`` for every feature and row parameter, float32.
    """
    _check_count("batch_size", batch_size)
    check_pass_parameters(model, {**feature_params, **row_params})
    n_total, positions = checked_positions(dataset, indices, total_samples)
    current = sorted({int(c) for c in current_classes})
    groups = [sorted({int(c) for c in g} - set(current)) for g in previous_groups]
    groups = [g for g in groups if g]
    feature_names = list(feature_params)
    row_names = list(row_params)
    all_params = [feature_params[n] for n in feature_names] + [row_params[n] for n in row_names]

    gamma: dict[str, Tensor] = {}

    def fold(name: str, value: Tensor) -> None:
        old = gamma.get(name)
        gamma[name] = value if old is None else torch.maximum(old, value)

    if forward is None:
        forward = avalanche_convention(model)[0]

    with preserved_model_state(model) as state, torch.enable_grad():
        enter_pass_mode(model)
        batches = _pass_batches(
            dataset,
            positions,
            n_total,
            batch_size=batch_size,
            reference_batch_size=batch_size,
            device=torch.device(device),
            default_task=0,
            num_workers=num_workers,
        )
        # All positions in order: the loader's minibatches are the reference minibatches.
        reference_batches = positions == list(range(n_total))
        run = _ClassGroups(
            model, forward, state, batches, all_params, [], groups, reference_batches
        )
        for group in [None, *range(len(groups))]:  # None: the current loss
            sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in all_params]
            model.zero_grad(set_to_none=True)
            _shared_batch_loop(run, [group], [sums])
            if grad_reducer is not None:
                grad_reducer(sums)
            for name, param, summed in zip(feature_names, all_params, sums):
                fold(name, standardized_importance(summed, like=param))
            if group is None:
                offset = len(feature_names)
                for i, name in enumerate(row_names):
                    fold(name, row_importance(sums[offset + i], current))
        model.zero_grad(set_to_none=True)
    for name, param in row_params.items():
        gamma.setdefault(name, torch.zeros(param.shape, dtype=torch.float32, device=param.device))
    return gamma
