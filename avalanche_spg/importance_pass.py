"""The importance pass: per-head summed gradients over an experience, turned into ``gamma``.

Spec (``spg-algorithm.md`` §1, paper Section 3.1): after training experience ``k``, for every head
``j`` seen so far (the current one last), sum over all minibatches of ``k``'s training data the
gradient of

* the ordinary cross-entropy (batch mean) of head ``k`` when ``j`` is the current head, or
* the sum of all logits of head ``j`` when ``j`` is an older head,

standardise each feature tensor's summed gradient, squash with ``|tanh|`` and take the max over
heads. Two implementations give the same result:

``"reference"``
    The straightforward loop of the spec: for every head, one forward and one ``backward()``
    per minibatch at the reference minibatch size. After task ``k`` that is ``k + 1`` full
    forward/backward passes over the task's data.
``"fast"``
    One forward of the feature extractor per minibatch, shared by all heads. The classifier's
    input ``h`` is captured with a forward pre-hook on the model's ``MultiHeadClassifier``; each
    head's cotangent ``dL_j/dh`` is computed on a detached copy of ``h`` (only the small head
    runs again), and one backward per head from ``h`` reaches the feature parameters only. So
    the pass costs ``1`` forward plus ``k + 1`` feature-extractor backward passes instead of
    ``k + 1`` of each. Minibatches may be larger than the reference's: its *sum of per-minibatch
    means* is reproduced exactly at any batch size by weighting every sample by ``1 / size`` of
    the reference minibatch it would have been in (:func:`reference_sample_weights`).
    Optionally (``vectorize_heads=True``) the per-head backward passes run as one batched call
    (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the stacked
    cotangents), falling back to the loop if an operation has no batching rule.

With no dropout the two methods agree up to float rounding, and bit for bit (on CPU) when the
fast pass uses the reference batch size and the loop of per-head backward passes. Rounding
differences come from summing the gradients in another order, and a gradient sum with heavy
cancellation amplifies them (measured: about 1e-6 on digit images; 1e-5 and more for an
untrained CNN fed zero-mean Gaussian noise, whose first-layer sums cancel almost entirely).
With dropout the two methods differ in which random masks each head sees (here all heads share
one).

Safety nets of the fast path: if the model has no single ``MultiHeadClassifier``, if a feature
parameter lives inside it, or if the model's output is not the classifier's output on the
captured features (a model that post-processes its logits), the fast pass runs one shared-batch
forward per head instead (still larger minibatches and feature-only gradients). That is also
what it does with a single head (the first task), where there is no forward to share.

Summed gradients are accumulated in float32 (float64 for a float64 model), whatever the model's
dtype; ``gamma`` is float32.
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
    "default_pass_batch_size",
    "reference_sample_weights",
    "find_multihead_classifier",
    "preserve_train_flags",
]

ImportanceMethod = Literal["fast", "reference"]
#: Called on each head's summed gradients before standardisation, in place (the distributed
#: plugin sums them across ranks here).
GradReducer = Callable[[list[Tensor]], None]

#: Default number of samples per minibatch of the fast pass, per device type. Measured on CPU
#: after task 9 (pass time, reference batch 64): the AlexNet-like CNN is fastest at 128 (64:
#: 10 % slower, 256 and 512: 25-30 % slower, its activations outgrow the caches), the MLP
#: gains up to 512 (128: 1.3x faster than 64). On a GPU larger batches amortise kernel
#: launches and Python overhead.
_TARGET_PASS_BATCH = {"cpu": 128, "cuda": 512}
#: With ``vectorize_heads``, at most this many cotangent rows (heads x samples) per batched
#: backward call, which bounds the memory of the batched activation gradients.
_MAX_BATCHED_ROWS = 4096


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


def default_pass_batch_size(reference_batch_size: int, device: torch.device | str) -> int:
    """The fast pass's default minibatch size: a multiple of the reference size near a
    per-device target (128 samples on CPU, 512 on a GPU)."""
    target = _TARGET_PASS_BATCH.get(torch.device(device).type, 512)
    return reference_batch_size * max(1, target // reference_batch_size)


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


def _sum_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


class _Batches:
    """The pass's minibatches on the device, with the reference weight of every sample."""

    def __init__(
        self,
        loader: DataLoader,
        weights: Tensor,
        device: torch.device,
        default_task: int,
    ) -> None:
        self.loader = loader
        self.weights = weights.to(device)  # moved once, not per batch
        self.device = device
        self.default_task = default_task

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, list[int]]]:
        """``(x, y, task labels, weights, sorted distinct task labels)`` per minibatch."""
        start = 0
        for batch in self.loader:
            x, y, t = _split_batch(batch, self.default_task)
            # The distinct tasks are read on the host, before the transfer: no device sync.
            tasks = torch.unique(t.cpu()).tolist()
            x = x.to(self.device)
            y = y.to(self.device)
            t = t.to(self.device)
            w = self.weights[start : start + len(y)]
            start += len(y)
            yield x, y, t, w, tasks


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
    :param pass_batch_size: minibatch size of the fast pass (default:
        :func:`default_pass_batch_size`). The result does not depend on it (up to float
        rounding).
    :param indices: positions in ``dataset`` this process handles (default: all). Weights are
        taken from the *global* position, so per-rank sums add up to the single-process sum.
    :param total_samples: size of the whole experience when ``indices`` is a shard.
    :param grad_reducer: called on each head's list of summed gradients before standardisation
        (e.g. an all-reduce across ranks).
    :param num_workers: DataLoader workers for the pass.
    :param vectorize_heads: fast pass only: run the per-head backward passes as one batched
        (``vmap``) call per minibatch instead of a loop. Same result up to rounding; measured
        slower than the loop on CPU, not yet measured on GPU (hence off by default). Falls
        back to the loop if the model uses an operation without a batching rule.
    :return: ``{name: gamma}`` for every feature parameter, float32, shaped like the parameter.
    """
    if reference_batch_size < 1:
        raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
    if pass_batch_size is not None and pass_batch_size < 1:
        raise ValueError(f"pass_batch_size must be >= 1 or None, got {pass_batch_size}")
    from avalanche.models import MultiTaskModule

    device = torch.device(device)
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
        batch_size = pass_batch_size or default_pass_batch_size(reference_batch_size, device)
    subset = Subset(dataset, positions)
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=getattr(dataset, "collate_fn", None),
        num_workers=num_workers,
    )
    batches = _Batches(
        loader,
        reference_sample_weights(positions, reference_batch_size, n_total),
        device,
        default_task,
    )

    sums = [
        [torch.zeros(p.shape, dtype=_sum_dtype(p), device=p.device) for p in params] for _ in heads
    ]
    with preserve_train_flags(model, True), torch.enable_grad():
        model.zero_grad(set_to_none=True)
        if method == "reference":
            _reference_loop(model, batches, params, heads, sums, multitask)
        else:
            _fast_loop(model, batches, params, heads, sums, multitask, vectorize_heads)
        model.zero_grad(set_to_none=True)

    max_abs_z: list[Tensor | None] = [None] * len(params)
    for head_sums in sums:
        if grad_reducer is not None:
            grad_reducer(head_sums)
        for index, summed in enumerate(head_sums):
            max_abs_z[index] = _fold_abs_z(max_abs_z[index], summed)
        head_sums.clear()  # each head's sums are consumed (and freed) as soon as folded
    gamma: dict[str, Tensor] = {}
    for name, param, value in zip(names, params, max_abs_z):
        if value is None:
            gamma[name] = standardized_importance(None, like=param)  # zeros
        else:
            gamma[name] = value.tanh_().clamp_(max=_below_one(value.device))
    return gamma


def _below_one(device: torch.device) -> Tensor:
    one = torch.ones((), dtype=torch.float32, device=device)
    return torch.nextafter(one, torch.zeros_like(one))


def _fold_abs_z(running: Tensor | None, summed: Tensor) -> Tensor | None:
    """``max(running, |standardise(summed)|)``, in place in ``summed`` (which it consumes).

    :func:`avalanche_spg.importance.standardized_importance` computes, per head,
    ``|tanh((G - mean) / std)|`` clamped below 1, with all its guards, and the pass then takes
    the elementwise max over heads: about a dozen passes over every parameter per head, which
    after task 9 cost as much as the backward passes of a small experience. Here each head
    only contributes ``|z|`` to a running maximum and ``tanh``/clamp run once at the end:
    ``max_j |tanh(z_j)| = tanh(max_j |z_j|)`` since ``tanh`` is odd and increasing (and its
    float implementation is odd and monotone, so the values are the same). The operations on
    ``z`` are the same as there (``G.float()``, ``G.mean()``, ``G.std()``, subtract, divide).

    Usability is the spec's: at least 2 elements, all finite, not all zero, std finite and
    > 0. A finite, positive std implies the other two (an infinite or NaN element makes the
    std NaN; all zeros make it 0), so only the std is checked. Unusable: ``running``
    unchanged.
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


