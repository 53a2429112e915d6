"""The importance pass's inputs: how the model is called, which samples it sees in which
minibatches with which weight, and the checks of the pass's arguments.

The paper (Section 3.1) sums the per-minibatch *mean* losses over the experience's minibatches;
:func:`reference_sample_weights` gives every sample the weight of its reference minibatch, so
that any batching (and any shard of positions) reproduces that sum. :class:`_Pass` holds what
every loop of the pass needs and chooses each head's loss in one place (:meth:`_Pass.head_loss`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from avalanche_spg.importance import has_float64
from avalanche_spg.importance_pass._model_state import ModelState

__all__ = [
    "ImportanceMethod",
    "GradReducer",
    "ModelForward",
    "avalanche_convention",
    "find_multihead_classifier",
    "reference_sample_weights",
    "loss_dtype",
    "default_pass_batch_size",
    "split_minibatch",
    "check_pass_parameters",
    "checked_positions",
]

ImportanceMethod = Literal["fast", "reference"]
#: Called on each head's summed gradients before standardisation, in place (the distributed
#: plugin sums them across ranks here).
GradReducer = Callable[[list[Tensor]], None]
#: The calling convention: ``forward(model, x, task_labels)`` with one task label per sample,
#: as the training loop calls the model (Avalanche: ``avalanche_forward``).
ModelForward = Callable[[nn.Module, Tensor, Tensor], Tensor]

#: Default number of samples per minibatch of the fast pass, per device type. On a CPU, large
#: enough to amortise the per-minibatch overhead, small enough that a convolutional network's
#: activations stay in the caches; on a GPU larger batches amortise kernel launches and Python
#: overhead. The pass's cost is reported in ``benchmarks/results/perf.md``.
_TARGET_PASS_BATCH = {"cpu": 128, "cuda": 512}


def avalanche_convention(model: nn.Module) -> tuple[ModelForward, bool]:
    """Avalanche's calling convention and whether ``model`` takes task labels at all.

    ``avalanche.models.utils.avalanche_forward``: ``model(x, task_labels)`` for a
    ``MultiTaskModule`` (or a ``DistributedDataParallel`` around one), ``model(x)`` otherwise.
    """
    from avalanche.models.utils import avalanche_forward, is_multi_task_module

    return avalanche_forward, bool(is_multi_task_module(model))


def find_multihead_classifier(model: nn.Module) -> nn.Module | None:
    """The single Avalanche ``MultiHeadClassifier`` inside ``model``, or ``None``."""
    from avalanche.models import MultiHeadClassifier

    found = [m for m in model.modules() if isinstance(m, MultiHeadClassifier)]
    return found[0] if len(found) == 1 else None


def reference_sample_weights(
    positions: Sequence[int], batch_size: int, total: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per-sample weights ``1 / |reference minibatch|`` for the samples at ``positions``.

    The reference pass sums minibatch *means* over consecutive minibatches of ``batch_size`` of a
    dataset of ``total`` samples (the last minibatch may be smaller). The sample at position
    ``p`` belongs to minibatch ``p // batch_size``; its weight in that mean is returned, so that
    a weighted sum over any batching (or any shard of positions) reproduces the reference sum.
    Weights are ``dtype`` (:func:`loss_dtype` of the device the pass runs on).
    """
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    batch_start = (pos // batch_size) * batch_size
    sizes = torch.clamp(total - batch_start, max=batch_size)
    return 1.0 / sizes.to(dtype)


def loss_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of the pass's weighted loss sums on ``device``: float64, or float32 on a
    device without float64 (Apple's MPS), where a float64 tensor cannot exist."""
    return torch.float64 if has_float64(torch.device(device)) else torch.float32


def default_pass_batch_size(reference_batch_size: int, device: torch.device | str) -> int:
    """The fast pass's default minibatch size: a multiple of the reference size near a
    per-device target (128 samples on CPU, 512 on a GPU)."""
    target = _TARGET_PASS_BATCH.get(torch.device(device).type, 512)
    return reference_batch_size * max(1, target // reference_batch_size)


def split_minibatch(batch: Sequence[Any], default_task: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, task labels)`` of a minibatch; the task labels are its last element, as
    Avalanche reads them (``[x, y]``: every sample of ``default_task``)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            "SPG's importance pass expects minibatches [x, y] or [x, y, ..., task_labels]; got "
            f"{type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if len(batch) < 3:
        return x, y, torch.full((len(y),), default_task, dtype=torch.long)
    t = batch[-1]
    if (
        not isinstance(t, Tensor)
        or t.shape != (len(y),)
        or t.dtype.is_floating_point
        or t.dtype.is_complex
    ):
        described = (
            f"a {t.dtype} tensor of shape {tuple(t.shape)}"
            if isinstance(t, Tensor)
            else type(t).__name__
        )
        raise ValueError(
            "SPG's importance pass reads a minibatch's task labels from its last element (as "
            f"Avalanche does); expected an integer tensor of {len(y)} labels, got {described}"
        )
    return x, y, t


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_pass_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """``ValueError`` naming them unless every tensor of ``params`` is a parameter of ``model``
    that requires a gradient: another model's parameter (a copy) never gets a gradient from
    this model's loss, so its importance would be 0, silently."""
    own = {id(p) for p in model.parameters()}
    foreign = [name for name, p in params.items() if id(p) not in own]
    if foreign:
        raise ValueError(
            f"feature_params holds tensors that are not parameters of the model: {foreign[:5]} "
            "(of a copy of the model, say); their importance would be 0"
        )
    frozen = [name for name, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"feature_params holds parameters that do not require a gradient: {frozen[:5]}; "
            "pass trainable parameters only"
        )


def checked_positions(
    dataset: Any, indices: Sequence[int] | None, total_samples: int | None
) -> tuple[int, list[int]]:
    """``(size of the experience, positions this process handles)`` of an importance pass,
    checked: ``total_samples`` (default ``len(dataset)``) at most ``len(dataset)``, and
    ``indices`` (default all) distinct positions below it. A position outside, or twice,
    would give samples the weight of another reference minibatch, or count them twice."""
    size = len(dataset)
    if total_samples is None:
        n_total = size
    else:
        _check_count("total_samples", total_samples, minimum=0)
        if total_samples > size:
            raise ValueError(f"total_samples={total_samples} exceeds the dataset's {size} samples")
        n_total = total_samples
    if indices is None:
        return n_total, list(range(n_total))
    positions = []
    for position in indices:
        try:
            positions.append(operator.index(position))
        except TypeError:
            raise ValueError(f"indices must be ints, got {position!r}") from None
    outside = [i for i in positions if not 0 <= i < n_total]
    if outside:
        raise ValueError(
            f"indices must be positions in [0, {n_total}) (total_samples), got {outside[:5]}"
        )
    if len(set(positions)) != len(positions):
        repeated = sorted({i for i in positions if positions.count(i) > 1})
        raise ValueError(f"indices must be distinct, got {repeated[:5]} more than once")
    return n_total, positions


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
            x, y, t = split_minibatch(batch, self.default_task)
            # The distinct tasks are read on the host, before the transfer: no device sync.
            tasks = torch.unique(t.cpu()).tolist()
            x = x.to(self.device)
            y = y.to(self.device)
            t = t.to(self.device)
            w = self.weights[start : start + len(y)]
            start += len(y)
            yield x, y, t, w, tasks


def _pass_batches(
    dataset: Dataset,
    positions: list[int],
    n_total: int,
    *,
    batch_size: int,
    reference_batch_size: int,
    device: torch.device,
    default_task: int,
    num_workers: int,
) -> _Batches:
    """The pass's minibatches of ``batch_size`` over ``dataset``'s ``positions`` (in order),
    every sample weighted by its reference minibatch of ``reference_batch_size`` among the
    ``n_total`` samples of the experience (:func:`reference_sample_weights`)."""
    loader = DataLoader(
        Subset(dataset, positions),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=getattr(dataset, "collate_fn", None),
        num_workers=num_workers,
    )
    weights = reference_sample_weights(
        positions, reference_batch_size, n_total, dtype=loss_dtype(device)
    )
    return _Batches(loader, weights, device, default_task)


@dataclass(eq=False)
class _Pass:
    """What every loop of the pass needs: the model call and the feature parameters."""

    model: nn.Module
    forward: ModelForward
    state: ModelState
    batches: _Batches
    params: list[nn.Parameter]
    old_heads: list[int]
    #: Whether the fast pass has checked that all heads see the same features (once per
    #: pass, for every old head, whatever the grouping of the heads).
    probed: bool = field(default=False, init=False)

    def call(self, x: Tensor, task_labels: Tensor) -> Tensor:
        """The model's output, called by the convention, on the state of the snapshot."""
        self.state.reset_volatile()
        return self.forward(self.model, x, task_labels)

    def current_loss(self, x: Tensor, y: Tensor, t: Tensor, w: Tensor) -> Tensor:
        """The reference's batch-mean cross-entropy in per-sample form, ``sum_i w_i CE_i``
        (``w_i``: ``1 / len(reference minibatch)``): exact for a smaller last minibatch and
        any batching of the samples."""
        return (F.cross_entropy(self.call(x, t), y, reduction="none").to(w.dtype) * w).sum()

    def old_head_loss(self, x: Tensor, t: Tensor, head: int) -> Tensor:
        """Sum of all logits of head ``head`` (every sample labelled ``head``)."""
        return self.call(x, torch.full_like(t, head)).sum()

    def head_loss(self, x: Tensor, y: Tensor, t: Tensor, w: Tensor, head: int | None) -> Tensor:
        """The loss whose gradient is summed for ``head`` (Section 3.1): the current loss for
        ``None``, an older head's logit sum otherwise. The one place that chooses."""
        return self.current_loss(x, y, t, w) if head is None else self.old_head_loss(x, t, head)
