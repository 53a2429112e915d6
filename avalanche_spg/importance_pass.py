"""The importance pass: per-head summed gradients over an experience, turned into ``gamma``.

Spec (``spg-algorithm.md`` §1, paper Section 3.1): after training experience ``k``, for every head
``j`` seen so far (the current one last), sum over all minibatches of ``k``'s training data the
gradient of

* the ordinary cross-entropy (batch mean) of head ``k`` when ``j`` is the current head, or
* the sum of all logits of head ``j`` when ``j`` is an older head,

standardise each feature tensor's summed gradient, squash with ``|tanh|`` and take the max over
heads. Two implementations give the same result:

``"reference"``
    The straightforward loop of the spec: one forward and one ``backward()`` per head per
    minibatch, at the reference minibatch size.
``"fast"``
    One forward per (larger) minibatch shared by all heads, then one gradient call per head that
    only reaches the feature parameters. The reference's *sum of per-minibatch means* is
    reproduced exactly at any batch size by weighting every sample by ``1 / size`` of the
    reference minibatch it would have been in. With dropout active the two paths differ only in
    which random masks each head sees (here all heads share one).

Both accumulate the summed gradients in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from avalanche_spg.importance import standardized_importance

__all__ = [
    "ImportanceMethod",
    "GradReducer",
    "compute_gamma",
    "reference_sample_weights",
    "find_multihead_classifier",
    "preserve_train_flags",
]

ImportanceMethod = Literal["fast", "reference"]
#: Called on each head's summed float32 gradients before standardisation, in place (the
#: distributed plugin sums them across ranks here).
GradReducer = Callable[[list[Tensor]], None]


@contextmanager
def preserve_train_flags(model: nn.Module, train: bool = True) -> Iterator[None]:
    """Put ``model`` in train (or eval) mode and restore every module's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def reference_sample_weights(positions: Sequence[int], batch_size: int, total: int) -> Tensor:
    """Per-sample weights ``1 / |reference minibatch|`` for the samples at ``positions``.

    The reference pass sums minibatch *means* over consecutive minibatches of ``batch_size`` of a
    dataset of ``total`` samples (the last minibatch may be smaller). The sample at position
    ``p`` belongs to minibatch ``p // batch_size``; its weight in that mean is returned, so that
    a weighted sum over any batching (or any shard of positions) reproduces the reference sum.
    """
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    batch_start = (pos // batch_size) * batch_size
    sizes = torch.clamp(total - batch_start, max=batch_size)
    return 1.0 / sizes.to(torch.float64)


def find_multihead_classifier(model: nn.Module) -> nn.Module | None:
    """The single Avalanche ``MultiHeadClassifier`` inside ``model``, or ``None``."""
    from avalanche.models import MultiHeadClassifier

    found = [m for m in model.modules() if isinstance(m, MultiHeadClassifier)]
    return found[0] if len(found) == 1 else None


def _split_batch(batch: Sequence[Any], default_task: int) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            "SPG's importance pass expects batches [x, y] or [x, y, task_label]; got "
            f"{type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if len(batch) >= 3 and isinstance(batch[2], Tensor):
        t = batch[2]
    else:
        t = torch.full((len(y),), default_task, dtype=torch.long)
    return x, y, t


def _forward(model: nn.Module, x: Tensor, task: int, multitask: bool) -> Tensor:
    return model(x, task_labels=task) if multitask else model(x)


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
) -> dict[str, Tensor]:
    """Compute ``gamma`` (max over heads of ``|tanh(standardise(G))|``) for one experience.

    :param model: the model as it is at the end of the experience. It is put in train mode for the
        pass and every module's own flag is restored afterwards; its ``.grad`` are zeroed before
        and after.
    :param dataset: the experience's training data, yielding ``[x, y]`` or ``[x, y, task]``.
    :param feature_params: the feature-extractor parameters, by name; importance is computed for
        these only.
    :param current_tasks: the task label(s) of the experience just trained: their samples use
        their own head with cross-entropy.
    :param previous_tasks: the task labels of earlier experiences (excluding current ones): each
        contributes the sum of its head's logits over the current data.
    :param device: where the forward/backward passes run.
    :param reference_batch_size: the minibatch size whose per-minibatch means are summed (the
        training minibatch size in the reference).
    :param method: ``"fast"`` (shared forward, feature-only gradients, larger batches) or
        ``"reference"`` (the straightforward per-head loop). See the module docstring.
    :param pass_batch_size: minibatch size of the fast pass (default: a multiple of the reference
        size near 512). The result does not depend on it (up to float rounding).
    :param indices: positions in ``dataset`` this process handles (default: all). Weights are
        taken from the *global* position, so per-rank sums add up to the single-process sum.
    :param total_samples: size of the whole experience when ``indices`` is a shard.
    :param grad_reducer: called on each head's list of summed gradients before standardisation
        (e.g. an all-reduce across ranks).
    :param num_workers: DataLoader workers for the pass.
    :return: ``{name: gamma}`` for every feature parameter, float32, shaped like the parameter.
    """
    if reference_batch_size < 1:
        raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
    from avalanche.models import MultiTaskModule

    names = list(feature_params)
    params = [feature_params[n] for n in names]
    multitask = isinstance(model, MultiTaskModule)
    current = [int(t) for t in current_tasks]
    previous = [int(t) for t in previous_tasks if int(t) not in current] if multitask else []
    heads: list[int | None] = [*previous, None]  # None: "each sample's own (current) head"
    default_task = current[0] if current else 0

    n_total = len(dataset) if total_samples is None else int(total_samples)  # type: ignore[arg-type]
    positions = list(range(n_total)) if indices is None else [int(i) for i in indices]
    if method == "reference":
        batch_size = reference_batch_size
    else:
        batch_size = pass_batch_size or reference_batch_size * max(1, 512 // reference_batch_size)
    subset = Subset(dataset, positions)
    collate = getattr(dataset, "collate_fn", None)
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers
    )
    weights_all = reference_sample_weights(positions, reference_batch_size, n_total)

    sums = [
        [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] for _ in heads
    ]
    with preserve_train_flags(model, True), torch.enable_grad():
        model.zero_grad(set_to_none=True)
        if method == "reference":
            _reference_loop(
                model,
                loader,
                params,
                heads,
                sums,
                device,
                default_task,
                multitask,
                weights_all,
                batch_size,
            )
        else:
            _fast_loop(
                model,
                loader,
                params,
                heads,
                sums,
                device,
                default_task,
                multitask,
                weights_all,
                batch_size,
            )
        model.zero_grad(set_to_none=True)

    gamma: dict[str, Tensor] = {}
    for head_sums in sums:
        if grad_reducer is not None:
            grad_reducer(head_sums)
        for name, param, summed in zip(names, params, head_sums):
            value = standardized_importance(summed, like=param)
            previous_value = gamma.get(name)
            gamma[name] = value if previous_value is None else torch.maximum(previous_value, value)
    return gamma