# ----------------------------------------------------------------------------- reference loop
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


def _current_loss(
    model: nn.Module, x: Tensor, y: Tensor, t: Tensor, w: Tensor, multitask: bool
) -> Tensor:
    """The reference's batch mean in per-sample form: ``sum_i w_i * CE_i`` (``w_i`` is
    ``1 / len(reference minibatch)``), which also handles a smaller last minibatch and any
    batching of the samples."""
    return (_per_sample_current_loss(model, x, y, t, multitask).double() * w).sum()


def _reference_loop(
    model: nn.Module,
    batches: _Batches,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    multitask: bool,
) -> None:
    for head, head_sums in zip(heads, sums):
        model.zero_grad(set_to_none=True)
        for x, y, t, w, _ in batches:
            if head is None:
                loss = _current_loss(model, x, y, t, w, multitask)
            else:
                loss = _forward(model, x, head, multitask).sum()
            loss.backward()
            for param, acc in zip(params, head_sums):
                if param.grad is not None:
                    acc.add_(param.grad)
                    param.grad = None
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- fast path
class _TapMismatch(Exception):
    """The model's output is not its classifier's output on the captured features."""


def _fast_loop(
    model: nn.Module,
    batches: _Batches,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    multitask: bool,
    vectorize_heads: bool,
) -> None:
    # With a single head there is no forward to share: the plain loop has less overhead.
    classifier = find_multihead_classifier(model) if multitask and len(heads) > 1 else None
    if classifier is not None:
        inside = {id(p) for p in classifier.parameters()}
        if any(id(p) in inside for p in params):
            classifier = None  # a "feature" parameter behind the tap: h would not reach it
    if classifier is not None:
        try:
            _tapped_loop(model, classifier, batches, params, heads, sums, vectorize_heads)
            return
        except _TapMismatch:
            for head_sums in sums:
                torch._foreach_zero_(head_sums)
            model.zero_grad(set_to_none=True)
    _shared_batch_loop(model, batches, params, heads, sums, multitask)