def _per_sample_current_loss(
    model: nn.Module, x: Tensor, y: Tensor, t: Tensor, multitask: bool
) -> Tensor:
    """Cross-entropy of every sample through its own head (reduction 'none')."""
    if not multitask:
        return F.cross_entropy(model(x), y, reduction="none")
    tasks = torch.unique(t)
    if len(tasks) == 1:
        return F.cross_entropy(model(x, task_labels=int(tasks[0])), y, reduction="none")
    losses = torch.empty(len(y), device=x.device)
    for task in tasks.tolist():
        mask = t == task
        losses[mask] = F.cross_entropy(
            model(x[mask], task_labels=int(task)), y[mask], reduction="none"
        ).float()
    return losses


def _reference_loop(
    model: nn.Module,
    loader: DataLoader,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    device: Any,
    default_task: int,
    multitask: bool,
    weights_all: Tensor,
    batch_size: int,
) -> None:
    for head, head_sums in zip(heads, sums):
        model.zero_grad(set_to_none=True)
        start = 0
        for batch in loader:
            x, y, t = _split_batch(batch, default_task)
            x, y, t = x.to(device), y.to(device), t.to(device)
            if head is None:
                # The reference's batch mean, in the per-sample form that also works when the
                # last batch is smaller: weights are 1/len(batch) for every sample here.
                w = weights_all[start : start + len(y)].to(device=device)
                loss = (_per_sample_current_loss(model, x, y, t, multitask).double() * w).sum()
            else:
                loss = _forward(model, x, head, multitask).sum()
            start += len(y)
            loss.backward()
            for param, acc in zip(params, head_sums):
                if param.grad is not None:
                    acc.add_(param.grad.float())
                    param.grad = None
        model.zero_grad(set_to_none=True)


def _fast_loop(
    model: nn.Module,
    loader: DataLoader,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    device: Any,
    default_task: int,
    multitask: bool,
    weights_all: Tensor,
    batch_size: int,
) -> None:
    classifier = find_multihead_classifier(model) if multitask else None
    old_heads = [h for h in heads if h is not None]
    if old_heads and classifier is None:
        # Without a MultiHeadClassifier to tap, old heads need their own forward each.
        _shared_forward_without_tap(
            model, loader, params, heads, sums, device, default_task, multitask, weights_all
        )
        return
    captured: list[Tensor] = []

    def grab_features(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    handle = classifier.register_forward_pre_hook(grab_features) if classifier else None
    try:
        start = 0
        for batch in loader:
            x, y, t = _split_batch(batch, default_task)
            x, y, t = x.to(device), y.to(device), t.to(device)
            w = weights_all[start : start + len(y)].to(device=device)
            start += len(y)
            captured.clear()
            current = (_per_sample_current_loss(model, x, y, t, multitask).double() * w).sum()
            losses: list[Tensor] = []
            for head in heads:
                if head is None:
                    losses.append(current)
                else:
                    assert classifier is not None
                    # One captured feature batch per task group; old heads see all of them.
                    losses.append(
                        sum(classifier.forward_single_task(h, head).sum() for h in captured)
                    )  # type: ignore[misc]
            _accumulate_head_grads(losses, params, sums)
    finally:
        if handle is not None:
            handle.remove()


def _shared_forward_without_tap(
    model: nn.Module,
    loader: DataLoader,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    device: Any,
    default_task: int,
    multitask: bool,
    weights_all: Tensor,
) -> None:
    start = 0
    for batch in loader:
        x, y, t = _split_batch(batch, default_task)
        x, y, t = x.to(device), y.to(device), t.to(device)
        w = weights_all[start : start + len(y)].to(device=device)
        start += len(y)
        losses = [
            (_per_sample_current_loss(model, x, y, t, multitask).double() * w).sum()
            if head is None
            else _forward(model, x, head, multitask).sum()
            for head in heads
        ]
        _accumulate_head_grads(losses, params, sums)


def _accumulate_head_grads(
    losses: list[Tensor], params: list[nn.Parameter], sums: list[list[Tensor]]
) -> None:
    for index, (loss, head_sums) in enumerate(zip(losses, sums)):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(
            loss, params, retain_graph=index < len(losses) - 1, allow_unused=True
        )
        for acc, grad in zip(head_sums, grads):
            if grad is not None:
                acc.add_(grad.float())