def _tapped_loop(
    model: nn.Module,
    classifier: Any,  # avalanche.models.MultiHeadClassifier
    batches: _Batches,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    vectorize_heads: bool,
) -> None:
    captured: list[Tensor] = []

    def grab_features(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    vectorize = [vectorize_heads and len(heads) > 1]
    handle = classifier.register_forward_pre_hook(grab_features)
    try:
        for x, y, t, w, tasks in batches:
            features: list[Tensor] = []  # one graph per task group of the minibatch
            cotangents: list[list[Tensor]] = [[] for _ in heads]
            for task in tasks:
                if len(tasks) == 1:
                    xg, yg, wg = x, y, w
                else:
                    rows = (t == task).nonzero().squeeze(1)
                    xg, yg, wg = x[rows], y[rows], w[rows]
                captured.clear()
                out = model(xg, task_labels=int(task))
                if len(captured) != 1:
                    raise _TapMismatch
                h = captured[0]
                captured.clear()
                head_input = h.detach().requires_grad_(True)
                own = classifier.forward_single_task(head_input, int(task))
                if own.shape != out.shape or not torch.allclose(
                    own.detach(), out.detach(), rtol=1e-5, atol=1e-6
                ):
                    raise _TapMismatch
                del out
                for index, head in enumerate(heads):
                    if head is None:
                        # The current head's loss, on the logits just checked to be the model's.
                        loss = (F.cross_entropy(own, yg, reduction="none").double() * wg).sum()
                    else:
                        loss = classifier.forward_single_task(head_input, head).sum()
                    (grad,) = torch.autograd.grad(loss, head_input, allow_unused=True)
                    cotangents[index].append(torch.zeros_like(h) if grad is None else grad)
                features.append(h)
            _feature_backward(features, cotangents, params, sums, vectorize)
    finally:
        handle.remove()


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


def _add_grads(head_sums: list[Tensor], grads: list[Tensor | None]) -> None:
    pairs = [(acc, g) for acc, g in zip(head_sums, grads) if g is not None]
    if not pairs:
        return
    accs = [acc for acc, _ in pairs]
    values = [g if g.dtype == acc.dtype else g.to(acc.dtype) for acc, g in pairs]
    torch._foreach_add_(accs, values)


def _shared_batch_loop(
    model: nn.Module,
    batches: _Batches,
    params: list[nn.Parameter],
    heads: list[int | None],
    sums: list[list[Tensor]],
    multitask: bool,
) -> None:
    """Without a classifier to tap: one forward per head on the (larger) minibatch, gradients
    of the feature parameters only."""
    for x, y, t, w, _ in batches:
        for index, head in enumerate(heads):
            if head is None:
                loss = _current_loss(model, x, y, t, w, multitask)
            else:
                loss = _forward(model, x, head, multitask).sum()
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            _add_grads(sums[index], list(grads))
